//! Recovery: reads the checkpoint directory into the state the other stages start from.
//!
//! ```text
//!  dir/tributary.json, checkpoint.json, metadata.log ──► DriverState (what was decided)
//!  dir/wal/<stream>-*.log ──────────────────────────────► blocks still unprocessed
//!                                   │
//!                                   ▼
//!  Recovered: batches to run again (same ids, same blocks), blocks to put back on workers,
//!             blocks acknowledged but never allocated, next sequence numbers, last batch id,
//!             the opened metadata log and write-ahead logs, and a report of what was found
//! ```
//!
//! This stage does file I/O only and no async work: the context runs it on the blocking pool.
//! Nothing it opens keeps running if it fails: a write-ahead log opened before a later one
//! fails to recover is closed (its writer thread joined) when the partial result is dropped.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::batch::BatchBlocks;
use crate::block::{BatchId, BlockId};
use crate::checkpoint::{CheckpointError, DriverState, LossCause, MetadataLog};
use crate::config::StorageWrap;
use crate::context::error::ContextError;
use crate::driver::restorer::Restorer;
use crate::wal::{DirStorage, Location, Logged, Storage, Wal, WalConfig, WalError, WalRecovery};

/// What a context found in its checkpoint directory at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Batches that were allocated but not completed; they run again with the same ids and
    /// the same blocks before any new batch.
    pub rerun_batches: Vec<BatchId>,
    /// Unprocessed blocks recovered from the write-ahead log.
    pub recovered_blocks: usize,
    /// Records in them.
    pub recovered_records: u64,
    /// Unprocessed blocks that were only in memory (no write-ahead log) and are gone.
    pub lost_blocks: usize,
    /// Records in them.
    pub lost_records: u64,
    /// Write-ahead log segments whose torn tail was truncated, with the bytes cut.
    pub truncated_segments: Vec<(String, u64)>,
    /// Blocks found in the write-ahead log that were never acknowledged (synced there, but
    /// not recorded before the driver stopped): not replayed, since their source was not
    /// told and sends them again.
    pub unacknowledged_blocks: usize,
    /// Records in them.
    pub unacknowledged_records: u64,
    /// Damaged write-ahead log segments set aside by [`WalRecovery::QuarantineDamaged`], with
    /// the offset of the damage: a copy is in `wal/quarantine/`, the segment was cut there.
    /// Acknowledged blocks lost with them are counted in `lost_blocks` and `lost_records`.
    pub quarantined_segments: Vec<(String, u64)>,
}

/// A batch to run: its id, its batch time and its blocks.
pub(crate) type ScheduledBatch = (BatchId, SystemTime, BatchBlocks);

/// The state the stages start from. Empty for a job without a checkpoint directory.
#[derive(Default)]
pub(crate) struct Recovered {
    /// The driver's decisions log (with a checkpoint directory).
    pub(crate) meta: Option<MetadataLog>,
    /// Write-ahead logs per stream (when enabled).
    pub(crate) wals: HashMap<u32, Arc<Wal>>,
    /// Batches allocated but not completed, in id order: they run first, unchanged.
    pub(crate) rerun: Vec<ScheduledBatch>,
    /// Recovered blocks to put back on the workers (read from the log one batch at a time).
    pub(crate) restorer: Restorer,
    /// The write-ahead log's storage (when on).
    pub(crate) wal_storage: Option<Arc<dyn Storage>>,
    /// Blocks acknowledged but not allocated (lost ones too: the next batch reports them).
    pub(crate) unallocated: Vec<(BlockId, u32)>,
    /// Per stream, the first sequence number to use.
    pub(crate) first_seq: HashMap<u32, u64>,
    /// The last batch id a previous run used (new ids come after it).
    pub(crate) last_batch: u64,
    /// What was found (`None` for a new job).
    pub(crate) report: Option<RecoveryReport>,
    /// The decisions the log holds (a new job: none).
    pub(crate) decisions: DriverState,
    /// Acknowledged blocks that are gone (and why): their batches report them lost.
    pub(crate) lost_at_restart: HashMap<BlockId, LossCause>,
}

impl std::fmt::Debug for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovered")
            .field("rerun", &self.rerun.len())
            .field("restorer", &self.restorer)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// Reads `dir` (if any) for a job with these streams: opens the metadata log and the
/// write-ahead logs and works out what to run again.
pub(crate) fn recover(
    dir: Option<&Path>,
    wal: Option<WalConfig>,
    wrap: Option<&StorageWrap>,
    checkpoint_every: u32,
    names: &[String],
    streams: &[u32],
) -> Result<Recovered, ContextError> {
    let wrapped = |s: Arc<dyn Storage>| match wrap {
        Some(w) => (w.0)(s),
        None => s,
    };
    let Some(dir) = dir else {
        return Ok(Recovered::default());
    };
    let state = crate::checkpoint::load(dir, names)?;
    let fresh = state.is_none();
    let state = state.unwrap_or_default();
    let mut wals = HashMap::new();
    let mut from_wal = Vec::new();
    let mut wal_storage = None;
    let mut quarantined = Vec::new();
    if let Some(wcfg) = wal {
        let wal_dir = dir.join("wal");
        let storage: Arc<dyn Storage> =
            wrapped(Arc::new(DirStorage::new(&wal_dir).map_err(|e| {
                CheckpointError::Unusable {
                    dir: wal_dir.display().to_string(),
                    reason: e.to_string(),
                }
            })?));
        for &stream in streams {
            let r = loop {
                match crate::wal::scan(storage.as_ref(), stream) {
                    Ok(r) => break r,
                    Err(
                        WalError::Corrupt { segment, offset }
                        | WalError::BadRecord { segment, offset },
                    ) if wcfg.recovery == WalRecovery::QuarantineDamaged
                        && !quarantined.iter().any(|(q, _)| *q == segment) =>
                    {
                        quarantine(&wal_dir, storage.as_ref(), &segment, offset)?;
                        quarantined.push((segment, offset));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            from_wal.push(r);
        }
        if !fresh && wcfg.recovery == WalRecovery::Strict {
            check_acknowledged(&state, &from_wal)?;
        }
        let wanted = acknowledged_unprocessed(&state);
        for r in &from_wal {
            crate::wal::truncate_torn(storage.as_ref(), r)?;
            // Blocks processed, and blocks never acknowledged (synced to the log, but the
            // driver died or failed before recording them: the source was not told, and will
            // send those records again), are done with: their segments can go.
            let live: Vec<(BlockId, Location)> = r
                .blocks
                .iter()
                .filter(|b| wanted.contains(&b.id))
                .map(|b| (b.id, b.location.clone()))
                .collect();
            let done: Vec<BlockId> = r
                .blocks
                .iter()
                .filter(|b| !wanted.contains(&b.id))
                .map(|b| b.id)
                .collect();
            let wal = Wal::open(storage.clone(), r.stream, wcfg, r.next_segment, &live);
            if !done.is_empty() {
                wal.processed(done);
            }
            wals.insert(r.stream, Arc::new(wal));
        }
        wal_storage = Some(storage);
    }
    let meta_storage = wrapped(Arc::new(DirStorage::new(dir).map_err(|e| {
        CheckpointError::Unusable {
            dir: dir.display().to_string(),
            reason: e.to_string(),
        }
    })?));
    let mut meta = MetadataLog::open(dir, names, state.clone(), meta_storage)?;
    meta.checkpoint_every(checkpoint_every);
    let mut recovered = Recovered {
        meta: Some(meta),
        wals,
        decisions: state.clone(),
        ..Recovered::default()
    };
    if !fresh {
        // With the log on, a block can only be gone because a damaged segment was
        // quarantined (a strict start refuses instead); without it, it was only in memory.
        let cause = if wal.is_some() {
            LossCause::Quarantined
        } else {
            LossCause::DriverStoppedWithoutWal
        };
        let restore = plan(&mut recovered, state, from_wal, cause);
        recovered.restorer = Restorer::new(wal_storage.clone(), restore);
        // Record what the quarantine cost before going on: a later start (strict again)
        // then knows these blocks lost instead of refusing.
        let newly: Vec<(u32, u64, LossCause)> = recovered
            .lost_at_restart
            .iter()
            .filter(|(id, c)| {
                **c == LossCause::Quarantined
                    && !recovered
                        .decisions
                        .missing
                        .contains_key(&(id.stream, id.seq))
            })
            .map(|(id, c)| (id.stream, id.seq, *c))
            .collect();
        if !newly.is_empty() {
            if let Some(meta) = &mut recovered.meta {
                meta.missing(newly.clone())
                    .map_err(|e| CheckpointError::WriteFailed {
                        file: "metadata.log".into(),
                        reason: e.to_string(),
                    })?;
            }
            recovered
                .decisions
                .apply(crate::checkpoint::Entry::Missing(newly));
        }
    }
    recovered.wal_storage = wal_storage;
    if let Some(r) = &mut recovered.report {
        r.quarantined_segments = quarantined;
    } else if !quarantined.is_empty() {
        recovered.report = Some(RecoveryReport {
            quarantined_segments: quarantined,
            ..RecoveryReport::default()
        });
    }
    Ok(recovered)
}

/// Works out the batches to run again and the blocks to restore from the decisions log and
/// what the write-ahead logs still hold.
fn plan(
    out: &mut Recovered,
    state: DriverState,
    wal: Vec<crate::wal::Scan>,
    cause: LossCause,
) -> Vec<Logged> {
    let mut report = RecoveryReport::default();
    let first_seq = &mut out.first_seq;
    let mut in_wal: BTreeMap<BlockId, Logged> = BTreeMap::new();
    let mut restore = Vec::new();
    for r in wal {
        report.truncated_segments.extend(r.truncated);
        for b in r.blocks {
            let next = first_seq.entry(b.id.stream).or_insert(0);
            *next = (*next).max(b.id.seq + 1);
            if !state.is_processed(b.id) {
                in_wal.insert(b.id, b);
            }
        }
    }
    for (stream, seq) in state.max_seq.iter().chain(&state.processed_through) {
        let next = first_seq.entry(*stream).or_insert(0);
        *next = (*next).max(seq + 1);
    }
    let known_missing = state.missing.clone();
    let mut restore_one = |in_wal: &mut BTreeMap<BlockId, Logged>,
                           (id, records): (BlockId, u32),
                           report: &mut RecoveryReport| {
        match in_wal.remove(&id) {
            Some(block) => {
                report.recovered_blocks += 1;
                report.recovered_records += u64::from(records);
                restore.push(block);
            }
            None => {
                report.lost_blocks += 1;
                report.lost_records += u64::from(records);
                let cause = known_missing
                    .get(&(id.stream, id.seq))
                    .copied()
                    .unwrap_or(cause);
                out.lost_at_restart.insert(id, cause);
            }
        }
    };
    for (id, alloc) in &state.pending {
        let mut bb = BatchBlocks {
            recovered: true,
            ..BatchBlocks::default()
        };
        for &(stream, seq, records) in &alloc.blocks {
            let bid = BlockId { stream, seq };
            restore_one(&mut in_wal, (bid, records), &mut report);
            bb.by_stream.entry(stream).or_default().push((bid, records));
        }
        bb.ranges = alloc.ranges.clone();
        report.rerun_batches.push(BatchId(*id));
        out.rerun.push((
            BatchId(*id),
            UNIX_EPOCH + Duration::from_millis(alloc.time_ms),
            bb,
        ));
    }
    // Acknowledged but not allocated. What else the WAL holds was never acknowledged (it
    // was synced there, but not recorded before the driver stopped): its source sends it
    // again, so it is not replayed (that would duplicate it).
    let unallocated: BTreeMap<BlockId, u32> = state
        .unallocated
        .iter()
        .map(|(&(stream, seq), &records)| (BlockId { stream, seq }, records))
        .collect();
    for (id, records) in unallocated {
        restore_one(&mut in_wal, (id, records), &mut report);
        // A lost block still goes into the next batch, which reports it lost and lets the
        // log record it as processed.
        out.unallocated.push((id, records));
    }
    for b in in_wal.values() {
        if !state.unallocated.contains_key(&(b.id.stream, b.id.seq)) {
            report.unacknowledged_blocks += 1;
            report.unacknowledged_records += u64::from(b.records);
        }
    }
    out.last_batch = state.last_batch;
    out.report = Some(report);
    restore
}

/// With the write-ahead log, every block the metadata log recorded as acknowledged and not
/// processed must be in the log (it was synced there before it was recorded): one missing
/// means the log was damaged, and recovery refuses rather than lose it silently. Streams
/// whose log has no segment at all (the WAL was just turned on) are not checked.
fn check_acknowledged(state: &DriverState, wal: &[crate::wal::Scan]) -> Result<(), WalError> {
    let logged: std::collections::BTreeSet<u32> = wal
        .iter()
        .filter(|r| r.next_segment > 0)
        .map(|r| r.stream)
        .collect();
    let found: std::collections::BTreeSet<BlockId> = wal
        .iter()
        .flat_map(|r| r.blocks.iter().map(|b| b.id))
        .collect();
    let mut missing: BTreeMap<u32, (usize, u64)> = BTreeMap::new();
    for (stream, seq, records) in state
        .pending
        .values()
        .flat_map(|a| a.blocks.iter().copied())
        .chain(state.unallocated.iter().map(|(&(s, q), &r)| (s, q, r)))
    {
        let id = BlockId { stream, seq };
        let known = state.missing.contains_key(&(stream, seq));
        if logged.contains(&stream) && !found.contains(&id) && !known {
            let m = missing.entry(stream).or_default();
            m.0 += 1;
            m.1 += u64::from(records);
        }
    }
    if let Some((&stream, &(blocks, records))) = missing.iter().next() {
        tracing::error!(
            stream,
            blocks,
            records,
            "write-ahead log lacks acknowledged blocks: refusing to start"
        );
        return Err(WalError::AcknowledgedMissing {
            stream,
            blocks,
            records,
        });
    }
    Ok(())
}

/// Blocks the metadata log recorded as acknowledged and not processed yet: allocated to a
/// pending batch, or waiting for one.
fn acknowledged_unprocessed(state: &DriverState) -> std::collections::BTreeSet<BlockId> {
    state
        .pending
        .values()
        .flat_map(|a| {
            a.blocks
                .iter()
                .map(|&(stream, seq, _)| BlockId { stream, seq })
        })
        .chain(
            state
                .unallocated
                .keys()
                .map(|&(stream, seq)| BlockId { stream, seq }),
        )
        .collect()
}

/// Copies the damaged `segment` to `wal/quarantine/` (synced), then cuts it at `offset`,
/// keeping the intact frames before the damage.
fn quarantine(
    wal_dir: &Path,
    storage: &dyn Storage,
    segment: &str,
    offset: u64,
) -> Result<(), ContextError> {
    let unusable = |e: std::io::Error| CheckpointError::Unusable {
        dir: wal_dir.join("quarantine").display().to_string(),
        reason: e.to_string(),
    };
    let qdir = wal_dir.join("quarantine");
    std::fs::create_dir_all(&qdir).map_err(unusable)?;
    let bytes = storage.read(segment).map_err(unusable)?;
    let copy = qdir.join(segment);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&copy).map_err(unusable)?;
        f.write_all(&bytes).map_err(unusable)?;
        f.sync_all().map_err(unusable)?;
    }
    std::fs::File::open(&qdir)
        .and_then(|d| d.sync_all())
        .map_err(unusable)?;
    storage.truncate(segment, offset).map_err(unusable)?;
    tracing::error!(
        segment,
        offset,
        copy = %copy.display(),
        "write-ahead log: damaged segment quarantined and cut at the damage; what it held after that is reported lost"
    );
    Ok(())
}
