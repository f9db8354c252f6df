//! Direct (replayable) streams in one process: every record read once, ranges contiguous,
//! the rate per partition respected, a retried task reading the same range, an unavailable
//! source waited for, and bad input (a truncated or vanished file, an oversized record)
//! stopping the context with an error that names it, never skipped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::{
    Backpressure, ByteString, ContextError, DirectOptions, DirectSource, OffsetRange, PlannedRange,
    RangeLimits, RangeSink, SourceError, StreamingContext,
};
use tributary_receivers::file_log::{FileLog, FileLogWriter};

/// Per batch: its id, its offset ranges and its records.
type Seen = Arc<Mutex<Vec<(u64, Vec<OffsetRange>, Vec<String>)>>>;

fn write(dir: &Path, partition: u32, from: u64, n: u64) {
    let mut w = FileLogWriter::open(dir, partition).unwrap();
    for i in from..from + n {
        w.append(format!("p{partition}-{i}").as_bytes()).unwrap();
    }
    w.flush().unwrap();
}

fn context(interval_ms: u64) -> StreamingContext {
    StreamingContext::builder()
        .batch_interval(Duration::from_millis(interval_ms))
        .backpressure(Backpressure::off())
        .build()
        .unwrap()
}

fn collect<S: DirectSource>(ctx: &StreamingContext, source: S, options: DirectOptions) -> Seen {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    ctx.direct_stream_with("log", source, options)
        .unwrap()
        .map(|l: ByteString| l.to_string())
        .for_each_batch(move |b| {
            s.lock()
                .unwrap()
                .push((b.id.0, b.offsets.clone(), b.records));
        })
        .unwrap();
    seen
}

fn records(seen: &Seen) -> usize {
    seen.lock().unwrap().iter().map(|(_, _, r)| r.len()).sum()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each record exactly once, and each partition's ranges back to back from offset 0.
fn assert_exactly_once(seen: &Seen, partitions: u32, per_partition: u64) {
    let seen = seen.lock().unwrap();
    let mut count: HashMap<&str, u32> = HashMap::new();
    for (_, _, recs) in seen.iter() {
        for r in recs {
            *count.entry(r.as_str()).or_default() += 1;
        }
    }
    for p in 0..partitions {
        for i in 0..per_partition {
            let key = format!("p{p}-{i}");
            assert_eq!(count.get(key.as_str()), Some(&1), "{key}");
        }
    }
    assert_eq!(count.len() as u64, u64::from(partitions) * per_partition);
    let mut next: HashMap<u32, u64> = HashMap::new();
    for (_, offsets, _) in seen.iter() {
        for r in offsets {
            let at = next.entry(r.partition).or_insert(0);
            assert_eq!(
                r.from, *at,
                "ranges of partition {} are contiguous",
                r.partition
            );
            *at = r.until;
        }
    }
}

/// Runs `ctx` with a direct stream on `source` until it read `partitions × per_partition`
/// records, stops it, and checks each was read exactly once, in contiguous ranges.
async fn read_everything<S: DirectSource>(
    ctx: &StreamingContext,
    source: S,
    options: DirectOptions,
    partitions: u32,
    per_partition: u64,
) -> Seen {
    let seen = collect(ctx, source, options);
    ctx.start().await.unwrap();
    let n = (u64::from(partitions) * per_partition) as usize;
    wait_until("all records read", || records(&seen) >= n).await;
    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seen, partitions, per_partition);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_read_once_while_the_log_grows() {
    let dir = tempfile::tempdir().unwrap();
    for p in 0..3 {
        write(dir.path(), p, 0, 0);
    }
    let ctx = context(50);
    let seen = collect(
        &ctx,
        FileLog::open(dir.path()).unwrap(),
        DirectOptions::default(),
    );
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    // Appended while batches run: 3 partitions × 20 chunks of 500.
    for chunk in 0..20u64 {
        for p in 0..3 {
            write(dir.path(), p, chunk * 500, 500);
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    wait_until("all records read", || records(&seen) >= 30_000).await;
    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seen, 3, 10_000);
    // The reports carry the same ranges, by stream name.
    let mut reported = 0;
    while let Ok(info) = reports.try_recv() {
        let in_ranges: u64 = info.offsets.values().flatten().map(|r| r.records).sum();
        assert_eq!(in_ranges, info.records);
        reported += info.records;
    }
    assert_eq!(reported, 30_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_reads_more_than_the_rate_per_partition_allows() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 3_000);
    write(dir.path(), 1, 0, 3_000);
    let ctx = context(100);
    // 5,000 records/s per partition × 100 ms = 500 per partition per batch.
    let options = DirectOptions::default().max_rate_per_partition(5_000);
    let seen = read_everything(&ctx, FileLog::open(dir.path()).unwrap(), options, 2, 3_000).await;
    let seen = seen.lock().unwrap();
    let full = seen.iter().filter(|(_, o, _)| !o.is_empty()).count();
    assert!(
        full >= 6,
        "6,000 records at 1,000 per batch take 6 batches, got {full}"
    );
    for (id, offsets, _) in seen.iter() {
        for r in offsets {
            assert!(
                r.records <= 500,
                "batch {id} read {} of partition {}",
                r.records,
                r.partition
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_rate_paces_a_direct_stream_from_its_initial_rate() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 20_000);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .backpressure(
            Backpressure::default()
                .initial_rate(2_000.0)
                .max_rate(50_000.0),
        )
        .build()
        .unwrap();
    let log = FileLog::open(dir.path()).unwrap();
    let seen = read_everything(&ctx, log, DirectOptions::default(), 1, 20_000).await;
    let seen = seen.lock().unwrap();
    let sizes: Vec<usize> = seen
        .iter()
        .filter(|(_, o, _)| !o.is_empty())
        .map(|(_, _, r)| r.len())
        .collect();
    // The first batch at the initial rate (2,000/s × 100 ms), none above the maximum.
    assert_eq!(sizes[0], 200, "{sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 5_000), "{sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_panics_is_retried_on_the_same_range() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 2_000);
    let ctx = context(50);
    let panicked = Arc::new(AtomicBool::new(false));
    let p = panicked.clone();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    ctx.direct_stream("log", FileLog::open(dir.path()).unwrap())
        .unwrap()
        .map(move |l: ByteString| {
            if &*l == "p0-1234" && !p.swap(true, Ordering::SeqCst) {
                panic!("a bad record, once");
            }
            l.to_string()
        })
        .for_each_batch(move |b| {
            s.lock()
                .unwrap()
                .push((b.id.0, b.offsets.clone(), b.records))
        })
        .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    wait_until("all records read", || records(&seen) >= 2_000).await;
    ctx.stop(true).await.unwrap();
    assert!(panicked.load(Ordering::SeqCst));
    assert_exactly_once(&seen, 1, 2_000);
    let mut retries = 0;
    while let Ok(info) = reports.try_recv() {
        retries += info.task_retries;
        assert!(info.failed.is_none(), "{:?}", info.failed);
    }
    assert!(retries >= 1);
}

/// A file log whose listing fails (broker down, say) for its first calls.
struct Flaky {
    inner: FileLog,
    failures_left: AtomicU32,
}

impl DirectSource for Flaky {
    fn describe(&self, partition: u32) -> String {
        self.inner.describe(partition)
    }
    async fn partitions(&self) -> Result<Vec<u32>, SourceError> {
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SourceError::Unavailable {
                what: "flaky".into(),
                source: "connection refused".into(),
            });
        }
        self.inner.partitions().await
    }
    async fn start_offset(&self, partition: u32) -> Result<u64, SourceError> {
        self.inner.start_offset(partition).await
    }
    async fn identity(&self, partition: u32) -> Result<Option<String>, SourceError> {
        self.inner.identity(partition).await
    }
    async fn plan(
        &self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        identity: Option<&str>,
    ) -> Result<PlannedRange, SourceError> {
        self.inner.plan(partition, from, limits, identity).await
    }
    async fn read(
        &self,
        range: OffsetRange,
        identity: Option<&str>,
        out: &mut RangeSink,
    ) -> Result<(), SourceError> {
        self.inner.read(range, identity, out).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_source_is_retried_and_nothing_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 1_000);
    let ctx = context(20);
    let source = Arc::new(Flaky {
        inner: FileLog::open(dir.path()).unwrap(),
        failures_left: AtomicU32::new(4),
    });
    read_everything(&ctx, source.clone(), DirectOptions::default(), 1, 1_000).await;
    assert_eq!(
        source.failures_left.load(Ordering::SeqCst),
        0,
        "it failed 4 times"
    );
}

/// Starts a job on `dir`'s log, waits until it read `n` records, applies `damage`, and
/// returns how the context ended.
async fn ends_after(dir: &Path, n: usize, max_block: usize, damage: impl FnOnce()) -> ContextError {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(30))
        .backpressure(Backpressure::off())
        .max_block_bytes(max_block)
        .build()
        .unwrap();
    let seen = collect(&ctx, FileLog::open(dir).unwrap(), DirectOptions::default());
    ctx.start().await.unwrap();
    wait_until("the first records", || records(&seen) >= n).await;
    damage();
    let end = tokio::time::timeout(Duration::from_secs(20), ctx.await_termination())
        .await
        .expect("the context ends");
    end.expect_err("damage under recorded offsets ends the context")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_truncated_under_a_recorded_offset_stops_the_stream_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 1_000);
    let file = dir.path().join("0.log");
    let f = file.clone();
    let e = ends_after(dir.path(), 1_000, 8 << 20, move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(10)
            .unwrap();
    })
    .await;
    let text = e.to_string();
    assert!(matches!(e, ContextError::DirectSource { .. }), "{e:?}");
    assert!(
        text.contains("0.log") && text.contains("truncated"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_disappears_stops_the_stream_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 100);
    write(dir.path(), 1, 0, 100);
    let f = dir.path().join("1.log");
    let e = ends_after(dir.path(), 200, 8 << 20, move || {
        std::fs::remove_file(&f).unwrap();
    })
    .await;
    let text = e.to_string();
    assert!(
        text.contains("1.log") && text.contains("disappeared"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_a_block_is_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 10);
    let d = dir.path().to_path_buf();
    let e = ends_after(dir.path(), 10, 1_024, move || {
        let mut w = FileLogWriter::open(&d, 0).unwrap();
        w.append("x".repeat(2_000).as_bytes()).unwrap();
        w.append(b"after").unwrap();
        w.flush().unwrap();
    })
    .await;
    let text = e.to_string();
    assert!(
        text.contains("2000 bytes") && text.contains("max_block_bytes"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_job_goes_on_from_the_logged_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let checkpoint = dir.path().join("checkpoint");
    write(&log, 0, 0, 500);
    let run = |log: std::path::PathBuf| {
        let checkpoint = checkpoint.clone();
        async move {
            let seen: Seen = Arc::default();
            let s = seen.clone();
            let ctx = StreamingContext::get_or_create(&checkpoint, move |b| {
                let ctx = b
                    .batch_interval(Duration::from_millis(30))
                    .backpressure(Backpressure::off())
                    .build()?;
                ctx.direct_stream("log", FileLog::open(&log).unwrap())?
                    .map(|l: ByteString| l.to_string())
                    .for_each_batch(move |b| {
                        s.lock()
                            .unwrap()
                            .push((b.id.0, b.offsets.clone(), b.records))
                    })?;
                Ok(ctx)
            })
            .unwrap();
            (ctx, seen)
        }
    };
    let (ctx, first) = run(log.clone()).await;
    ctx.start().await.unwrap();
    wait_until("the first run's records", || records(&first) >= 500).await;
    ctx.stop(true).await.unwrap();
    write(&log, 0, 500, 300);
    let (ctx, second) = run(log.clone()).await;
    ctx.start().await.unwrap();
    wait_until("the second run's records", || records(&second) >= 300).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx.stop(true).await.unwrap();
    assert_eq!(records(&first), 500);
    assert_eq!(
        records(&second),
        300,
        "the second run reads only what is new"
    );
    let second = second.lock().unwrap();
    let firsts: Vec<&OffsetRange> = second.iter().flat_map(|(_, o, _)| o).collect();
    assert_eq!(
        firsts[0].from,
        first_end(&first),
        "from where the first run ended"
    );
}

/// Where the first run's ranges ended.
fn first_end(seen: &Seen) -> u64 {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|(_, o, _)| o)
        .map(|r| r.until)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_a_block_is_read_in_several_ranges_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 0, 0, 2_000);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(200))
        .backpressure(Backpressure::off())
        .max_block_bytes(1_024)
        .memory_limit(1 << 20)
        .build()
        .unwrap();
    let log = FileLog::open(dir.path()).unwrap();
    let seen = read_everything(&ctx, log, DirectOptions::default(), 1, 2_000).await;
    let seen = seen.lock().unwrap();
    let most = seen.iter().map(|(_, o, _)| o.len()).max().unwrap();
    assert!(most > 1, "one batch read its backlog in several ranges");
    for (_, offsets, _) in seen.iter() {
        for r in offsets {
            // Each range is one block: its records (4 + line bytes each) fit in 1,024.
            let line_bytes = (r.until - r.from) - r.records;
            assert!(line_bytes + 4 * r.records <= 1_024, "{r:?}");
        }
    }
}
