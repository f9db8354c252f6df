//! Run: cargo run --example worker_failure
//!
//! Kills a worker in the middle of a stream, twice:
//!
//! 1. with replication k = 2: every block the dead worker held is re-replicated from a
//!    survivor, the receiver placed on it restarts on another worker, and **no record is lost**;
//! 2. with k = 1: the blocks only the dead worker held are gone, and the loss is **reported**
//!    exactly (per batch, and in the log), never silent. This run turns early tasks off, so
//!    that blocks wait unprocessed for their batch: with early tasks (the default) a block
//!    whose work was done before its worker died is not lost, and there may be nothing to lose.
//!
//! Each run stores sequence-numbered records and checks which ones reached the batch function.
//! Exits with status 0 when both outcomes are as described, 1 otherwise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::StreamingContext;
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

struct Outcome {
    processed: u64,
    reported_lost_records: u64,
    reported_lost_blocks: usize,
    generated: u64,
}

async fn run(k: usize) -> anyhow::Result<Outcome> {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(500))
        .block_interval(Duration::from_millis(50))
        .workers(3)
        .replication(k)
        // k = 1 shows a loss: blocks wait unprocessed for their batch (see the top).
        .early_tasks(k > 1)
        .build()?;
    let source = SyntheticReceiver::new().rate(100_000.0);
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = seen.clone();
    ctx.receiver_stream("synthetic", source.clone())?
        .map(|r| parse(&r).map(|p| p.0).unwrap_or(u64::MAX))
        .for_each_batch(move |b| s.lock().unwrap().extend(b.records))?;
    let mut reports = ctx.subscribe_batches();
    ctx.start().await?;

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let held: Vec<_> = ctx.block_locations().await;
    let on_0 = held.iter().filter(|(_, at)| at.contains(&0)).count();
    println!(
        "  k={k}: killing worker 0 (it holds {on_0} of {} unprocessed blocks)",
        held.len()
    );
    ctx.kill_worker(0).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ctx.stop(true).await?;

    let mut lost_records = 0;
    let mut lost_blocks = 0;
    while let Ok(info) = reports.try_recv() {
        if info.lost_blocks > 0 {
            println!(
                "  {}: {} blocks lost ({} records) — reported",
                info.id, info.lost_blocks, info.lost_records
            );
        }
        lost_records += info.lost_records;
        lost_blocks += info.lost_blocks;
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    seen.dedup();
    Ok(Outcome {
        processed: seen.len() as u64,
        reported_lost_records: lost_records,
        reported_lost_blocks: lost_blocks,
        generated: source.generated(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let mut ok = true;
    for k in [2, 1] {
        println!("== replication k = {k}");
        let o = run(k).await?;
        println!(
            "  generated {}, processed {}, reported lost {} records in {} blocks",
            o.generated, o.processed, o.reported_lost_records, o.reported_lost_blocks
        );
        let accounted = o.processed + o.reported_lost_records == o.generated;
        if k == 2 {
            let good = o.processed == o.generated && o.reported_lost_records == 0;
            println!(
                "  {}",
                if good {
                    "OK: nothing lost"
                } else {
                    "UNEXPECTED: records missing with k = 2"
                }
            );
            ok &= good;
        } else {
            let good = accounted && o.reported_lost_blocks > 0;
            println!(
                "  {}",
                if good {
                    "OK: the loss is reported exactly (processed + reported lost = generated)"
                } else {
                    "UNEXPECTED: loss not accounted for"
                }
            );
            ok &= good;
        }
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
