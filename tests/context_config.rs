//! Invalid configuration is refused at build time, naming the setting; misuse of the
//! lifecycle is a typed error.

use std::time::Duration;

use tributary::{ContextError, StreamingContext};
use tributary_receivers::synthetic::SyntheticReceiver;

fn refused(b: tributary::StreamingContextBuilder) -> String {
    let err = b.build().expect_err("must be refused");
    err.setting.to_string()
}

#[test]
fn each_invalid_setting_is_named() {
    let b = StreamingContext::builder;
    assert_eq!(
        refused(b().batch_interval(Duration::ZERO)),
        "batch_interval"
    );
    assert_eq!(
        refused(b().block_interval(Duration::ZERO)),
        "block_interval"
    );
    assert_eq!(
        refused(
            b().batch_interval(Duration::from_millis(100))
                .block_interval(Duration::from_millis(200))
        ),
        "block_interval"
    );
    assert_eq!(refused(b().workers(0)), "workers");
    assert_eq!(refused(b().workers(2).replication(3)), "replication");
    assert_eq!(refused(b().replication(0)), "replication");
    assert_eq!(refused(b().executors(0)), "executors");
    assert_eq!(refused(b().rate_limit(0.0)), "rate_limit");
    assert_eq!(refused(b().rate_limit(f64::NAN)), "rate_limit");
    assert_eq!(refused(b().task_attempts(0)), "task_attempts");
    assert_eq!(refused(b().block_queue(0)), "block_queue");
    assert_eq!(refused(b().checkpoint_interval(0)), "checkpoint_interval");
    let msg = b()
        .workers(2)
        .replication(3)
        .build()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("raise workers or lower replication"), "{msg}");
    assert!(b().build().is_ok(), "the defaults are valid");
}

#[tokio::test]
async fn streams_cannot_be_added_after_start_and_names_are_unique() {
    let ctx = StreamingContext::builder().build().unwrap();
    let s = ctx
        .receiver_stream("a", SyntheticReceiver::new().limit(10))
        .unwrap();
    assert!(matches!(
        ctx.receiver_stream("a", SyntheticReceiver::new()),
        Err(ContextError::Config(e)) if e.setting == "receiver name"
    ));
    s.count().for_each_batch(|_| {}).unwrap();
    ctx.start().await.unwrap();
    assert!(matches!(
        ctx.start().await,
        Err(ContextError::AlreadyStarted)
    ));
    assert!(matches!(
        ctx.receiver_stream("b", SyntheticReceiver::new()),
        Err(ContextError::AlreadyStarted)
    ));
    assert!(matches!(
        s.count().for_each_batch(|_| {}),
        Err(ContextError::AlreadyStarted)
    ));
    ctx.stop(true).await.unwrap();
    // Stopping twice is harmless and reports the same outcome.
    ctx.stop(true).await.unwrap();
}

#[tokio::test]
async fn stopping_a_context_that_never_started_ends_it() {
    let ctx = StreamingContext::builder().build().unwrap();
    let s = ctx.receiver_stream("a", SyntheticReceiver::new()).unwrap();
    s.count().for_each_batch(|_| {}).unwrap();
    tokio::time::timeout(Duration::from_secs(10), ctx.stop(true))
        .await
        .expect("stop returns")
        .unwrap();
    assert!(matches!(
        ctx.start().await,
        Err(ContextError::AlreadyStarted)
    ));
}
