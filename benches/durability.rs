//! Run: cargo bench --bench durability
//!
//! One JSON object per line:
//! * `disk_fsync_write_bandwidth`: this disk's sequential write bandwidth with an fsync after
//!   every 8 MiB, measured in the same run (the ceiling for a write-ahead log);
//! * `ingest_wal_k2`: records/s (100-byte records from the synthetic receiver, `store_many`)
//!   with the write-ahead log on (group commit, fsync before every acknowledgement) and k = 2,
//!   and the ratio of the log's write rate to the disk bandwidth above;
//! * `recovery_after_sigkill`: a child process fills the log with ~1 GB of unprocessed blocks
//!   (its batch function never completes), is SIGKILLed, and a new process recovers: time from
//!   process start to the first recovered batch done, to every recovered record processed, and
//!   the recovering process's peak RSS, under a `BENCH_RECOVER_MEMORY_MIB` budget (default 256).
//!
//! `BENCH_SECONDS` (default 6) sets the ingest run's length; `BENCH_WAL_GB` (default 1.0) the
//! size of the log to recover. The temporary directory is under `BENCH_DIR` (default: system temp).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tributary::wal::WalConfig;
use tributary::StreamingContext;
use tributary_receivers::synthetic::SyntheticReceiver;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn disk_bandwidth(dir: &Path) -> f64 {
    let path = dir.join("bandwidth.probe");
    // The same write size as a full block (8 MiB, the default max_block_bytes), then fsync.
    let chunk = vec![0xa5u8; 8 << 20];
    let mut f = std::fs::File::create(&path).unwrap();
    let total = 512u64 << 20;
    let t = Instant::now();
    let mut written = 0u64;
    while written < total {
        f.write_all(&chunk).unwrap();
        f.sync_data().unwrap();
        written += chunk.len() as u64;
    }
    let bw = written as f64 / t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    bw
}

/// A context with the WAL on, counting records at the batch function.
fn job(
    dir: &Path,
    block_on_first_batch: bool,
    memory: usize,
) -> (StreamingContext, Arc<AtomicU64>) {
    let processed = Arc::new(AtomicU64::new(0));
    let p = processed.clone();
    let dir = dir.to_path_buf();
    let ctx = StreamingContext::get_or_create(&dir, move |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(1))
            .block_interval(Duration::from_millis(200))
            .workers(2)
            .replication(2)
            .memory_limit(memory)
            .write_ahead_log(WalConfig::default())
            .build()?;
        ctx.receiver_stream("synthetic", SyntheticReceiver::new().chunk(2000))?
            .count()
            .for_each_batch(move |b| {
                if block_on_first_batch {
                    // Never completes: every block stays unprocessed in the log.
                    std::thread::sleep(Duration::from_secs(3600));
                }
                p.fetch_add(b.records.iter().sum::<u64>(), Ordering::SeqCst);
            })?;
        Ok(ctx)
    })
    .unwrap();
    (ctx, processed)
}

async fn ingest(dir: &Path, bandwidth: f64) {
    let seconds = env_f64("BENCH_SECONDS", 6.0);
    let (ctx, processed) = job(dir, false, 3 << 30);
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    ctx.stop(false).await.unwrap();
    let infos: Vec<_> = std::iter::from_fn(|| reports.try_recv().ok()).collect();
    let steady = &infos[infos.len().min(2)..];
    let records: u64 = steady.iter().map(|i| i.records).sum();
    let rate = records as f64 / steady.len().max(1) as f64;
    // Each record is 100 bytes + a 4-byte frame length; blocks add a few bytes more.
    let wal_bytes_per_s = rate * 104.0;
    println!(
        "{}",
        json!({
            "name": "ingest_wal_k2",
            "records_per_s": rate.round(),
            "wal_mb_per_s": (wal_bytes_per_s / 1e6 * 10.0).round() / 10.0,
            "ratio_to_disk_bandwidth": (wal_bytes_per_s / bandwidth * 1000.0).round() / 1000.0,
            "sync_policy": "every block (group commit)",
            "replication": 2,
            "processed_records": processed.load(Ordering::SeqCst),
        })
    );
}

/// This process's peak resident set (VmHWM), in MB; 0 where /proc is missing.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024 / 1_000_000)
}

/// Child modes (the bench re-executes itself).
async fn child(mode: &str, dir: PathBuf) {
    match mode {
        "fill" => {
            let (ctx, _) = job(&dir, true, 3 << 30);
            ctx.start().await.unwrap();
            std::future::pending::<()>().await;
        }
        "recover" => {
            let t0 = Instant::now();
            let memory = env_f64("BENCH_RECOVER_MEMORY_MIB", 256.0) as usize * (1 << 20);
            let (ctx, processed) = job(&dir, false, memory);
            let mut reports = ctx.subscribe_batches();
            ctx.start().await.unwrap();
            let started = t0.elapsed();
            let report = ctx.recovery_report().unwrap_or_default();
            // The first batch done is the first re-run batch.
            let first = tokio::time::timeout(Duration::from_secs(120), reports.recv()).await;
            let done = t0.elapsed();
            // Then until every recovered record went through a batch.
            let deadline = Instant::now() + Duration::from_secs(300);
            while processed.load(Ordering::SeqCst) < report.recovered_records
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let all = t0.elapsed();
            println!(
                "{}",
                json!({
                    "recovery_to_first_batch_s": done.as_secs_f64(),
                    "all_recovered_processed_s": all.as_secs_f64(),
                    "start_s": started.as_secs_f64(),
                    "memory_limit_mib": memory >> 20,
                    "peak_rss_mb": peak_rss_mb(),
                    "first_batch_records": first.ok().and_then(|r| r.ok()).map(|i| i.records),
                    "recovered_blocks": report.recovered_blocks,
                    "recovered_records": report.recovered_records,
                    "rerun_batches": report.rerun_batches.len(),
                    "processed": processed.load(Ordering::SeqCst),
                })
            );
            std::process::exit(0);
        }
        other => panic!("unknown child mode {other}"),
    }
}

async fn recovery(dir: &Path) {
    let target = (env_f64("BENCH_WAL_GB", 1.0) * 1e9) as u64;
    let exe = std::env::current_exe().unwrap();
    let mut fill = Command::new(&exe)
        .env("BENCH_CHILD", "fill")
        .env("BENCH_CHILD_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while dir_bytes(&dir.join("wal")) < target && t.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(100));
    }
    fill.kill().unwrap(); // SIGKILL
    fill.wait().unwrap();
    let wal_bytes = dir_bytes(&dir.join("wal"));
    let out = Command::new(&exe)
        .env("BENCH_CHILD", "recover")
        .env("BENCH_CHILD_DIR", dir)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    let mut v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or(json!({ "error": line.to_string() }));
    if let Some(o) = v.as_object_mut() {
        o.insert("name".into(), json!("recovery_after_sigkill"));
        o.insert(
            "wal_gb".into(),
            json!((wal_bytes as f64 / 1e9 * 100.0).round() / 100.0),
        );
    }
    println!("{v}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(mode) = std::env::var("BENCH_CHILD") {
        let dir = PathBuf::from(std::env::var("BENCH_CHILD_DIR").unwrap());
        child(&mode, dir).await;
        return;
    }
    let base = std::env::var("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let tmp = tempfile::tempdir_in(base).unwrap();
    let bw = disk_bandwidth(tmp.path());
    println!(
        "{}",
        json!({ "name": "disk_fsync_write_bandwidth", "mb_per_s": (bw / 1e6 * 10.0).round() / 10.0, "fsync_every_mib": 8 })
    );
    ingest(&tmp.path().join("ingest"), bw).await;
    recovery(&tmp.path().join("recovery")).await;
}
