//! Writes that fail (a full disk, short writes, failed fsyncs) are never acknowledged, leave
//! the logs readable, never put a record in two batch ids, and the pipeline recovers when the
//! cause goes away. Faults are injected through `wrap_storage` + `testing::FaultyStorage`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary::testing::{Faults, FaultyStorage};
use tributary::wal::WalConfig;
use tributary::{Backoff, ContextError, StreamingContext};

mod durability_support;
use durability_support::Reliable;

/// Output keyed by batch id: a batch run again replaces its earlier output.
type Output = Arc<Mutex<BTreeMap<u64, Vec<u64>>>>;

fn job(
    dir: &Path,
    wal: bool,
    acked: Arc<AtomicU64>,
    out: Output,
    faults: Faults,
) -> StreamingContext {
    StreamingContext::get_or_create(dir, move |b| {
        let mut b = b
            .batch_interval(Duration::from_millis(200))
            .block_interval(Duration::from_millis(20))
            .receiver_backoff(Some(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(400),
            )))
            .wrap_storage(move |inner| Arc::new(FaultyStorage::new(inner, faults.clone())));
        if wal {
            b = b.write_ahead_log(WalConfig::default());
        }
        let ctx = b.build()?;
        ctx.receiver_stream(
            "numbers",
            Reliable {
                acked,
                limit: u64::MAX,
                pause: Duration::from_millis(2),
            },
        )?
        .map(|s: String| s.parse::<u64>().unwrap())
        .for_each_batch(move |batch| {
            out.lock().unwrap().insert(batch.id.0, batch.records);
        })?;
        Ok(ctx)
    })
    .unwrap()
}

async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every acknowledged number is in the output, and no number is in two batch ids.
fn check(out: &Output, acked: u64) {
    let out = out.lock().unwrap();
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for (id, records) in out.iter() {
        for n in records {
            if let Some(other) = seen.insert(*n, *id) {
                assert_eq!(other, *id, "{n} is in batch {other} and batch {id}");
            }
        }
    }
    let missing: Vec<u64> = (0..acked).filter(|n| !seen.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged records missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Starts the job on a new `dir` and waits for its first acknowledgements.
async fn started(dir: &Path, wal: bool) -> (StreamingContext, Arc<AtomicU64>, Output, Faults) {
    let acked = Arc::new(AtomicU64::new(0));
    let out: Output = Arc::default();
    let faults = Faults::new();
    let ctx = job(dir, wal, acked.clone(), out.clone(), faults.clone());
    ctx.start().await.unwrap();
    wait_for("first acks", Duration::from_secs(20), || {
        acked.load(Ordering::SeqCst) >= 2_000
    })
    .await;
    (ctx, acked, out, faults)
}

/// Runs the job, injects `fault` for `for_how_long` while it ingests, lifts it, checks that
/// acknowledgements resume, stops it (abruptly if `abrupt`), starts it again on the same
/// directory, lets it run, stops it gracefully, and checks the output.
async fn round(wal: bool, abrupt: bool, fault: impl Fn(&Faults, bool), for_how_long: Duration) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let (ctx, acked, out, faults) = started(&dir, wal).await;
    fault(&faults, true);
    tokio::time::sleep(for_how_long).await;
    fault(&faults, false);
    assert!(
        faults.appends_failed() + faults.syncs_failed() > 0,
        "the fault was hit"
    );
    let resumed_from = acked.load(Ordering::SeqCst);
    wait_for(
        "acknowledgements to resume once the fault is gone",
        Duration::from_secs(20),
        || acked.load(Ordering::SeqCst) >= resumed_from + 2_000,
    )
    .await;
    let first = ctx.stop(!abrupt).await;
    first.unwrap();

    // The directory must start again, and the job go on.
    restart_and_check(&dir, wal, &acked, &out, &faults).await;
}

/// Starts the job again on `dir`, waits for new acknowledgements, stops it gracefully, and
/// checks the output.
async fn restart_and_check(
    dir: &Path,
    wal: bool,
    acked: &Arc<AtomicU64>,
    out: &Output,
    faults: &Faults,
) {
    let ctx = job(dir, wal, acked.clone(), out.clone(), faults.clone());
    ctx.start().await.unwrap();
    let before = acked.load(Ordering::SeqCst);
    wait_for("acks after the restart", Duration::from_secs(20), || {
        acked.load(Ordering::SeqCst) >= before + 1_000
    })
    .await;
    ctx.stop(true).await.unwrap();
    check(out, acked.load(Ordering::SeqCst));
}

fn wal_full(f: &Faults, on: bool) {
    f.only_files(Some(".wal"));
    f.disk_full(on);
}

fn metadata_full(f: &Faults, on: bool) {
    f.only_files(Some("metadata.log"));
    f.disk_full(on);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_wal_a_full_disk_leaves_the_metadata_log_readable() {
    round(false, false, metadata_full, Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_metadata_log_never_puts_a_record_in_two_batches() {
    round(true, true, metadata_full, Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_recovers_when_space_comes_back() {
    round(true, true, wal_full, Duration::from_millis(1_500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_wal_fsyncs_are_not_acknowledged_and_the_log_goes_on() {
    round(
        true,
        true,
        |f, on| {
            f.only_files(Some(".wal"));
            if on {
                f.fail_next_syncs(3);
            }
        },
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_log_that_stays_full_stops_the_context_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let (ctx, acked, out, faults) = started(&dir, true).await;
    metadata_full(&faults, true);
    let ended = tokio::time::timeout(Duration::from_secs(60), ctx.await_termination())
        .await
        .expect("the context ends by itself");
    let err = ended.unwrap_err();
    assert!(
        matches!(
            err,
            ContextError::Checkpoint(tributary::checkpoint::CheckpointError::WriteFailed { .. })
                | ContextError::Receivers(_)
        ),
        "{err}"
    );
    // Space again: the directory starts, and nothing acknowledged is missing.
    metadata_full(&faults, false);
    restart_and_check(&dir, true, &acked, &out, &faults).await;
}
