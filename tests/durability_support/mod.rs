//! Shared by the durability tests: a reliable receiver whose "source" keeps the acknowledged
//! offset, and helpers for the tests that run `examples/reliable_ingest` as a child process.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tributary::{BoxError, Receiver, ReceiverContext};

/// Stores numbers reliably, 100 at a time, up to `limit`, resuming after the last
/// acknowledged one (its "source" keeps the acknowledged offset, as a broker would), pausing
/// `pause` between stores.
pub struct Reliable {
    pub acked: Arc<AtomicU64>,
    pub limit: u64,
    pub pause: Duration,
}

#[derive(Debug)]
pub struct Go;

impl Receiver for Reliable {
    type Msg = Go;
    type State = u64;
    type Record = String;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        let _ = ctx.myself().send(Go);
        Ok(self.acked.load(Ordering::SeqCst))
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
        ctx.store_reliably((*next..*next + 100).map(|n| n.to_string()))
            .await?;
        *next += 100;
        self.acked.store(*next, Ordering::SeqCst);
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        let _ = ctx.myself().send(Go);
        Ok(())
    }
}

/// `target/<profile>/examples/reliable_ingest`, built if missing.
pub fn child_binary() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/reliable_ingest
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = profile_dir.join("examples").join("reliable_ingest");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--example", "reliable_ingest"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the crash child failed");
    }
    bin
}

/// The source's acknowledged offset, in the example's output directory `out`.
pub fn acked(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("source.offset"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Every number in the example's batch files.
pub fn seen(out: &Path) -> HashSet<u64> {
    let mut seen = HashSet::new();
    let Ok(dir) = std::fs::read_dir(out.join("batches")) else {
        return seen;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_some() {
            continue; // a temp file of an interrupted write
        }
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            if let Ok(n) = line.parse() {
                seen.insert(n);
            }
        }
    }
    seen
}

/// Records the example's batches reported lost (`out/lost.log`).
pub fn reported_lost(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("lost.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().rev().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Batch ids the example saw applied twice with different contents.
pub fn conflicts(out: &Path) -> usize {
    std::fs::read_dir(out.join("conflicts"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The example's last ledger line: `(stored, completed, pending, lost, balances)`.
pub fn ledger(out: &Path) -> Option<(u64, u64, u64, u64, bool)> {
    let text = std::fs::read_to_string(out.join("ledger.txt")).ok()?;
    let w: Vec<&str> = text.split_whitespace().collect();
    let num = |i: usize| w.get(i)?.parse::<u64>().ok();
    Some((num(1)?, num(3)?, num(5)?, num(7)?, *w.get(9)? == "true"))
}
