//! Faults in the block pipeline: worker loss (k = 2 and k = 1), executor death mid-task, and
//! backpressure from a slow batch function.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod pipeline_support;

use pipeline_support::{
    collect, drain, generate_then_hold, generate_then_hold_with, wait_until, Seqs,
};
use tributary::StreamingContext;
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

fn assert_exactly_once(seqs: &Seqs, n: u64) {
    let mut got = seqs.lock().unwrap().clone();
    assert_eq!(got.len() as u64, n, "count");
    got.sort_unstable();
    assert!(
        got.iter().copied().eq(0..n),
        "every sequence number exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loss_with_k2_loses_nothing_and_restores_k_replicas() {
    let n = 30_000;
    let (ctx, seqs, mut reports) = generate_then_hold(3, 2, n).await;
    let before = ctx.block_locations().await;
    assert!(
        before.iter().any(|(_, at)| at.contains(&0)),
        "worker 0 holds some blocks"
    );

    assert!(ctx.kill_worker(0).await);
    let mut restored = false;
    for _ in 0..1000 {
        let now = ctx.block_locations().await;
        if !now.is_empty() && now.iter().all(|(_, at)| at.len() == 2 && !at.contains(&0)) {
            restored = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(restored, "re-replicated");
    assert_eq!(ctx.live_workers().await, vec![1, 2]);

    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seqs, n);
    let infos = drain(&mut reports);
    assert_eq!(infos.iter().map(|i| i.lost_blocks).sum::<usize>(), 0);
    assert_eq!(infos.iter().map(|i| i.records).sum::<u64>(), n);
}

/// With k = 1, worker 0 killed after `n` records were acknowledged, then a graceful stop:
/// what was lost is reported exactly (processed + lost = n, no duplicates, the ledger
/// balances, every loss to the worker). Returns (blocks on worker 0 at the kill, blocks
/// reported lost, records reported lost).
async fn kill_worker_0_with_k1(early: bool) -> (usize, usize, u64) {
    let n = 30_000;
    let (ctx, seqs, mut reports) = generate_then_hold_with(2, 1, n, early).await;
    let on_worker_0 = ctx
        .block_locations()
        .await
        .iter()
        .filter(|(_, at)| at == &vec![0])
        .count();
    // With early tasks, a block processed before its batch is freed at once: worker 0 may
    // hold none of them.
    assert!(early || on_worker_0 > 0);
    assert!(ctx.kill_worker(0).await);
    ctx.stop(true).await.unwrap();

    let infos = drain(&mut reports);
    let lost_blocks: usize = infos.iter().map(|i| i.lost_blocks).sum();
    let lost_records: u64 = infos.iter().map(|i| i.lost_records).sum();
    let processed = seqs.lock().unwrap().len() as u64;
    assert_eq!(
        processed + lost_records,
        n,
        "lost = exactly what was not processed"
    );
    let mut got = seqs.lock().unwrap().clone();
    got.sort_unstable();
    got.dedup();
    assert_eq!(
        got.len() as u64,
        processed,
        "no duplicates among the survivors"
    );
    // The ledger of the last batch: every stored record completed or lost to the worker.
    let ledger = &infos.last().expect("a batch").ledger;
    let l = &ledger.streams["synthetic"];
    assert!(ledger.balances(), "{ledger:?}");
    assert_eq!((l.stored, l.completed, l.pending), (n, processed, 0));
    let expected_lost = if lost_records > 0 {
        std::collections::BTreeMap::from([(tributary::LossCause::WorkerLost, lost_records)])
    } else {
        std::collections::BTreeMap::new()
    };
    assert_eq!(l.lost, expected_lost);
    (on_worker_0, lost_blocks, lost_records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loss_with_k1_reports_exactly_what_was_lost() {
    let (on_worker_0, lost_blocks, lost_records) = kill_worker_0_with_k1(false).await;
    assert_eq!(
        lost_blocks, on_worker_0,
        "every block of the dead worker reported lost"
    );
    assert!(lost_records > 0);
}

/// With early tasks, blocks processed before their worker died are not lost: their partial
/// results are computed already. The accounting stays exact: lost = what was not processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loss_with_k1_and_early_tasks_loses_only_what_was_not_processed() {
    let (on_worker_0, lost_blocks, _) = kill_worker_0_with_k1(true).await;
    assert!(lost_blocks <= on_worker_0, "{lost_blocks} > {on_worker_0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_dying_mid_task_still_completes_the_batch_once() {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(200))
        .block_interval(Duration::from_millis(20))
        .workers(2)
        .replication(2)
        .executors(2)
        .build()
        .unwrap();
    let n = 20_000;
    let source = SyntheticReceiver::new().limit(n).chunk(500);
    let crashed = Arc::new(AtomicBool::new(false));
    let c = crashed.clone();
    let seqs: Seqs = Arc::default();
    let s = seqs.clone();
    let batches_with_seq_777 = Arc::new(AtomicU64::new(0));
    let b777 = batches_with_seq_777.clone();
    ctx.receiver_stream("synthetic", source.clone())
        .unwrap()
        .map(move |r| {
            let seq = parse(&r).unwrap().0;
            if seq == 777 && !c.swap(true, Ordering::SeqCst) {
                panic!("executor crash injected at record 777");
            }
            seq
        })
        .for_each_batch(move |b| {
            if b.records.contains(&777) {
                b777.fetch_add(1, Ordering::SeqCst);
            }
            s.lock().unwrap().extend(b.records)
        })
        .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    wait_until("all generated", || source.generated() >= n).await;
    ctx.stop(true).await.unwrap();

    assert!(crashed.load(Ordering::SeqCst), "the crash was injected");
    assert_exactly_once(&seqs, n);
    assert_eq!(
        batches_with_seq_777.load(Ordering::SeqCst),
        1,
        "the batch completed once"
    );
    let infos = drain(&mut reports);
    assert!(
        infos.iter().any(|i| i.task_retries >= 1),
        "the task was retried"
    );
    assert!(infos.iter().all(|i| i.failed.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_function_makes_store_wait_with_bounded_memory_and_no_loss() {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(50))
        .block_interval(Duration::from_millis(10))
        .workers(2)
        .replication(2)
        .max_block_bytes(4 << 10)
        .block_queue(1)
        .memory_limit(32 << 10)
        .build()
        .unwrap();
    let n = 4_000;
    let source = SyntheticReceiver::new().limit(n).chunk(50);
    let processed = Arc::new(AtomicU64::new(0));
    let seqs: Seqs = Arc::default();
    let (p, s) = (processed.clone(), seqs.clone());
    // The records reach the sink as text: a block's partial (its records, kept for the batch
    // once the block is freed after its early work) weighs about what the block did.
    ctx.receiver_stream("synthetic", source.clone())
        .unwrap()
        .for_each_batch(move |b| {
            std::thread::sleep(Duration::from_millis(20)); // a slow sink
            p.fetch_add(b.records.len() as u64, Ordering::SeqCst);
            s.lock()
                .unwrap()
                .extend(b.records.iter().map(|r| parse(r).unwrap().0));
        })
        .unwrap();
    ctx.start().await.unwrap();
    // Bound: memory budget (32 KiB of blocks or of their partials, ~330 records) + one queued
    // block + the generator's open block (4 KiB each, ~40 records) + one chunk in flight.
    let bound = 330 + 2 * 41 + 50 + 100;
    let mut max_gap = 0;
    let mut max_pending = 0;
    for _ in 0..3000 {
        let gap = source
            .generated()
            .saturating_sub(processed.load(Ordering::SeqCst));
        max_gap = max_gap.max(gap);
        max_pending = max_pending.max(ctx.pending_blocks().await);
        if processed.load(Ordering::SeqCst) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seqs, n);
    assert!(
        max_gap <= bound,
        "store must wait for processing: gap {max_gap} > {bound}"
    );
    assert!(
        max_pending <= 32,
        "pending blocks bounded by the memory budget: {max_pending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_on_a_dead_worker_restarts_elsewhere_and_loses_nothing() {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(200))
        .block_interval(Duration::from_millis(20))
        .workers(3)
        .replication(2)
        .build()
        .unwrap();
    let n = 60_000;
    // Slow enough to still be running when its worker dies.
    let source = SyntheticReceiver::new().limit(n).rate(40_000.0).chunk(200);
    let seqs = collect(&ctx, &source);
    ctx.start().await.unwrap();
    let mut events = ctx.supervision_events().unwrap();
    wait_until("some records generated", || source.generated() > 10_000).await;
    // Stream 0's receiver is placed on worker 0.
    assert!(ctx.kill_worker(0).await);
    let restarted = tributary::testing::next_event(&mut events, Duration::from_secs(10), |e| {
        &*e.child == "receivers/synthetic"
            && matches!(
                e.kind,
                tributary::EventKind::Restarted { counted: false, .. }
            )
    })
    .await;
    assert!(
        restarted.is_some(),
        "the receiver was restarted (uncounted) after its worker died"
    );
    wait_until("all generated", || source.generated() >= n).await;
    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seqs, n);
    assert!(ctx.block_locations().await.is_empty());
}

fn failing_job(ctx: &StreamingContext, source: &SyntheticReceiver) -> Seqs {
    let seqs: Seqs = Arc::default();
    let s = seqs.clone();
    ctx.receiver_stream("synthetic", source.clone())
        .unwrap()
        .map(|r| {
            let seq = parse(&r).unwrap().0;
            // Always fails for this record: every attempt of its task panics.
            assert_ne!(seq, 1234, "poison record");
            seq
        })
        .for_each_batch(move |b| s.lock().unwrap().extend(b.records))
        .unwrap();
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_task_always_fails_is_reported_and_the_stream_goes_on() {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .block_interval(Duration::from_millis(20))
        .task_attempts(3)
        .build()
        .unwrap();
    let n = 10_000;
    // 0.5 s of records (5 batches): the last record comes well after the poison one's batch,
    // however long that batch's failing attempts take.
    let source = SyntheticReceiver::new().limit(n).rate(20_000.0).chunk(100);
    let seqs = failing_job(&ctx, &source);
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    wait_until("all generated", || source.generated() >= n).await;
    ctx.stop(true).await.unwrap();
    let infos = drain(&mut reports);
    let failed: Vec<_> = infos.iter().filter(|i| i.failed.is_some()).collect();
    assert_eq!(
        failed.len(),
        1,
        "exactly the batch with the poison record failed"
    );
    let why = failed[0].failed.clone().unwrap();
    assert!(why.contains("after 3 attempts"), "{why}");
    let got = seqs.lock().unwrap().clone();
    assert!(!got.contains(&1234));
    assert!(got.contains(&(n - 1)), "later batches still ran");
    assert_eq!(
        got.len() as u64 + failed[0].records,
        n,
        "only the failed batch is missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_stop_policy_a_failed_batch_stops_the_context_with_its_error() {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .block_interval(Duration::from_millis(20))
        .task_attempts(2)
        .on_batch_failure(tributary::OnBatchFailure::Stop)
        .build()
        .unwrap();
    let source = SyntheticReceiver::new().rate(50_000.0).chunk(100);
    let _seqs = failing_job(&ctx, &source);
    ctx.start().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), ctx.await_termination())
        .await
        .expect("the context stops by itself");
    assert!(
        matches!(outcome, Err(tributary::ContextError::BatchFailed { ref error, .. }) if error.to_string().contains("after 2 attempts")),
        "{outcome:?}"
    );
}

/// With early tasks, a block is freed as soon as its batch's work over it is done, before the
/// batch completes: a batch holds many times more records than the memory budget has room
/// for (the budget is a safety net, not the pace), and every record is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_early_tasks_a_processed_block_leaves_the_budget_before_its_batch_completes() {
    let budget = 64 << 10;
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .block_interval(Duration::from_millis(10))
        .workers(2)
        .replication(2)
        .max_block_bytes(4 << 10)
        .memory_limit(budget)
        // As fast as the source goes: only the budget could hold it back.
        .backpressure(tributary::Backpressure::off())
        .build()
        .unwrap();
    let n = 60_000u64;
    let source = SyntheticReceiver::new().limit(n).chunk(50);
    // (records, sum of sequence numbers): any record lost or counted twice changes one.
    let total = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    let sizes: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let (t, z) = (total.clone(), sizes.clone());
    ctx.receiver_stream("synthetic", source.clone())
        .unwrap()
        .aggregate(
            || (0u64, 0u64),
            |a: &mut (u64, u64), r: tributary::ByteString| {
                a.0 += 1;
                a.1 += parse(&r).unwrap().0;
            },
            |a, b| (a.0 + b.0, a.1 + b.1),
        )
        .for_each_batch(move |b| {
            for (records, sum) in b.records {
                let mut t = t.lock().unwrap();
                t.0 += records;
                t.1 += sum;
                z.lock().unwrap().push(records);
            }
        })
        .unwrap();
    ctx.start().await.unwrap();
    let mut max_pending = 0;
    for _ in 0..2000 {
        max_pending = max_pending.max(ctx.pending_blocks().await);
        if total.lock().unwrap().0 >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctx.stop(true).await.unwrap();
    assert_eq!(
        *total.lock().unwrap(),
        (n, n * (n - 1) / 2),
        "every record once"
    );
    // A record is ~100 bytes in a block: the budget has room for ~650 of them at once.
    let biggest = sizes.lock().unwrap().iter().copied().max().unwrap_or(0);
    assert!(
        biggest >= 10 * (budget as u64 / 100),
        "a batch held {biggest} records: the budget paced the stream ({:?})",
        sizes.lock().unwrap()
    );
    // 16 blocks of 4 KiB; blocks cut by time are smaller, so a few more fit.
    assert!(
        max_pending <= 48,
        "blocks in memory bounded by the budget: {max_pending}"
    );
}
