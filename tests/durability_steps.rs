//! A crash between any two steps of a segment roll, a segment deletion or a compaction of the
//! metadata log leaves a directory that starts, with nothing acknowledged lost: the
//! `reliable_ingest` example ends itself (abort, like a kill) exactly at each step, then runs
//! again on the same directories.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod durability_support;
use durability_support::{acked, child_binary, conflicts, ledger, seen};

fn run(bin: &Path, tmp: &Path, extra: &[&str], within: Duration) -> (bool, String) {
    let log = tmp.join(format!("run-{}.log", fastrand::u32(..)));
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(bin)
        .args(extra)
        .arg("--dir")
        .arg(tmp.join("checkpoint"))
        .arg("--out")
        .arg(tmp.join("out"))
        .args(["--wal-segment-kib", "16", "--checkpoint-every", "5"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("spawn child");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "child did not end within {within:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

fn crash_at(step: &str) {
    let bin = child_binary();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let out = tmp.join("out");
    // Twice at the step, then a clean run: each restart starts on what the crash left.
    for _ in 0..2 {
        let (ok, log) = run(&bin, tmp, &["--crash-at", step], Duration::from_secs(60));
        assert!(
            !ok && log.contains("crashing at"),
            "{step}: the run should have crashed at the step:\n{log}"
        );
    }
    let (ok, log) = run(&bin, tmp, &["--seconds", "1.5"], Duration::from_secs(60));
    assert!(ok, "{step}: the directory did not start again:\n{log}");
    let acked = acked(&out);
    assert!(acked > 0);
    let seen = seen(&out);
    let missing = (0..acked).filter(|n| !seen.contains(n)).count();
    assert_eq!(missing, 0, "{step}: acknowledged records missing");
    assert_eq!(
        conflicts(&out),
        0,
        "{step}: a batch id applied twice differently"
    );
    let (stored, completed, pending, lost, balances) = ledger(&out).expect("a ledger");
    assert!(
        balances && lost == 0 && pending == 0 && stored == completed,
        "{step}: ledger stored {stored} completed {completed} pending {pending} lost {lost}"
    );
}

#[test]
fn a_crash_right_after_a_segment_roll_leaves_a_directory_that_starts() {
    crash_at("segment-rolled");
}

#[test]
fn a_crash_right_after_a_segment_deletion_leaves_a_directory_that_starts() {
    crash_at("segment-deleted");
}

#[test]
fn a_crash_in_the_middle_of_a_compaction_leaves_a_directory_that_starts() {
    crash_at("compacting");
}

#[test]
fn a_crash_right_after_a_compaction_leaves_a_directory_that_starts() {
    crash_at("compacted");
}
