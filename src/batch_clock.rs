//! The batch clock: the batch boundaries that the block generators and the scheduler share.
//!
//! ```text
//!  origin ──────┬──────────┬──────────┬───► time
//!          boundary 1  boundary 2  boundary 3      (origin + k × batch interval)
//!  generators:  cut the block in progress at each boundary, mark it "boundary k delivered"
//!  scheduler:   at boundary k, allocates the blocks cut up to it (waiting briefly for the marks)
//! ```
//!
//! A block never straddles two batches: the last block of a batch is cut at its boundary, so a
//! record waits at most one batch interval (not a block interval more) before its batch is cut.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::block::BatchId;

/// Batch `k` (k ≥ 1) ends at `origin + k × interval`; its id is that time in ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchClock {
    origin: Instant,
    origin_sys: SystemTime,
    interval: Duration,
}

impl BatchClock {
    /// Boundaries every `interval` from now, with ids after `after_ms` (the last id a previous
    /// run used).
    pub(crate) fn new(interval: Duration, after_ms: u64) -> BatchClock {
        BatchClock {
            origin: Instant::now(),
            origin_sys: SystemTime::now().max(UNIX_EPOCH + Duration::from_millis(after_ms + 1)),
            interval,
        }
    }

    /// The batch interval.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// When boundary `k` falls.
    pub(crate) fn deadline(&self, k: u32) -> Instant {
        self.origin + self.interval * k
    }

    /// Boundary `k`'s batch time.
    pub(crate) fn time(&self, k: u32) -> SystemTime {
        self.origin_sys + self.interval * k
    }

    /// Boundary `k`'s batch id.
    pub(crate) fn id(&self, k: u32) -> BatchId {
        batch_id(self.time(k))
    }

    /// The time of the last boundary before `k` (the origin for `k` = 1).
    pub(crate) fn previous_time(&self, k: u32) -> SystemTime {
        self.origin_sys + self.interval * k.saturating_sub(1)
    }
}

/// A batch time as a batch id (ms since the epoch).
pub(crate) fn batch_id(t: SystemTime) -> BatchId {
    BatchId(
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn boundaries_are_evenly_spaced_and_ids_increase_after_the_previous_run() {
        let c = BatchClock::new(Duration::from_millis(500), 4_000_000_000_000);
        assert_eq!(c.deadline(2) - c.deadline(1), Duration::from_millis(500));
        assert!(c.id(1).0 > 4_000_000_000_000);
        assert_eq!(c.id(2).0 - c.id(1).0, 500);
        assert_eq!(c.previous_time(1), c.time(0));
    }
}
