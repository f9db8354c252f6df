//! The adaptive ingestion rate (backpressure) with a real context: a free-running source
//! feeding a job slower than it settles at what the job processes, batch after batch, with
//! the scheduling delay below one interval and nothing lost; a job that speeds up lets the
//! rate rise; a configured maximum is never exceeded.
//!
//! The job's cost is wall time (a sleep per record, in the output), so its capacity is the
//! same on any machine; the source is far faster than it, even in a debug build.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tributary::{Backpressure, BatchInfo, StreamingContext};
use tributary_receivers::synthetic::SyntheticReceiver;

const INTERVAL: Duration = Duration::from_millis(500);

/// A context whose job costs `cost_ns` nanoseconds per record (read at each batch).
async fn job(
    backpressure: Backpressure,
    cost_ns: Arc<AtomicU64>,
) -> (
    StreamingContext,
    tokio::sync::broadcast::Receiver<BatchInfo>,
) {
    let ctx = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .block_interval(Duration::from_millis(100))
        .replication(1)
        .backpressure(backpressure)
        .build()
        .unwrap();
    ctx.receiver_stream("synthetic", SyntheticReceiver::new().chunk(100))
        .unwrap()
        .count()
        .for_each_batch(move |b| {
            let n: u64 = b.records.iter().sum();
            let cost = cost_ns.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_nanos(n.saturating_mul(cost)));
        })
        .unwrap();
    let reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    (ctx, reports)
}

/// The next `n` batch reports (bounded wait).
async fn batches(
    reports: &mut tokio::sync::broadcast::Receiver<BatchInfo>,
    n: usize,
) -> Vec<BatchInfo> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), reports.recv()).await {
            Ok(Ok(info)) => out.push(info),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            other => panic!("no batch report: {other:?}"),
        }
    }
    out
}

fn show(infos: &[BatchInfo]) -> String {
    infos
        .iter()
        .map(|i| {
            format!(
                "{} rec / {} ms delay",
                i.records,
                i.scheduling_delay.as_millis()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_slower_than_its_source_sets_the_rate_and_keeps_up() {
    // 20 µs per record: 50,000 records/s, 25,000 per 500 ms batch.
    let cost = Arc::new(AtomicU64::new(20_000));
    let (ctx, mut reports) = job(Backpressure::default(), cost).await;
    let warm = batches(&mut reports, 10).await;
    let measured = batches(&mut reports, 8).await;
    ctx.stop(true).await.unwrap();
    println!("warm-up: {}\nmeasured: {}", show(&warm), show(&measured));
    for i in &measured {
        assert!(
            i.scheduling_delay < INTERVAL,
            "a batch waited a whole interval or more: {}",
            show(&measured)
        );
        assert!(
            (5_000..=40_000).contains(&i.records),
            "batches near 25,000 records (the job's capacity): {}",
            show(&measured)
        );
        assert_eq!(i.lost_records, 0);
    }
    let ledger = &measured.last().unwrap().ledger;
    assert!(ledger.streams.values().all(|l| l.lost_total() == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_rises_again_when_the_job_speeds_up() {
    let cost = Arc::new(AtomicU64::new(40_000)); // 25,000 records/s
    let (ctx, mut reports) = job(Backpressure::default(), cost.clone()).await;
    let _warm = batches(&mut reports, 8).await;
    let slow = batches(&mut reports, 4).await;
    cost.store(4_000, Ordering::Relaxed); // 250,000 records/s
    let _rising = batches(&mut reports, 8).await;
    let fast = batches(&mut reports, 4).await;
    ctx.stop(true).await.unwrap();
    println!("slow: {}\nfast: {}", show(&slow), show(&fast));
    let mean = |v: &[BatchInfo]| v.iter().map(|i| i.records).sum::<u64>() / v.len() as u64;
    assert!(
        mean(&fast) >= 3 * mean(&slow),
        "the rate rose with the job's speed: slow {} vs fast {}",
        show(&slow),
        show(&fast)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_never_exceeds_the_configured_maximum() {
    let max = 20_000.0; // records/s: 10,000 per batch
    let cost = Arc::new(AtomicU64::new(0)); // a job far faster than that
    let (ctx, mut reports) = job(Backpressure::default().max_rate(max), cost).await;
    let infos = batches(&mut reports, 10).await;
    ctx.stop(true).await.unwrap();
    println!("{}", show(&infos));
    // The bucket starts full (one second's worth); after that, the rate holds.
    let total: u64 = infos.iter().map(|i| i.records).sum();
    let elapsed = INTERVAL.as_secs_f64() * (infos.len() as f64 + 1.0);
    assert!(
        total as f64 <= max * elapsed + max,
        "{total} records in {elapsed} s at most {max}/s: {}",
        show(&infos)
    );
    for i in &infos[2..] {
        assert!(
            i.records as f64 <= max * INTERVAL.as_secs_f64() * 1.3,
            "{}",
            show(&infos)
        );
    }
}

/// A job whose cost is in its per-block tasks, which run early (as blocks arrive): at the
/// boundary little is left, so the batch's time there would read a saturated job as idle and
/// the rate would climb until batches queue. The rate follows the tasks' work instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_work_in_early_tasks_the_rate_still_settles_and_keeps_up() {
    let ctx = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .block_interval(Duration::from_millis(100))
        .replication(1)
        .build()
        .unwrap();
    ctx.receiver_stream("synthetic", SyntheticReceiver::new().chunk(100))
        .unwrap()
        .aggregate(
            || 0u64,
            // 20 µs per record, slept 2 ms per 100 records: at most 50,000 records/s per
            // executor, whatever the machine.
            |n: &mut u64, _| {
                *n += 1;
                if n.is_multiple_of(100) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            },
            |a, b| a + b,
        )
        .for_each_batch(|_| {})
        .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    let warm = batches(&mut reports, 12).await;
    let measured = batches(&mut reports, 8).await;
    ctx.stop(true).await.unwrap();
    println!("warm-up: {}\nmeasured: {}", show(&warm), show(&measured));
    // Measured: 44,600–46,200 records per batch, delay 1–4 ms; with the time at the boundary
    // as the signal, 30,000–57,700 records and delays of 170–283 ms.
    let sizes: Vec<u64> = measured.iter().map(|i| i.records).collect();
    let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(
        *hi as f64 <= *lo as f64 * 1.5,
        "steady batches: {}",
        show(&measured)
    );
    for i in &measured {
        assert!(
            i.scheduling_delay < INTERVAL / 5,
            "a batch waited a fifth of an interval or more: {}",
            show(&measured)
        );
        // Two executors: at most 50,000 records per 500 ms batch.
        assert!(
            (2_000..=60_000).contains(&i.records),
            "batches near the job's capacity: {}",
            show(&measured)
        );
    }
}

/// The queue of batches waiting to run is bounded: behind a batch that takes 75 intervals, at
/// most 16 wait; later boundaries are skipped and their blocks go into the next batch cut (one
/// larger batch, not an ever longer queue). Nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_queued_behind_a_slow_one_are_bounded_and_nothing_is_lost() {
    let interval = Duration::from_millis(20);
    let ctx = StreamingContext::builder()
        .batch_interval(interval)
        .block_interval(interval)
        .replication(1)
        .backpressure(Backpressure::off())
        .build()
        .unwrap();
    let sizes: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let s = sizes.clone();
    ctx.receiver_stream(
        "synthetic",
        SyntheticReceiver::new().rate(2_000.0).chunk(2).limit(8_000),
    )
    .unwrap()
    .count()
    .for_each_batch(move |b| {
        let n: u64 = b.records.iter().sum();
        let mut s = s.lock().unwrap();
        if n > 0 && s.is_empty() {
            // The first batch with records takes 1.5 s: ~75 boundaries pass behind it.
            std::thread::sleep(Duration::from_millis(1500));
        }
        s.push(n);
    })
    .unwrap();
    ctx.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    ctx.stop(true).await.unwrap();
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(
        sizes.iter().sum::<u64>(),
        8_000,
        "every record once: {sizes:?}"
    );
    // ~40 records per 20 ms interval; the batch after the skipped boundaries holds dozens of
    // intervals' worth.
    let largest_after = sizes.iter().skip_while(|n| **n == 0).skip(1).max().copied();
    assert!(
        largest_after.unwrap_or(0) > 40 * 20,
        "behind a slow batch, skipped boundaries must fold into one batch: {sizes:?}"
    );
}
