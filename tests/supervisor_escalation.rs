//! Escalate: a supervisor fails with its child's error and its own supervisor decides, through
//! three levels; the verdict is applied to the whole subtree.

mod common;

use std::time::Duration;

use common::*;
use tributary::testing::ProbeMsg;
use tributary::{ChildStatus, Directive, EventKind, Strategy, Supervisor, SupervisorSpec};

fn escalate_all() -> Strategy {
    Strategy::one_for_one(10, Duration::from_secs(60)).otherwise(Directive::Escalate)
}

#[tokio::test]
async fn escalation_climbs_three_levels_and_the_root_returns_the_original_error() {
    let root = Supervisor::start("root", escalate_all()).await.unwrap();
    let mut events = root.subscribe();
    let l1 = root
        .spawn_supervisor(SupervisorSpec::new("l1", escalate_all()))
        .await
        .unwrap();
    let l2 = l1
        .spawn_supervisor(SupervisorSpec::new("l2", escalate_all()))
        .await
        .unwrap();
    let l3 = l2
        .spawn_supervisor(SupervisorSpec::new("l3", seed_strategy()))
        .await
        .unwrap();
    let p = spawn_probe(&l3, "rx").await;
    let sibling = spawn_probe(&l1, "sibling").await;

    fail(&p.probe, UnexpectedError("corrupt frame".into()));

    let err = root.wait().await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<UnexpectedError>().map(|e| e.0.as_str()),
        Some("corrupt frame")
    );
    // Each level decided, in order, on the same error.
    for (sup, child) in [
        ("root/l1/l2/l3", "root/l1/l2/l3/rx"),
        ("root/l1/l2", "root/l1/l2/l3"),
        ("root/l1", "root/l1/l2"),
        ("root", "root/l1"),
    ] {
        let e = expect_event(&mut events, child, |e| {
            is_failed(e, child, Directive::Escalate)
        })
        .await;
        assert_eq!(&*e.supervisor, sup);
        assert!(
            matches!(e.kind, EventKind::Failed { ref error, .. } if error.contains("corrupt frame"))
        );
    }
    for s in [&l1, &l2, &l3] {
        assert!(s.is_finished());
    }
    assert_eq!(p.journal.stops(), 1);
    assert_eq!(sibling.journal.stops(), 1);
}

#[tokio::test]
async fn parent_decides_resume_for_an_escalated_error_and_the_child_keeps_its_state() {
    let root_strategy = escalate_all().on::<UnexpectedError>(Directive::Resume);
    let root = Supervisor::start("root", root_strategy).await.unwrap();
    let mut events = root.subscribe();
    let mid = root
        .spawn_supervisor(SupervisorSpec::new("mid", escalate_all()))
        .await
        .unwrap();
    let leaf = mid
        .spawn_supervisor(SupervisorSpec::new("leaf", escalate_all()))
        .await
        .unwrap();
    let p = spawn_probe(&leaf, "rx").await;

    p.probe.send(ProbeMsg::Store(1)).unwrap();
    fail(&p.probe, UnexpectedError("x".into()));
    // Queued behind the failure while the verdict travels: processed afterwards, in order.
    p.probe.send(ProbeMsg::Store(2)).unwrap();
    p.probe.send(ProbeMsg::Store(3)).unwrap();

    expect_event(&mut events, "root resumes mid", |e| {
        is_failed(e, "root/mid", Directive::Resume)
    })
    .await;
    let v = view(&p.probe).await;
    assert_eq!((v.incarnation, v.stored), (1, vec![1, 2, 3]));
    assert!(!root.is_finished() && !mid.is_finished() && !leaf.is_finished());
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn parent_decides_restart_for_an_escalated_error_and_the_subtree_restarts_in_place() {
    let root_strategy = escalate_all().on::<UnexpectedError>(Directive::Restart);
    let root = Supervisor::start("root", root_strategy).await.unwrap();
    let mut events = root.subscribe();
    let mid = root
        .spawn_supervisor(SupervisorSpec::new("mid", escalate_all()))
        .await
        .unwrap();
    let leaf = mid
        .spawn_supervisor(SupervisorSpec::new("leaf", escalate_all()))
        .await
        .unwrap();
    let p = spawn_probe(&leaf, "rx").await;
    let cousin = spawn_probe(&mid, "cousin").await;
    let outsider = spawn_probe(&root, "outsider").await;

    p.probe.send(ProbeMsg::Store(1)).unwrap();
    fail(&p.probe, UnexpectedError("y".into()));
    p.probe.send(ProbeMsg::Store(2)).unwrap();

    let e = expect_event(&mut events, "root restarts mid", |e| {
        is_failed(e, "root/mid", Directive::Restart)
    })
    .await;
    assert!(matches!(
        e.kind,
        EventKind::Failed {
            restarts_in_window: 1,
            ..
        }
    ));
    let v = view(&p.probe).await;
    assert_eq!(
        (v.incarnation, v.stored),
        (2, vec![2]),
        "the failed receiver restarted and kept its mailbox"
    );
    assert_eq!(
        view(&cousin.probe).await.incarnation,
        2,
        "the whole subtree of mid restarted"
    );
    assert_eq!(
        view(&outsider.probe).await.incarnation,
        1,
        "outside the subtree nothing restarted"
    );
    let root_children = root.children().await.unwrap();
    assert_eq!(
        root_children[0].restarts_total, 1,
        "mid's restart is counted at root"
    );
    root.shutdown().await.unwrap();
}

#[tokio::test]
async fn parent_decides_stop_for_an_escalated_error_and_the_subtree_stops() {
    let root_strategy = escalate_all().on::<UnexpectedError>(Directive::Stop);
    let root = Supervisor::start("root", root_strategy).await.unwrap();
    let mid = root
        .spawn_supervisor(SupervisorSpec::new("mid", escalate_all()))
        .await
        .unwrap();
    let p = spawn_probe(&mid, "rx").await;
    let q = spawn_probe(&mid, "rx2").await;
    let outsider = spawn_probe(&root, "outsider").await;

    fail(&p.probe, UnexpectedError("z".into()));
    let err = mid.wait().await.unwrap_err();
    assert!(
        matches!(err, tributary::SupervisorError::Stopped { ref reason } if reason.contains('z')),
        "{err}"
    );
    p.probe.wait_stopped().await;
    q.probe.wait_stopped().await;
    assert_eq!((p.journal.stops(), q.journal.stops()), (1, 1));
    // The parent records why, and carries on.
    let mut mid_status = None;
    for _ in 0..100 {
        let children = root.children().await.unwrap();
        if children[0].status != ChildStatus::Running {
            mid_status = Some(children[0].status.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        matches!(mid_status, Some(ChildStatus::Stopped { ref reason }) if reason.contains('z')),
        "{mid_status:?}"
    );
    assert_eq!(view(&outsider.probe).await.incarnation, 1);
    root.shutdown().await.unwrap();
}
