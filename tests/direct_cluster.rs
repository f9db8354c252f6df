//! Direct streams with worker processes: the ranges are read where the driver places their
//! tasks, in the driver's process or in worker processes (this test binary re-run as one,
//! `worker_process`, with `TRIBUTARY_WORKER_OF` set: one binary, two roles). A worker process
//! SIGKILLed mid-stream changes nothing in the output: its ranges are read again elsewhere.
//! Loopback, ports from the OS, every wait bounded, every child killed at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary::cluster::{self, ClusterConfig};
use tributary::{
    Backpressure, ByteString, ContextError, DirectOptions, OffsetRange, StreamingContext,
};
use tributary_receivers::file_log::{FileLog, FileLogWriter};

const COOKIE: &str = "direct-cluster-test-cookie";
/// The file log's directory, for the worker processes.
const LOG_DIR: &str = "TRIBUTARY_TEST_DIRECT_LOG";
const PARTITIONS: u32 = 6;
const PER_PARTITION: u64 = 3_000;

/// Per batch: its ranges, and each record with the process that read it.
type Seen = Arc<Mutex<Vec<(Vec<OffsetRange>, Vec<(u32, String)>)>>>;

/// The job, the same in every process: each line tagged with the process that read it.
fn define(ctx: &StreamingContext, log: &Path, seen: Seen) -> Result<(), ContextError> {
    // 1,000 records/s per partition, 100 ms batches: 100 per partition per batch, 3 s in all.
    let options = DirectOptions::default().max_rate_per_partition(1_000);
    ctx.direct_stream_with("log", FileLog::open(log).unwrap(), options)?
        .map(|l: ByteString| (std::process::id(), l.to_string()))
        .for_each_batch(move |b| seen.lock().unwrap().push((b.offsets.clone(), b.records)))
}

fn builder() -> tributary::StreamingContextBuilder {
    StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .backpressure(Backpressure::off())
}

/// The worker role: does nothing in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process() {
    let Some(worker) = cluster::worker_role().expect("worker settings") else {
        return;
    };
    let log = std::env::var_os(LOG_DIR).expect("the log directory");
    let ctx = builder().build().unwrap();
    define(&ctx, Path::new(&log), Seen::default()).unwrap();
    let exit = ctx.run_as_worker(worker.executors(2)).await;
    println!("worker exit: {exit:?}");
}

/// A worker process of this binary, killed when dropped.
struct Worker(Child);

impl Worker {
    fn spawn(driver: &str, log_dir: &Path, out: PathBuf) -> Worker {
        let file = std::fs::File::create(out).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "worker_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(cluster::WORKER_OF, driver)
            .env("TRIBUTARY_COOKIE", COOKIE)
            .env(LOG_DIR, log_dir)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Worker(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn records(seen: &Seen) -> Vec<(u32, String)> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|(_, r)| r.clone())
        .collect()
}

async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_read_in_worker_processes_and_a_killed_one_changes_nothing() {
    if cluster::worker_role().ok().flatten().is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    for p in 0..PARTITIONS {
        let mut w = FileLogWriter::open(&log, p).unwrap();
        for i in 0..PER_PARTITION {
            w.append(format!("p{p}-{i}").as_bytes()).unwrap();
        }
        w.flush().unwrap();
    }
    let seen = Seen::default();
    let ctx = builder()
        .workers(0)
        .executors(1)
        .cluster(ClusterConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            COOKIE.to_string(),
        ))
        .build()
        .unwrap();
    define(&ctx, &log, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    let addr = ctx.cluster_addr().unwrap().to_string();
    let me = std::process::id();
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| Worker::spawn(&addr, &log, tmp.path().join(format!("w{i}.log"))))
        .collect();
    let victim = workers[0].0.id();
    wait_until("a range read by the first worker process", 30, || {
        records(&seen).iter().any(|(pid, _)| *pid == victim)
    })
    .await;
    // Killed while batches run: its ranges in flight are read again by another executor.
    let _ = workers[0].0.kill();
    let _ = workers[0].0.wait();
    let before = records(&seen).len();
    // A new incarnation joins (as a launcher would start it).
    workers.push(Worker::spawn(&addr, &log, tmp.path().join("w2.log")));
    let total = (u64::from(PARTITIONS) * PER_PARTITION) as usize;
    wait_until("every record", 60, || records(&seen).len() >= total).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ctx.stop(true).await.unwrap();
    drop(workers);

    let all = records(&seen);
    assert!(
        before < total,
        "the kill fell mid-stream ({before} of {total} read)"
    );
    let mut count: HashMap<&str, u32> = HashMap::new();
    let mut by_process: HashMap<u32, usize> = HashMap::new();
    for (pid, r) in &all {
        *count.entry(r.as_str()).or_default() += 1;
        *by_process.entry(*pid).or_default() += 1;
    }
    for p in 0..PARTITIONS {
        for i in 0..PER_PARTITION {
            let k = format!("p{p}-{i}");
            assert_eq!(count.get(k.as_str()), Some(&1), "{k}");
        }
    }
    assert_eq!(all.len(), total, "nothing twice");
    let remote: usize = by_process
        .iter()
        .filter(|(pid, _)| **pid != me)
        .map(|(_, n)| n)
        .sum();
    assert!(
        remote > 0,
        "some ranges were read in worker processes: {by_process:?}"
    );
    let mut next: HashMap<u32, u64> = HashMap::new();
    for (offsets, _) in seen.lock().unwrap().iter() {
        for r in offsets {
            let at = next.entry(r.partition).or_insert(0);
            assert_eq!(r.from, *at, "contiguous ranges");
            *at = r.until;
        }
    }
}
