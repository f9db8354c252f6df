//! The DirectPlanner: each batch's offset ranges, decided by the driver before it runs.
//!
//! ```text
//!  batch boundary ──► per direct stream: partitions ──► per partition:
//!     from = the end of the last logged range (or the source's start offset)
//!     until = DirectSource::plan(from, at most rate × interval records, at most a block)
//!  ──► ranges ──► logged with the batch (ReceiverTracker::allocate) ──► commit: next from = until
//! ```
//!
//! Nothing advances until the batch's allocation is logged: a batch that could not be logged
//! does not exist, and the next one plans from the same offsets. A source that is unavailable
//! is retried at later boundaries with backoff (its records wait in the source); any other
//! source error ends the context, naming the partition and offsets.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::direct::{
    DirectRange, DirectStreams, NextOffsets, OffsetRange, RangeLimits, SourceError,
};
use crate::driver::rate_controller::RateController;

/// A direct stream's source failed in a way that retrying will not fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("direct stream `{stream}`: {error}")]
pub(crate) struct PlanError {
    pub(crate) stream: String,
    pub(crate) error: String,
}

/// Plans the ranges of the job's direct streams.
#[derive(Debug)]
pub(crate) struct DirectPlanner {
    streams: DirectStreams,
    next: NextOffsets,
    interval: Duration,
    rates: Option<RateController>,
    max_bytes: usize,
    /// Per stream: consecutive boundaries the source was unavailable at, and boundaries to
    /// skip before trying again.
    backoff: BTreeMap<u32, (u32, u32)>,
}

/// Ranges of one partition a batch holds at most (each up to a block): a batch of a
/// partition with a long backlog and no rate limit stops there; the next batch goes on.
const MAX_RANGES_PER_BATCH: usize = 64;

/// Boundaries skipped at most between two attempts at an unavailable source.
const MAX_SKIPPED: u32 = 32;

impl DirectPlanner {
    pub(crate) fn new(
        streams: DirectStreams,
        next: NextOffsets,
        interval: Duration,
        rates: Option<RateController>,
        max_bytes: usize,
    ) -> Self {
        DirectPlanner {
            streams,
            next,
            interval,
            rates,
            max_bytes,
            backoff: BTreeMap::new(),
        }
    }

    /// Whether the job has direct streams.
    pub(crate) fn is_empty(&self) -> bool {
        self.streams.0.is_empty()
    }

    /// The ranges of the next batch (empty ranges left out). Not committed: call
    /// [`commit`](Self::commit) once the batch is logged.
    pub(crate) async fn plan(&mut self) -> Result<Vec<DirectRange>, PlanError> {
        let mut out = Vec::new();
        let streams = self.streams.clone();
        for s in streams.0.iter() {
            if let Some((_, skip)) = self.backoff.get_mut(&s.stream) {
                if *skip > 0 {
                    *skip -= 1;
                    continue;
                }
            }
            match self.plan_stream(s.stream).await {
                Ok(mut ranges) => {
                    if let Some((failures, _)) = self.backoff.remove(&s.stream) {
                        tracing::info!(stream = %s.name, failures, "direct source available again");
                    }
                    out.append(&mut ranges);
                }
                Err(e) if e.is_retryable() => {
                    let entry = self.backoff.entry(s.stream).or_insert((0, 0));
                    entry.0 += 1;
                    entry.1 = (1u32 << entry.0.min(5)).min(MAX_SKIPPED) - 1;
                    metrics::counter!(crate::telemetry::DIRECT_SOURCE_UNAVAILABLE_TOTAL, "stream" => s.name.clone())
                        .increment(1);
                    tracing::warn!(stream = %s.name, error = %e, failures = entry.0, skip = entry.1, "direct source unavailable; its records wait, trying again at a later batch");
                }
                Err(e) => {
                    tracing::error!(stream = %s.name, error = %e, "direct source failed");
                    return Err(PlanError {
                        stream: s.name.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    async fn plan_stream(&mut self, stream: u32) -> Result<Vec<DirectRange>, SourceError> {
        let Some(s) = self.streams.get(stream).cloned() else {
            return Ok(Vec::new());
        };
        let partitions = s.source.partitions().await?;
        // A partition read before and not listed now: its records cannot be read any more.
        for ((st, p), (offset, _)) in self.next.range((stream, 0)..=(stream, u32::MAX)) {
            debug_assert_eq!(*st, stream);
            if !partitions.contains(p) {
                return Err(SourceError::PartitionGone {
                    partition: *p,
                    what: s.source.describe(*p),
                    offset: *offset,
                });
            }
        }
        // Records per partition for this batch: the fixed limit, and the adaptive rate
        // shared among the partitions.
        let secs = self.interval.as_secs_f64();
        let n = partitions.len().max(1) as f64;
        let fixed = s
            .options
            .max_rate_per_partition
            .map(|r| ((r as f64) * secs).ceil() as u64);
        let adaptive = self
            .rates
            .as_ref()
            .and_then(|r| r.rate(stream))
            .map(|r| (r * secs / n).ceil() as u64);
        let max_records = match (fixed, adaptive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|m| m.max(1));
        let mut out = Vec::new();
        for p in partitions {
            let (mut from, identity) = match self.next.get(&(stream, p)) {
                Some(n) => n.clone(),
                None => {
                    let from = s.source.start_offset(p).await?;
                    (from, s.source.identity(p).await?)
                }
            };
            // As many ranges as it takes, each at most a block: a partition's records of one
            // batch are read in several tasks when they are more than a block.
            let mut left = max_records;
            let mut ranges = 0usize;
            while left != Some(0) {
                let limits = RangeLimits {
                    max_records: left,
                    max_bytes: self.max_bytes,
                };
                let planned = s.source.plan(p, from, limits, identity.as_deref()).await?;
                if planned.until < from {
                    return Err(SourceError::Invalid {
                        what: s.source.describe(p),
                        detail: format!(
                            "planned a range ending at {} before its start {from}",
                            planned.until
                        ),
                    });
                }
                if planned.until == from {
                    break;
                }
                out.push(DirectRange {
                    stream,
                    range: OffsetRange {
                        partition: p,
                        from,
                        until: planned.until,
                        records: planned.records,
                    },
                    identity: identity.clone(),
                });
                ranges += 1;
                left = left.map(|l| l.saturating_sub(planned.records));
                from = planned.until;
                if ranges >= MAX_RANGES_PER_BATCH {
                    break;
                }
            }
            if ranges == 0 {
                // Nothing to read yet: remember where it starts and what it is.
                self.next.entry((stream, p)).or_insert((from, identity));
            }
        }
        Ok(out)
    }

    /// The batch holding `ranges` is logged: the next ranges start where these end.
    pub(crate) fn commit(&mut self, ranges: &[DirectRange]) {
        for r in ranges {
            self.next.insert(
                (r.stream, r.range.partition),
                (r.range.until, r.identity.clone()),
            );
        }
    }
}
