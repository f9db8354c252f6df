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

#[test]
fn bad_cluster_settings_are_refused_at_build_time() {
    use tributary::cluster::{ClusterConfig, MAX_CLUSTER_BLOCK_BYTES};
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let b = || StreamingContext::builder().workers(0).replication(2);
    let msg = |b: tributary::StreamingContextBuilder| b.build().unwrap_err().to_string();
    assert!(msg(b().cluster(ClusterConfig::new(addr, ""))).contains("cookie"));
    assert!(msg(
        b().cluster(ClusterConfig::new(addr, "s").heartbeat_deadline(Duration::from_millis(10)))
    )
    .contains("heartbeat_deadline"));
    assert!(msg(b()
        .max_block_bytes(MAX_CLUSTER_BLOCK_BYTES + 1)
        .memory_limit(1 << 30)
        .cluster(ClusterConfig::new(addr, "s")))
    .contains("max_block_bytes"));
    assert_eq!(
        refused(b()),
        "workers",
        "no worker at all without a cluster"
    );
    assert!(b().cluster(ClusterConfig::new(addr, "s")).build().is_ok());
    assert_eq!(
        refused(
            StreamingContext::builder()
                .receiver_placement(tributary::ReceiverPlacement::WorkerProcesses)
        ),
        "receiver_placement",
        "receivers in worker processes without a cluster"
    );
}

#[tokio::test]
async fn a_cluster_address_in_use_is_a_start_error_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let ctx = StreamingContext::builder()
        .cluster(tributary::cluster::ClusterConfig::new(addr, "s"))
        .build()
        .unwrap();
    ctx.receiver_stream("s", SyntheticReceiver::new().limit(10))
        .unwrap()
        .count()
        .for_each_batch(|_| {})
        .unwrap();
    let err = ctx.start().await.expect_err("the address is taken");
    let text = err.to_string();
    assert!(
        text.contains("cannot listen on") && text.contains(&addr.to_string()),
        "{text}"
    );
    assert!(ctx.await_termination().await.is_err(), "the context ended");
}
