//! Checkpoint directories and reliable storing, in process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::wal::{recover, DirStorage, WalConfig};
use tributary::{ContextError, StreamingContext};

mod durability_support;
use durability_support::Reliable;

fn job(
    dir: &std::path::Path,
    acked: Arc<AtomicU64>,
    limit: u64,
    seen: Arc<Mutex<Vec<u64>>>,
) -> Result<StreamingContext, ContextError> {
    StreamingContext::get_or_create(dir, move |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(5)) // long: the first run stops before a batch
            .block_interval(Duration::from_millis(50))
            .write_ahead_log(WalConfig::default())
            .build()?;
        ctx.receiver_stream(
            "numbers",
            Reliable {
                acked,
                limit,
                pause: Duration::ZERO,
            },
        )?
        .map(|s: String| s.parse::<u64>().unwrap())
        .for_each_batch(move |b| seen.lock().unwrap().extend(b.records))?;
        Ok(ctx)
    })
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliably_stored_records_are_in_the_log_and_recovered_after_an_abrupt_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let acked = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();

    let ctx = job(&dir, acked.clone(), 5_000, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    wait_until(|| acked.load(Ordering::SeqCst) >= 5_000).await;
    // Acknowledged means in the log, synced: read it back from disk right now.
    let storage = DirStorage::new(dir.join("wal")).unwrap();
    let logged: u64 = recover(&storage, 0)
        .unwrap()
        .blocks
        .iter()
        .map(|(b, _)| u64::from(b.records))
        .sum();
    assert!(logged >= 5_000, "only {logged} records in the log");
    ctx.stop(false).await.unwrap(); // abrupt: nothing processed (5 s batches)
    assert!(seen.lock().unwrap().is_empty());

    let ctx = job(&dir, acked.clone(), 5_000, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    let report = ctx.recovery_report().expect("recovered");
    assert!(report.recovered_records >= 5_000, "{report:?}");
    assert_eq!(report.lost_blocks, 0);
    ctx.stop(true).await.unwrap();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..5_000).collect::<Vec<_>>(),
        "each acknowledged record processed once"
    );
}

#[tokio::test]
async fn foreign_incompatible_and_unwritable_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let define = |b: tributary::StreamingContextBuilder| -> Result<StreamingContext, ContextError> {
        let ctx = b.build()?;
        ctx.receiver_stream(
            "numbers",
            Reliable {
                acked: Arc::default(),
                limit: 0,
                pause: Duration::ZERO,
            },
        )?;
        Ok(ctx)
    };
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("data.csv"), b"1,2,3").unwrap();
    let err = StreamingContext::get_or_create(&foreign, define).unwrap_err();
    assert!(
        err.to_string().contains("not written by Tributary"),
        "{err}"
    );

    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("tributary.json"),
        br#"{"format": 0, "streams": ["numbers"]}"#,
    )
    .unwrap();
    let err = StreamingContext::get_or_create(&old, define).unwrap_err();
    assert!(err.to_string().contains("format 0"), "{err}");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = StreamingContext::get_or_create(file.join("sub"), define).unwrap_err();
    assert!(
        matches!(&err, ContextError::Config(e) if e.setting == "checkpoint_dir"),
        "{err}"
    );

    let err = StreamingContext::builder()
        .write_ahead_log(WalConfig::default())
        .build()
        .unwrap_err();
    assert_eq!(err.setting, "write_ahead_log");
}

/// Stores records of `RECORD` bytes (a number, padded), 100 per call, reliably.
struct Wide {
    acked: Arc<AtomicU64>,
    limit: u64,
}

const RECORD: usize = 1024;

impl tributary::Receiver for Wide {
    type Msg = durability_support::Go;
    type State = u64;
    type Record = String;

    async fn pre_start(
        &self,
        ctx: &tributary::ReceiverContext<Self>,
    ) -> Result<u64, tributary::BoxError> {
        let _ = ctx.myself().send(durability_support::Go);
        Ok(self.acked.load(Ordering::SeqCst))
    }

    async fn handle(
        &self,
        ctx: &tributary::ReceiverContext<Self>,
        _: durability_support::Go,
        next: &mut u64,
    ) -> Result<(), tributary::BoxError> {
        if *next >= self.limit {
            return Ok(());
        }
        ctx.store_reliably((*next..*next + 100).map(|n| format!("{n:0>RECORD$}")))
            .await?;
        *next += 100;
        self.acked.store(*next, Ordering::SeqCst);
        let _ = ctx.myself().send(durability_support::Go);
        Ok(())
    }
}

fn wide_job(
    dir: &std::path::Path,
    acked: Arc<AtomicU64>,
    batch: Duration,
    memory: usize,
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
) -> Result<StreamingContext, ContextError> {
    StreamingContext::get_or_create(dir, move |b| {
        let ctx = b
            .batch_interval(batch)
            .block_interval(Duration::from_millis(20))
            .max_block_bytes(64 * 1024)
            .memory_limit(memory)
            .write_ahead_log(WalConfig::default())
            .build()?;
        ctx.receiver_stream(
            "wide",
            Wide {
                acked,
                limit: 20_000,
            },
        )?
        .map(|s: String| s.parse::<u64>().unwrap())
        .for_each_batch(move |b| batches.lock().unwrap().push(b.records))?;
        Ok(ctx)
    })
}

/// 20 MB acknowledged and unprocessed in the log; the next start has a 1 MiB budget. Recovery
/// reads the blocks back a batch at a time, each batch within the budget (before: every
/// recovered block was read into memory at start, and the first batch held all of them),
/// and every record is processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_reads_the_log_back_within_the_memory_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let acked = Arc::new(AtomicU64::new(0));
    let batches: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();

    // First run: the default budget holds everything; stopped before its first batch.
    let first = wide_job(
        &dir,
        acked.clone(),
        Duration::from_secs(60),
        1 << 30,
        Arc::default(),
    )
    .unwrap();
    first.start().await.unwrap();
    for _ in 0..3000 {
        if acked.load(Ordering::SeqCst) >= 20_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        acked.load(Ordering::SeqCst),
        20_000,
        "first run acknowledged all"
    );
    first.stop(false).await.unwrap(); // abrupt, before the first (60 s) batch

    let budget = 1 << 20;
    let ctx = wide_job(
        &dir,
        acked.clone(),
        Duration::from_millis(200),
        budget,
        batches.clone(),
    )
    .unwrap();
    ctx.start().await.unwrap();
    let report = ctx.recovery_report().expect("recovered");
    assert_eq!(report.recovered_records, 20_000, "{report:?}");
    for _ in 0..3000 {
        let seen: usize = batches.lock().unwrap().iter().map(Vec::len).sum();
        if seen >= 20_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ctx.stop(true).await.unwrap();
    let batches = batches.lock().unwrap().clone();
    let mut all: Vec<u64> = batches.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..20_000).collect::<Vec<_>>(), "each record once");
    // A block holds at most 64 KiB of records: a batch may pass the budget by less than
    // one block (the block that reaches it is the last one taken).
    let per_batch_max = (budget + 64 * 1024) / RECORD;
    let sizes: Vec<usize> = batches.iter().map(Vec::len).filter(|n| *n > 0).collect();
    assert!(
        sizes.iter().all(|n| *n <= per_batch_max),
        "a batch read more than the budget back: {sizes:?} (max {per_batch_max} records)"
    );
    assert!(sizes.len() >= 15, "recovered over many batches: {sizes:?}");
}

/// With the write-ahead log on and k = 1, a worker that dies takes the only replica of its
/// unprocessed blocks: they are read back from the log and placed on a survivor, not lost
/// (before: reported lost, cause WorkerLost, although the log held them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_log_a_block_whose_last_replica_dies_is_read_back_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let acked = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (a, s) = (acked.clone(), seen.clone());
    let ctx = StreamingContext::get_or_create(&dir, move |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(1))
            .block_interval(Duration::from_millis(20))
            .workers(2)
            .replication(1)
            .write_ahead_log(WalConfig::default())
            // Blocks stay on their worker until their batch completes (with early tasks a
            // processed block is freed at once, and the kill would find none to lose).
            .early_tasks(false)
            .build()?;
        ctx.receiver_stream(
            "numbers",
            Reliable {
                acked: a,
                limit: 20_000,
                pause: Duration::from_millis(2),
            },
        )?
        .map(|s: String| s.parse::<u64>().unwrap())
        .for_each_batch(move |b| s.lock().unwrap().extend(b.records))?;
        Ok(ctx)
    })
    .unwrap();
    ctx.start().await.unwrap();
    wait_until(|| acked.load(Ordering::SeqCst) >= 3_000).await;
    // Every unprocessed block has its only replica on worker 0 (the receiver's home).
    let held = ctx.worker_block_count(0).await.unwrap_or(0);
    assert!(held > 0, "worker 0 holds blocks");
    assert!(ctx.kill_worker(0).await);
    wait_until(|| acked.load(Ordering::SeqCst) >= 20_000).await;
    ctx.stop(true).await.unwrap();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    let missing = (0..20_000u64)
        .filter(|n| got.binary_search(n).is_err())
        .count();
    assert_eq!(
        missing, 0,
        "{missing} acknowledged records lost with the worker"
    );
    got.dedup();
    assert_eq!(got.len(), 20_000);
}
