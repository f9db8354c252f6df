//! Workers in other OS processes: `examples/reliable_ingest` as the driver (no write-ahead
//! log, no in-process worker: every block replica lives in a worker process) and as workers,
//! on loopback, ports from the OS. Every wait is bounded; every child is killed at the end,
//! even when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod durability_support;
use durability_support::{acked, child_binary, ledger, seen};

const COOKIE: &str = "test-cookie";

/// A child process killed when dropped, with its output in a file (shown on failure).
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(child_binary())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn child");
        Proc { child, log }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn output(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("  ")).collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits (bounded) for the process to exit.
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool, logs: &[&Proc]) {
    let t = Instant::now();
    while t.elapsed() < within {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out: Vec<String> = logs
        .iter()
        .map(|p| format!("--- {}:\n{}", p.log.display(), p.output()))
        .collect();
    panic!(
        "timed out after {within:?} waiting for {what}\n{}",
        out.join("\n")
    );
}

fn live_workers(out: &Path) -> usize {
    std::fs::read_to_string(out.join("live_workers"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A driver with every replica in worker processes (k = 2), running `seconds`, without the
/// write-ahead log.
fn driver(tmp: &Path, seconds: f64, extra: &[&str]) -> (Proc, PathBuf, String) {
    let mut args = vec!["--no-wal"];
    args.extend_from_slice(extra);
    driver_with(tmp, seconds, &args)
}

/// A driver with every replica in worker processes, running `seconds`.
fn driver_with(tmp: &Path, seconds: f64, extra: &[&str]) -> (Proc, PathBuf, String) {
    let (dir, out) = (tmp.join("ckpt"), tmp.join("out"));
    let secs = seconds.to_string();
    let mut args = vec![
        "--dir",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--cluster-listen",
        "127.0.0.1:0",
        "--cookie",
        COOKIE,
        "--local-workers",
        "0",
        "--seconds",
        &secs,
    ];
    args.extend_from_slice(extra);
    let d = Proc::spawn(&args, tmp.join("driver.log"));
    let addr_file = out.join("cluster.addr");
    wait_until(
        "the driver's cluster address",
        Duration::from_secs(20),
        || addr_file.exists(),
        &[&d],
    );
    let addr = std::fs::read_to_string(&addr_file).unwrap();
    (d, out, addr.trim().to_string())
}

fn worker(tmp: &Path, addr: &str, cookie: &str, n: usize) -> Proc {
    Proc::spawn(
        &["--worker", "--driver", addr, "--cookie", cookie],
        tmp.join(format!("worker-{n}.log")),
    )
}

/// Starts `n` workers of the driver at `addr` and waits until they joined and, when `flowing`,
/// until records flow.
fn join_workers(
    tmp: &Path,
    d: &Proc,
    out: &Path,
    addr: &str,
    n: usize,
    flowing: bool,
) -> Vec<Proc> {
    let workers: Vec<Proc> = (0..n).map(|i| worker(tmp, addr, COOKIE, i)).collect();
    wait_until(
        &format!("{n} workers joined"),
        Duration::from_secs(20),
        || live_workers(out) == n,
        &[d],
    );
    if flowing {
        wait_until(
            "records flowing",
            Duration::from_secs(10),
            || acked(out) > 5_000,
            &[d],
        );
    }
    workers
}

/// Every acknowledged record is in the output; the ledger balances with nothing lost.
fn assert_nothing_lost(out: &Path, driver: &Proc) {
    let acked = acked(out);
    assert!(acked > 0, "nothing acknowledged\n{}", driver.output());
    let seen = seen(out);
    let missing: Vec<u64> = (0..acked).filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {acked} acknowledged records missing, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        driver.output()
    );
    let (stored, completed, pending, lost, balances) = ledger(out).expect("a ledger");
    assert!(balances, "ledger does not balance");
    assert_eq!(lost, 0, "the ledger reports {lost} lost of {stored}");
    assert_eq!(stored, completed + pending);
}

#[test]
fn a_worker_process_killed_mid_stream_loses_nothing_with_two_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut d, out, addr) = driver(tmp.path(), 8.0, &[]);
    let mut workers = join_workers(tmp.path(), &d, &out, &addr, 3, true);
    let before_kill = acked(&out);
    // SIGKILL a worker holding replicas, mid-stream.
    signal(workers[0].pid(), "-KILL");
    let killed_at = Instant::now();
    wait_until(
        "the driver noticed the killed worker",
        Duration::from_secs(5),
        || live_workers(&out) == 2,
        &[&d],
    );
    let noticed = killed_at.elapsed();
    // The process manager's part: a new incarnation joins as a new worker.
    workers.push(worker(tmp.path(), &addr, COOKIE, 3));
    wait_until(
        "the relaunched worker joined",
        Duration::from_secs(20),
        || live_workers(&out) == 3,
        &[&d],
    );
    let status = d.wait(Duration::from_secs(60)).expect("driver finished");
    assert!(status.success(), "driver failed: {status}\n{}", d.output());
    assert!(
        acked(&out) > before_kill + 5_000,
        "the stream went on after the kill"
    );
    assert_nothing_lost(&out, &d);
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        log.contains("re-replication done"),
        "blocks of the killed worker were re-replicated"
    );
    eprintln!("worker SIGKILL noticed by the driver in {noticed:?}");
    // The survivors exit by themselves once the driver is gone.
    for (i, w) in workers.iter_mut().enumerate().skip(1) {
        let s = w.wait(Duration::from_secs(10));
        assert!(
            s.is_some_and(|s| s.success()),
            "worker {i} did not exit cleanly after the driver stopped: {s:?}\n{}",
            w.output()
        );
    }
}

#[test]
fn with_one_replica_a_killed_worker_process_loses_exactly_what_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut d, out, addr) = driver(tmp.path(), 6.0, &["--replication", "1"]);
    let mut workers = join_workers(tmp.path(), &d, &out, &addr, 2, true);
    signal(workers[0].pid(), "-KILL");
    let status = d.wait(Duration::from_secs(60)).expect("driver finished");
    assert!(status.success(), "driver failed: {status}\n{}", d.output());
    let acked = acked(&out);
    let seen = seen(&out);
    let missing = (0..acked).filter(|n| !seen.contains(n)).count() as u64;
    let (stored, completed, pending, lost, balances) = ledger(&out).expect("a ledger");
    eprintln!("k = 1: acked {acked}, missing {missing}, ledger: stored {stored} completed {completed} lost {lost}");
    assert!(balances && stored == completed + pending + lost);
    // Each lost record is reported (a record in flight when the worker died may be lost
    // and also sent again by the source: at most one source call, 200 records).
    assert!(
        missing <= lost && lost <= missing + 200,
        "missing {missing}, lost {lost}"
    );
    drop(workers.pop());
}

/// With the write-ahead log and k = 1, a worker process SIGKILLed takes the only replica of
/// its blocks: the driver reads them back from the log and places them on the survivor.
#[test]
fn with_the_log_and_one_replica_a_killed_worker_process_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // Blocks processed only at their batch: those acknowledged since the last one have
    // nothing but their replica and the log (with early tasks, most are processed already).
    let (mut d, out, addr) =
        driver_with(tmp.path(), 6.0, &["--replication", "1", "--no-early-tasks"]);
    let mut workers = join_workers(tmp.path(), &d, &out, &addr, 2, true);
    // Kill every worker: each unprocessed block loses its only replica. `store` waits for a
    // worker; a new one joins; the lost blocks are read back from the log onto it.
    signal(workers[0].pid(), "-KILL");
    signal(workers[1].pid(), "-KILL");
    wait_until(
        "both losses noticed",
        Duration::from_secs(5),
        || live_workers(&out) == 0,
        &[&d],
    );
    workers.push(worker(tmp.path(), &addr, COOKIE, 2));
    let status = d.wait(Duration::from_secs(60)).expect("driver finished");
    assert!(status.success(), "driver failed: {status}\n{}", d.output());
    assert_nothing_lost(&out, &d);
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        log.contains("block read back from the write-ahead log"),
        "no block needed the log: the test did not test it\n{}",
        d.output()
    );
}

/// The driver process SIGKILLed: its workers notice the closed connection and exit cleanly
/// (they hold only that driver's blocks).
#[test]
fn workers_exit_cleanly_when_the_driver_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, out, addr) = driver(tmp.path(), 60.0, &[]);
    let mut workers = join_workers(tmp.path(), &d, &out, &addr, 2, false);
    signal(d.pid(), "-KILL");
    for (i, w) in workers.iter_mut().enumerate() {
        let s = w.wait(Duration::from_secs(10));
        assert!(
            s.is_some_and(|s| s.success()),
            "worker {i} did not exit cleanly after the driver was killed: {s:?}\n{}",
            w.output()
        );
        assert!(w.output().contains("DriverGone"), "{}", w.output());
    }
    drop(d);
}

#[test]
fn a_wrong_cookie_is_refused_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, out, addr) = driver(tmp.path(), 30.0, &[]);
    let mut w = worker(tmp.path(), &addr, "not-the-cookie", 0);
    let status = w.wait(Duration::from_secs(20)).expect("the worker exits");
    assert!(!status.success(), "a worker with a wrong cookie must fail");
    assert!(
        w.output()
            .contains("refused this worker before authentication"),
        "worker's error names the refusal:\n{}",
        w.output()
    );
    wait_until(
        "the driver logs the refusal",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&d.log)
                .unwrap_or_default()
                .contains("closed before authentication")
        },
        &[&d],
    );
    assert_eq!(live_workers(&out), 0, "the refused worker never joined");
}

#[test]
fn a_frozen_worker_is_declared_lost_by_the_heartbeat_and_fenced() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut d, out, addr) = driver(tmp.path(), 10.0, &[]);
    let mut workers = join_workers(tmp.path(), &d, &out, &addr, 3, true);
    // Frozen: its connection stays open, so only the heartbeat (2 s deadline) can tell.
    signal(workers[0].pid(), "-STOP");
    let frozen_at = Instant::now();
    wait_until(
        "the driver declared the frozen worker lost",
        Duration::from_secs(5),
        || live_workers(&out) == 2,
        &[&d, &workers[0]],
    );
    let detected = frozen_at.elapsed();
    assert!(
        detected >= Duration::from_millis(1500),
        "declared lost before the deadline: {detected:?}"
    );
    // Resumed, it finds its connection closed (fenced) and exits; it never rejoins as
    // the same worker.
    signal(workers[0].pid(), "-CONT");
    let s = workers[0].wait(Duration::from_secs(10));
    assert!(
        s.is_some(),
        "the fenced worker did not exit after it was resumed\n{}",
        workers[0].output()
    );
    assert_eq!(
        live_workers(&out),
        2,
        "the fenced incarnation did not come back"
    );
    let status = d.wait(Duration::from_secs(60)).expect("driver finished");
    assert!(status.success(), "driver failed: {status}\n{}", d.output());
    assert_nothing_lost(&out, &d);
    eprintln!("frozen worker declared lost after {detected:?}");
    drop(workers);
}

/// `target/<profile>/examples/word_count` (built by `cargo test --workspace`; built here if
/// missing).
fn word_count_binary() -> PathBuf {
    let reliable = child_binary();
    let bin = reliable.with_file_name("word_count");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--quiet", "--example", "word_count"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "building word_count failed");
    }
    bin
}

#[test]
fn the_driver_relaunches_a_worker_process_that_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("word_count.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(word_count_binary())
        .args([
            "--worker-processes",
            "2",
            "--workers",
            "0",
            "--duration",
            "6",
        ])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut driver = Proc {
        child,
        log: log.clone(),
    };
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "the worker pids",
        Duration::from_secs(20),
        || read().contains("worker pids: [Some("),
        &[&driver],
    );
    let text = read();
    let line = text
        .lines()
        .find(|l| l.starts_with("worker pids:"))
        .unwrap();
    let first: i32 = line
        .split("Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .expect("a pid");
    std::thread::sleep(Duration::from_millis(1500));
    signal(first, "-KILL");
    wait_until(
        "the killed worker relaunched",
        Duration::from_secs(10),
        || read().contains("workers/worker-0 restarted"),
        &[&driver],
    );
    let status = driver
        .wait(Duration::from_secs(60))
        .expect("driver finished");
    assert!(
        status.success(),
        "driver failed: {status}\n{}",
        driver.output()
    );
    let out = read();
    assert!(
        out.contains("workers/worker-0 failed (worker process exited: signal: 9"),
        "the death is a supervision event:\n{out}"
    );
    assert!(out.contains("totals:"), "the job finished:\n{out}");
    // Every worker process is gone once the driver is.
    let alive = Command::new("kill")
        .args(["-0", &first.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(!alive, "the killed worker's pid is not running");
}

fn under_replicated(out: &Path) -> Option<usize> {
    std::fs::read_to_string(out.join("under_replicated"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Worker SIGKILLs in a loop (`TRIBUTARY_WORKER_KILLS`, default 10), k = 2, a new
/// incarnation started after each: no record lost, counted by sequence numbers. Each kill
/// waits until every block has its 2 replicas again (k = 2 survives one failure at a time).
#[test]
fn repeated_worker_kills_lose_nothing_with_two_replicas() {
    let kills: usize = std::env::var("TRIBUTARY_WORKER_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = std::env::var("TRIBUTARY_WORKER_KILLS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("worker kill loop: {kills} kills, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().unwrap();
    let (mut d, out, addr) = driver(tmp.path(), 3600.0, &[]);
    let mut workers = join_workers(tmp.path(), &d, &out, &addr, 3, false);
    let t0 = Instant::now();
    for k in 0..kills {
        wait_until(
            "every block back to 2 replicas",
            Duration::from_secs(30),
            || under_replicated(&out) == Some(0),
            &[&d],
        );
        std::thread::sleep(Duration::from_millis(100 + rng.u64(0..300)));
        let victim = rng.usize(..workers.len());
        let acked_before = acked(&out);
        signal(workers[victim].pid(), "-KILL");
        let mut dead = workers.swap_remove(victim);
        let _ = dead.wait(Duration::from_secs(5));
        wait_until(
            "the killed worker noticed",
            Duration::from_secs(5),
            || live_workers(&out) == 2,
            &[&d],
        );
        workers.push(worker(tmp.path(), &addr, COOKIE, 3 + k));
        wait_until(
            "the new incarnation joined",
            Duration::from_secs(20),
            || live_workers(&out) == 3,
            &[&d],
        );
        assert!(
            acked(&out) >= acked_before,
            "kill {k}: the acknowledged offset went back"
        );
    }
    eprintln!("{kills} kills in {:?}", t0.elapsed());
    signal(d.pid(), "-INT"); // graceful stop
    let status = d.wait(Duration::from_secs(60)).expect("driver finished");
    assert!(status.success(), "driver failed: {status}\n{}", d.output());
    assert_nothing_lost(&out, &d);
    eprintln!(
        "worker kill loop: {} records acknowledged, none lost",
        acked(&out)
    );
}
