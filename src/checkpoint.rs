//! Driver metadata: the decisions log, checkpoints, and the checkpoint directory's marker.
//!
//! ```text
//!  dir/tributary.json   marker: format version and stream names (refuses foreign/incompatible dirs)
//!  dir/metadata.log     frames (see wal/record.rs) of JSON entries, fsynced as written:
//!                         {"added":[stream,seq,records]}     a block was acknowledged
//!                         {"alloc":{"id","time_ms","blocks":[[stream,seq,records],..]}}
//!                         {"done":id}                         batch id completed
//!  dir/checkpoint.json  the state the log compacts into (written to a temp file, synced, renamed)
//!  dir/wal/             write-ahead log segments (when enabled)
//! ```
//!
//! Replaying the checkpoint then the log is idempotent, so a crash between writing a checkpoint
//! and resetting the log is harmless. Batches complete in order and each stream's blocks are
//! allocated in sequence order, so "processed" is, per stream, a prefix of sequence numbers.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::block::BlockId;
use crate::wal::Storage;

/// The checkpoint format this build reads and writes.
/// 2: frame headers carry their own checksum (format 1 directories are refused, naming both).
pub(crate) const FORMAT: u32 = 2;

/// Errors of the checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The directory cannot be created or written.
    #[error("checkpoint directory {dir} is not usable: {reason}")]
    Unusable {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// The directory holds files that Tributary did not write.
    #[error("checkpoint directory {dir} is not empty and was not written by Tributary (no tributary.json); use an empty directory")]
    Foreign {
        /// The directory.
        dir: String,
    },
    /// The directory was written by an incompatible version.
    #[error("checkpoint directory {dir} has format {found}, this build reads format {expected}")]
    Incompatible {
        /// The directory.
        dir: String,
        /// Its format.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// The job defined now does not match the one that wrote the checkpoint.
    #[error("checkpoint in {dir} was written by a job with streams {found:?}, this job defines {defined:?}")]
    StreamsChanged {
        /// The directory.
        dir: String,
        /// Streams in the checkpoint.
        found: Vec<String>,
        /// Streams defined now.
        defined: Vec<String>,
    },
    /// A metadata write failed (after retries) and the context stopped so as not to apply a
    /// decision that is not durable.
    #[error("could not write checkpoint metadata {file}: {reason}")]
    WriteFailed {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// A metadata file is damaged.
    #[error("checkpoint metadata {file} is damaged: {reason}")]
    Damaged {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format: u32,
    streams: Vec<String>,
}

/// A batch allocation as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Allocation {
    pub(crate) id: u64,
    pub(crate) time_ms: u64,
    /// `(stream, seq, records)`.
    pub(crate) blocks: Vec<(u32, u64, u32)>,
    /// The offset ranges of direct streams the batch reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) ranges: Vec<crate::direct::DirectRange>,
}

/// Why records were lost (see [`Ledger`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// Every worker holding the block died before its batch ran (replication `k = 1`, or
    /// all `k` replicas lost).
    WorkerLost,
    /// The driver stopped without the write-ahead log while the block was only in memory.
    DriverStoppedWithoutWal,
    /// The block was in a damaged write-ahead log segment that recovery quarantined.
    Quarantined,
}

/// A completed batch as logged: its id and the blocks of it that were lost, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Completion {
    pub(crate) id: u64,
    /// `(stream, seq, cause)` of each lost block.
    #[serde(default)]
    pub(crate) lost: Vec<(u32, u64, LossCause)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Entry {
    Added((u32, u64, u32)),
    Alloc(Allocation),
    Done(Completion),
    /// Acknowledged blocks that recovery found gone (a quarantined segment), recorded so that
    /// a later start knows them lost rather than refusing again.
    Missing(Vec<(u32, u64, LossCause)>),
}

/// Where the records of one receiver went. It balances: `stored` = `completed` + `pending`
/// + every loss, each loss with its cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamLedger {
    /// Records acknowledged (in blocks recorded as durable).
    pub stored: u64,
    /// Records in batches that completed.
    pub completed: u64,
    /// Records acknowledged and not in a completed batch yet.
    pub pending: u64,
    /// Records lost, per cause.
    pub lost: BTreeMap<LossCause, u64>,
}

impl StreamLedger {
    /// Records lost, all causes.
    pub fn lost_total(&self) -> u64 {
        self.lost.values().sum()
    }

    /// Whether `stored == completed + pending + lost`.
    pub fn balances(&self) -> bool {
        self.stored == self.completed + self.pending + self.lost_total()
    }
}

/// Per receiver stream (by name) and in total: records stored, completed, pending, lost with
/// causes. Kept by the driver across restarts (in the metadata log), given in every
/// [`BatchInfo`](crate::BatchInfo) and by [`StreamingContext::ledger`](crate::StreamingContext::ledger).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Per receiver stream.
    pub streams: BTreeMap<String, StreamLedger>,
}

impl Ledger {
    /// All streams added up.
    pub fn total(&self) -> StreamLedger {
        let mut t = StreamLedger::default();
        for s in self.streams.values() {
            t.stored += s.stored;
            t.completed += s.completed;
            t.pending += s.pending;
            for (c, n) in &s.lost {
                *t.lost.entry(*c).or_default() += n;
            }
        }
        t
    }

    /// Whether every stream, and so the total, balances.
    pub fn balances(&self) -> bool {
        self.streams.values().all(StreamLedger::balances)
    }
}

/// The driver's state as of the last durable decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DriverState {
    /// Allocated, not completed, in id order.
    pub(crate) pending: BTreeMap<u64, Allocation>,
    /// Acknowledged blocks not yet allocated: `(stream, seq) -> records`.
    #[serde(with = "as_triples")]
    pub(crate) unallocated: BTreeMap<(u32, u64), u32>,
    /// Per stream, the highest sequence number processed.
    pub(crate) processed_through: BTreeMap<u32, u64>,
    /// Per stream, the highest sequence number acknowledged.
    pub(crate) max_seq: BTreeMap<u32, u64>,
    /// The last batch id allocated (batch time in ms).
    pub(crate) last_batch: u64,
    /// Per stream: records stored, completed and lost (pending is derived).
    #[serde(default)]
    pub(crate) ledger: BTreeMap<u32, StreamLedger>,
    /// Acknowledged, unprocessed blocks known to be gone, and why (until their batch ends).
    #[serde(default, with = "as_missing")]
    pub(crate) missing: BTreeMap<(u32, u64), LossCause>,
    /// Per direct stream and partition: where the next range starts (the end of the last
    /// logged one) and the partition's identity.
    #[serde(default, with = "as_next_offsets")]
    pub(crate) direct_next: crate::direct::NextOffsets,
    /// The last batch id completed (batches complete in id order).
    #[serde(default)]
    pub(crate) last_completed: u64,
}

impl DriverState {
    /// Applies an entry that was written (or, without a checkpoint directory, decided).
    /// Idempotent: replaying the log over a checkpoint that already holds an entry is harmless.
    pub(crate) fn apply(&mut self, e: Entry) {
        match e {
            Entry::Added((stream, seq, records)) => {
                let done = self
                    .processed_through
                    .get(&stream)
                    .is_some_and(|p| seq <= *p);
                let allocated = self
                    .pending
                    .values()
                    .any(|a| a.blocks.iter().any(|b| b.0 == stream && b.1 == seq));
                // Counted once: a replay of an entry already in the checkpoint finds the
                // block queued, allocated or processed.
                if !done && !allocated && self.unallocated.insert((stream, seq), records).is_none()
                {
                    self.ledger.entry(stream).or_default().stored += u64::from(records);
                }
                let m = self.max_seq.entry(stream).or_insert(seq);
                *m = (*m).max(seq);
            }
            Entry::Alloc(a) => {
                // A batch already completed (its blocks are within the processed prefix) is
                // an entry the checkpoint holds already: replaying it must not make it
                // pending again (its completion would be counted twice).
                let completed = if a.blocks.is_empty() {
                    a.id <= self.last_completed
                } else {
                    a.blocks
                        .iter()
                        .all(|b| self.processed_through.get(&b.0).is_some_and(|p| b.1 <= *p))
                };
                for r in &a.ranges {
                    let key = (r.stream, r.range.partition);
                    if self
                        .direct_next
                        .get(&key)
                        .is_none_or(|(n, _)| *n <= r.range.until)
                    {
                        self.direct_next
                            .insert(key, (r.range.until, r.identity.clone()));
                    }
                }
                if completed {
                    self.last_batch = self.last_batch.max(a.id);
                    return;
                }
                for b in &a.blocks {
                    self.unallocated.remove(&(b.0, b.1));
                    let m = self.max_seq.entry(b.0).or_insert(b.1);
                    *m = (*m).max(b.1);
                }
                self.last_batch = self.last_batch.max(a.id);
                self.pending.insert(a.id, a);
            }
            Entry::Missing(blocks) => {
                for (stream, seq, cause) in blocks {
                    let done = self
                        .processed_through
                        .get(&stream)
                        .is_some_and(|p| seq <= *p);
                    if !done {
                        self.missing.insert((stream, seq), cause);
                    }
                }
            }
            Entry::Done(done) => {
                if let Some(a) = self.pending.remove(&done.id) {
                    for b in a.blocks {
                        self.missing.remove(&(b.0, b.1));
                        let p = self.processed_through.entry(b.0).or_insert(b.1);
                        *p = (*p).max(b.1);
                        let l = self.ledger.entry(b.0).or_default();
                        match done.lost.iter().find(|(s, q, _)| *s == b.0 && *q == b.1) {
                            Some((_, _, cause)) => {
                                *l.lost.entry(*cause).or_default() += u64::from(b.2)
                            }
                            None => l.completed += u64::from(b.2),
                        }
                    }
                }
                self.last_batch = self.last_batch.max(done.id);
                self.last_completed = self.last_completed.max(done.id);
            }
        }
    }

    /// The ledger, with receiver names for the streams (`names[stream]`).
    pub(crate) fn ledger(&self, names: &[String]) -> Ledger {
        let mut streams: BTreeMap<String, StreamLedger> = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let stream = i as u32;
            let mut l = self.ledger.get(&stream).cloned().unwrap_or_default();
            l.pending = self
                .pending
                .values()
                .flat_map(|a| a.blocks.iter())
                .chain(
                    self.unallocated
                        .iter()
                        .map(|(k, r)| (k.0, k.1, *r))
                        .collect::<Vec<_>>()
                        .iter(),
                )
                .filter(|b| b.0 == stream)
                .map(|b| u64::from(b.2))
                .sum();
            streams.insert(name.clone(), l);
        }
        Ledger { streams }
    }

    /// Whether block `id` was processed already.
    pub(crate) fn is_processed(&self, id: BlockId) -> bool {
        self.processed_through
            .get(&id.stream)
            .is_some_and(|p| id.seq <= *p)
    }
}

/// `(stream, partition) -> (offset, identity)` as a list.
mod as_next_offsets {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::direct::NextOffsets;

    type Row = (u32, u32, u64, Option<String>);

    pub(super) fn serialize<S: Serializer>(m: &NextOffsets, s: S) -> Result<S::Ok, S::Error> {
        let rows: Vec<Row> = m
            .iter()
            .map(|(k, v)| (k.0, k.1, v.0, v.1.clone()))
            .collect();
        rows.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NextOffsets, D::Error> {
        let rows = Vec::<Row>::deserialize(d)?;
        Ok(rows.into_iter().map(|r| ((r.0, r.1), (r.2, r.3))).collect())
    }
}

/// `(stream, seq) -> cause` as a list of triples.
mod as_missing {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::LossCause;

    pub(super) fn serialize<S: Serializer>(
        m: &BTreeMap<(u32, u64), LossCause>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<(u32, u64, LossCause)> = m.iter().map(|(k, c)| (k.0, k.1, *c)).collect();
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(u32, u64), LossCause>, D::Error> {
        let v: Vec<(u32, u64, LossCause)> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|(a, b, c)| ((a, b), c)).collect())
    }
}

/// JSON maps need string keys: store `(stream, seq) -> records` as a list of triples.
mod as_triples {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        m: &BTreeMap<(u32, u64), u32>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<(u32, u64, u32)> = m.iter().map(|((a, b), c)| (*a, *b, *c)).collect();
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(u32, u64), u32>, D::Error> {
        let v: Vec<(u32, u64, u32)> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|(a, b, c)| ((a, b), c)).collect())
    }
}

/// The open metadata log of a running context, written through a [`Storage`] (the directory
/// itself, or a wrapper that injects faults in tests).
///
/// A failed append (ENOSPC, EIO, a short write, a failed fsync) is rolled back: the file is
/// cut back to its last good length before the error is returned, so the log stays readable
/// and the entry counts as never written. If the rollback fails too, the log refuses every
/// later write until a rollback succeeds.
pub(crate) struct MetadataLog {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    /// Bytes of whole, synced entries: where the next entry starts.
    good_len: u64,
    /// A failed append may have left bytes past `good_len` that could not be cut yet.
    dirty: bool,
    state: DriverState,
    since_checkpoint: u32,
    /// Completions between compactions into `checkpoint.json`.
    checkpoint_every: u32,
}

impl std::fmt::Debug for MetadataLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataLog")
            .field("dir", &self.dir)
            .field("good_len", &self.good_len)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

/// The log's file name in the checkpoint directory.
const LOG: &str = "metadata.log";

fn unusable(dir: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Unusable {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    }
}

fn damaged(file: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Damaged {
        file: file.display().to_string(),
        reason: e.to_string(),
    }
}

/// Checks that `dir` can be used: creatable, writable. Called at build time.
pub(crate) fn check_usable(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| unusable(dir, e))?;
    let probe = dir.join(".tributary-probe");
    std::fs::write(&probe, b"ok").map_err(|e| unusable(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| unusable(dir, e))?;
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Reads the marker: `Ok(None)` for an empty (or missing) directory, the state otherwise.
pub(crate) fn load(dir: &Path, streams: &[String]) -> Result<Option<DriverState>, CheckpointError> {
    let marker_path = dir.join("tributary.json");
    if !marker_path.exists() {
        let empty = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(unusable(dir, e)),
        };
        return if empty {
            Ok(None)
        } else {
            Err(CheckpointError::Foreign {
                dir: dir.display().to_string(),
            })
        };
    }
    let marker: Marker = std::fs::read(&marker_path)
        .map_err(|e| unusable(dir, e))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| damaged(&marker_path, e)))?;
    if marker.format != FORMAT {
        return Err(CheckpointError::Incompatible {
            dir: dir.display().to_string(),
            found: marker.format,
            expected: FORMAT,
        });
    }
    if marker.streams != streams {
        return Err(CheckpointError::StreamsChanged {
            dir: dir.display().to_string(),
            found: marker.streams,
            defined: streams.to_vec(),
        });
    }
    let mut state = DriverState::default();
    let cp = dir.join("checkpoint.json");
    if cp.exists() {
        let bytes = std::fs::read(&cp).map_err(|e| unusable(dir, e))?;
        state = serde_json::from_slice(&bytes).map_err(|e| damaged(&cp, e))?;
    }
    let log = dir.join("metadata.log");
    if log.exists() {
        let bytes = std::fs::read(&log).map_err(|e| unusable(dir, e))?;
        let (frames, ending) = crate::wal::read_frames_pub(&bytes, true);
        for (offset, payload) in frames {
            let e: Entry = serde_json::from_slice(payload)
                .map_err(|e| damaged(&log, format!("at offset {offset}: {e}")))?;
            state.apply(e);
        }
        match ending {
            crate::wal::FrameEnding::Clean => {}
            crate::wal::FrameEnding::TornTail { valid_len } => {
                tracing::warn!(file = %log.display(), valid_len, "metadata log: torn tail truncated");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&log)
                    .map_err(|e| unusable(dir, e))?;
                f.set_len(valid_len as u64).map_err(|e| unusable(dir, e))?;
                f.sync_all().map_err(|e| unusable(dir, e))?;
            }
            crate::wal::FrameEnding::Corrupt { offset } => {
                return Err(damaged(&log, format!("corrupt entry at offset {offset}")));
            }
        }
    }
    Ok(Some(state))
}

impl MetadataLog {
    /// Opens (creating the marker if needed) the log, starting from `state`, writing through
    /// `storage` (which holds the directory's files).
    pub(crate) fn open(
        dir: &Path,
        streams: &[String],
        state: DriverState,
        storage: Arc<dyn Storage>,
    ) -> Result<MetadataLog, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|e| unusable(dir, e))?;
        let marker_path = dir.join("tributary.json");
        if !marker_path.exists() {
            let marker = serde_json::to_vec_pretty(&Marker {
                format: FORMAT,
                streams: streams.to_vec(),
            })
            .map_err(|e| unusable(dir, e))?;
            write_atomically(&marker_path, &marker).map_err(|e| unusable(dir, e))?;
        }
        let good_len = match storage.read(LOG) {
            Ok(bytes) => bytes.len() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                storage.append(LOG, &[]).map_err(|e| unusable(dir, e))?;
                storage.sync(LOG).map_err(|e| unusable(dir, e))?;
                0
            }
            Err(e) => return Err(unusable(dir, e)),
        };
        Ok(MetadataLog {
            dir: dir.to_path_buf(),
            storage,
            good_len,
            dirty: false,
            state,
            since_checkpoint: 0,
            checkpoint_every: 100,
        })
    }

    /// Opens the log on the directory itself.
    #[cfg(test)]
    fn open_dir(
        dir: &Path,
        streams: &[String],
        state: DriverState,
    ) -> Result<MetadataLog, CheckpointError> {
        let storage = Arc::new(crate::wal::DirStorage::new(dir).map_err(|e| unusable(dir, e))?);
        Self::open(dir, streams, state, storage)
    }

    /// Compacts into `checkpoint.json` every `batches` completions (at least 1).
    pub(crate) fn checkpoint_every(&mut self, batches: u32) {
        self.checkpoint_every = batches.max(1);
    }

    fn write(&mut self, e: Entry) -> std::io::Result<()> {
        if self.dirty {
            self.roll_back()?;
        }
        let json = serde_json::to_vec(&e).map_err(std::io::Error::other)?;
        let mut frame = Vec::with_capacity(json.len() + 16);
        crate::wal::frame_pub(&json, &mut frame);
        let written = self
            .storage
            .append(LOG, &frame)
            .and_then(|()| self.storage.sync(LOG));
        if let Err(err) = written {
            tracing::error!(error = %err, "metadata log: append failed; rolling it back");
            metrics::counter!(crate::telemetry::METADATA_WRITE_FAILURES_TOTAL).increment(1);
            self.dirty = true;
            if let Err(e) = self.roll_back() {
                tracing::error!(error = %e, "metadata log: rollback failed; will retry before the next write");
            }
            return Err(err);
        }
        self.good_len += frame.len() as u64;
        self.state.apply(e);
        Ok(())
    }

    /// Cuts the file back to its last good entry (and syncs it).
    fn roll_back(&mut self) -> std::io::Result<()> {
        self.storage.truncate(LOG, self.good_len)?;
        self.dirty = false;
        Ok(())
    }

    /// Logs that a block was acknowledged.
    pub(crate) fn added(&mut self, id: BlockId, records: u32) -> std::io::Result<()> {
        self.write(Entry::Added((id.stream, id.seq, records)))
    }

    /// Logs acknowledged blocks that recovery found gone, with why.
    pub(crate) fn missing(&mut self, blocks: Vec<(u32, u64, LossCause)>) -> std::io::Result<()> {
        self.write(Entry::Missing(blocks))
    }

    /// Logs a batch allocation (before the batch runs).
    pub(crate) fn allocated(&mut self, a: Allocation) -> std::io::Result<()> {
        self.write(Entry::Alloc(a))
    }

    /// Logs a completed batch; every 100 completions, compacts the log into a checkpoint.
    pub(crate) fn completed(&mut self, done: Completion) -> std::io::Result<()> {
        self.write(Entry::Done(done))?;
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.checkpoint_every {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes the state as a checkpoint and starts an empty log.
    pub(crate) fn checkpoint(&mut self) -> std::io::Result<()> {
        let json = serde_json::to_vec(&self.state).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join("checkpoint.json"), &json)?;
        self.storage.truncate(LOG, 0)?;
        self.good_len = 0;
        self.dirty = false;
        self.since_checkpoint = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn direct_ranges_survive_a_reopen_and_compaction_and_completed_ones_stay_done() {
        use crate::direct::{DirectRange, OffsetRange};
        let range = |id: u64, from: u64, until: u64| Allocation {
            id,
            time_ms: id,
            blocks: vec![],
            ranges: vec![DirectRange {
                stream: crate::direct::DIRECT_STREAM_BASE,
                range: OffsetRange {
                    partition: 3,
                    from,
                    until,
                    records: until - from,
                },
                identity: Some("1:2:0:00".into()),
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetadataLog::open_dir(dir.path(), &names(), DriverState::default()).unwrap();
        log.allocated(range(1000, 0, 10)).unwrap();
        log.completed(Completion {
            id: 1000,
            lost: vec![],
        })
        .unwrap();
        log.allocated(range(2000, 10, 25)).unwrap();
        drop(log);
        let s = load(dir.path(), &names()).unwrap().unwrap();
        assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), vec![2000]);
        assert_eq!(s.pending[&2000].ranges[0].range.from, 10);
        let key = (crate::direct::DIRECT_STREAM_BASE, 3);
        assert_eq!(s.direct_next[&key], (25, Some("1:2:0:00".into())));
        // Compacted, then the completed batch's entry replayed again: still done.
        let mut log = MetadataLog::open_dir(dir.path(), &names(), s.clone()).unwrap();
        log.checkpoint().unwrap();
        drop(log);
        let mut c = load(dir.path(), &names()).unwrap().unwrap();
        assert_eq!(c, s, "same state from the checkpoint");
        c.apply(Entry::Alloc(range(1000, 0, 10)));
        assert_eq!(c.pending.keys().copied().collect::<Vec<_>>(), vec![2000]);
        assert_eq!(
            c.direct_next[&key].0, 25,
            "a replayed entry does not move offsets back"
        );
    }

    #[test]
    fn decisions_survive_a_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load(dir.path(), &names()).unwrap(),
            None,
            "empty directory: new job"
        );
        let mut log = MetadataLog::open_dir(dir.path(), &names(), DriverState::default()).unwrap();
        log.added(BlockId { stream: 0, seq: 0 }, 10).unwrap();
        log.added(BlockId { stream: 0, seq: 1 }, 5).unwrap();
        log.allocated(Allocation {
            id: 1000,
            time_ms: 1000,
            blocks: vec![(0, 0, 10)],
            ranges: vec![],
        })
        .unwrap();
        log.added(BlockId { stream: 1, seq: 0 }, 7).unwrap();
        log.allocated(Allocation {
            id: 2000,
            time_ms: 2000,
            blocks: vec![(0, 1, 5)],
            ranges: vec![],
        })
        .unwrap();
        log.completed(Completion {
            id: 1000,
            lost: vec![],
        })
        .unwrap();
        drop(log);

        let s = load(dir.path(), &names()).unwrap().unwrap();
        assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), vec![2000]);
        assert_eq!(
            s.unallocated.keys().copied().collect::<Vec<_>>(),
            vec![(1, 0)]
        );
        assert!(s.is_processed(BlockId { stream: 0, seq: 0 }));
        assert!(!s.is_processed(BlockId { stream: 0, seq: 1 }));
        assert_eq!(s.last_batch, 2000);

        let mut log = MetadataLog::open_dir(dir.path(), &names(), s.clone()).unwrap();
        log.checkpoint().unwrap();
        drop(log);
        assert_eq!(
            load(dir.path(), &names()).unwrap().unwrap(),
            s,
            "same state from the checkpoint"
        );
    }

    #[test]
    fn foreign_incompatible_and_changed_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        assert!(matches!(
            load(dir.path(), &names()),
            Err(CheckpointError::Foreign { .. })
        ));

        // A future format, and format 1 (frames without a header checksum).
        for found in [99u32, 1] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("tributary.json"),
                format!(r#"{{"format": {found}, "streams": ["a","b"]}}"#),
            )
            .unwrap();
            let err = load(dir.path(), &names()).unwrap_err();
            assert_eq!(
                err,
                CheckpointError::Incompatible {
                    dir: dir.path().display().to_string(),
                    found,
                    expected: FORMAT,
                }
            );
            assert!(err
                .to_string()
                .contains(&format!("has format {found}, this build reads format 2")));
        }

        let dir = tempfile::tempdir().unwrap();
        MetadataLog::open_dir(dir.path(), &names(), DriverState::default()).unwrap();
        assert!(matches!(
            load(dir.path(), &["a".into()]),
            Err(CheckpointError::StreamsChanged { .. })
        ));
    }

    #[test]
    fn an_unwritable_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_usable(&file.join("sub")),
            Err(CheckpointError::Unusable { .. })
        ));
    }
}
