//! Each row of the directive table (DESIGN §2), proven on a receiver under a supervisor.

mod common;

use common::*;
use tokio::sync::oneshot;
use tributary::testing::ProbeMsg;
use tributary::{ChildStatus, Directive, EventKind, Supervisor};

#[tokio::test]
async fn resume_keeps_state_and_drops_the_failing_message() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let mut p = spawn_probe(&root, "rx").await;

    p.probe.send(ProbeMsg::Store(1)).unwrap();
    p.probe.send(ProbeMsg::Store(2)).unwrap();
    fail(&p.probe, ArithmeticError);
    p.probe.send(ProbeMsg::Store(3)).unwrap();

    let v = view(&p.probe).await;
    assert_eq!(v.incarnation, 1, "resume must not rebuild the state");
    assert_eq!(v.stored, vec![1, 2, 3], "state kept across the failure");
    assert_eq!(p.journal.starts(), 1);
    assert_eq!(p.journal.stops(), 0, "resume must not run the stop hook");
    let e = expect_event(&mut events, "resume decision", |e| {
        is_failed(e, "root/rx", Directive::Resume)
    })
    .await;
    assert!(
        matches!(e.kind, EventKind::Failed { ref error, restarts_in_window: 0, .. } if error.contains("by zero"))
    );
    assert_eq!(drain(&mut p.records).await, vec![1, 2, 3]);
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_rebuilds_state_and_loses_no_queued_message() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let mut p = spawn_probe(&root, "rx").await;
    p.probe.send(ProbeMsg::Store(1)).unwrap();

    // Hold the receiver so that everything below is in its mailbox when it fails.
    let (release, blocked) = oneshot::channel();
    p.probe.send(ProbeMsg::Block(blocked)).unwrap();
    fail(&p.probe, NullPointerError);
    for v in 2..=100 {
        p.probe.send(ProbeMsg::Store(v)).unwrap();
    }
    release.send(()).unwrap();

    let v = view(&p.probe).await;
    assert_eq!(v.incarnation, 2, "state rebuilt by the start hook");
    assert_eq!(
        v.stored,
        (2..=100).collect::<Vec<_>>(),
        "fresh state saw every queued message"
    );
    assert_eq!(p.journal.starts(), 2);
    assert_eq!(
        p.journal.stops(),
        1,
        "the old state's stop hook ran before the restart"
    );
    expect_event(&mut events, "restart decision", |e| {
        is_failed(e, "root/rx", Directive::Restart)
    })
    .await;
    let e = expect_event(&mut events, "restarted", |e| {
        matches!(e.kind, EventKind::Restarted { .. })
    })
    .await;
    assert_eq!(
        e.kind,
        EventKind::Restarted {
            restarts_in_window: 1,
            counted: true
        }
    );
    assert_eq!(
        drain(&mut p.records).await,
        (1..=100).collect::<Vec<_>>(),
        "nothing stored was lost"
    );

    // The same reference keeps working after the restart.
    p.probe.send(ProbeMsg::Store(101)).unwrap();
    assert_eq!(view(&p.probe).await.stored.last(), Some(&101));
    let info = &root.children().await.unwrap()[0];
    assert_eq!((info.restarts_total, info.restarts_in_window), (1, 1));
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn stop_ends_the_child_for_good_and_records_why() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;
    let other = spawn_probe(&root, "other").await;

    fail(&p.probe, IllegalArgumentError("negative port".into()));
    p.probe.wait_stopped().await;
    let e = expect_event(&mut events, "stopped", |e| {
        matches!(e.kind, EventKind::Stopped { .. })
    })
    .await;
    assert_eq!(&*e.child, "root/rx");
    assert!(
        matches!(e.kind, EventKind::Stopped { ref reason } if reason.contains("negative port"))
    );

    let children = root.children().await.unwrap();
    assert!(
        matches!(&children[0].status, ChildStatus::Stopped { reason } if reason.contains("negative port")),
        "{children:?}"
    );
    assert_eq!(
        children[1].status,
        ChildStatus::Running,
        "siblings are unaffected (one-for-one)"
    );
    assert_eq!(p.journal.stops(), 1, "its stop hook ran");
    assert_eq!(p.journal.starts(), 1, "it was not restarted");
    assert!(
        p.probe.send(ProbeMsg::Store(1)).is_err(),
        "a stopped child takes no messages"
    );
    assert_eq!(view(&other.probe).await.incarnation, 1);
    assert!(!root.is_finished(), "the supervisor carries on");
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn unmatched_failure_escalates_to_the_root_which_ends_the_tree_with_that_error() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;
    let other = spawn_probe(&root, "other").await;

    fail(&p.probe, UnexpectedError("disk on fire".into()));
    let err = root.wait().await.unwrap_err();
    let original = err
        .downcast_ref::<UnexpectedError>()
        .expect("same error type at the root");
    assert_eq!(original.0, "disk on fire");
    assert!(
        matches!(err, tributary::SupervisorError::Escalated { ref child, .. } if child == "root/rx")
    );
    expect_event(&mut events, "tree failed", |e| {
        matches!(e.kind, EventKind::TreeFailed { .. })
    })
    .await;
    assert_eq!(p.journal.stops(), 1, "stop hooks ran on the way down");
    assert_eq!(other.journal.stops(), 1);
    assert!(!p.probe.is_running() && !other.probe.is_running());
    // Shutting down an ended tree reports how it ended.
    assert!(root.shutdown().await.is_err());
}

#[tokio::test]
async fn panics_are_supervised_and_never_reach_a_sibling() {
    let strategy = seed_strategy().on_panic(Directive::Restart);
    let root = Supervisor::start("root", strategy).await.unwrap();
    let a = spawn_probe(&root, "a").await;
    let b = spawn_probe(&root, "b").await;
    b.probe.send(ProbeMsg::Store(7)).unwrap();

    for _ in 0..3 {
        a.probe.send(ProbeMsg::Panic("boom")).unwrap();
    }
    assert_eq!(view(&a.probe).await.incarnation, 4);
    let vb = view(&b.probe).await;
    assert_eq!((vb.incarnation, vb.stored.clone()), (1, vec![7]));

    // Without a panic case, a panic is matched as `PanicError` and otherwise escalates.
    let root2 = Supervisor::start("root2", seed_strategy()).await.unwrap();
    let c = spawn_probe(&root2, "c").await;
    c.probe.send(ProbeMsg::Panic("kaboom")).unwrap();
    let err = root2.wait().await.unwrap_err();
    let panic = err
        .downcast_ref::<tributary::PanicError>()
        .expect("panic error");
    assert_eq!(panic.message(), "kaboom");
    assert!(!root.is_finished());
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_child_that_ends_cleanly_is_not_a_failure() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;
    let other = spawn_probe(&root, "other").await;
    p.probe.send(ProbeMsg::Finish).unwrap();
    p.probe.wait_stopped().await;
    let e = expect_event(&mut events, "completed", |e| e.kind == EventKind::Completed).await;
    assert_eq!(&*e.child, "root/rx");
    let children = root.children().await.unwrap();
    assert_eq!(children[0].status, ChildStatus::Completed);
    assert_eq!(children[1].status, ChildStatus::Running);
    assert_eq!(p.journal.stops(), 1);
    assert_eq!(view(&other.probe).await.incarnation, 1);
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn stopping_a_supervisor_stops_children_youngest_first_with_their_stop_hooks() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let journal = tributary::testing::Journal::new();
    let sub = root
        .spawn_supervisor(tributary::SupervisorSpec::new("sub", seed_strategy()))
        .await
        .unwrap();
    for (sup, name) in [(&root, "a"), (&sub, "b"), (&sub, "c"), (&root, "d")] {
        let (store, _rx) = tributary::Store::channel(8);
        std::mem::forget(_rx);
        sup.spawn_receiver(tributary::ReceiverSpec::new(
            name,
            tributary::testing::Probe::new(name, journal.clone()),
            store,
        ))
        .await
        .unwrap();
    }
    root.shutdown().await.unwrap();
    assert_eq!(
        journal.log(),
        // root's children in start order: sub, a, d; sub's: b, c.
        ["start a", "start b", "start c", "start d", "stop d", "stop a", "stop c", "stop b"]
    );
    assert!(sub.is_finished());
}

#[tokio::test]
async fn a_failing_first_start_is_returned_to_the_spawner() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let journal = tributary::testing::Journal::new();
    journal.fail_next_starts(1);
    let (store, _rx) = tributary::Store::channel(8);
    let err = root
        .spawn_receiver(tributary::ReceiverSpec::new(
            "rx",
            tributary::testing::Probe::new("rx", journal),
            store,
        ))
        .await
        .unwrap_err();
    assert!(
        err.downcast_ref::<tributary::testing::StartError>()
            .is_some(),
        "{err}"
    );
    assert!(root.children().await.unwrap().is_empty());
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_configuration_is_refused_with_the_setting_named() {
    let err = Supervisor::start(
        "root",
        seed_strategy().limit(tributary::RestartLimit::Windowed {
            max_restarts: 3,
            window: std::time::Duration::ZERO,
        }),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("strategy.window"), "{err}");
    assert!(Supervisor::start("a/b", seed_strategy())
        .await
        .unwrap_err()
        .to_string()
        .contains("child.name"));

    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let _p = spawn_probe(&root, "rx").await;
    let (store, _rx) = tributary::Store::channel(8);
    let dup = root
        .spawn_receiver(tributary::ReceiverSpec::new(
            "rx",
            tributary::testing::Probe::new("rx", Default::default()),
            store,
        ))
        .await
        .unwrap_err();
    assert!(dup.to_string().contains("already a child"), "{dup}");
    root.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_child_stuck_in_its_handler_is_killed_after_the_stop_timeout() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let stuck = spawn_probe(&root, "stuck").await;
    let fine = spawn_probe(&root, "fine").await;
    let (_never_released, blocked) = oneshot::channel::<()>();
    stuck.probe.send(ProbeMsg::Block(blocked)).unwrap();
    let t0 = tokio::time::Instant::now();
    root.shutdown().await.unwrap();
    assert!(t0.elapsed() >= tributary::supervisor::CHILD_STOP_TIMEOUT);
    assert_eq!(
        fine.journal.stops(),
        1,
        "a well-behaved sibling stopped with its hook"
    );
    assert!(!stuck.probe.is_running(), "the stuck child was killed");
}
