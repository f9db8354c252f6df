//! A child's link to its supervisor: the supervisor's strategy, this child's restart budget and
//! backoff, and the channels to report to the supervisor.
//!
//! Failures are decided *in the child* (a receiver host or a nested supervisor), because by the
//! time `ractor` would tell the supervisor, the child's state and mailbox would be gone. The
//! decision uses the supervisor's [`Strategy`] (shared, immutable) and this child's own
//! [`RestartBudget`], so no round trip to the supervisor is needed on the failure path.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorCell, ActorRef};

use crate::error::BoxError;
use crate::supervisor::backoff::Backoff;
use crate::supervisor::decider::{Directive, Strategy, StrategyKind};
use crate::supervisor::restart_budget::RestartBudget;
use crate::supervisor::SupervisorMsg;
use crate::telemetry::{EventBus, EventKind, SupervisionEvent};

/// Control messages from a supervisor to a child (receiver host or nested supervisor). They
/// travel in the child's mailbox, so they never overtake user messages already queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// The answer to an escalation: Resume, Restart or Stop.
    Verdict(Directive),
    /// A restart was requested from outside (all-for-one sibling, or an ancestor restarted);
    /// the request itself is the bumped `restart_epoch`, this message only wakes the child.
    Restart,
    /// A backoff delay before a restart has elapsed.
    BackoffElapsed,
}

/// Counters shared between a child and its supervisor's record of it.
#[derive(Debug, Default)]
pub(crate) struct ChildShared {
    /// Bumped by the supervisor to ask for an uncounted restart.
    pub(crate) restart_epoch: AtomicU64,
    /// Restarts completed, over the child's life.
    pub(crate) restarts_total: AtomicU64,
    /// Restarts in the window at the last decision.
    pub(crate) restarts_in_window: AtomicU32,
}

/// The outcome of one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) directive: Directive,
    pub(crate) restarts_in_window: u32,
    /// Backoff before the restart, when one is configured.
    pub(crate) delay: Option<Duration>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct ChildLink {
    pub(crate) supervisor_path: Arc<str>,
    pub(crate) path: Arc<str>,
    strategy: Arc<Strategy>,
    parent: ActorRef<SupervisorMsg>,
    budget: RestartBudget,
    backoff: Option<Backoff>,
    pub(crate) shared: Arc<ChildShared>,
    bus: EventBus,
    seen_epoch: u64,
}

impl ChildLink {
    pub(crate) fn new(
        supervisor_path: Arc<str>,
        path: Arc<str>,
        strategy: Arc<Strategy>,
        parent: ActorRef<SupervisorMsg>,
        backoff: Option<Backoff>,
        bus: EventBus,
    ) -> Self {
        let budget = RestartBudget::new(strategy.restart_limit());
        let backoff = backoff.or(strategy.default_backoff());
        ChildLink {
            supervisor_path,
            path,
            strategy,
            parent,
            budget,
            backoff,
            shared: Arc::new(ChildShared::default()),
            bus,
            seen_epoch: 0,
        }
    }

    /// Decides what to do with `error` and emits the decision as an event.
    ///
    /// `resumable` is false when the child has no state to resume (its start hook failed): a
    /// Resume then becomes a Restart, which uses the budget, so a start hook that keeps failing
    /// cannot loop forever.
    pub(crate) fn decide(&mut self, error: &BoxError, resumable: bool) -> Decision {
        let mut directive = self.strategy.decide(error.as_ref());
        if directive == Directive::Resume && !resumable {
            directive = Directive::Restart;
        }
        let mut limit_exceeded = false;
        let mut restarts_in_window = 0;
        let mut delay = None;
        if directive == Directive::Restart {
            match self.budget.try_restart(tokio::time::Instant::now()) {
                Ok(n) => {
                    restarts_in_window = n;
                    delay = self.backoff.map(|b| b.delay(n));
                }
                Err(exhausted) => {
                    restarts_in_window = exhausted.in_window;
                    limit_exceeded = true;
                    directive = self.strategy.limit_exceeded_directive();
                }
            }
            self.shared
                .restarts_in_window
                .store(restarts_in_window, Ordering::Relaxed);
        }
        self.emit(EventKind::Failed {
            error: error.to_string(),
            directive,
            restarts_in_window,
            limit_exceeded,
        });
        Decision {
            directive,
            restarts_in_window,
            delay,
        }
    }

    /// Records a completed restart and emits it; tells an all-for-one supervisor so that it
    /// restarts the siblings.
    pub(crate) fn restarted(&self, myself: &ActorCell, counted: bool) {
        self.shared.restarts_total.fetch_add(1, Ordering::Relaxed);
        self.emit(EventKind::Restarted {
            restarts_in_window: self.shared.restarts_in_window.load(Ordering::Relaxed),
            counted,
        });
        if counted && self.strategy.kind() == StrategyKind::AllForOne {
            let _ = self.parent.send_message(SupervisorMsg::SiblingRestarted {
                child: myself.get_id(),
            });
        }
    }

    /// Whether the supervisor asked for a restart that has not been served yet.
    pub(crate) fn restart_pending(&self) -> bool {
        self.shared.restart_epoch.load(Ordering::Acquire) != self.seen_epoch
    }

    /// Whether the supervisor asked for a restart since the last call; consumes the request.
    pub(crate) fn take_restart_request(&mut self) -> bool {
        let epoch = self.shared.restart_epoch.load(Ordering::Acquire);
        if epoch != self.seen_epoch {
            self.seen_epoch = epoch;
            true
        } else {
            false
        }
    }

    /// Hands `error` to the supervisor, which fails with it. Returns `false` if the supervisor
    /// is gone (the caller then stops).
    /// `origin` is the path of the child where the failure happened.
    pub(crate) fn escalate(&self, myself: &ActorCell, error: BoxError, origin: Arc<str>) -> bool {
        self.parent
            .send_message(SupervisorMsg::Escalate {
                child: myself.get_id(),
                origin,
                error,
            })
            .is_ok()
    }

    pub(crate) fn emit(&self, kind: EventKind) {
        SupervisionEvent {
            supervisor: self.supervisor_path.clone(),
            child: self.path.clone(),
            kind,
        }
        .emit(&self.bus);
    }
}

/// Sends `control` to `target` after `delay` (a backoff), unless it has stopped by then.
pub(crate) fn send_after<F>(delay: Duration, send: F)
where
    F: FnOnce() + Send + 'static,
{
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        send();
    });
}
