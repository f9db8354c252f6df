//! Tasks in worker processes: this test binary is both the driver (the tests) and the worker
//! processes (`worker_process`, re-run by the tests with `TRIBUTARY_WORKER_OF` set): one
//! binary, two roles, the job defined once in `define`. Each record is tagged, in its task,
//! with the id of the process that computed it, so the driver can see where tasks ran.
//! Loopback, ports from the OS, every wait bounded, every child killed at the end.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary::cluster::{self, ClusterConfig};
use tributary::{ByteString, ContextError, StreamingContext};
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

const COOKIE: &str = "executors-test-cookie";
/// Set in a worker process to define another job than the driver's.
const OTHER_JOB: &str = "TRIBUTARY_TEST_OTHER_JOB";

type Seen = Arc<Mutex<Vec<(u32, u64)>>>;

/// The job: numbered synthetic records, each tagged with the process that ran its task.
fn define(ctx: &StreamingContext, total: u64, seen: Seen) -> Result<(), ContextError> {
    let source = SyntheticReceiver::new().rate(20_000.0).limit(total);
    let tagged =
        ctx.receiver_stream("numbers", source)?
            .flat_map_with(|record: ByteString, out| {
                if let Some((seq, _, _)) = parse(&record) {
                    out((std::process::id(), seq));
                }
            });
    tagged.for_each_batch(move |batch| seen.lock().unwrap().extend(batch.records))?;
    if std::env::var_os(OTHER_JOB).is_some() {
        tagged.count().for_each_batch(|_| {})?;
    }
    Ok(())
}

/// The worker role: does nothing in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process() {
    let Some(worker) = cluster::worker_role().expect("worker settings") else {
        return;
    };
    let ctx = StreamingContext::builder().build().unwrap();
    define(&ctx, 0, Seen::default()).unwrap();
    let exit = ctx.run_as_worker(worker.executors(2)).await;
    println!("worker exit: {exit:?}");
}

/// A worker process of this binary, killed when dropped.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn spawn(driver: &str, log: PathBuf, other_job: bool) -> Worker {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "worker_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(cluster::WORKER_OF, driver)
        .env("TRIBUTARY_COOKIE", COOKIE)
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null());
        if other_job {
            cmd.env(OTHER_JOB, "1");
        } else {
            cmd.env_remove(OTHER_JOB);
        }
        Worker {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A driver with no in-process worker (every replica in worker processes), k = 2, running
/// `define` over `total` records.
async fn driver(total: u64) -> (StreamingContext, Seen, String) {
    let seen = Seen::default();
    let ctx = StreamingContext::builder()
        .workers(0)
        .replication(2)
        .executors(1)
        .batch_interval(Duration::from_millis(200))
        .block_interval(Duration::from_millis(50))
        .cluster(ClusterConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            COOKIE.to_string(),
        ))
        .build()
        .unwrap();
    define(&ctx, total, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    let addr = ctx.cluster_addr().unwrap().to_string();
    (ctx, seen, addr)
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F, logs: &[&Worker])
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < within {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs: Vec<String> = logs
        .iter()
        .map(|w| format!("--- {}:\n{}", w.log.display(), w.output()))
        .collect();
    panic!(
        "timed out after {within:?} waiting for {what}\n{}",
        logs.join("\n")
    );
}

fn count(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

/// Every record of `0..total` exactly once; the records computed per process.
fn exactly_once(seen: &Seen, total: u64) -> HashMap<u32, usize> {
    let seen = seen.lock().unwrap();
    let mut numbers = HashSet::new();
    let mut twice = Vec::new();
    let mut by_process: HashMap<u32, usize> = HashMap::new();
    for (pid, n) in seen.iter() {
        if !numbers.insert(*n) {
            twice.push(*n);
        }
        *by_process.entry(*pid).or_default() += 1;
    }
    let missing: Vec<u64> = (0..total).filter(|n| !numbers.contains(n)).collect();
    assert!(
        twice.is_empty() && missing.is_empty(),
        "{} twice (e.g. {:?}), {} missing (e.g. {:?})",
        twice.len(),
        &twice[..twice.len().min(5)],
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    by_process
}

/// Sums `BatchInfo::remote_tasks` until the context ends.
fn remote_tasks(ctx: &StreamingContext) -> tokio::task::JoinHandle<u64> {
    let mut reports = ctx.subscribe_batches();
    tokio::spawn(async move {
        let mut remote = 0;
        while let Ok(info) = reports.recv().await {
            remote += u64::from(info.remote_tasks);
        }
        remote
    })
}

fn log(tmp: &Path, name: &str) -> PathBuf {
    tmp.join(format!("{name}.log"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_in_the_worker_processes_and_their_results_reach_the_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 20_000;
    let (ctx, seen, addr) = driver(total).await;
    let remote = remote_tasks(&ctx);
    let workers: Vec<Worker> = (0..2)
        .map(|i| Worker::spawn(&addr, log(tmp.path(), &format!("w{i}")), false))
        .collect();
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_until(
        "every record",
        Duration::from_secs(40),
        || async { count(&seen) >= total as usize },
        &refs,
    )
    .await;
    ctx.stop(true).await.unwrap();
    let by_process = exactly_once(&seen, total);
    println!(
        "records computed per process (driver {}): {by_process:?}",
        std::process::id()
    );
    for w in &workers {
        assert!(
            by_process.get(&w.pid()).copied().unwrap_or(0) > 0,
            "no record computed in worker process {}: {by_process:?}",
            w.pid()
        );
    }
    let here = by_process.get(&std::process::id()).copied().unwrap_or(0);
    assert!(
        here < total as usize / 2,
        "{here} of {total} records computed in the driver: {by_process:?}"
    );
    assert!(remote.await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_running_tasks_killed_mid_stream_changes_nothing_in_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 60_000;
    let (ctx, seen, addr) = driver(total).await;
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| Worker::spawn(&addr, log(tmp.path(), &format!("w{i}")), false))
        .collect();
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_until(
        "a third of the records",
        Duration::from_secs(40),
        || async { count(&seen) >= total as usize / 3 },
        &refs,
    )
    .await;
    // SIGKILL a worker process that has been running tasks.
    let busy: HashSet<u32> = seen.lock().unwrap().iter().map(|(p, _)| *p).collect();
    let victim = workers
        .iter()
        .position(|w| busy.contains(&w.pid()))
        .expect("no worker process has computed anything");
    let killed = workers[victim].pid();
    workers[victim].child.kill().unwrap();
    let _ = workers[victim].child.wait();
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_until(
        "every record after the kill",
        Duration::from_secs(60),
        || async { count(&seen) >= total as usize },
        &refs,
    )
    .await;
    let ledger = ctx.ledger().await.expect("a ledger");
    ctx.stop(true).await.unwrap();
    let by_process = exactly_once(&seen, total);
    println!("records computed per process (killed {killed}): {by_process:?}");
    assert!(ledger.balances(), "{ledger:?}");
    assert_eq!(ledger.total().lost_total(), 0, "{ledger:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_of_another_job_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 2_000;
    let (ctx, seen, addr) = driver(total).await;
    let mut other = Worker::spawn(&addr, log(tmp.path(), "other"), true);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = other.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the worker of another job was not sent away\n{}",
            other.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{}", other.output());
    assert!(other.output().contains("DriverGone"), "{}", other.output());
    assert!(ctx.live_workers().await.is_empty());
    assert_eq!(count(&seen), 0, "records ran on a refused worker");
    // A worker of this job joins and the stream goes on.
    let good = Worker::spawn(&addr, log(tmp.path(), "good"), false);
    wait_until(
        "every record",
        Duration::from_secs(40),
        || async { count(&seen) >= total as usize },
        &[&good],
    )
    .await;
    ctx.stop(true).await.unwrap();
    exactly_once(&seen, total);
}
