//! Damage in the write-ahead log is never mistaken for a torn tail: a start on a damaged log
//! is refused with the segment and offset, and nothing the metadata log recorded as
//! acknowledged may be missing from the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tributary::wal::{WalConfig, WalError, WalRecovery};
use tributary::{Backpressure, ContextError, StreamingContext};
use tributary_receivers::synthetic::SyntheticReceiver;

const RECORDS: u64 = 20_000;

/// The job: a synthetic source, small WAL segments, batches too long to run before the stop.
fn job(dir: &Path, source: SyntheticReceiver, counted: Arc<AtomicU64>) -> StreamingContext {
    job_with(dir, source, counted, WalRecovery::Strict)
}

fn job_with(
    dir: &Path,
    source: SyntheticReceiver,
    counted: Arc<AtomicU64>,
    recovery: WalRecovery,
) -> StreamingContext {
    StreamingContext::get_or_create(dir, move |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(60))
            .block_interval(Duration::from_millis(5))
            // The log is filled as fast as the source goes (its own 100,000/s), not paced
            // from 1,000/s for the first 60 s batch.
            .backpressure(Backpressure::off())
            .write_ahead_log(WalConfig {
                segment_bytes: 256 << 10,
                recovery,
                ..WalConfig::default()
            })
            .build()?;
        ctx.receiver_stream("numbers", source)?
            .count()
            .for_each_batch(move |b| {
                counted.fetch_add(b.records[0], Ordering::SeqCst);
            })?;
        Ok(ctx)
    })
    .unwrap()
}

/// Runs the job until every record is acknowledged, then stops it abruptly: every block is in
/// the log, none processed. Returns the segments, oldest first.
async fn fill(dir: &Path) -> Vec<PathBuf> {
    let source = source();
    let ctx = job(dir, source.clone(), Arc::default());
    ctx.start().await.unwrap();
    for _ in 0..1000 {
        if source.generated() >= RECORDS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ctx.stop(false).await.unwrap();
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    segs
}

/// 20,000 records of ~100 bytes at 100,000 per second: ~40 blocks, ~8 segments.
fn source() -> SyntheticReceiver {
    SyntheticReceiver::new()
        .limit(RECORDS)
        .rate(100_000.0)
        .chunk(50)
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Starts the same job on the damaged directory: it must refuse, and the files must be left
/// as they were (nothing truncated).
async fn refused(dir: &Path) -> WalError {
    let before: Vec<(PathBuf, u64)> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .flatten()
        .map(|e| (e.path(), e.metadata().unwrap().len()))
        .collect();
    let ctx = job(dir, source(), Arc::default());
    let err = tokio::time::timeout(Duration::from_secs(30), ctx.start())
        .await
        .expect("start returns")
        .expect_err("a damaged log must be refused");
    for (p, len) in before {
        assert_eq!(
            std::fs::metadata(&p).map(|m| m.len()).ok(),
            Some(len),
            "{} changed",
            p.display()
        );
    }
    match err {
        ContextError::Wal(e) => {
            assert!(e.is_corruption(), "{e}");
            e
        }
        other => panic!("not a WAL error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_length_in_the_middle_of_a_segment_is_corruption_not_a_torn_tail() {
    let grown: [fn(u32) -> u32; 2] = [|len| len + (16 << 20), |len| len | (1 << 31)];
    for grow in grown {
        let tmp = tempfile::tempdir().unwrap();
        let segs = fill(tmp.path()).await;
        let seg = &segs[segs.len() - 1];
        let mut bytes = std::fs::read(seg).unwrap();
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        bytes[0..4].copy_from_slice(&grow(len).to_le_bytes());
        std::fs::write(seg, &bytes).unwrap();
        match refused(tmp.path()).await {
            WalError::Corrupt { segment, offset } => {
                assert_eq!(segment, name(seg));
                assert_eq!(offset, 0);
            }
            other => panic!("{other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_of_an_older_segment_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let segs = fill(tmp.path()).await;
    let seg = &segs[0];
    let len = std::fs::metadata(seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    match refused(tmp.path()).await {
        WalError::Corrupt { segment, .. } => assert_eq!(segment, name(seg)),
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_blocks_missing_from_the_log_are_refused_with_their_count() {
    // The last segment emptied reads as a clean end, but the metadata log knows that the
    // blocks that were in it were acknowledged.
    let tmp = tempfile::tempdir().unwrap();
    let segs = fill(tmp.path()).await;
    let seg = &segs[segs.len() - 1];
    assert!(std::fs::metadata(seg).unwrap().len() > 0);
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(0).unwrap();
    drop(f);
    match refused(tmp.path()).await {
        WalError::AcknowledgedMissing {
            stream,
            blocks,
            records,
        } => {
            assert_eq!(stream, 0);
            assert!(
                blocks >= 1 && records >= 50,
                "{blocks} blocks, {records} records"
            );
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quarantine_mode_goes_on_and_reports_exactly_what_the_damage_cost() {
    let tmp = tempfile::tempdir().unwrap();
    let segs = fill(tmp.path()).await;
    // A flipped payload byte in the first frame of an older segment.
    let seg = &segs[1];
    let mut bytes = std::fs::read(seg).unwrap();
    let original = bytes.clone();
    bytes[40] ^= 0x10;
    std::fs::write(seg, &bytes).unwrap();
    let frames_after_damage = {
        // Blocks in the damaged segment: every one is lost (the damage is in the first frame).
        let mut n = 0;
        let mut at = 0usize;
        while at + 12 <= original.len() {
            let len = u32::from_le_bytes(original[at..at + 4].try_into().unwrap()) as usize;
            at += 12 + len;
            n += 1;
        }
        n
    };
    assert!(matches!(
        refused(tmp.path()).await,
        WalError::Corrupt { .. }
    ));

    let counted = Arc::new(AtomicU64::new(0));
    // The source sends nothing new: what the batches count is what the log gave back.
    let ctx = job_with(
        tmp.path(),
        source().limit(0),
        counted.clone(),
        WalRecovery::QuarantineDamaged,
    );
    ctx.start().await.expect("the quarantine mode starts");
    let report = ctx.recovery_report().expect("a report");
    assert_eq!(report.quarantined_segments, vec![(name(seg), 0)]);
    assert_eq!(report.lost_blocks, frames_after_damage, "{report:?}");
    let copy = tmp.path().join("wal/quarantine").join(name(seg));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        bytes,
        "the damaged segment is kept aside"
    );
    assert_eq!(
        std::fs::metadata(seg).unwrap().len(),
        0,
        "cut at the damage"
    );
    ctx.stop(true).await.unwrap();
    // Everything else was processed: the lost records are exactly the ones reported.
    assert_eq!(
        counted.load(Ordering::SeqCst) + report.lost_records,
        RECORDS,
        "{report:?}"
    );
    // The directory is sound again: a strict start works.
    let ctx = job(tmp.path(), source().limit(0), Arc::default());
    ctx.start().await.unwrap();
    ctx.stop(true).await.unwrap();
}
