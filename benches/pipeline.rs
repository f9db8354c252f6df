//! Run: cargo bench --bench pipeline
//!
//! The block pipeline on the fixed comparison workload: 100-byte ASCII records (13-digit
//! sequence number, 16-digit creation time in epoch µs, ten six-letter words from a 256-word
//! vocabulary), from the synthetic receiver. The batch job is one pass (one task per block)
//! that counts records, parses the sequence number and timestamp, and counts words, all as one
//! `reduce_by_key_with` over `u128` keys, each record read as `&[u8]` in place in its block
//! (no allocation per word, no record made per line).
//!
//! One JSON object per line:
//! * `throughput_store_many_k1`, `throughput_store_many_k2`, `throughput_store_k2`: records
//!   per second completed at the batch executor (1 s batches, 200 ms blocks), measured over
//!   the batches after the first two, with the run's max scheduling delay (the job keeps up
//!   when it stays below the batch interval) and the peak RSS of the process;
//!   Free-running, the source fills the budget, so batches alternate between large and small
//!   (see `batch_records_min`/`max`); the rate is their average;
//! * `steady_5500k_per_s_k2`: the same with the source limited to 5.5 M records/s, to show
//!   that rate sustained batch after batch (every batch near 5.5 M records, keeping up);
//! * `latency_1m_per_s`: record creation → batch function done, p50/p99/max, at a fixed
//!   1,000,000 records/s with 50 ms batches and 10 ms blocks.
//!
//! Each case runs in a process of its own, so its peak RSS is its own. The context has 2
//! workers, 2 executors and a block memory budget of 1 GiB: two 1 s batches of this workload
//! at 5 M records/s (blocks are held until their batch completes, and the next batch's blocks
//! arrive meanwhile). Knobs: `BENCH_ONLY=<case>` runs one case in this process (for
//! profiling), `BENCH_SECONDS` (default 8) sets each run's length, `BENCH_MEM_MB` the budget,
//! `BENCH_DEBUG=1` prints every batch's size and timings to stderr, `BENCH_BACKPRESSURE=off`
//! turns the adaptive ingestion rate off (on by default, as for users).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tributary::{Backpressure, BatchInfo, StreamingContext};
use tributary_receivers::synthetic::{StoreMode, SyntheticReceiver};

mod support;
use support::{only_case, peak_rss_mb, steady, word_job, Key};

fn secs() -> f64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Run {
    infos: Vec<BatchInfo>,
    words: u64,
    records_seen: u64,
    latency_ms: Vec<u64>,
}

async fn run(
    k: usize,
    mode: StoreMode,
    rate: Option<f64>,
    batch: Duration,
    block: Duration,
    seconds: f64,
    track_latency: bool,
) -> Run {
    let ctx = StreamingContext::builder()
        .batch_interval(batch)
        .block_interval(block)
        .workers(2)
        .replication(k)
        .executors(2)
        .memory_limit(
            std::env::var("BENCH_MEM_MB")
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(1024)
                << 20,
        )
        .backpressure(
            if std::env::var("BENCH_BACKPRESSURE").is_ok_and(|v| v == "off") {
                Backpressure::off()
            } else {
                Backpressure::default()
            },
        )
        .build()
        .unwrap();
    let mut source = SyntheticReceiver::new()
        .mode(mode)
        .chunk(if mode == StoreMode::Many { 2000 } else { 500 });
    if let Some(r) = rate {
        source = source.rate(r);
    }
    let counts = word_job(&ctx, source, track_latency);

    let records_seen = Arc::new(AtomicU64::new(0));
    let words = Arc::new(AtomicU64::new(0));
    let latency: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (rs, w, lat) = (records_seen.clone(), words.clone(), latency.clone());
    counts
        .for_each_batch(move |batch| {
            let done_ms = now_us() / 1000;
            let mut lat = lat.lock().unwrap();
            for (key, n) in batch.records {
                if key == Key::RECORDS {
                    rs.fetch_add(n, Ordering::Relaxed);
                } else if key.is_word() {
                    w.fetch_add(n, Ordering::Relaxed);
                } else if let Some(ms) = key.created() {
                    lat.extend(std::iter::repeat_n(done_ms.saturating_sub(ms), n as usize));
                }
            }
        })
        .unwrap();

    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    ctx.stop(false).await.unwrap();
    let infos: Vec<BatchInfo> = std::iter::from_fn(|| reports.try_recv().ok()).collect();
    if std::env::var("BENCH_DEBUG").is_ok() {
        for i in &infos {
            eprintln!(
                "batch records {} blocks {} proc {:?} sched {:?}",
                i.records, i.blocks, i.processing_time, i.scheduling_delay
            );
        }
    }
    let latency_ms = std::mem::take(&mut *latency.lock().unwrap());
    Run {
        infos,
        words: words.load(Ordering::Relaxed),
        records_seen: records_seen.load(Ordering::Relaxed),
        latency_ms,
    }
}

async fn throughput(name: &str, k: usize, mode: StoreMode, limit: Option<f64>) {
    let interval = Duration::from_secs(1);
    let r = run(
        k,
        mode,
        limit,
        interval,
        Duration::from_millis(200),
        secs(),
        false,
    )
    .await;
    let (steady, rate, max_sched) = steady(&r.infos, interval);
    println!(
        "{}",
        json!({
            "name": name,
            "replication": k,
            "source_rate_limit": limit,
            "records_per_s": rate.round(),
            "batches_measured": steady.len(),
            "batch_records_min": steady.iter().map(|i| i.records).min().unwrap_or(0),
            "batch_records_max": steady.iter().map(|i| i.records).max().unwrap_or(0),
            "max_scheduling_delay_ms": max_sched,
            "keeps_up": max_sched < interval.as_millis(),
            "words_counted": r.words,
            "words_per_record": if r.records_seen > 0 { r.words as f64 / r.records_seen as f64 } else { 0.0 },
            "lost_blocks": r.infos.iter().map(|i| i.lost_blocks).sum::<usize>(),
            "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
        })
    );
}

async fn latency() {
    let r = run(
        2,
        StoreMode::Many,
        Some(1_000_000.0),
        Duration::from_millis(50),
        Duration::from_millis(10),
        secs(),
        true,
    )
    .await;
    let mut l = r.latency_ms;
    // Drop the first second (start-up).
    let skip = (l.len() as f64 / secs()).round() as usize;
    let mut l: Vec<u64> = l.drain(skip.min(l.len())..).collect();
    l.sort_unstable();
    let pick = |q: f64| {
        l.get(((l.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let achieved = r.records_seen as f64 / secs();
    println!(
        "{}",
        json!({
            "name": "latency_1m_per_s",
            "target_records_per_s": 1_000_000,
            "achieved_records_per_s": achieved.round(),
            "samples": l.len(),
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "max_ms": l.last().copied().unwrap_or(0),
            "batch_interval_ms": 50,
            "block_interval_ms": 10,
        })
    );
}

/// The cases, each run in a process of its own (so that its peak RSS is its own).
const CASES: [&str; 5] = [
    "throughput_store_many_k1",
    "throughput_store_many_k2",
    "throughput_store_k2",
    "steady_5500k_per_s_k2",
    "latency_1m_per_s",
];

fn main() {
    // BENCH_ONLY=<name> runs one case in this process (also how each case is run).
    let Some(only) = only_case(&CASES) else {
        return;
    };
    let rt = support::runtime();
    rt.block_on(async {
        match only.as_str() {
            "throughput_store_many_k1" => {
                throughput("throughput_store_many_k1", 1, StoreMode::Many, None).await
            }
            "throughput_store_many_k2" => {
                throughput("throughput_store_many_k2", 2, StoreMode::Many, None).await
            }
            "throughput_store_k2" => {
                throughput("throughput_store_k2", 2, StoreMode::Single, None).await
            }
            "steady_5500k_per_s_k2" => {
                let name = "steady_5500k_per_s_k2";
                throughput(name, 2, StoreMode::Many, Some(5_500_000.0)).await
            }
            "latency_1m_per_s" => latency().await,
            other => panic!("unknown case {other}; cases: {CASES:?}"),
        }
    });
}
