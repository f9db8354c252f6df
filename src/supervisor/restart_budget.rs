//! The per-child restart budget: a sliding window over the times of recent restarts.
//!
//! ```text
//!   window = 60 s, max = 3          now
//!   ──[ r1 ]────[ r2 ]──[ r3 ]───────┤   r1..r3 within (now - 60 s, now]: 4th restart denied
//!   ───────────[ r2 ]──[ r3 ]────────────────┤  r1 left the window: allowed again
//! ```
//!
//! Time comes from `tokio::time::Instant`, so tests drive it with the paused clock.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::supervisor::decider::RestartLimit;

/// Why a restart was refused: the number of restarts already in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exhausted {
    pub(crate) in_window: u32,
}

/// Restart times of one child within the current window. Memory is bounded by `max_restarts`.
#[derive(Debug)]
pub(crate) struct RestartBudget {
    limit: RestartLimit,
    restarts: VecDeque<Instant>,
}

impl RestartBudget {
    pub(crate) fn new(limit: RestartLimit) -> Self {
        RestartBudget {
            limit,
            restarts: VecDeque::new(),
        }
    }

    /// Asks for one restart at `now`. On success the restart is counted and the number of
    /// restarts in the window (including this one) is returned.
    pub(crate) fn try_restart(&mut self, now: Instant) -> Result<u32, Exhausted> {
        match self.limit {
            RestartLimit::Unlimited => Ok(1),
            RestartLimit::Windowed {
                max_restarts,
                window,
            } => {
                while let Some(&oldest) = self.restarts.front() {
                    if now.saturating_duration_since(oldest) >= window {
                        self.restarts.pop_front();
                    } else {
                        break;
                    }
                }
                let in_window = u32::try_from(self.restarts.len()).unwrap_or(u32::MAX);
                if in_window >= max_restarts {
                    return Err(Exhausted { in_window });
                }
                self.restarts.push_back(now);
                Ok(in_window + 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limit(max_restarts: u32, secs: u64) -> RestartLimit {
        RestartLimit::Windowed {
            max_restarts,
            window: Duration::from_secs(secs),
        }
    }

    #[test]
    fn eleventh_restart_within_window_is_refused() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(limit(10, 60));
        for i in 1..=10 {
            assert_eq!(b.try_restart(t0 + Duration::from_secs(i)), Ok(i as u32));
        }
        assert_eq!(
            b.try_restart(t0 + Duration::from_secs(59)),
            Err(Exhausted { in_window: 10 })
        );
    }

    #[test]
    fn budget_returns_as_old_restarts_leave_the_window() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(limit(2, 10));
        assert!(b.try_restart(t0).is_ok());
        assert!(b.try_restart(t0 + Duration::from_secs(5)).is_ok());
        assert!(b.try_restart(t0 + Duration::from_secs(9)).is_err());
        // t0 leaves the window at t0 + 10 s; the one at +5 s is still in it.
        assert_eq!(b.try_restart(t0 + Duration::from_secs(10)), Ok(2));
        assert!(b.try_restart(t0 + Duration::from_secs(11)).is_err());
    }

    #[test]
    fn refused_restarts_do_not_count() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(limit(1, 10));
        assert!(b.try_restart(t0).is_ok());
        for s in 1..10 {
            assert!(b.try_restart(t0 + Duration::from_secs(s)).is_err());
        }
        assert_eq!(b.try_restart(t0 + Duration::from_secs(10)), Ok(1));
    }

    #[test]
    fn zero_max_never_restarts_and_unlimited_always_does() {
        let t0 = Instant::now();
        assert!(RestartBudget::new(limit(0, 10)).try_restart(t0).is_err());
        let mut b = RestartBudget::new(RestartLimit::Unlimited);
        for _ in 0..1000 {
            assert!(b.try_restart(t0).is_ok());
        }
    }
}
