//! Shared by the supervisor tests: the seed's error types and small helpers.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tributary::testing::{next_event, probe_view, Journal, Probe, ProbeMsg, ProbeView};
use tributary::{
    Directive, EventKind, ReceiverRef, ReceiverSpec, Store, Strategy, SupervisionEvent,
    SupervisorHandle,
};

pub const WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("arithmetic: / by zero")]
pub struct ArithmeticError;

#[derive(Debug, thiserror::Error)]
#[error("null pointer")]
pub struct NullPointerError;

#[derive(Debug, thiserror::Error)]
#[error("illegal argument: {0}")]
pub struct IllegalArgumentError(pub String);

#[derive(Debug, thiserror::Error)]
#[error("unexpected: {0}")]
pub struct UnexpectedError(pub String);

/// The seed's strategy: Arithmetic→Resume, NullPointer→Restart, IllegalArgument→Stop, else Escalate.
pub fn seed_strategy() -> Strategy {
    Strategy::one_for_one(10, Duration::from_secs(60))
        .on::<ArithmeticError>(Directive::Resume)
        .on::<NullPointerError>(Directive::Restart)
        .on::<IllegalArgumentError>(Directive::Stop)
        .otherwise(Directive::Escalate)
}

pub struct Spawned {
    pub probe: ReceiverRef<ProbeMsg>,
    pub journal: Journal,
    pub records: tokio::sync::mpsc::Receiver<u64>,
}

pub async fn spawn_probe(sup: &SupervisorHandle, name: &str) -> Spawned {
    let journal = Journal::new();
    let (store, records) = Store::channel(1024);
    let probe = sup
        .spawn_receiver(ReceiverSpec::new(
            name,
            Probe::new(name, journal.clone()),
            store,
        ))
        .await
        .expect("spawn probe");
    Spawned {
        probe,
        journal,
        records,
    }
}

pub async fn view(probe: &ReceiverRef<ProbeMsg>) -> ProbeView {
    probe_view(probe, WITHIN).await.expect("probe answers")
}

pub fn fail(probe: &ReceiverRef<ProbeMsg>, e: impl std::error::Error + Send + Sync + 'static) {
    probe.send(ProbeMsg::Fail(Box::new(e))).expect("send");
}

pub async fn expect_event<F>(
    events: &mut tokio::sync::broadcast::Receiver<SupervisionEvent>,
    what: &str,
    pred: F,
) -> SupervisionEvent
where
    F: FnMut(&SupervisionEvent) -> bool,
{
    next_event(events, WITHIN, pred)
        .await
        .unwrap_or_else(|| panic!("no event: {what}"))
}

pub fn is_failed(e: &SupervisionEvent, child: &str, directive: Directive) -> bool {
    &*e.child == child
        && matches!(&e.kind, EventKind::Failed { directive: d, .. } if *d == directive)
}

pub async fn drain(records: &mut tokio::sync::mpsc::Receiver<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    while let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(50), records.recv()).await {
        out.push(v);
    }
    out
}
