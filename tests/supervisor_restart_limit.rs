//! The restart cap (10 per child within any 60 s by default), backoff, and all-for-one, on
//! tokio's paused clock: no real sleeps.

mod common;

use std::time::Duration;

use common::*;
use tributary::testing::ProbeMsg;
use tributary::{
    Backoff, ChildStatus, Directive, EventKind, ReceiverSpec, Store, Strategy, Supervisor,
};

async fn restart_once(
    p: &Spawned,
    events: &mut tokio::sync::broadcast::Receiver<tributary::SupervisionEvent>,
) -> EventKind {
    fail(&p.probe, NullPointerError);
    expect_event(events, "decision", |e| {
        matches!(e.kind, EventKind::Failed { .. })
    })
    .await
    .kind
}

#[tokio::test(start_paused = true)]
async fn the_eleventh_restart_within_a_minute_stops_the_child() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;

    for i in 1..=10u32 {
        let kind = restart_once(&p, &mut events).await;
        assert_eq!(
            kind,
            EventKind::Failed {
                error: "null pointer".into(),
                directive: Directive::Restart,
                restarts_in_window: i,
                limit_exceeded: false
            }
        );
        tokio::time::advance(Duration::from_secs(5)).await; // all ten within 50 s
    }
    let kind = restart_once(&p, &mut events).await;
    assert_eq!(
        kind,
        EventKind::Failed {
            error: "null pointer".into(),
            directive: Directive::Stop,
            restarts_in_window: 10,
            limit_exceeded: true
        }
    );
    p.probe.wait_stopped().await;
    assert_eq!(p.journal.starts(), 11);
    let info = &root.children().await.unwrap()[0];
    assert!(matches!(info.status, ChildStatus::Stopped { .. }));
    assert_eq!(info.restarts_total, 10);
    root.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_healthy_child_regains_its_budget_as_old_restarts_leave_the_window() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;

    for _ in 0..10 {
        restart_once(&p, &mut events).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // Restarts happened at t = 0, 1, ..., 9 s; now t = 10 s and the budget is spent.
    // The first one leaves the window at t = 60 s: exactly one restart becomes available.
    tokio::time::advance(Duration::from_secs(50)).await; // t = 60 s
    let kind = restart_once(&p, &mut events).await;
    assert!(
        matches!(
            kind,
            EventKind::Failed {
                directive: Directive::Restart,
                restarts_in_window: 10,
                ..
            }
        ),
        "{kind:?}"
    );
    // ...but only one: the restart of t = 1 s stays in the window until t = 61 s.
    let kind = restart_once(&p, &mut events).await;
    assert!(
        matches!(
            kind,
            EventKind::Failed {
                directive: Directive::Stop,
                limit_exceeded: true,
                ..
            }
        ),
        "{kind:?}"
    );
    root.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn after_a_quiet_minute_the_full_budget_is_back() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;
    for _ in 0..10 {
        restart_once(&p, &mut events).await;
    }
    tokio::time::advance(Duration::from_secs(60)).await;
    for i in 1..=10u32 {
        let kind = restart_once(&p, &mut events).await;
        assert!(
            matches!(kind, EventKind::Failed { directive: Directive::Restart, restarts_in_window, .. } if restarts_in_window == i),
            "{kind:?}"
        );
    }
    assert_eq!(view(&p.probe).await.incarnation, 21);
    root.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn exceeding_the_limit_can_escalate_instead() {
    let strategy = seed_strategy()
        .limit(tributary::RestartLimit::Windowed {
            max_restarts: 2,
            window: Duration::from_secs(60),
        })
        .on_limit_exceeded(Directive::Escalate);
    let root = Supervisor::start("root", strategy).await.unwrap();
    let p = spawn_probe(&root, "rx").await;
    for _ in 0..3 {
        fail(&p.probe, NullPointerError);
    }
    let err = root.wait().await.unwrap_err();
    assert!(err.downcast_ref::<NullPointerError>().is_some(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_start_hook_during_restart_counts_as_another_failure() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let p = spawn_probe(&root, "rx").await;
    p.journal.fail_next_starts(2);
    fail(&p.probe, NullPointerError);
    // NPE -> restart #1 (start fails) -> StartError is unmatched -> escalates to the root.
    let e = expect_event(
        &mut events,
        "start failure decided",
        |e| matches!(&e.kind, EventKind::Failed { error, .. } if error.contains("start hook")),
    )
    .await;
    assert!(
        matches!(
            e.kind,
            EventKind::Failed {
                directive: Directive::Escalate,
                ..
            }
        ),
        "{e:?}"
    );

    // With a case for it, the start failures are restarted and use the budget.
    let strategy = seed_strategy().on::<tributary::testing::StartError>(Directive::Restart);
    let root2 = Supervisor::start("root2", strategy).await.unwrap();
    let mut events = root2.subscribe();
    let p = spawn_probe(&root2, "rx").await;
    p.journal.fail_next_starts(2);
    fail(&p.probe, NullPointerError);
    let e = expect_event(&mut events, "restarted", |e| {
        matches!(e.kind, EventKind::Restarted { .. })
    })
    .await;
    assert_eq!(
        e.kind,
        EventKind::Restarted {
            restarts_in_window: 3,
            counted: true
        }
    );
    assert_eq!(view(&p.probe).await.incarnation, 2);
    root2.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_the_restart_and_keeps_messages_that_arrive_meanwhile() {
    let root = Supervisor::start("root", seed_strategy()).await.unwrap();
    let mut events = root.subscribe();
    let journal = tributary::testing::Journal::new();
    let (store, mut records) = Store::channel(64);
    let probe = root
        .spawn_receiver(
            ReceiverSpec::new(
                "rx",
                tributary::testing::Probe::new("rx", journal.clone()),
                store,
            )
            .backoff(Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(0.0)),
        )
        .await
        .unwrap();

    for (n, expected) in [(1u32, 1u64), (2, 2), (3, 4)] {
        let t0 = tokio::time::Instant::now();
        probe
            .send(ProbeMsg::Fail(Box::new(NullPointerError)))
            .unwrap();
        probe.send(ProbeMsg::Store(u64::from(n))).unwrap();
        let e = expect_event(&mut events, "restarted", |e| {
            matches!(e.kind, EventKind::Restarted { .. })
        })
        .await;
        assert_eq!(
            e.kind,
            EventKind::Restarted {
                restarts_in_window: n,
                counted: true
            }
        );
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(expected),
            "restart {n} waited its backoff"
        );
    }
    let v = view(&probe).await;
    assert_eq!((v.incarnation, v.stored), (4, vec![3]));
    assert_eq!(
        drain(&mut records).await,
        vec![1, 2, 3],
        "messages sent during backoff were kept"
    );
    root.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn all_for_one_restarts_the_siblings_without_using_their_budget() {
    let strategy = Strategy::all_for_one(10, Duration::from_secs(60))
        .on::<NullPointerError>(Directive::Restart)
        .on::<ArithmeticError>(Directive::Resume);
    let root = Supervisor::start("root", strategy).await.unwrap();
    let mut events = root.subscribe();
    let a = spawn_probe(&root, "a").await;
    let b = spawn_probe(&root, "b").await;
    let c = spawn_probe(&root, "c").await;
    b.probe.send(ProbeMsg::Store(1)).unwrap();

    fail(&a.probe, ArithmeticError); // resume affects only `a`
    assert_eq!(view(&b.probe).await.incarnation, 1);

    fail(&a.probe, NullPointerError);
    for child in ["root/b", "root/c"] {
        let e = expect_event(&mut events, child, |e| {
            &*e.child == child && matches!(e.kind, EventKind::Restarted { .. })
        })
        .await;
        assert_eq!(
            e.kind,
            EventKind::Restarted {
                restarts_in_window: 0,
                counted: false
            }
        );
    }
    assert_eq!(view(&a.probe).await.incarnation, 2);
    let vb = view(&b.probe).await;
    assert_eq!((vb.incarnation, vb.stored), (2, vec![]));
    assert_eq!(view(&c.probe).await.incarnation, 2);
    root.shutdown().await.unwrap();
}
