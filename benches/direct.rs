//! Run: cargo bench --bench direct
//!
//! A direct stream on the file log against the receiver path, the same job (the pipeline
//! bench's: per record, parse the sequence number and timestamp and count the ten words, one
//! `reduce_by_key` over `u128` keys) on the same 100-byte records, side by side in one run:
//!
//! * `receiver_store_many_k2`: the synthetic receiver (`store_many`), k = 2, the adaptive
//!   rate on: what the pipeline bench's `throughput_store_many_k2` measures;
//! * `direct_file_log`: the same records written to a 4-partition file log before the job
//!   starts (`BENCH_DIRECT_RECORDS`, default 80 M, in one 2 GB file hard-linked four times, in
//!   tmpfs where there is one), read as a direct
//!   stream, the adaptive rate on; the batches until the log runs out are measured.
//!
//! Both: 1 s batches, 2 executors, records per second over the batches after the first two
//! (with the run's max scheduling delay) and the peak RSS of the process (each case in a
//! process of its own). One JSON object per line. Knobs: `BENCH_ONLY=<case>`,
//! `BENCH_SECONDS` (default 8).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tributary::{BatchInfo, ByteString, StreamingContext};
use tributary_receivers::file_log::FileLog;
use tributary_receivers::synthetic::{word, StoreMode, SyntheticReceiver};

mod support;
use support::{only_case, peak_rss_mb, steady, word_job, word_job_on};

const CASES: [&str; 2] = ["receiver_store_many_k2", "direct_file_log"];
const PARTITIONS: u32 = 4;

fn secs() -> f64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0)
}

fn context() -> StreamingContext {
    StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .block_interval(Duration::from_millis(200))
        .workers(2)
        .replication(2)
        .executors(2)
        .build()
        .unwrap()
}

/// Runs the context for the bench's time; its batch reports.
async fn run(ctx: &StreamingContext) -> Vec<BatchInfo> {
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs_f64(secs())).await;
    ctx.stop(false).await.unwrap();
    std::iter::from_fn(|| reports.try_recv().ok()).collect()
}

fn report(name: &str, infos: &[BatchInfo], words: u64) {
    let interval = Duration::from_secs(1);
    let (steady, rate, max_sched) = steady(infos, interval);
    println!(
        "{}",
        json!({
            "name": name,
            "records_per_s": rate.round(),
            "batches_measured": steady.len(),
            "batch_records_min": steady.iter().map(|i| i.records).min().unwrap_or(0),
            "batch_records_max": steady.iter().map(|i| i.records).max().unwrap_or(0),
            "max_scheduling_delay_ms": max_sched,
            "keeps_up": max_sched < interval.as_millis(),
            "words_counted": words,
            "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
        })
    );
}

/// Counts the words of each batch (the output).
fn count_words(stream: tributary::DStream<(support::Key, u64)>) -> Arc<AtomicU64> {
    let words = Arc::new(AtomicU64::new(0));
    let w = words.clone();
    stream
        .for_each_batch(move |b| {
            let n: u64 = b
                .records
                .iter()
                .filter(|(k, _)| k.is_word())
                .map(|(_, n)| n)
                .sum();
            w.fetch_add(n, Ordering::Relaxed);
        })
        .unwrap();
    words
}

async fn receiver() {
    let ctx = context();
    let source = SyntheticReceiver::new().mode(StoreMode::Many).chunk(2000);
    let words = count_words(word_job(&ctx, source, false));
    let infos = run(&ctx).await;
    report(
        "receiver_store_many_k2",
        &infos,
        words.load(Ordering::Relaxed),
    );
}

/// One 100-byte record (the synthetic receiver's format), newline-terminated.
fn record(seq: u64, vocabulary: &[String], rng: &mut fastrand::Rng, out: &mut Vec<u8>) {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let _ = write!(out, "{seq:013} {us:016}");
    for _ in 0..10 {
        out.push(b' ');
        out.extend_from_slice(vocabulary[rng.usize(..256)].as_bytes());
    }
    out.push(b'\n');
}

async fn direct() {
    // In memory where the machine has a tmpfs (the log is read from the page cache either
    // way; tmpfs makes writing it quick).
    let dir = match std::path::Path::new("/dev/shm") {
        shm if shm.is_dir() => tempfile::tempdir_in(shm).unwrap(),
        _ => tempfile::tempdir().unwrap(),
    };
    // The log is written before the job starts (not timed): a writer running beside the job
    // would measure the file system's write path (measured: it took most of a core), not
    // the direct path. A 1 MB chunk of records, repeated, in one file hard-linked as every
    // partition's (the job does not need unique sequence numbers).
    let total: u64 = std::env::var("BENCH_DIRECT_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(80_000_000);
    let vocabulary: Vec<String> = (0..=255u8).map(word).collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut chunk = Vec::with_capacity(1 << 20);
    for seq in 0..10_000 {
        record(seq, &vocabulary, &mut rng, &mut chunk);
    }
    let per_partition = total / u64::from(PARTITIONS) / 10_000;
    // One file, hard-linked as every partition's (a quarter of the writing).
    let first = dir.path().join("0.log");
    let mut f = std::fs::File::create(&first).unwrap();
    for _ in 0..per_partition {
        f.write_all(&chunk).unwrap();
    }
    for p in 1..PARTITIONS {
        std::fs::hard_link(&first, dir.path().join(format!("{p}.log"))).unwrap();
    }
    let total = per_partition * 10_000 * u64::from(PARTITIONS);
    let ctx = context();
    let lines = ctx
        .direct_stream::<_, ByteString>("log", FileLog::open(dir.path()).unwrap())
        .unwrap();
    let words = count_words(word_job_on(&lines, false));
    let infos = run(&ctx).await;
    // Only the batches before the log ran out count.
    let mut read = 0;
    let full: Vec<BatchInfo> = infos
        .into_iter()
        .take_while(|i| {
            read += i.records;
            read < total
        })
        .collect();
    report("direct_file_log", &full, words.load(Ordering::Relaxed));
}

fn main() {
    let Some(only) = only_case(&CASES) else {
        return;
    };
    support::runtime().block_on(async {
        match only.as_str() {
            "receiver_store_many_k2" => receiver().await,
            "direct_file_log" => direct().await,
            other => panic!("unknown case {other}; cases: {CASES:?}"),
        }
    });
}
