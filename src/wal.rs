//! The write-ahead log: every block of a receiver, appended and fsynced before it is
//! acknowledged.
//!
//! ```text
//!  dir/wal/<stream>-<segment>.wal      one file per segment; a segment = frames (see record.rs)
//!  frame payload = stream: u32 | seq: u64 | created_us: u64 | records: u32 | block data
//! ```
//!
//! * **Group commit**: appends queue to one writer thread per stream; it writes everything
//!   queued, then syncs once and acknowledges them all ([`SyncPolicy::EveryBlock`]). With
//!   [`SyncPolicy::Interval`] acknowledgements wait for the next periodic sync; with
//!   [`SyncPolicy::Never`] they follow the write (no durability against power loss: say so to
//!   your users).
//! * Segments roll by size and by age, and are deleted once every block in them was processed.
//! * [`recover`] reads every segment and verifies every checksum; a torn tail is truncated at the
//!   last good frame and reported; corruption in the middle is an error naming the segment and
//!   offset, never skipped.

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::block::{Block, BlockId};

mod record;
pub mod storage;

pub use storage::{DirStorage, MemStorage, Op, Storage};

pub(crate) use record::{
    frame as frame_pub, read_frames as read_frames_pub, Ending as FrameEnding,
};

/// When appended blocks are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Group commit: each batch of queued appends is followed by one fsync before any of them
    /// is acknowledged (default).
    EveryBlock,
    /// Fsync at most every interval; acknowledgements wait for it.
    Interval(Duration),
    /// Never fsync; acknowledge after the write reached the OS (like Spark's receiver WAL).
    Never,
}

/// Write-ahead log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalConfig {
    /// When to fsync (default: group commit, every block).
    pub sync: SyncPolicy,
    /// Roll to a new segment past this size (default 64 MiB).
    pub segment_bytes: u64,
    /// Roll to a new segment past this age (default 60 s).
    pub segment_age: Duration,
    /// What a start does when it finds the log damaged (default: refuse).
    pub recovery: WalRecovery,
}

/// What recovery does with a damaged write-ahead log (RocksDB and raft-engine have the same
/// choice of recovery modes). A torn tail at the end of the newest segment is not damage: it
/// is always cut and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WalRecovery {
    /// Refuse to start (`WalError::Corrupt` naming segment and offset, or
    /// `WalError::AcknowledgedMissing`), changing nothing on disk: the operator decides.
    #[default]
    Strict,
    /// Go on without what is damaged: each damaged segment is copied to `wal/quarantine/`
    /// and cut at the damaged frame (what precedes it is kept); acknowledged blocks that are
    /// then missing are reported lost ([`RecoveryReport`](crate::RecoveryReport): lost blocks
    /// and records, the quarantined segments), never silently skipped.
    QuarantineDamaged,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            sync: SyncPolicy::EveryBlock,
            segment_bytes: 64 << 20,
            segment_age: Duration::from_secs(60),
            recovery: WalRecovery::Strict,
        }
    }
}

/// Errors of the write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// An I/O operation failed.
    #[error("write-ahead log I/O error on {segment}: {reason}")]
    Io {
        /// The segment (file name) concerned.
        segment: String,
        /// The error.
        reason: String,
    },
    /// A damaged record in the middle of a segment: data after it cannot be trusted.
    #[error("write-ahead log segment {segment} is corrupt at offset {offset}")]
    Corrupt {
        /// The segment.
        segment: String,
        /// Byte offset of the damaged frame.
        offset: u64,
    },
    /// A frame's payload is not a block.
    #[error("write-ahead log segment {segment} has an undecodable record at offset {offset}")]
    BadRecord {
        /// The segment.
        segment: String,
        /// Byte offset.
        offset: u64,
    },
    /// Blocks the driver's metadata log recorded as acknowledged are not in the write-ahead
    /// log (a segment was cut, emptied or removed): starting would lose them silently.
    #[error("write-ahead log of stream {stream} lacks {blocks} acknowledged blocks ({records} records) that the metadata log recorded; the log was damaged (cut, emptied or removed segment)")]
    AcknowledgedMissing {
        /// The stream.
        stream: u32,
        /// Blocks missing.
        blocks: usize,
        /// Records in them.
        records: u64,
    },
    /// The log has shut down.
    #[error("the write-ahead log has shut down")]
    Closed,
}

impl WalError {
    /// Whether this error means the data on disk is damaged (as opposed to an I/O failure).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            WalError::Corrupt { .. }
                | WalError::BadRecord { .. }
                | WalError::AcknowledgedMissing { .. }
        )
    }
}

/// Where a block is in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Segment file name.
    pub segment: String,
    /// Offset of the frame.
    pub offset: u64,
}

fn io_err(segment: &str, e: std::io::Error) -> WalError {
    WalError::Io {
        segment: segment.to_string(),
        reason: e.to_string(),
    }
}

fn segment_name(stream: u32, n: u64) -> String {
    format!("{stream:05}-{n:012}.wal")
}

fn parse_segment(name: &str) -> Option<(u32, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (s, n) = stem.split_once('-')?;
    Some((s.parse().ok()?, n.parse().ok()?))
}

fn encode(block: &Block, out: &mut Vec<u8>) {
    let created = block
        .created
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let mut payload = Vec::with_capacity(PAYLOAD_HEAD + block.data.len());
    payload.extend_from_slice(&block.id.stream.to_le_bytes());
    payload.extend_from_slice(&block.id.seq.to_le_bytes());
    payload.extend_from_slice(&created.to_le_bytes());
    payload.extend_from_slice(&block.records.to_le_bytes());
    payload.extend_from_slice(&block.data);
    record::frame(&payload, out);
}

/// Bytes before a block's data in its payload: stream, seq, created, records.
const PAYLOAD_HEAD: usize = 24;

fn decode_head(payload: &[u8]) -> Option<(BlockId, u32)> {
    let stream = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(4..12)?.try_into().ok()?);
    let records = u32::from_le_bytes(payload.get(20..24)?.try_into().ok()?);
    Some((BlockId { stream, seq }, records))
}

/// The block in `payload`; its data is a slice of the same buffer (no copy).
fn decode_owned(payload: Vec<u8>) -> Option<Block> {
    let (id, records) = decode_head(&payload)?;
    let created = u64::from_le_bytes(payload.get(12..20)?.try_into().ok()?);
    Some(Block {
        id,
        created: UNIX_EPOCH + Duration::from_micros(created),
        records,
        data: Bytes::from(payload).slice(PAYLOAD_HEAD..),
    })
}

/// What recovery found for one stream.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The stream.
    pub stream: u32,
    /// Every intact block, in log order, with its location.
    pub blocks: Vec<(Block, Location)>,
    /// Segments whose torn tail was truncated: `(segment, bytes cut)`.
    pub truncated: Vec<(String, u64)>,
    /// The next segment number to use.
    pub next_segment: u64,
}

/// A block found in the log, without its data: [`load`] reads it when it is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Logged {
    pub(crate) id: BlockId,
    pub(crate) records: u32,
    /// Bytes of its data.
    pub(crate) bytes: u64,
    pub(crate) location: Location,
}

/// What [`scan`] found for one stream: blocks by location, not their data.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) stream: u32,
    /// Every intact block, in log order.
    pub(crate) blocks: Vec<Logged>,
    /// Segments whose torn tail is to be cut: `(segment, bytes cut)`.
    pub(crate) truncated: Vec<(String, u64)>,
    pub(crate) next_segment: u64,
    /// Torn tails found, as `(segment, valid length)`, cut by [`truncate_torn`].
    torn: Vec<(String, u64)>,
}

/// Reads every segment of `stream`: verifies checksums, truncates torn tails (reported in the
/// result and logged), fails on corruption. Every block is read into memory: the context
/// itself scans the log and reads blocks back one batch at a time.
pub fn recover(storage: &dyn Storage, stream: u32) -> Result<Recovered, WalError> {
    let s = scan(storage, stream)?;
    truncate_torn(storage, &s)?;
    let mut blocks = Vec::with_capacity(s.blocks.len());
    for b in s.blocks {
        blocks.push((load(storage, &b.location)?, b.location));
    }
    Ok(Recovered {
        stream,
        blocks,
        truncated: s.truncated,
        next_segment: s.next_segment,
    })
}

/// Like [`recover`], without changing any file and without keeping block data: one segment
/// is in memory at a time. The torn tails found are cut by [`truncate_torn`], once the
/// caller has checked that nothing acknowledged was in them.
pub(crate) fn scan(storage: &dyn Storage, stream: u32) -> Result<Scan, WalError> {
    let mut out = Scan {
        stream,
        ..Scan::default()
    };
    let mut names: Vec<(u64, String)> = storage
        .list()
        .map_err(|e| io_err("(listing)", e))?
        .into_iter()
        .filter_map(|n| {
            parse_segment(&n)
                .filter(|(s, _)| *s == stream)
                .map(|(_, k)| (k, n))
        })
        .collect();
    names.sort();
    // Only the newest segment was being written: only its tail can be torn by a crash.
    let newest = names.last().map(|(k, _)| *k);
    for (k, name) in names {
        out.next_segment = out.next_segment.max(k + 1);
        let bytes = storage.read(&name).map_err(|e| io_err(&name, e))?;
        let (frames, ending) = record::read_frames(&bytes, Some(k) == newest);
        for (offset, payload) in frames {
            let (id, records) = decode_head(payload).ok_or(WalError::BadRecord {
                segment: name.clone(),
                offset: offset as u64,
            })?;
            out.blocks.push(Logged {
                id,
                records,
                bytes: (payload.len() - PAYLOAD_HEAD) as u64,
                location: Location {
                    segment: name.clone(),
                    offset: offset as u64,
                },
            });
        }
        match ending {
            record::Ending::Clean => {}
            record::Ending::TornTail { valid_len } => {
                let cut = (bytes.len() - valid_len) as u64;
                out.truncated.push((name.clone(), cut));
                out.torn.push((name, valid_len as u64));
            }
            record::Ending::Corrupt { offset } => {
                tracing::error!(segment = %name, offset, "write-ahead log: corrupt segment");
                return Err(WalError::Corrupt {
                    segment: name,
                    offset: offset as u64,
                });
            }
        }
    }
    Ok(out)
}

/// Reads the block at `loc`, verifying both of its frame's checksums again (the file may have
/// changed since it was scanned).
pub(crate) fn load(storage: &dyn Storage, loc: &Location) -> Result<Block, WalError> {
    let corrupt = || WalError::Corrupt {
        segment: loc.segment.clone(),
        offset: loc.offset,
    };
    let head = storage
        .read_at(&loc.segment, loc.offset, record::HEADER)
        .map_err(|e| io_err(&loc.segment, e))?;
    let (len, crc) = record::parse_header(&head).ok_or_else(corrupt)?;
    let payload = storage
        .read_at(&loc.segment, loc.offset + record::HEADER as u64, len)
        .map_err(|e| io_err(&loc.segment, e))?;
    if crc32c::crc32c(&payload) != crc {
        return Err(corrupt());
    }
    decode_owned(payload).ok_or(WalError::BadRecord {
        segment: loc.segment.clone(),
        offset: loc.offset,
    })
}

/// Cuts the torn tails that [`scan`] found at their last good frame.
pub(crate) fn truncate_torn(storage: &dyn Storage, r: &Scan) -> Result<(), WalError> {
    for (name, valid_len) in &r.torn {
        tracing::warn!(segment = %name, valid_len, "write-ahead log: torn tail truncated");
        storage
            .truncate(name, *valid_len)
            .map_err(|e| io_err(name, e))?;
    }
    Ok(())
}

enum Cmd {
    Append(Block, oneshot::Sender<Result<Location, WalError>>),
    /// These blocks were processed; segments holding only processed blocks are deleted.
    Processed(Vec<BlockId>),
}

/// The write-ahead log of one stream. Appends are acknowledged per the [`SyncPolicy`].
#[derive(Debug)]
pub struct Wal {
    tx: Option<std_mpsc::Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An appended block waiting for its sync: the acknowledgement, where it is, its sequence.
type Pending = (oneshot::Sender<Result<Location, WalError>>, Location, u64);

struct Writer {
    storage: Arc<dyn Storage>,
    stream: u32,
    config: WalConfig,
    segment: u64,
    active: String,
    active_len: u64,
    /// Bytes of the active segment known durable (synced; written, with `SyncPolicy::Never`).
    synced_len: u64,
    opened: Instant,
    /// Unprocessed blocks per segment.
    live: BTreeMap<String, Vec<u64>>,
    broken: Option<WalError>,
}

impl Wal {
    /// Opens the log of `stream` for appending, continuing after segment `next_segment - 1`
    /// (from [`recover`]). `live` lists blocks already in the log and not processed yet, so
    /// their segments are kept until they are.
    pub fn open(
        storage: Arc<dyn Storage>,
        stream: u32,
        config: WalConfig,
        next_segment: u64,
        live: &[(BlockId, Location)],
    ) -> Wal {
        let (tx, rx) = std_mpsc::channel();
        let mut live_map: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (id, loc) in live {
            live_map
                .entry(loc.segment.clone())
                .or_default()
                .push(id.seq);
        }
        let writer = Writer {
            storage,
            stream,
            config,
            segment: next_segment,
            active: segment_name(stream, next_segment),
            active_len: 0,
            synced_len: 0,
            opened: Instant::now(),
            live: live_map,
            broken: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tributary-wal-{stream}"))
            .spawn(move || writer.run(rx))
            .ok();
        Wal {
            tx: Some(tx),
            thread,
        }
    }

    /// Appends `block`; resolves once it is durable per the sync policy.
    ///
    /// The block is handed to the writer when this is called (not when the future is first
    /// polled), so appends are logged in call order even when their futures are awaited
    /// together.
    pub fn append(
        &self,
        block: Block,
    ) -> impl std::future::Future<Output = Result<Location, WalError>> + Send + 'static {
        let (ack, rx) = oneshot::channel();
        let sent = self.tx.as_ref().ok_or(WalError::Closed).and_then(|tx| {
            tx.send(Cmd::Append(block, ack))
                .map_err(|_| WalError::Closed)
        });
        async move {
            sent?;
            rx.await.map_err(|_| WalError::Closed)?
        }
    }

    /// Marks blocks as processed: segments with no unprocessed block left (other than the one
    /// being written) are deleted.
    pub fn processed(&self, ids: Vec<BlockId>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Processed(ids));
        }
    }

    /// Syncs what is pending and stops the writer thread.
    pub fn close(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
        let mut pending: Vec<Pending> = Vec::new();
        let mut last_sync = Instant::now();
        let mut buf = Vec::new();
        loop {
            let wait = match self.config.sync {
                SyncPolicy::Interval(d) if !pending.is_empty() => {
                    d.saturating_sub(last_sync.elapsed())
                }
                _ => Duration::from_secs(1),
            };
            let first = match rx.recv_timeout(wait) {
                Ok(cmd) => Some(cmd),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    self.sync_and_ack(&mut pending);
                    return;
                }
            };
            // Group: everything queued now goes into one write and one sync.
            let mut cmds: Vec<Cmd> = first.into_iter().collect();
            while let Ok(cmd) = rx.try_recv() {
                cmds.push(cmd);
            }
            buf.clear();
            let mut appended: Vec<Pending> = Vec::new();
            for cmd in cmds {
                match cmd {
                    Cmd::Append(block, ack) => {
                        if self.broken.is_some() && !self.repair() {
                            let _ = ack.send(Err(self.broken.clone().unwrap_or(WalError::Closed)));
                            continue;
                        }
                        let loc = Location {
                            segment: self.active.clone(),
                            offset: self.active_len + buf.len() as u64,
                        };
                        encode(&block, &mut buf);
                        appended.push((ack, loc, block.id.seq));
                    }
                    Cmd::Processed(ids) => self.forget(&ids),
                }
            }
            if !buf.is_empty() {
                match self.storage.append(&self.active, &buf) {
                    Ok(()) => {
                        self.active_len += buf.len() as u64;
                        let seqs = self.live.entry(self.active.clone()).or_default();
                        seqs.extend(appended.iter().map(|(_, _, seq)| *seq));
                        if self.config.sync == SyncPolicy::Never {
                            self.synced_len = self.active_len;
                        }
                        pending.extend(appended);
                    }
                    Err(e) => {
                        // Never acknowledged; the file is cut back to what it was before this
                        // write, so a partial frame cannot sit in the middle of the segment.
                        let err = io_err(&self.active, e);
                        self.failed(&err, appended);
                        self.cut_back(self.active_len, &err);
                    }
                }
            }
            let due = match self.config.sync {
                SyncPolicy::EveryBlock => true,
                SyncPolicy::Interval(d) => last_sync.elapsed() >= d,
                SyncPolicy::Never => false,
            };
            if self.config.sync == SyncPolicy::Never {
                for (ack, loc, _) in pending.drain(..) {
                    let _ = ack.send(Ok(loc));
                }
            } else if due && !pending.is_empty() {
                self.sync_and_ack(&mut pending);
                last_sync = Instant::now();
            }
            if self.active_len >= self.config.segment_bytes
                || (self.active_len > 0 && self.opened.elapsed() >= self.config.segment_age)
            {
                self.sync_and_ack(&mut pending);
                self.roll();
            }
        }
    }

    fn sync_and_ack(&mut self, pending: &mut Vec<Pending>) {
        if pending.is_empty() {
            return;
        }
        let result = if self.config.sync == SyncPolicy::Never {
            Ok(())
        } else {
            self.storage
                .sync(&self.active)
                .map_err(|e| io_err(&self.active, e))
        };
        metrics::counter!(crate::telemetry::WAL_SYNCS_TOTAL).increment(1);
        match result {
            Ok(()) => {
                self.synced_len = self.active_len;
                for (ack, loc, _) in pending.drain(..) {
                    let _ = ack.send(Ok(loc));
                }
            }
            Err(err) => {
                // After a failed fsync the kernel may have dropped the unsynced pages: what was
                // written since the last good sync is cut off (none of it was acknowledged),
                // and the log goes on in a fresh segment.
                let failed = std::mem::take(pending);
                self.failed(&err, failed);
                if self.cut_back(self.synced_len, &err) {
                    self.roll();
                }
            }
        }
    }

    /// Fails the acknowledgements of blocks that did not make it, and forgets them.
    fn failed(&mut self, err: &WalError, blocks: Vec<Pending>) {
        tracing::error!(error = %err, blocks = blocks.len(), "write-ahead log: write failed; the blocks are not acknowledged");
        metrics::counter!(crate::telemetry::WAL_WRITE_FAILURES_TOTAL).increment(1);
        for (ack, loc, seq) in blocks {
            if let Some(seqs) = self.live.get_mut(&loc.segment) {
                seqs.retain(|s| *s != seq);
            }
            let _ = ack.send(Err(err.clone()));
        }
    }

    /// Cuts the active segment back to `len`. On failure the log is broken until a later
    /// [`Writer::repair`] succeeds. Returns whether the cut succeeded.
    fn cut_back(&mut self, len: u64, err: &WalError) -> bool {
        match self.storage.truncate(&self.active, len) {
            Ok(()) => {
                self.active_len = len;
                self.synced_len = self.synced_len.min(len);
                true
            }
            Err(e) => {
                tracing::error!(segment = %self.active, error = %e, "write-ahead log: could not cut a failed write back; appends fail until it can");
                self.broken = Some(err.clone());
                false
            }
        }
    }

    /// Tries again to cut the active segment back to its last durable length; on success the
    /// log takes appends again, in a fresh segment.
    fn repair(&mut self) -> bool {
        let Some(err) = self.broken.clone() else {
            return true;
        };
        if self.cut_back(self.synced_len, &err) {
            self.broken = None;
            self.roll();
            tracing::warn!(segment = %self.active, "write-ahead log recovered: appending again");
            metrics::counter!(crate::telemetry::WAL_RECOVERED_TOTAL).increment(1);
            true
        } else {
            false
        }
    }

    fn roll(&mut self) {
        self.segment += 1;
        self.active = segment_name(self.stream, self.segment);
        self.active_len = 0;
        self.synced_len = 0;
        self.opened = Instant::now();
        // Segments already fully processed can go now.
        self.forget(&[]);
    }

    fn forget(&mut self, ids: &[BlockId]) {
        for seqs in self.live.values_mut() {
            seqs.retain(|s| {
                !ids.iter()
                    .any(|id| id.stream == self.stream && id.seq == *s)
            });
        }
        let done: Vec<String> = self
            .live
            .iter()
            .filter(|(name, seqs)| seqs.is_empty() && **name != self.active)
            .map(|(name, _)| name.clone())
            .collect();
        for name in done {
            self.live.remove(&name);
            match self.storage.remove(&name) {
                Ok(()) => tracing::debug!(segment = %name, "write-ahead log segment deleted"),
                Err(e) => {
                    tracing::warn!(segment = %name, error = %e, "could not delete a processed segment")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seq: u64, payload: &'static [u8]) -> Block {
        Block {
            id: BlockId { stream: 3, seq },
            created: UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000 + seq),
            records: 1,
            data: Bytes::from_static(payload),
        }
    }

    fn mem() -> (MemStorage, Arc<dyn Storage>) {
        let m = MemStorage::new();
        let s: Arc<dyn Storage> = Arc::new(m.clone());
        (m, s)
    }

    #[tokio::test]
    async fn the_sync_completes_before_the_acknowledgement() {
        let (m, s) = mem();
        let wal = Wal::open(s, 3, WalConfig::default(), 0, &[]);
        for seq in 0..3 {
            wal.append(block(seq, b"data")).await.unwrap();
            m.mark(format!("ack {seq}"));
        }
        let ops = m.ops();
        for seq in 0..3 {
            let ack = ops
                .iter()
                .position(|o| *o == Op::Mark(format!("ack {seq}")))
                .unwrap();
            let appends_before = ops[..ack]
                .iter()
                .filter(|o| matches!(o, Op::Append(..)))
                .count();
            let last_append = ops[..ack]
                .iter()
                .rposition(|o| matches!(o, Op::Append(..)))
                .unwrap();
            assert!(appends_before > seq as usize);
            assert!(
                ops[last_append..ack]
                    .iter()
                    .any(|o| matches!(o, Op::Sync(_))),
                "ack {seq} without a sync after its append: {ops:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_scan_keeps_no_data_and_a_load_verifies_the_frame_again() {
        let (m, s) = mem();
        let wal = Wal::open(s.clone(), 3, WalConfig::default(), 0, &[]);
        for seq in 0..3 {
            wal.append(block(seq, b"some payload")).await.unwrap();
        }
        drop(wal);
        let found = scan(s.as_ref(), 3).unwrap();
        assert_eq!(found.blocks.len(), 3);
        assert!(found.blocks.iter().all(|b| b.bytes == 12 && b.records == 1));
        let second = &found.blocks[1];
        let back = load(s.as_ref(), &second.location).unwrap();
        let want = block(1, b"some payload");
        assert_eq!(
            (back.id, back.records, back.created),
            (want.id, want.records, want.created)
        );
        assert_eq!(back.data, want.data);
        // Damage after the scan (a payload byte) is found when the block is read back.
        let at = second.location.offset as usize + record::HEADER + PAYLOAD_HEAD + 2;
        m.corrupt(&second.location.segment, at, 0x40);
        assert!(matches!(
            load(s.as_ref(), &second.location),
            Err(WalError::Corrupt { offset, .. }) if offset == second.location.offset
        ));
        // And a damaged header.
        m.corrupt(
            &second.location.segment,
            second.location.offset as usize + 1,
            0x01,
        );
        assert!(matches!(
            load(s.as_ref(), &second.location),
            Err(WalError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn acknowledged_blocks_survive_a_crash_and_are_recovered_in_order() {
        let (m, s) = mem();
        let wal = Wal::open(s.clone(), 3, WalConfig::default(), 0, &[]);
        for seq in 0..10 {
            wal.append(block(seq, b"payload")).await.unwrap();
        }
        drop(wal);
        m.crash();
        let r = recover(s.as_ref(), 3).unwrap();
        let seqs: Vec<u64> = r.blocks.iter().map(|(b, _)| b.id.seq).collect();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>());
        assert_eq!(&r.blocks[4].0.data[..], b"payload");
        assert_eq!(r.blocks[4].0.created, block(4, b"").created);
        assert!(r.truncated.is_empty());
    }

    #[tokio::test]
    async fn with_sync_never_a_crash_loses_what_was_acknowledged() {
        let (m, s) = mem();
        let wal = Wal::open(
            s.clone(),
            3,
            WalConfig {
                sync: SyncPolicy::Never,
                ..WalConfig::default()
            },
            0,
            &[],
        );
        wal.append(block(0, b"x")).await.unwrap();
        m.crash();
        assert!(
            recover(s.as_ref(), 3).unwrap().blocks.is_empty(),
            "nothing was synced"
        );
        assert!(!m.ops().iter().any(|o| matches!(o, Op::Sync(_))));
    }

    #[tokio::test]
    async fn recovery_truncates_a_torn_tail_and_reports_it() {
        let (m, s) = mem();
        let wal = Wal::open(s.clone(), 3, WalConfig::default(), 0, &[]);
        wal.append(block(0, b"first")).await.unwrap();
        wal.append(block(1, b"second")).await.unwrap();
        drop(wal);
        // A torn append: half a frame at the end.
        s.append(&segment_name(3, 0), &[9, 0, 0, 0, 1, 2]).unwrap();
        let r = recover(s.as_ref(), 3).unwrap();
        assert_eq!(r.blocks.len(), 2);
        assert_eq!(r.truncated, vec![(segment_name(3, 0), 6)]);
        // Truncated on disk: a second recovery is clean.
        assert!(recover(s.as_ref(), 3).unwrap().truncated.is_empty());
        assert!(m.ops().iter().any(|o| matches!(o, Op::Truncate(..))));
    }

    #[tokio::test]
    async fn corruption_in_the_middle_is_an_error_with_segment_and_offset() {
        let (m, s) = mem();
        let wal = Wal::open(s.clone(), 3, WalConfig::default(), 0, &[]);
        let first = wal.append(block(0, b"first")).await.unwrap();
        wal.append(block(1, b"second")).await.unwrap();
        drop(wal);
        m.corrupt(&first.segment, 8 + 25, 0xff);
        let err = recover(s.as_ref(), 3).unwrap_err();
        assert_eq!(
            err,
            WalError::Corrupt {
                segment: segment_name(3, 0),
                offset: 0
            }
        );
        assert!(err.is_corruption());
    }

    #[tokio::test]
    async fn segments_roll_by_size_and_are_deleted_once_processed() {
        let (m, s) = mem();
        let config = WalConfig {
            segment_bytes: 100,
            ..WalConfig::default()
        };
        let wal = Wal::open(s.clone(), 3, config, 0, &[]);
        let mut ids = Vec::new();
        for seq in 0..6 {
            wal.append(block(seq, b"0123456789012345678901234567890123456789"))
                .await
                .unwrap();
            ids.push(BlockId { stream: 3, seq });
        }
        let segments = s.list().unwrap();
        assert!(segments.len() >= 3, "{segments:?}");
        wal.processed(ids[..4].to_vec());
        wal.append(block(6, b"x")).await.unwrap(); // the writer has handled `processed` by now
        let left = recover(s.as_ref(), 3).unwrap();
        let seqs: Vec<u64> = left.blocks.iter().map(|(b, _)| b.id.seq).collect();
        assert!(
            seqs.contains(&4) && seqs.contains(&5) && seqs.contains(&6),
            "{seqs:?}"
        );
        assert!(
            !seqs.contains(&0),
            "a fully processed segment was deleted: {seqs:?}"
        );
        assert!(m.ops().iter().any(|o| matches!(o, Op::Remove(_))));
    }

    #[tokio::test]
    async fn group_commit_syncs_once_for_concurrent_appends() {
        let (m, s) = mem();
        let wal = Arc::new(Wal::open(s, 3, WalConfig::default(), 0, &[]));
        let tasks: Vec<_> = (0..50)
            .map(|seq| {
                let wal = wal.clone();
                tokio::spawn(async move { wal.append(block(seq, b"abc")).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let ops = m.ops();
        let syncs = ops.iter().filter(|o| matches!(o, Op::Sync(_))).count();
        let writes = ops.iter().filter(|o| matches!(o, Op::Append(..))).count();
        // One write and one sync per group, however many blocks the group holds.
        assert_eq!(syncs, writes, "{ops:?}");
        assert!(writes <= 50);
    }

    #[test]
    fn dir_storage_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStorage::new(dir.path()).unwrap();
        s.append("a.wal", b"hello").unwrap();
        s.sync("a.wal").unwrap();
        s.append("a.wal", b" world").unwrap();
        assert_eq!(s.read("a.wal").unwrap(), b"hello world");
        assert_eq!(s.read_at("a.wal", 6, 5).unwrap(), b"world");
        s.truncate("a.wal", 5).unwrap();
        assert_eq!(s.read("a.wal").unwrap(), b"hello");
        assert_eq!(s.list().unwrap(), vec!["a.wal".to_string()]);
        s.remove("a.wal").unwrap();
        assert!(s.list().unwrap().is_empty());
    }
}
