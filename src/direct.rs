//! Replayable ("direct") sources: streams read by offset, exactly once, with no receiver and no
//! write-ahead log (Spark's Kafka direct stream).
//!
//! ```text
//!  every batch boundary (the driver):
//!     DirectSource::partitions ─► per partition: from = where the last batch ended
//!     DirectSource::plan(from, limits) ─► until (at most the rate × interval, at most the
//!        block size) ─► the batch's offset ranges, logged with the batch (metadata log)
//!  the batch runs: one task per range, on an executor:
//!     DirectSource::read(range) ─► the range's records ─► the stream's per-block work
//!  a crash, a retry, a restart: the same ranges are read again, never others
//! ```
//!
//! A batch's ranges are decided, and written to the driver's metadata log, before the batch
//! runs. A task that fails is retried on the same range; a restarted driver
//! ([`StreamingContext::get_or_create`](crate::StreamingContext::get_or_create)) re-runs the
//! batches it had logged on exactly their recorded ranges, then goes on from their end
//! offsets. So every record reaches the output functions of exactly one batch id: with output
//! keyed by batch id (written idempotently), or written in one transaction with the batch's
//! [`Batch::offsets`](crate::Batch::offsets), the output holds every record exactly once.
//!
//! Built-in sources live in `tributary-receivers` (a file log; a Kafka-protocol broker).

use std::future::Future;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};

use crate::error::BoxError;

/// Stream ids of direct streams start here (receiver streams count from 0).
pub(crate) const DIRECT_STREAM_BASE: u32 = 1 << 31;

/// The records of one partition a batch covers: offsets `from..until` (in the source's own
/// unit: record numbers for Kafka, byte positions for the file log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OffsetRange {
    /// The partition.
    pub partition: u32,
    /// The first offset in the range.
    pub from: u64,
    /// The offset after the last record in the range (where the next range starts).
    pub until: u64,
    /// Records in the range.
    pub records: u64,
}

/// How much one range may hold ([`DirectSource::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLimits {
    /// At most this many records (`None`: no limit). Set from the stream's
    /// [`max_rate_per_partition`](DirectOptions::max_rate_per_partition) and its adaptive rate.
    pub max_records: Option<u64>,
    /// At most this many bytes of records (the context's block size): a range is read as
    /// one block. A single record larger than this is an error
    /// ([`SourceError::RecordTooLarge`]), never dropped.
    pub max_bytes: usize,
}

/// Where a planned range ends ([`DirectSource::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRange {
    /// The offset after the range's last record (`from` itself: nothing new).
    pub until: u64,
    /// Records in `from..until`.
    pub records: u64,
}

/// Collects the records a [`DirectSource::read`] reads, in order, as one block.
#[derive(Debug)]
pub struct RangeSink {
    data: BytesMut,
    records: u64,
    max_bytes: usize,
}

impl RangeSink {
    /// An empty sink taking records of up to `max_bytes` in all (the framework makes one per
    /// range read; make one yourself to test a source's `read`).
    pub fn new(max_bytes: usize) -> Self {
        RangeSink {
            data: BytesMut::new(),
            records: 0,
            max_bytes,
        }
    }

    /// Appends one record's payload (the bytes its [`Record`](crate::Record) type decodes:
    /// for text records, the line without its newline). A payload larger than the block
    /// size is refused.
    pub fn push(&mut self, payload: &[u8]) -> Result<(), SourceError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| (*l as usize) <= self.max_bytes)
            .ok_or(SourceError::RecordTooLarge {
                what: "a record read".into(),
                offset: None,
                bytes: payload.len(),
                limit: self.max_bytes,
            })?;
        self.data.reserve(4 + payload.len());
        self.data.put_u32_le(len);
        self.data.put_slice(payload);
        self.records += 1;
        Ok(())
    }

    /// Records pushed so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The payloads pushed so far, in order.
    pub fn payloads(&self) -> impl Iterator<Item = &[u8]> + '_ {
        crate::block::Payloads::new(&self.data).map_while(Result::ok)
    }

    pub(crate) fn into_data(self) -> (Bytes, u64) {
        (self.data.freeze(), self.records)
    }
}

/// Why a direct source could not list, plan or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot be reached now (a broker down, a file system away): retried at the
    /// next batches with backoff, never skipped.
    #[error("{what} is unavailable: {source}")]
    Unavailable {
        /// What was tried (the broker's address, the directory).
        what: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// A partition that earlier batches read from is gone.
    #[error("partition {partition} ({what}) disappeared: its records after offset {offset} cannot be read")]
    PartitionGone {
        /// The partition.
        partition: u32,
        /// What it was (a file, a topic's partition).
        what: String,
        /// Where the next batch would have started.
        offset: u64,
    },
    /// The partition holds fewer bytes or records than an offset already recorded.
    #[error("{what} was truncated: it ends at offset {end}, below the recorded offset {recorded}")]
    Truncated {
        /// The partition (its file, its topic).
        what: String,
        /// Where it ends now.
        end: u64,
        /// The offset a batch recorded.
        recorded: u64,
    },
    /// The partition is not the one the offsets were recorded on (a file rotated or replaced).
    #[error("{what} was replaced since its offsets were recorded ({detail})")]
    Replaced {
        /// The partition.
        what: String,
        /// What differs.
        detail: String,
    },
    /// A record is larger than the block size: refused, not dropped.
    #[error("{what}: a record of {bytes} bytes{} is larger than the block size of {limit} bytes (raise `max_block_bytes`)", offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
    RecordTooLarge {
        /// The partition.
        what: String,
        /// Where the record starts, if known.
        offset: Option<u64>,
        /// Its size.
        bytes: usize,
        /// The block size.
        limit: usize,
    },
    /// Anything else that makes the partition unreadable as recorded.
    #[error("{what}: {detail}")]
    Invalid {
        /// The partition.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

impl SourceError {
    /// Whether trying again later may succeed ([`SourceError::Unavailable`]); the others stop
    /// the stream's context with the error.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }
}

/// A source that can be re-read by offset: partitions, each an ordered sequence of records at
/// increasing offsets. The driver owns the offsets (no consumer group, no commit to the
/// source). Reads must be deterministic: reading a range twice gives the same records.
///
/// Implement it for a log, a broker's topic, a table with a sequence column; see
/// `tributary_receivers::FileLog` for a complete one.
pub trait DirectSource: Send + Sync + 'static {
    /// Names a partition in messages and errors (its file, its topic and partition).
    fn describe(&self, partition: u32) -> String;

    /// The partitions now. A partition that earlier batches read and that is no longer
    /// listed is an error ([`SourceError::PartitionGone`]).
    fn partitions(&self) -> impl Future<Output = Result<Vec<u32>, SourceError>> + Send;

    /// Where a job that never read `partition` starts (its first offset).
    fn start_offset(&self, partition: u32)
        -> impl Future<Output = Result<u64, SourceError>> + Send;

    /// What identifies `partition`'s content when it is first read (a file's inode and a
    /// fingerprint of its first bytes), recorded with the offsets and handed back to
    /// [`plan`](Self::plan) and [`read`](Self::read), which refuse a partition that is no
    /// longer the same ([`SourceError::Replaced`]). `None` (the default): nothing to check.
    fn identity(
        &self,
        partition: u32,
    ) -> impl Future<Output = Result<Option<String>, SourceError>> + Send {
        let _ = partition;
        async { Ok(None) }
    }

    /// Where a range of `partition` starting at `from` ends: after the last complete record
    /// available now, within `limits`. Offsets below `from` that the source no longer holds
    /// are an error ([`SourceError::Truncated`]), never skipped.
    fn plan(
        &self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        identity: Option<&str>,
    ) -> impl Future<Output = Result<PlannedRange, SourceError>> + Send;

    /// Reads exactly the records of `range` into `out`, in order.
    fn read(
        &self,
        range: OffsetRange,
        identity: Option<&str>,
        out: &mut RangeSink,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// A shared source is a source (keep a handle to it while the stream reads it).
impl<S: DirectSource> DirectSource for Arc<S> {
    fn describe(&self, partition: u32) -> String {
        (**self).describe(partition)
    }
    fn partitions(&self) -> impl Future<Output = Result<Vec<u32>, SourceError>> + Send {
        (**self).partitions()
    }
    fn start_offset(
        &self,
        partition: u32,
    ) -> impl Future<Output = Result<u64, SourceError>> + Send {
        (**self).start_offset(partition)
    }
    fn identity(
        &self,
        partition: u32,
    ) -> impl Future<Output = Result<Option<String>, SourceError>> + Send {
        (**self).identity(partition)
    }
    fn plan(
        &self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        identity: Option<&str>,
    ) -> impl Future<Output = Result<PlannedRange, SourceError>> + Send {
        (**self).plan(partition, from, limits, identity)
    }
    fn read(
        &self,
        range: OffsetRange,
        identity: Option<&str>,
        out: &mut RangeSink,
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        (**self).read(range, identity, out)
    }
}

/// Settings of one direct stream ([`StreamingContext::direct_stream_with`](crate::StreamingContext::direct_stream_with)).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DirectOptions {
    pub(crate) max_rate_per_partition: Option<u64>,
}

impl DirectOptions {
    /// At most this many records per second per partition (Spark's `maxRatePerPartition`):
    /// a batch reads at most `rate × batch interval` records of each partition. The adaptive
    /// rate (backpressure), when on, may set a lower one. Default: no fixed limit.
    pub fn max_rate_per_partition(mut self, records_per_second: u64) -> Self {
        self.max_rate_per_partition = Some(records_per_second);
        self
    }
}

/// A [`DirectSource`] behind dynamic dispatch (the trait's futures are generic).
pub(crate) trait ErasedSource: Send + Sync {
    fn describe(&self, partition: u32) -> String;
    fn partitions(&self) -> BoxFuture<'_, Result<Vec<u32>, SourceError>>;
    fn start_offset(&self, partition: u32) -> BoxFuture<'_, Result<u64, SourceError>>;
    fn identity(&self, partition: u32) -> BoxFuture<'_, Result<Option<String>, SourceError>>;
    fn plan<'a>(
        &'a self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        identity: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PlannedRange, SourceError>>;
    fn read<'a>(
        &'a self,
        range: OffsetRange,
        identity: Option<&'a str>,
        out: &'a mut RangeSink,
    ) -> BoxFuture<'a, Result<(), SourceError>>;
}

impl<S: DirectSource> ErasedSource for S {
    fn describe(&self, partition: u32) -> String {
        DirectSource::describe(self, partition)
    }
    fn partitions(&self) -> BoxFuture<'_, Result<Vec<u32>, SourceError>> {
        DirectSource::partitions(self).boxed()
    }
    fn start_offset(&self, partition: u32) -> BoxFuture<'_, Result<u64, SourceError>> {
        DirectSource::start_offset(self, partition).boxed()
    }
    fn identity(&self, partition: u32) -> BoxFuture<'_, Result<Option<String>, SourceError>> {
        DirectSource::identity(self, partition).boxed()
    }
    fn plan<'a>(
        &'a self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        identity: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PlannedRange, SourceError>> {
        DirectSource::plan(self, partition, from, limits, identity).boxed()
    }
    fn read<'a>(
        &'a self,
        range: OffsetRange,
        identity: Option<&'a str>,
        out: &'a mut RangeSink,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        DirectSource::read(self, range, identity, out).boxed()
    }
}

/// One range of a batch as the driver decides, logs and reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DirectRange {
    pub(crate) stream: u32,
    pub(crate) range: OffsetRange,
    /// The partition's identity when first read ([`DirectSource::identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) identity: Option<String>,
}

/// Why a range could not be read as a block.
#[derive(Debug)]
pub(crate) struct ReadError {
    /// The source is unavailable (try the same range again later).
    pub(crate) retryable: bool,
    pub(crate) text: String,
}

/// Reads `range` from its stream's source as one block, checking it holds the records the
/// batch recorded.
pub(crate) async fn read_block(
    direct: &DirectStreams,
    max_bytes: usize,
    range: &DirectRange,
) -> Result<crate::block::Block, ReadError> {
    let Some(s) = direct.get(range.stream) else {
        return Err(ReadError {
            retryable: false,
            text: format!("no direct stream {} in this job", range.stream),
        });
    };
    let mut sink = RangeSink::new(max_bytes);
    s.source
        .read(range.range, range.identity.as_deref(), &mut sink)
        .await
        .map_err(|e| ReadError {
            retryable: e.is_retryable(),
            text: format!("direct stream `{}`: {e}", s.name),
        })?;
    let (data, records) = sink.into_data();
    // The recorded count is what the batch promised: a source that reads something else
    // now has changed under its offsets.
    if records != range.range.records {
        return Err(ReadError {
            retryable: false,
            text: format!(
                "direct stream `{}`: {} offsets {}..{} held {} records when planned, {records} when read",
                s.name,
                s.source.describe(range.range.partition),
                range.range.from,
                range.range.until,
                range.range.records
            ),
        });
    }
    metrics::counter!(crate::telemetry::DIRECT_RECORDS_TOTAL, "stream" => s.name.clone())
        .increment(records);
    Ok(crate::block::Block {
        id: crate::block::BlockId {
            stream: range.stream,
            seq: range.range.from,
        },
        created: std::time::SystemTime::now(),
        records: u32::try_from(records).unwrap_or(u32::MAX),
        data,
    })
}

/// Per direct stream and partition: where its next range starts, and its identity.
pub(crate) type NextOffsets = std::collections::BTreeMap<(u32, u32), (u64, Option<String>)>;

/// A direct stream of the job: its id, name, source and settings.
#[derive(Clone)]
pub(crate) struct DirectStream {
    pub(crate) stream: u32,
    pub(crate) name: String,
    pub(crate) source: Arc<dyn ErasedSource>,
    pub(crate) options: DirectOptions,
}

impl std::fmt::Debug for DirectStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectStream")
            .field("stream", &self.stream)
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The job's direct streams, by stream id. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct DirectStreams(pub(crate) Arc<Vec<DirectStream>>);

impl DirectStreams {
    pub(crate) fn get(&self, stream: u32) -> Option<&DirectStream> {
        self.0.iter().find(|s| s.stream == stream)
    }

    /// How the checkpoint directory's marker names them (beside the receivers' names).
    pub(crate) fn marker_names(names: &[String]) -> Vec<String> {
        names.iter().map(|n| format!("direct:{n}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_encodes_records_as_a_block_does_and_refuses_oversized_ones() {
        let mut sink = RangeSink::new(8);
        sink.push(b"abc").unwrap();
        sink.push(b"").unwrap();
        let err = sink.push(b"123456789").unwrap_err();
        assert!(matches!(
            err,
            SourceError::RecordTooLarge {
                bytes: 9,
                limit: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("max_block_bytes"), "{err}");
        let (data, records) = sink.into_data();
        assert_eq!(records, 2);
        let block = crate::Block {
            id: crate::BlockId { stream: 0, seq: 0 },
            created: std::time::SystemTime::now(),
            records: 2,
            data,
        };
        let got: Vec<String> = block.decode().unwrap();
        assert_eq!(got, ["abc", ""]);
    }

    #[test]
    fn only_an_unavailable_source_is_retried() {
        let down = SourceError::Unavailable {
            what: "broker 127.0.0.1:1".into(),
            source: "connection refused".into(),
        };
        assert!(down.is_retryable());
        assert!(std::error::Error::source(&down).is_some());
        let cut = SourceError::Truncated {
            what: "p0.log".into(),
            end: 3,
            recorded: 10,
        };
        assert!(!cut.is_retryable());
        assert!(cut.to_string().contains("p0.log") && cut.to_string().contains("10"));
    }
}
