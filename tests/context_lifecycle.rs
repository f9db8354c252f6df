//! The context always terminates: a failed `start` leaves nothing running, a failure that
//! escalates to the context ends it, slow user code cannot stall ingestion, and every `stop`
//! returns.
//!
//! Tests here look at process-wide things (threads named `tributary-wal-*`), so they run one
//! at a time (`SERIAL`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tributary::testing::StartError;
use tributary::wal::WalConfig;
use tributary::{
    Backoff, BoxError, ContextError, Directive, Receiver, ReceiverContext, Strategy,
    StreamingContext, SupervisorError,
};
use tributary_receivers::synthetic::SyntheticReceiver;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long any lifecycle call may take in these tests before it counts as a hang.
const PROMPT: Duration = Duration::from_secs(15);

/// Stores one number per message, sending itself the next one; counts messages handled.
#[derive(Clone)]
struct Ticker {
    handled: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Tick;

impl Receiver for Ticker {
    type Msg = Tick;
    type State = u64;
    type Record = u64;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        let _ = ctx.myself().send(Tick);
        Ok(0)
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        _: Tick,
        n: &mut u64,
    ) -> Result<(), BoxError> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        ctx.store_many((*n..*n + 10).collect::<Vec<_>>()).await?;
        *n += 10;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let _ = ctx.myself().send(Tick);
        Ok(())
    }
}

/// A receiver whose start hook always fails.
struct FailsToStart;

impl Receiver for FailsToStart {
    type Msg = ();
    type State = ();
    type Record = u64;

    async fn pre_start(&self, _: &ReceiverContext<Self>) -> Result<(), BoxError> {
        Err(Box::new(StartError))
    }

    async fn handle(&self, _: &ReceiverContext<Self>, _: (), _: &mut ()) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The error of [`AlwaysFails`].
#[derive(Debug, thiserror::Error)]
#[error("the device is gone")]
struct DeviceGone;

/// A receiver that fails on every message (it sends itself one at start).
struct AlwaysFails;

impl Receiver for AlwaysFails {
    type Msg = ();
    type State = ();
    type Record = u64;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<(), BoxError> {
        let _ = ctx.myself().send(());
        Ok(())
    }

    async fn handle(&self, _: &ReceiverContext<Self>, _: (), _: &mut ()) -> Result<(), BoxError> {
        Err(Box::new(DeviceGone))
    }
}

/// Waits (bounded) until no thread named `prefix…` is left; returns how many are.
///
/// A thread that was joined can still be listed in `/proc/self/task` for a moment: the
/// kernel wakes the joiner before it has removed the exiting thread (a plain spawn-join
/// loop sees this in about 1 of 500 joins). So "nothing left running" is checked with a
/// short bounded wait: a thread still there after it was not joined.
async fn threads_left(prefix: &str) -> usize {
    let t0 = Instant::now();
    while threads_named(prefix) > 0 && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    threads_named(prefix)
}

/// Threads of this process whose name starts with `prefix` (Linux: /proc/self/task).
fn threads_named(prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.trim().starts_with(prefix))
                .unwrap_or(false)
        })
        .count()
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PROMPT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {PROMPT:?}"))
}

/// After a failed start: `stop` (both kinds) and `await_termination` return at once with the
/// start's error, and the report stream is closed.
async fn assert_terminated_with_start_error(ctx: &StreamingContext, start_err: &ContextError) {
    let t0 = Instant::now();
    let waited = within("await_termination", ctx.await_termination()).await;
    assert_eq!(
        waited.as_ref().err().map(ToString::to_string),
        Some(start_err.to_string())
    );
    let stopped = within("stop(true)", ctx.stop(true)).await;
    assert_eq!(
        stopped.err().map(|e| e.to_string()),
        Some(start_err.to_string())
    );
    within("stop(false)", ctx.stop(false)).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let mut reports = ctx.subscribe_batches();
    assert!(matches!(reports.recv().await, Err(RecvError::Closed)));
    assert!(matches!(
        ctx.start().await,
        Err(ContextError::AlreadyStarted)
    ));
}

/// Writes a few WAL blocks into `dir` and stops abruptly, leaving them unprocessed.
async fn leave_unprocessed_wal(dir: &std::path::Path) {
    let ctx = StreamingContext::get_or_create(dir, |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(60))
            .block_interval(Duration::from_millis(10))
            .write_ahead_log(WalConfig::default())
            .build()?;
        ctx.receiver_stream("numbers", SyntheticReceiver::new().limit(20_000).chunk(100))?
            .count()
            .for_each_batch(|_| {})?;
        Ok(ctx)
    })
    .unwrap();
    ctx.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    within("stop", ctx.stop(false)).await.unwrap();
}

fn the_same_job(dir: &std::path::Path, seen: Arc<AtomicU64>) -> StreamingContext {
    StreamingContext::get_or_create(dir, move |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(60))
            .block_interval(Duration::from_millis(10))
            .write_ahead_log(WalConfig::default())
            .build()?;
        ctx.receiver_stream("numbers", SyntheticReceiver::new().limit(20_000).chunk(100))?
            .count()
            .for_each_batch(move |b| {
                seen.fetch_add(b.records[0], Ordering::SeqCst);
            })?;
        Ok(ctx)
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_failing_on_a_corrupt_wal_leaves_nothing_running_and_stop_returns() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    leave_unprocessed_wal(dir.path()).await;
    // Damage the first frame's payload of a segment that has frames after it.
    let wal = dir.path().join("wal");
    let mut damaged = false;
    for seg in std::fs::read_dir(&wal).unwrap().flatten() {
        let mut bytes = std::fs::read(seg.path()).unwrap();
        let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        if bytes.len() > 8 + first_len + 8 {
            bytes[8 + first_len / 2] ^= 0xff;
            std::fs::write(seg.path(), &bytes).unwrap();
            damaged = true;
            break;
        }
    }
    assert!(damaged, "a segment with two frames");
    let seen = Arc::new(AtomicU64::new(0));
    let ctx = the_same_job(dir.path(), seen.clone());
    let err = within("start", ctx.start()).await.unwrap_err();
    assert!(
        matches!(err, ContextError::Wal(ref e) if e.is_corruption()),
        "{err}"
    );
    assert_terminated_with_start_error(&ctx, &err).await;
    assert_eq!(threads_left("tributary-wal").await, 0, "no WAL thread left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_failing_on_a_checkpoint_dir_gone_bad_after_build_returns_everywhere() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let seen = Arc::new(AtomicU64::new(0));
    let ctx = the_same_job(&dir, seen);
    // After build(): the directory is replaced by a file.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let err = within("start", ctx.start()).await.unwrap_err();
    assert_terminated_with_start_error(&ctx, &err).await;
    assert_eq!(threads_left("tributary-wal").await, 0, "no WAL thread left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_to_start_stops_the_ones_already_started() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let ctx = StreamingContext::builder()
        .checkpoint_dir(tmp.path().join("ckpt"))
        .write_ahead_log(WalConfig::default())
        .block_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    ctx.receiver_stream(
        "ticker",
        Ticker {
            handled: handled.clone(),
        },
    )
    .unwrap()
    .count()
    .for_each_batch(|_| {})
    .unwrap();
    ctx.receiver_stream("broken", FailsToStart)
        .unwrap()
        .count()
        .for_each_batch(|_| {})
        .unwrap();
    let err = within("start", ctx.start()).await.unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
    assert_terminated_with_start_error(&ctx, &err).await;
    let after = handled.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        after,
        "the receiver that had started still handles messages"
    );
    assert_eq!(threads_left("tributary-wal").await, 0, "no WAL thread left");
}

/// Runs `AlwaysFails` under `builder`'s settings; the context must end by itself with the
/// receiver's error.
async fn escalation_ends_the_context(builder: tributary::StreamingContextBuilder) {
    let ctx = builder.build().unwrap();
    ctx.receiver_stream("device", AlwaysFails)
        .unwrap()
        .count()
        .for_each_batch(|_| {})
        .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    let err = within("await_termination", ctx.await_termination())
        .await
        .unwrap_err();
    let ContextError::Receivers(SupervisorError::Escalated { error, .. }) = &err else {
        panic!("not an escalation: {err:?}");
    };
    assert!(
        error.downcast_ref::<DeviceGone>().is_some(),
        "the original error: {error:?}"
    );
    within("the report stream to close", async {
        loop {
            match reports.recv().await {
                Err(RecvError::Closed) => break,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
            }
        }
    })
    .await;
    // Stopping an ended context returns its outcome at once.
    let stopped = within("stop(true)", ctx.stop(true)).await;
    assert_eq!(stopped.unwrap_err().to_string(), err.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_by_the_decider_ends_the_context_with_the_original_error() {
    let _serial = SERIAL.lock().await;
    escalation_ends_the_context(StreamingContext::builder().receiver_strategy(|| {
        Strategy::one_for_one(10, Duration::from_secs(60)).otherwise(Directive::Escalate)
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_by_the_restart_cap_ends_the_context_without_backoff() {
    let _serial = SERIAL.lock().await;
    escalation_ends_the_context(StreamingContext::builder().receiver_backoff(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_by_the_restart_cap_ends_the_context_with_backoff() {
    let _serial = SERIAL.lock().await;
    escalation_ends_the_context(
        StreamingContext::builder().receiver_backoff(Some(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(20),
        ))),
    )
    .await;
}

/// A batch function that blocks its thread for 2 s per 1 s batch, on a runtime with a single
/// worker thread: ingestion and the batch reports must go on regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_blocking_batch_function_does_not_stall_ingestion() {
    let _serial = SERIAL.lock().await;
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .block_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let source = SyntheticReceiver::new().rate(20_000.0).chunk(100);
    ctx.receiver_stream("synthetic", source.clone())
        .unwrap()
        .count()
        .for_each_batch(|_| std::thread::sleep(Duration::from_secs(2)))
        .unwrap();
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    let reported = Arc::new(AtomicU64::new(0));
    let r = reported.clone();
    let listener = tokio::spawn(async move {
        while let Ok(_) | Err(RecvError::Lagged(_)) = reports.recv().await {
            r.fetch_add(1, Ordering::SeqCst);
        }
    });
    // Sample from a thread of its own: the runtime's timers are what is under test.
    let stored = std::thread::spawn({
        let source = source.clone();
        move || {
            let mut samples = Vec::new();
            for _ in 0..7 {
                std::thread::sleep(Duration::from_secs(1));
                samples.push(source.generated());
            }
            samples
        }
    })
    .join()
    .unwrap();
    let rises = stored.windows(2).filter(|w| w[1] > w[0]).count();
    assert_eq!(
        rises,
        stored.len() - 1,
        "records stored must rise every second: {stored:?}"
    );
    assert!(
        reported.load(Ordering::SeqCst) >= 2,
        "batch reports keep arriving: {}",
        reported.load(Ordering::SeqCst)
    );
    within("stop(false)", ctx.stop(false)).await.unwrap();
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_before_start_and_stop_twice_return() {
    let _serial = SERIAL.lock().await;
    let ctx = StreamingContext::builder().build().unwrap();
    within("stop before start", ctx.stop(true)).await.unwrap();
    within("second stop", ctx.stop(false)).await.unwrap();
    within("await_termination", ctx.await_termination())
        .await
        .unwrap();
    assert!(matches!(
        ctx.start().await,
        Err(ContextError::AlreadyStarted)
    ));

    let ctx = StreamingContext::builder().build().unwrap();
    ctx.receiver_stream("synthetic", SyntheticReceiver::new().rate(10_000.0))
        .unwrap()
        .count()
        .for_each_batch(|_| {})
        .unwrap();
    ctx.start().await.unwrap();
    let (a, b) = tokio::join!(ctx.stop(true), ctx.stop(false));
    a.unwrap();
    b.unwrap();
    within("third stop", ctx.stop(true)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_recovery_returns_and_leaves_nothing_running() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    leave_unprocessed_wal(dir.path()).await;
    for delay_ms in [0u64, 1, 5, 20] {
        let seen = Arc::new(AtomicU64::new(0));
        let ctx = the_same_job(dir.path(), seen);
        let stopper = ctx.clone();
        let (started, stopped) = within("start and stop", async {
            tokio::join!(ctx.start(), async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                stopper.stop(false).await
            })
        })
        .await;
        // Either the stop came first (start says so) or start finished and stop stopped it.
        if let Err(e) = &started {
            assert!(matches!(e, ContextError::StoppedDuringStart), "{e}");
        }
        stopped.unwrap();
        within("await_termination", ctx.await_termination())
            .await
            .unwrap();
        assert_eq!(threads_left("tributary-wal").await, 0, "no WAL thread left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_start_leaves_nothing_running() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    leave_unprocessed_wal(dir.path()).await;
    for delay_us in [0u64, 200, 1_000, 5_000] {
        let ctx = the_same_job(dir.path(), Arc::new(AtomicU64::new(0)));
        // The caller gives up on start (a timeout): its future is dropped halfway.
        let abandoned = tokio::time::timeout(Duration::from_micros(delay_us), ctx.start()).await;
        if abandoned.is_ok() {
            // It finished in time: an ordinary stop.
            within("stop", ctx.stop(false)).await.unwrap();
        } else {
            let ended = within("await_termination", ctx.await_termination()).await;
            assert!(
                matches!(ended, Err(ContextError::StoppedDuringStart)),
                "{ended:?}"
            );
        }
        // The teardown runs in the background: give it a moment, bounded.
        let t0 = Instant::now();
        while threads_named("tributary-wal") > 0 && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(threads_named("tributary-wal"), 0, "no WAL thread left");
    }
}
