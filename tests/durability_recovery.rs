//! Checkpoint directories and reliable storing, in process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::wal::{recover, DirStorage, WalConfig};
use tributary::{ContextError, StreamingContext};

mod durability_support;
use durability_support::Reliable;

fn job(
    dir: &std::path::Path,
    acked: Arc<AtomicU64>,
    limit: u64,
    seen: Arc<Mutex<Vec<u64>>>,
) -> Result<StreamingContext, ContextError> {
    StreamingContext::get_or_create(dir, move |b| {
        let ctx = b
            .batch_interval(Duration::from_secs(5)) // long: the first run stops before a batch
            .block_interval(Duration::from_millis(50))
            .write_ahead_log(WalConfig::default())
            .build()?;
        ctx.receiver_stream(
            "numbers",
            Reliable {
                acked,
                limit,
                pause: Duration::ZERO,
            },
        )?
        .map(|s: String| s.parse::<u64>().unwrap())
        .for_each_batch(move |b| seen.lock().unwrap().extend(b.records))?;
        Ok(ctx)
    })
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliably_stored_records_are_in_the_log_and_recovered_after_an_abrupt_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let acked = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();

    let ctx = job(&dir, acked.clone(), 5_000, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    wait_until(|| acked.load(Ordering::SeqCst) >= 5_000).await;
    // Acknowledged means in the log, synced: read it back from disk right now.
    let storage = DirStorage::new(dir.join("wal")).unwrap();
    let logged: u64 = recover(&storage, 0)
        .unwrap()
        .blocks
        .iter()
        .map(|(b, _)| u64::from(b.records))
        .sum();
    assert!(logged >= 5_000, "only {logged} records in the log");
    ctx.stop(false).await.unwrap(); // abrupt: nothing processed (5 s batches)
    assert!(seen.lock().unwrap().is_empty());

    let ctx = job(&dir, acked.clone(), 5_000, seen.clone()).unwrap();
    ctx.start().await.unwrap();
    let report = ctx.recovery_report().expect("recovered");
    assert!(report.recovered_records >= 5_000, "{report:?}");
    assert_eq!(report.lost_blocks, 0);
    ctx.stop(true).await.unwrap();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..5_000).collect::<Vec<_>>(),
        "each acknowledged record processed once"
    );
}

#[tokio::test]
async fn foreign_incompatible_and_unwritable_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let define = |b: tributary::StreamingContextBuilder| -> Result<StreamingContext, ContextError> {
        let ctx = b.build()?;
        ctx.receiver_stream(
            "numbers",
            Reliable {
                acked: Arc::default(),
                limit: 0,
                pause: Duration::ZERO,
            },
        )?;
        Ok(ctx)
    };
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("data.csv"), b"1,2,3").unwrap();
    let err = StreamingContext::get_or_create(&foreign, define).unwrap_err();
    assert!(
        err.to_string().contains("not written by Tributary"),
        "{err}"
    );

    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("tributary.json"),
        br#"{"format": 0, "streams": ["numbers"]}"#,
    )
    .unwrap();
    let err = StreamingContext::get_or_create(&old, define).unwrap_err();
    assert!(err.to_string().contains("format 0"), "{err}");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = StreamingContext::get_or_create(file.join("sub"), define).unwrap_err();
    assert!(
        matches!(&err, ContextError::Config(e) if e.setting == "checkpoint_dir"),
        "{err}"
    );

    let err = StreamingContext::builder()
        .write_ahead_log(WalConfig::default())
        .build()
        .unwrap_err();
    assert_eq!(err.setting, "write_ahead_log");
}
