//! Run: cargo bench --bench cluster
//!
//! Workers in other processes, on loopback. The bench is the driver; it launches its worker
//! processes itself (this binary again, in the worker role, through `cluster::WorkerLauncher`).
//! One JSON object per line:
//! * `throughput_in_process_k2` / `throughput_2_worker_processes_k2`: the pipeline bench's job
//!   (`benches/pipeline.rs`: 100-byte records, word count over `u128` keys, 1 s batches, 200 ms
//!   blocks, 2 executors, k = 2), first with 2 in-process workers, then with no in-process
//!   worker and 2 worker processes (every block crosses loopback to both, and every task reads
//!   its block back from one), in the same run; `ratio` = processes / in-process; and with 1
//!   in-process worker + 2 processes (one replica in the driver, where the tasks read it, one
//!   in a worker process): `ratio_one_replica_in_driver`;
//! * `worker_sigkill_detection`: a worker process SIGKILLed (`BENCH_KILLS`, default 20 times;
//!   relaunched by the launcher each time) → the driver no longer counts it live: p50/p99/max;
//! * `worker_sigstop_detection`: a worker process SIGSTOPped → declared lost by the heartbeat
//!   (deadline 2 s), 3 times;
//! * `rereplication_after_worker_loss`: ~`BENCH_HELD_MB` (default 1024) MB of unprocessed
//!   blocks held with k = 2 over 3 worker processes, one SIGKILLed → every block back to 2
//!   replicas.
//!
//! `BENCH_SECONDS` (default 8) sets each throughput run's length; `BENCH_ONLY=<case>` runs one;
//! `BENCH_BACKPRESSURE=off` turns the adaptive rate off (the block budget regulates).

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tributary::cluster::{self, ClusterConfig, WorkerLauncher};
use tributary::{Backpressure, BatchInfo, StreamingContext};
use tributary_receivers::synthetic::{StoreMode, SyntheticReceiver};

mod support;
use support::{launch, peak_rss_mb, steady, wait_live, word_job, Key};

fn secs() -> f64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A driver context: `local` in-process workers, and a cluster when `processes > 0`.
fn context(local: usize, processes: usize, memory: usize, cookie: &str) -> StreamingContext {
    let mut b = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .block_interval(Duration::from_millis(200))
        .workers(local)
        .replication(2)
        .executors(2)
        .memory_limit(memory)
        .backpressure(
            if std::env::var("BENCH_BACKPRESSURE").is_ok_and(|v| v == "off") {
                Backpressure::off()
            } else {
                Backpressure::default()
            },
        );
    if processes > 0 {
        b = b.cluster(ClusterConfig::new(([127, 0, 0, 1], 0).into(), cookie));
    }
    b.build().unwrap()
}

/// The measured job, the same in the driver and in the worker processes.
fn define(ctx: &StreamingContext, source: SyntheticReceiver, records: Arc<AtomicU64>) {
    word_job(ctx, source, false)
        .for_each_batch(move |batch| {
            for (key, n) in batch.records {
                if key == Key::RECORDS {
                    records.fetch_add(n, Ordering::Relaxed);
                }
            }
        })
        .unwrap();
}

async fn throughput(name: &str, local: usize, processes: usize, cookie: &str) -> f64 {
    let ctx = context(local, processes, 1 << 30, cookie);
    let source = SyntheticReceiver::new().mode(StoreMode::Many).chunk(2000);
    define(&ctx, source, Arc::default());
    let mut reports = ctx.subscribe_batches();
    // Until the workers joined, store waits (no worker to hold a block): the first two
    // batches are not measured.
    ctx.start().await.unwrap();
    let launcher = if processes > 0 {
        Some(launch(&ctx, processes, cookie, &["--job", "word"]).await)
    } else {
        None
    };
    let begin = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs())).await;
    ctx.stop(false).await.unwrap();
    let elapsed = begin.elapsed();
    if let Some(l) = launcher {
        l.shutdown().await;
    }
    let infos: Vec<BatchInfo> = std::iter::from_fn(|| reports.try_recv().ok()).collect();
    let (steady, rate, max_sched) = steady(&infos, Duration::from_secs(1));
    let mut processing: Vec<f64> = steady
        .iter()
        .map(|i| i.processing_time.as_secs_f64() * 1e3)
        .collect();
    let median_processing_ms = quantile(&mut processing, 0.5).round();
    println!(
        "{}",
        json!({
            "name": name,
            "in_process_workers": local,
            "worker_processes": processes,
            "replication": 2,
            "records_per_s": rate.round(),
            "batches_measured": steady.len(),
            "max_scheduling_delay_ms": max_sched,
            "median_processing_ms": median_processing_ms,
            "lost_blocks": infos.iter().map(|i| i.lost_blocks).sum::<usize>(),
            "tasks_in_worker_processes": infos.iter().map(|i| i.remote_tasks as usize).sum::<usize>(),
            "tasks": infos.iter().map(|i| i.blocks).sum::<usize>(),
            "seconds": elapsed.as_secs_f64(),
            "driver_peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
        })
    );
    rate
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// A context with 3 worker processes and a slow source (detection, not throughput).
async fn detection_cluster(cookie: &str) -> (StreamingContext, WorkerLauncher) {
    let ctx = context(0, 3, 1 << 30, cookie);
    ctx.receiver_stream("synthetic", SyntheticReceiver::new().rate(100_000.0))
        .unwrap()
        .count()
        .for_each_batch(|_| {})
        .unwrap();
    ctx.start().await.unwrap();
    let launcher = launch(&ctx, 3, cookie, &["--job", "count"]).await;
    (ctx, launcher)
}

async fn sigkill_detection(cookie: &str) {
    let (ctx, launcher) = detection_cluster(cookie).await;
    let mut ms = Vec::new();
    for i in 0..env_usize("BENCH_KILLS", 20) {
        let pid = launcher.pids()[i % 3].expect("a running worker");
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal(pid, "-KILL");
        let t0 = Instant::now();
        while ctx.live_workers().await.len() == 3 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        // The launcher relaunches it; the new incarnation joins as a new worker.
        wait_live(&ctx, 3, Duration::from_secs(30)).await;
        while launcher.pids()[i % 3].is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let n = ms.len();
    println!(
        "{}",
        json!({
            "name": "worker_sigkill_detection",
            "kills": n,
            "p50_ms": (quantile(&mut ms, 0.5) * 10.0).round() / 10.0,
            "p99_ms": (quantile(&mut ms, 0.99) * 10.0).round() / 10.0,
            "max_ms": (quantile(&mut ms, 1.0) * 10.0).round() / 10.0,
        })
    );
    ctx.stop(false).await.unwrap();
    launcher.shutdown().await;
}

async fn sigstop_detection(cookie: &str) {
    let (ctx, launcher) = detection_cluster(cookie).await;
    let mut ms = Vec::new();
    for i in 0..3 {
        let pid = launcher.pids()[i].expect("a running worker");
        signal(pid, "-STOP");
        let t0 = Instant::now();
        while ctx.live_workers().await.len() == 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        signal(pid, "-CONT"); // fenced: it exits, and the launcher relaunches it
        wait_live(&ctx, 3, Duration::from_secs(30)).await;
    }
    println!(
        "{}",
        json!({
            "name": "worker_sigstop_detection",
            "heartbeat_deadline_ms": 2000,
            "stops": ms.len(),
            "each_ms": ms.iter().map(|m| m.round()).collect::<Vec<_>>(),
        })
    );
    ctx.stop(false).await.unwrap();
    launcher.shutdown().await;
}

async fn rereplication(cookie: &str) {
    let held = env_usize("BENCH_HELD_MB", 1024) << 20;
    let ctx = context(0, 3, held * 2, cookie);
    // The batch function never finishes: every block stays unprocessed (held).
    ctx.receiver_stream("synthetic", SyntheticReceiver::new().chunk(2000))
        .unwrap()
        .count()
        .for_each_batch(|_| std::thread::sleep(Duration::from_secs(3600)))
        .unwrap();
    ctx.start().await.unwrap();
    let launcher = launch(&ctx, 3, cookie, &["--job", "count"]).await;
    // Blocks are ~3.5 MB here (200 ms of the free-running source); wait for about `held`
    // bytes of them (counted as 1 MB each, so at least that much is held).
    let t = Instant::now();
    loop {
        let blocks = ctx.block_locations().await;
        if blocks.len() as u64 * 1_000_000 >= held as u64 || t.elapsed() > Duration::from_secs(120)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let blocks = ctx.block_locations().await.len();
    let pid = launcher.pids()[0].expect("worker 0");
    signal(pid, "-KILL");
    let t0 = Instant::now();
    while ctx.live_workers().await.len() == 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let detected = t0.elapsed();
    loop {
        let under = ctx
            .block_locations()
            .await
            .iter()
            .filter(|(_, at)| at.len() < 2)
            .count();
        if under == 0 || t0.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restored = t0.elapsed();
    println!(
        "{}",
        json!({
            "name": "rereplication_after_worker_loss",
            "blocks_held": blocks,
            "approx_held_mb": held >> 20,
            "detected_ms": detected.as_millis(),
            "k_copies_restored_s": restored.as_secs_f64(),
        })
    );
    launcher.shutdown().await;
    // The batch function never returns: exit rather than wait for its thread.
    std::process::exit(0);
}

const CASES: [&str; 4] = [
    "throughput",
    "worker_sigkill_detection",
    "worker_sigstop_detection",
    "rereplication_after_worker_loss",
];

fn main() {
    let rt = support::runtime();
    // The worker role: the launcher starts this binary with the driver's address.
    let args: Vec<String> = std::env::args().collect();
    if let Some(driver) = args
        .iter()
        .position(|a| a == "--worker-of")
        .and_then(|i| args.get(i + 1))
    {
        let cookie = std::env::var("TRIBUTARY_COOKIE").expect("cookie");
        let mut cfg = cluster::WorkerConfig::new(driver.as_str(), cookie);
        if let Some(n) = std::env::var("BENCH_WORKER_EXECUTORS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            cfg = cfg.executors(n);
        }
        // One binary, two roles: the worker defines the same job and runs its tasks.
        let ctx = StreamingContext::builder().build().unwrap();
        if args.iter().any(|a| a == "count") {
            ctx.receiver_stream("synthetic", SyntheticReceiver::new())
                .unwrap()
                .count()
                .for_each_batch(|_| {})
                .unwrap();
        } else {
            define(&ctx, SyntheticReceiver::new(), Arc::default());
        }
        let _ = rt.block_on(ctx.run_as_worker(cfg));
        return;
    }
    let Ok(only) = std::env::var("BENCH_ONLY") else {
        let exe = std::env::current_exe().expect("bench executable");
        for case in CASES {
            let status = Command::new(&exe)
                .env("BENCH_ONLY", case)
                .status()
                .expect("run a bench case");
            assert!(status.success(), "{case} failed: {status}");
        }
        return;
    };
    let cookie = cluster::random_cookie().unwrap();
    rt.block_on(async {
        match only.as_str() {
            "throughput" => {
                let one = throughput("throughput_in_process_k2", 2, 0, &cookie).await;
                let two = throughput("throughput_2_worker_processes_k2", 0, 2, &cookie).await;
                let mixed =
                    throughput("throughput_1_in_process_2_processes_k2", 1, 2, &cookie).await;
                println!(
                    "{}",
                    json!({
                        "name": "worker_processes_vs_in_process",
                        "ratio": ((two / one.max(1.0)) * 1000.0).round() / 1000.0,
                        "ratio_one_replica_in_driver": ((mixed / one.max(1.0)) * 1000.0).round() / 1000.0,
                        "target": 0.7,
                    })
                );
            }
            "worker_sigkill_detection" => sigkill_detection(&cookie).await,
            "worker_sigstop_detection" => sigstop_detection(&cookie).await,
            "rereplication_after_worker_loss" => rereplication(&cookie).await,
            other => panic!("unknown case {other}; cases: {CASES:?}"),
        }
    });
}
