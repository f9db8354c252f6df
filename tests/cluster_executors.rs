//! Tasks in worker processes: this test binary is both the driver (the tests) and the worker
//! processes (`worker_process`, re-run by the tests with `TRIBUTARY_WORKER_OF` set): one
//! binary, two roles, the job defined once in `define`. Each record is tagged, in its task,
//! with the id of the process that computed it, so the driver can see where tasks ran.
//! Loopback, ports from the OS, every wait bounded, every child killed at the end.
//!
//! One cluster node per process (`ractor`'s process groups are process-wide): the tests take
//! turns with the driver role.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary::cluster::{self, ClusterConfig};
use tributary::wal::WalConfig;
use tributary::{
    BoxError, ByteString, ContextError, Receiver, ReceiverContext, ReceiverPlacement,
    StreamingContext,
};
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

const COOKIE: &str = "executors-test-cookie";
/// Set in a worker process to define another job than the driver's.
const OTHER_JOB: &str = "TRIBUTARY_TEST_OTHER_JOB";
/// Set in a worker process to connect with TLS, with the directory of the certificates.
const TLS_DIR: &str = "TRIBUTARY_TEST_TLS_DIR";
/// With `TLS_DIR`: which identity the worker presents (`worker` or `rogue`).
const TLS_AS: &str = "TRIBUTARY_TEST_TLS_AS";
/// Set in a worker process to define the file-source job, with the source's directory.
const SOURCE_DIR: &str = "TRIBUTARY_TEST_SOURCE_DIR";
/// Numbers the file source produces.
const FILE_TOTAL: u64 = 30_000;

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

/// A source whose acknowledged offset is a file every process on this machine sees (as a
/// broker's committed offset would be): numbers from that offset on, 100 per
/// `store_reliably`, each record `number:receiving process id`; the offset advances only once
/// the store resolved.
struct FileSource {
    dir: PathBuf,
    limit: u64,
}

#[derive(Debug)]
struct Go;

impl FileSource {
    fn offset(dir: &Path) -> u64 {
        std::fs::read_to_string(dir.join("offset"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Receiver for FileSource {
    type Msg = Go;
    type State = u64;
    type Record = String;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        let _ = ctx.myself().send(Go);
        Ok(Self::offset(&self.dir))
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        _: Go,
        next: &mut u64,
    ) -> Result<(), BoxError> {
        if *next >= self.limit {
            return Ok(());
        }
        let end = (*next + 100).min(self.limit);
        let pid = std::process::id();
        ctx.store_reliably((*next..end).map(|n| format!("{n}:{pid}")))
            .await?;
        *next = end;
        let tmp = self.dir.join("offset.tmp");
        std::fs::write(&tmp, end.to_string())?;
        std::fs::rename(&tmp, self.dir.join("offset"))?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _ = ctx.myself().send(Go);
        Ok(())
    }
}

/// (task's process, number, receiving process) of every record output.
type FileSeen = Arc<Mutex<Vec<(u32, u64, u32)>>>;

/// The file-source job: the records tagged with the process that ran their task.
/// The driver's output costs `cost_ns` per record (a slow job; workers never run outputs).
fn define_file_job(
    ctx: &StreamingContext,
    dir: &Path,
    seen: FileSeen,
    cost_ns: u64,
) -> Result<(), ContextError> {
    let source = FileSource {
        dir: dir.to_path_buf(),
        limit: FILE_TOTAL,
    };
    ctx.receiver_stream("file-numbers", source)?
        .flat_map_with(|record: String, out| {
            if let Some((n, pid)) = record.split_once(':') {
                if let (Ok(n), Ok(pid)) = (n.parse::<u64>(), pid.parse::<u32>()) {
                    out((std::process::id(), n, pid));
                }
            }
        })
        .for_each_batch(move |batch| {
            let n = batch.records.len() as u64;
            seen.lock().unwrap().extend(batch.records);
            std::thread::sleep(Duration::from_nanos(n * cost_ns));
        })
}

fn file_job_builder() -> tributary::StreamingContextBuilder {
    StreamingContext::builder()
        .batch_interval(Duration::from_millis(200))
        .block_interval(Duration::from_millis(50))
}

/// The driver role, one test at a time.
static DRIVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The worker role: does nothing in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process() {
    let Some(worker) = cluster::worker_role().expect("worker settings") else {
        return;
    };
    init_logs();
    if let Some(dir) = std::env::var_os(SOURCE_DIR) {
        let ctx = file_job_builder().build().unwrap();
        define_file_job(&ctx, Path::new(&dir), FileSeen::default(), 0).unwrap();
        let exit = ctx.run_as_worker(worker.executors(2)).await;
        println!("worker exit: {exit:?}");
        return;
    }
    let mut worker = worker.executors(2);
    if let Some(dir) = std::env::var_os(TLS_DIR) {
        let who = std::env::var(TLS_AS).unwrap_or_else(|_| "worker".into());
        let dir = Path::new(&dir);
        let tls = cluster::ClusterTls::from_pem_files(
            dir.join(format!("{who}.pem")),
            dir.join(format!("{who}.key")),
            dir.join(format!("{who}-ca.pem")),
        )
        .unwrap();
        worker = worker.tls(tls, "tributary-driver");
    }
    let ctx = StreamingContext::builder().build().unwrap();
    define(&ctx, 0, Seen::default()).unwrap();
    let exit = ctx.run_as_worker(worker).await;
    println!("worker exit: {exit:?}");
}

/// A worker process of this binary, killed when dropped.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn spawn(driver: &str, log: PathBuf, other_job: bool) -> Worker {
        Self::spawn_with(driver, log, other_job, None)
    }

    fn spawn_with(driver: &str, log: PathBuf, other_job: bool, source: Option<&Path>) -> Worker {
        Self::spawn_tls(driver, log, other_job, source, None)
    }

    fn spawn_tls(
        driver: &str,
        log: PathBuf,
        other_job: bool,
        source: Option<&Path>,
        tls: Option<(&Path, &str)>,
    ) -> Worker {
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
        match source {
            Some(dir) => cmd.env(SOURCE_DIR, dir),
            None => cmd.env_remove(SOURCE_DIR),
        };
        match tls {
            Some((dir, who)) => cmd.env(TLS_DIR, dir).env(TLS_AS, who),
            None => cmd.env_remove(TLS_DIR).env_remove(TLS_AS),
        };
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
/// `define` over `total` records; blocks for its workers through shared memory.
async fn driver(total: u64) -> (StreamingContext, Seen, String) {
    driver_with(total, true).await
}

/// [`driver`], with blocks through shared memory or (`shared_memory` false) the TCP link.
async fn driver_with(total: u64, shared_memory: bool) -> (StreamingContext, Seen, String) {
    let seen = Seen::default();
    let ctx = StreamingContext::builder()
        .workers(0)
        .replication(2)
        .executors(1)
        .batch_interval(Duration::from_millis(200))
        .block_interval(Duration::from_millis(50))
        .cluster(
            ClusterConfig::new("127.0.0.1:0".parse().unwrap(), COOKIE.to_string())
                .shared_memory(shared_memory),
        )
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

/// `n` worker processes of the driver at `addr` (of the file-source job with `source`).
fn spawn_workers(addr: &str, tmp: &Path, n: usize, source: Option<&Path>) -> Vec<Worker> {
    (0..n)
        .map(|i| Worker::spawn_with(addr, log(tmp, &format!("w{i}")), false, source))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_in_the_worker_processes_and_their_results_reach_the_driver() {
    tasks_run_in_the_worker_processes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_shared_memory_blocks_reach_workers_on_this_host_over_tcp() {
    tasks_run_in_the_worker_processes(false).await;
}

/// Two worker processes compute most records, each exactly once, their blocks on the
/// shared-memory data link or (`shared_memory` false) the TCP one.
async fn tasks_run_in_the_worker_processes(shared_memory: bool) {
    let _driver = DRIVER.lock().await;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let total = 20_000;
    let (ctx, seen, addr) = driver_with(total, shared_memory).await;
    let remote = remote_tasks(&ctx);
    let workers: Vec<Worker> = spawn_workers(&addr, tmp.path(), 2, None);
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
    for w in &workers {
        let out = w.output();
        let shm = out.contains("data link to the driver open (shared memory: same host)");
        assert!(
            out.contains("data link to the driver open") && shm == shared_memory,
            "worker {} opened no data link (shared memory: {shared_memory}) for its blocks:\n{out}",
            w.pid(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_running_tasks_killed_mid_stream_changes_nothing_in_the_output() {
    let _driver = DRIVER.lock().await;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let total = 60_000;
    let (ctx, seen, addr) = driver(total).await;
    let mut workers: Vec<Worker> = spawn_workers(&addr, tmp.path(), 3, None);
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
    let _driver = DRIVER.lock().await;
    init_logs();
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
    // It is told why, and exits with that error.
    let out = other.output();
    assert!(
        out.contains("WrongJob") && out.contains("not this driver's"),
        "{out}"
    );
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

/// A driver whose receivers run in worker processes (k = 2, no in-process worker), on the
/// file source in `tmp/source`; with `wal`, the write-ahead log in `tmp/ckpt`.
async fn file_driver(tmp: &Path, wal: bool) -> (StreamingContext, FileSeen, String, PathBuf) {
    file_driver_costing(tmp, wal, 0).await
}

/// Like `file_driver`, the driver's output costing `cost_ns` per record.
async fn file_driver_costing(
    tmp: &Path,
    wal: bool,
    cost_ns: u64,
) -> (StreamingContext, FileSeen, String, PathBuf) {
    let source = tmp.join("source");
    std::fs::create_dir_all(&source).unwrap();
    let seen = FileSeen::default();
    let mut b = file_job_builder()
        .workers(0)
        .replication(2)
        .executors(1)
        .receiver_placement(ReceiverPlacement::WorkerProcesses)
        .cluster(ClusterConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            COOKIE.to_string(),
        ));
    if wal {
        b = b
            .checkpoint_dir(tmp.join("ckpt"))
            .write_ahead_log(WalConfig::default());
    }
    let ctx = b.build().unwrap();
    define_file_job(&ctx, &source, seen.clone(), cost_ns).unwrap();
    ctx.start().await.unwrap();
    let addr = ctx.cluster_addr().unwrap().to_string();
    (ctx, seen, addr, source)
}

/// Every number below `upto` at least once; returns how many came twice or more.
fn none_missing(seen: &FileSeen, upto: u64) -> usize {
    let seen = seen.lock().unwrap();
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for (_, n, _) in seen.iter() {
        *counts.entry(*n).or_default() += 1;
    }
    let missing: Vec<u64> = (0..upto).filter(|n| !counts.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {upto} acknowledged numbers missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    counts.values().filter(|c| **c > 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_run_in_worker_processes_and_nothing_is_lost_or_repeated() {
    let _driver = DRIVER.lock().await;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let (ctx, seen, addr, source) = file_driver(tmp.path(), false).await;
    let workers: Vec<Worker> = spawn_workers(&addr, tmp.path(), 2, Some(&source));
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_until(
        "every number",
        Duration::from_secs(60),
        || async { seen.lock().unwrap().len() >= FILE_TOTAL as usize },
        &refs,
    )
    .await;
    ctx.stop(true).await.unwrap();
    let twice = none_missing(&seen, FILE_TOTAL);
    assert_eq!(twice, 0, "numbers output twice without any failure");
    let pids: HashSet<u32> = workers.iter().map(Worker::pid).collect();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|(_, _, receiver)| pids.contains(receiver)),
        "a record was received outside the worker processes"
    );
    assert!(seen.iter().all(|(task, _, _)| pids.contains(task)));
}

/// Backpressure reaches receivers in worker processes: a driver whose output takes 1 ms per
/// record (1,000 records/s) behind a source several times faster keeps its batches near
/// 200 records and its scheduling delay below two intervals (without the driver's rate the
/// worker's receiver would ramp past the source's speed and the delay would grow batch after
/// batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_rate_reaches_receivers_in_worker_processes() {
    let _driver = DRIVER.lock().await;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let (ctx, _seen, addr, source) = file_driver_costing(tmp.path(), false, 1_000_000).await;
    let mut reports = ctx.subscribe_batches();
    let workers: Vec<Worker> = spawn_workers(&addr, tmp.path(), 1, Some(&source));
    let refs: Vec<&Worker> = workers.iter().collect();
    // Until records flow, then a few seconds for the rate to settle.
    wait_until(
        "records flowing",
        Duration::from_secs(30),
        || async { FileSource::offset(&source) > 0 },
        &refs,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    while reports.try_recv().is_ok() {}
    let mut infos = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(info)) = tokio::time::timeout_at(until, reports.recv()).await {
        infos.push(info);
    }
    ctx.stop(false).await.unwrap();
    let shown: Vec<String> = infos
        .iter()
        .map(|i| format!("{} rec / {} ms", i.records, i.scheduling_delay.as_millis()))
        .collect();
    println!("batches: {shown:?}");
    assert!(infos.len() >= 5, "batches ran: {shown:?}");
    let busy: Vec<_> = infos.iter().filter(|i| i.records > 0).collect();
    assert!(!busy.is_empty(), "records flowed: {shown:?}");
    for i in &busy {
        assert!(i.records <= 600, "a batch near 200 records: {shown:?}");
        assert!(
            i.scheduling_delay < Duration::from_millis(400),
            "the delay stays below two intervals: {shown:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiving_worker_sigkilled_after_acks_loses_nothing_acknowledged_with_the_log() {
    let _driver = DRIVER.lock().await;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let (ctx, seen, addr, source) = file_driver(tmp.path(), true).await;
    let mut workers: Vec<Worker> = spawn_workers(&addr, tmp.path(), 3, Some(&source));
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_until(
        "a third of the numbers acknowledged",
        Duration::from_secs(60),
        || async { FileSource::offset(&source) >= FILE_TOTAL / 3 },
        &refs,
    )
    .await;
    // SIGKILL the process running the receiver, right after its source advanced.
    let receiving: HashSet<u32> = seen.lock().unwrap().iter().map(|(_, _, r)| *r).collect();
    let victim = workers
        .iter()
        .position(|w| receiving.contains(&w.pid()))
        .expect("no worker process is receiving");
    let killed = workers[victim].pid();
    let acked_at_kill = FileSource::offset(&source);
    workers[victim].child.kill().unwrap();
    let _ = workers[victim].child.wait();
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_until(
        "every number acknowledged and output after the kill",
        Duration::from_secs(90),
        || async {
            FileSource::offset(&source) >= FILE_TOTAL
                && seen
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, n, _)| *n == FILE_TOTAL - 1)
                    .count()
                    > 0
        },
        &refs,
    )
    .await;
    let ledger = ctx.ledger().await.expect("a ledger");
    ctx.stop(true).await.unwrap();
    let twice = none_missing(&seen, FILE_TOTAL);
    let after: HashSet<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n, _)| *n >= acked_at_kill + 1_000)
        .map(|(_, _, r)| *r)
        .collect();
    println!("killed {killed} at offset {acked_at_kill}; receivers afterwards {after:?}; {twice} numbers twice (redelivered)");
    assert!(!after.contains(&killed));
    assert!(!after.is_empty(), "the receiver did not restart elsewhere");
    assert!(ledger.balances(), "{ledger:?}");
    assert_eq!(ledger.total().lost_total(), 0, "{ledger:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cluster_context_at_a_time_per_process() {
    let _driver = DRIVER.lock().await;
    let (first, _, _) = driver(10).await;
    let second = StreamingContext::builder()
        .workers(0)
        .cluster(ClusterConfig::new("127.0.0.1:0".parse().unwrap(), COOKIE))
        .build()
        .unwrap();
    define(&second, 10, Seen::default()).unwrap();
    let err = second.start().await.expect_err("a second cluster node");
    assert!(err.to_string().contains("another cluster node"), "{err}");
    first.stop(false).await.unwrap();
    // Once the first has stopped, a new one starts.
    let (third, _, _) = driver(10).await;
    third.stop(false).await.unwrap();
}

/// A CA, the driver's and a worker's certificates from it, and a "rogue" worker whose
/// certificate and CA are another CA's, as PEM files in `dir`.
fn make_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (cert, key)
    };
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let (good_ca, good_key) = ca("tributary test CA");
    let (rogue_ca, rogue_key) = ca("another CA");
    let leaf = |who: &str, purpose, ca: &rcgen::Certificate, ca_key: &KeyPair| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![who.to_string()]).unwrap();
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, ca, ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    // An impostor: its certificate from the other CA, but it trusts the driver's CA.
    let (cert, key) = leaf(
        "worker",
        ExtendedKeyUsagePurpose::ClientAuth,
        &rogue_ca,
        &rogue_key,
    );
    write("impostor.pem", cert);
    write("impostor.key", key);
    write("impostor-ca.pem", good_ca.pem());
    for (who, purpose, ca, ca_key, file) in [
        (
            "tributary-driver",
            ExtendedKeyUsagePurpose::ServerAuth,
            &good_ca,
            &good_key,
            "driver",
        ),
        (
            "worker",
            ExtendedKeyUsagePurpose::ClientAuth,
            &good_ca,
            &good_key,
            "worker",
        ),
        (
            "worker",
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_ca,
            &rogue_key,
            "rogue",
        ),
    ] {
        let (cert, key) = leaf(who, purpose, ca, ca_key);
        write(&format!("{file}.pem"), cert);
        write(&format!("{file}.key"), key);
        write(&format!("{file}-ca.pem"), ca.pem());
    }
}

/// Waits (bounded) for a worker process to exit; its output.
async fn exit_output(w: &mut Worker, within: Duration) -> String {
    let t = Instant::now();
    while t.elapsed() < within {
        if w.child.try_wait().unwrap().is_some() {
            return w.output();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker did not exit within {within:?}\n{}", w.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_only_workers_with_a_certificate_of_the_cluster_ca_join() {
    let _driver = DRIVER.lock().await;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    let tls = cluster::ClusterTls::from_pem_files(
        certs.join("driver.pem"),
        certs.join("driver.key"),
        certs.join("driver-ca.pem"),
    )
    .unwrap();
    let total = 5_000;
    let seen = Seen::default();
    let ctx = StreamingContext::builder()
        .workers(0)
        .replication(1)
        .executors(1)
        .batch_interval(Duration::from_millis(200))
        .block_interval(Duration::from_millis(50))
        .cluster(ClusterConfig::new("127.0.0.1:0".parse().unwrap(), COOKIE).tls(tls))
        .build()
        .unwrap();
    define(&ctx, total, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    let addr = ctx.cluster_addr().unwrap().to_string();

    // Without TLS: the driver's handshake fails, the worker is refused before the cookie.
    let mut plain = Worker::spawn(&addr, log(tmp.path(), "plain"), false);
    let out = exit_output(&mut plain, Duration::from_secs(30)).await;
    assert!(out.contains("Refused"), "{out}");
    // A certificate of another CA (which also does not trust the driver's): refused.
    let mut rogue = Worker::spawn_tls(
        &addr,
        log(tmp.path(), "rogue"),
        false,
        None,
        Some((&certs, "rogue")),
    );
    let out = exit_output(&mut rogue, Duration::from_secs(30)).await;
    assert!(out.contains("TLS"), "{out}");
    // A certificate the driver's CA did not sign, from a worker that trusts the driver:
    // the driver refuses it.
    let mut impostor = Worker::spawn_tls(
        &addr,
        log(tmp.path(), "impostor"),
        false,
        None,
        Some((&certs, "impostor")),
    );
    let out = exit_output(&mut impostor, Duration::from_secs(30)).await;
    assert!(out.contains("TLS") || out.contains("Refused"), "{out}");
    assert!(ctx.live_workers().await.is_empty());
    assert_eq!(count(&seen), 0);

    // With the cluster CA's certificate: joins, and the job runs over TLS.
    let good = Worker::spawn_tls(
        &addr,
        log(tmp.path(), "good"),
        false,
        None,
        Some((&certs, "worker")),
    );
    wait_until(
        "every record over TLS",
        Duration::from_secs(40),
        || async { count(&seen) >= total as usize },
        &[&good],
    )
    .await;
    ctx.stop(true).await.unwrap();
    let by_process = exactly_once(&seen, total);
    assert!(by_process.contains_key(&good.pid()), "{by_process:?}");
    assert!(
        good.output().contains("data link to the driver open"),
        "no data link over TLS:\n{}",
        good.output()
    );
}

/// `TRIBUTARY_WORKER_KILLS` (default 10) SIGKILLs of a random worker process while it runs
/// tasks, a new worker started after each, the next kill once every block has 2 replicas
/// again: every record exactly once at the end. Seeded (`TRIBUTARY_WORKER_KILLS_SEED`,
/// printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kills_of_workers_running_tasks_change_nothing_in_the_output() {
    let _driver = DRIVER.lock().await;
    init_logs();
    let kills: usize = std::env::var("TRIBUTARY_WORKER_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = std::env::var("TRIBUTARY_WORKER_KILLS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("{kills} kills, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().unwrap();
    // The source runs until stopped; `total` is what it produced by then.
    let (ctx, seen, addr) = driver(u64::MAX).await;
    let mut workers = spawn_workers(&addr, tmp.path(), 3, None);
    for kill in 0..kills {
        let refs: Vec<&Worker> = workers.iter().collect();
        let before = count(&seen);
        wait_until(
            "records flowing",
            Duration::from_secs(30),
            || async { count(&seen) > before + 2_000 },
            &refs,
        )
        .await;
        let victim = rng.usize(..workers.len());
        let mut dead = workers.remove(victim);
        dead.child.kill().unwrap();
        let _ = dead.child.wait();
        workers.push(Worker::spawn(
            &addr,
            log(tmp.path(), &format!("w{}", 3 + kill)),
            false,
        ));
        let refs: Vec<&Worker> = workers.iter().collect();
        wait_until(
            &format!("3 live workers and every block with 2 replicas after kill {kill}"),
            Duration::from_secs(30),
            || async {
                ctx.live_workers().await.len() == 3
                    && ctx
                        .block_locations()
                        .await
                        .iter()
                        .all(|(_, at)| at.len() >= 2)
            },
            &refs,
        )
        .await;
    }
    let ledger = ctx.ledger().await.expect("a ledger");
    ctx.stop(true).await.unwrap();
    let total = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
        + 1;
    let by_process = exactly_once(&seen, total);
    println!(
        "{kills} kills: {total} records, each exactly once, computed in {} processes",
        by_process.len()
    );
    assert!(ledger.balances(), "{ledger:?}");
    assert_eq!(ledger.total().lost_total(), 0, "{ledger:?}");
}
