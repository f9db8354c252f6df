//! Shared by the pipeline tests: a synthetic job whose sequence numbers are collected, and
//! small waiting helpers.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::{BatchInfo, StreamingContext};
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

pub type Seqs = Arc<Mutex<Vec<u64>>>;

pub fn collect(ctx: &StreamingContext, source: &SyntheticReceiver) -> Seqs {
    let seqs: Seqs = Arc::default();
    let s = seqs.clone();
    ctx.receiver_stream("synthetic", source.clone())
        .unwrap()
        .map(|r| parse(&r).unwrap().0)
        .for_each_batch(move |b| s.lock().unwrap().extend(b.records))
        .unwrap();
    seqs
}

pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn drain(reports: &mut tokio::sync::broadcast::Receiver<BatchInfo>) -> Vec<BatchInfo> {
    std::iter::from_fn(|| reports.try_recv().ok()).collect()
}

/// Starts a job with long (60 s) batches, generates `n` records, and returns once they are all
/// acknowledged and none processed yet (early tasks off: blocks wait for their batch).
pub async fn generate_then_hold(
    workers: usize,
    k: usize,
    n: u64,
) -> (
    StreamingContext,
    Seqs,
    tokio::sync::broadcast::Receiver<BatchInfo>,
) {
    generate_then_hold_with(workers, k, n, false).await
}

/// [`generate_then_hold`], with early tasks `early` (on: blocks acknowledged after the first
/// batch may be processed already).
pub async fn generate_then_hold_with(
    workers: usize,
    k: usize,
    n: u64,
    early: bool,
) -> (
    StreamingContext,
    Seqs,
    tokio::sync::broadcast::Receiver<BatchInfo>,
) {
    // The first boundary is a minute away: it never comes between generating, counting the
    // blocks and the caller's kill (with 5 s it did once in CI, the batch freeing the blocks
    // counted); the caller's graceful stop runs the batch. No adaptive rate: it would hold the
    // source at its initial rate until a batch completed.
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(60))
        .backpressure(tributary::Backpressure::off())
        .block_interval(Duration::from_millis(20))
        .workers(workers)
        .replication(k)
        .early_tasks(early)
        .build()
        .unwrap();
    let source = SyntheticReceiver::new().limit(n).chunk(500);
    let seqs = collect(&ctx, &source);
    let reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    wait_until("all generated", || source.generated() >= n).await;
    // Let the last blocks be cut and acknowledged.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (ctx, seqs, reports)
}
