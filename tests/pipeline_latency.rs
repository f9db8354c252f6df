//! Batch boundaries cut blocks: the last block of a batch is cut at its boundary, so every
//! record of batch T was stored in the interval that T closes, (T − interval, T], not a block
//! interval earlier. A record waits at most one batch interval before its batch is cut.
//!
//! The synthetic receiver writes each record's creation time (µs since the epoch) into it; the
//! output compares it with the batch time. Block interval 200 ms against 500 ms batches: the
//! boundaries are not multiples of it, so without boundary cuts a block cut 100 ms before a
//! boundary and ending 100 ms after it would put records into the batch after theirs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tributary::{Backpressure, ByteString, StreamingContext};
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

const INTERVAL: Duration = Duration::from_millis(500);

/// Per batch: its time (ms), the earliest and latest creation time (ms) of its records, and
/// how many.
type Spans = Arc<Mutex<Vec<(i64, i64, i64, usize)>>>;

/// Per batch: its time (ms), and when each of its blocks' tasks ran (ms).
type Ran = Arc<Mutex<Vec<(i64, Vec<i64>)>>>;

/// Timer slack: a boundary cut runs a little after its boundary.
const SLACK_MS: i64 = 60;

/// Waits for `n` batch reports (bounded).
async fn wait_batches(
    reports: &mut tokio::sync::broadcast::Receiver<tributary::BatchInfo>,
    n: usize,
) {
    let mut batches = 0;
    while batches < n {
        match tokio::time::timeout(Duration::from_secs(20), reports.recv()).await {
            Ok(Ok(_)) => batches += 1,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            other => panic!("no batch report: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_of_a_batch_was_stored_in_the_interval_it_closes() {
    let ctx = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .block_interval(Duration::from_millis(200))
        .replication(1)
        .backpressure(Backpressure::off())
        .build()
        .unwrap();
    // (batch time ms, earliest and latest record creation ms in it, records)
    let seen: Spans = Arc::default();
    let s = seen.clone();
    ctx.receiver_stream(
        "synthetic",
        SyntheticReceiver::new().rate(20_000.0).chunk(50),
    )
    .unwrap()
    .map(|l: ByteString| parse(&l).map_or(0, |(_, created, _)| created as i64 / 1000))
    .for_each_batch(move |b| {
        let t = b.time.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        if let (Some(lo), Some(hi)) = (b.records.iter().min(), b.records.iter().max()) {
            s.lock().unwrap().push((t, *lo, *hi, b.records.len()));
        }
    })
    .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    wait_batches(&mut reports, 8).await;
    ctx.stop(true).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    // The first batch can hold records from before the context's first boundary interval
    // (the receiver starts before the scheduler), and the last is the drain batch (cut early).
    let full = &seen[1..seen.len() - 1];
    assert!(full.len() >= 5, "too few batches with records: {seen:?}");
    let interval = INTERVAL.as_millis() as i64;
    for (t, lo, hi, n) in full {
        assert!(
            *lo > t - interval - SLACK_MS,
            "batch {t} holds a record created {} ms before it, more than one interval ({n} records; all: {seen:?})",
            t - lo
        );
        assert!(
            *hi <= t + SLACK_MS,
            "batch {t} holds a record created {} ms after it ({seen:?})",
            hi - t
        );
    }
}

/// When each block's task ran (ms since the epoch), per batch, with early tasks `on` or off.
async fn task_times(early: bool) -> Vec<(i64, Vec<i64>)> {
    let ctx = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .block_interval(Duration::from_millis(100))
        .replication(1)
        .early_tasks(early)
        .backpressure(Backpressure::off())
        .build()
        .unwrap();
    let seen: Ran = Arc::default();
    let s = seen.clone();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    ctx.receiver_stream(
        "synthetic",
        SyntheticReceiver::new().rate(5_000.0).chunk(10),
    )
    .unwrap()
    .aggregate(
        Vec::<i64>::new,
        // One entry per block: when its task ran.
        move |ran: &mut Vec<i64>, _l: ByteString| {
            if ran.is_empty() {
                ran.push(now_ms());
            }
        },
        |mut a, b| {
            a.extend(b);
            a
        },
    )
    .for_each_batch(move |b| {
        let t = b.time.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let ran = b.records.into_iter().flatten().collect();
        s.lock().unwrap().push((t, ran));
    })
    .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    wait_batches(&mut reports, 6).await;
    ctx.stop(true).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    seen
}

/// Tasks that ran before their batch's boundary, and all tasks, over the batches after the
/// first (whose tasks teach the scheduler which tasks the stream needs) and before the last.
fn before_boundary(seen: &[(i64, Vec<i64>)]) -> (usize, usize) {
    let middle = &seen[2.min(seen.len())..seen.len().saturating_sub(1)];
    let early = middle
        .iter()
        .map(|(t, ran)| ran.iter().filter(|r| *r < t).count())
        .sum();
    (early, middle.iter().map(|(_, ran)| ran.len()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_are_processed_as_they_arrive_and_only_merged_at_the_boundary() {
    let on = task_times(true).await;
    let (early, all) = before_boundary(&on);
    // Five 100 ms blocks per batch: all but the one cut at the boundary run before it.
    assert!(all >= 8, "too few tasks: {on:?}");
    assert!(
        early * 2 >= all,
        "with early tasks, most blocks must be processed before their boundary: {early} of {all} ({on:?})"
    );
    let off = task_times(false).await;
    let (early, all) = before_boundary(&off);
    assert!(all >= 8, "too few tasks: {off:?}");
    assert_eq!(
        early, 0,
        "without early tasks, no block is processed before its boundary ({off:?})"
    );
}
