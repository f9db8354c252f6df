//! Supervisors: actors that own children (receivers and other supervisors) and apply a
//! [`Strategy`] to their failures.
//!
//! ```text
//!             root (Strategy A)
//!             ├── ingest (Strategy B)        a nested supervisor is a child like any other
//!             │   ├── socket-1 (receiver)
//!             │   └── socket-2 (receiver)
//!             └── publisher-rx (receiver)
//! ```
//!
//! * A child's failure is decided by its supervisor's strategy, in the child (see
//!   `link.rs`): Resume and Restart happen in place, so the child's [`ReceiverRef`]
//!   and mailbox survive them.
//! * **Escalate**: the child suspends (its new messages wait, in order) and sends its error to
//!   the supervisor. The supervisor then fails with that same error: its own supervisor's
//!   strategy decides about it, and the verdict (Resume, Restart or Stop) is applied to the
//!   supervisor and its subtree. At the root, escalation stops the whole tree cleanly (every
//!   stop hook runs) and [`SupervisorHandle::wait`] returns [`SupervisorError::Escalated`] with
//!   the original error.
//! * A child that ends cleanly ([`ReceiverContext::stop`](crate::ReceiverContext::stop)) is
//!   recorded as completed; it is not a failure.
//! * Stopping a supervisor stops its children first, youngest first, each with its stop hook.
//! * A restart of a supervisor (decided by its parent) restarts its running children in place.
//!   Children that had already stopped stay stopped.
//! * Every decision is a [`SupervisionEvent`]: logged with `tracing`, counted with `metrics`,
//!   and published on the tree's event stream ([`SupervisorHandle::subscribe`]).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr};
use tokio::sync::{broadcast, oneshot, watch};

use crate::error::{BoxError, ConfigError, SharedError, SupervisorError};
use crate::receiver::host::{self, HostArgs, ReceiverHost};
use crate::receiver::{Receiver, ReceiverRef, ReceiverSpec};
use crate::telemetry::{EventBus, EventKind, SupervisionEvent};

pub(crate) mod backoff;
pub(crate) mod decider;
pub(crate) mod link;
pub(crate) mod restart_budget;

pub use backoff::Backoff;
pub use decider::{Directive, RestartLimit, Strategy, StrategyKind};

use link::{send_after, ChildLink, ChildShared, Control};

/// How long a supervisor waits for one child to stop before killing it (its stop hook then
/// does not run, and a warning is logged).
pub const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Entry point for supervision trees.
#[derive(Debug)]
pub struct Supervisor;

impl Supervisor {
    /// Starts the root supervisor of a new tree. Children are added with
    /// [`SupervisorHandle::spawn_receiver`] and [`SupervisorHandle::spawn_supervisor`].
    ///
    /// Fails with [`SupervisorError::Config`] if the strategy or the name is invalid.
    pub async fn start(
        name: impl Into<String>,
        strategy: Strategy,
    ) -> Result<SupervisorHandle, SupervisorError> {
        let name = name.into();
        validate_name(&name)?;
        strategy.validate()?;
        let path: Arc<str> = name.into();
        let bus = EventBus::new();
        let (exit_tx, exit_rx) = watch::channel(None);
        let args = SupArgs {
            path: path.clone(),
            strategy: Arc::new(strategy),
            link: None,
            bus: bus.clone(),
            exit: exit_tx,
        };
        let (actor, _join) = Actor::spawn(None, SupervisorActor, args)
            .await
            .map_err(|e| spawn_error(&path, e))?;
        Ok(SupervisorHandle {
            actor,
            path,
            bus,
            exit: exit_rx,
        })
    }
}

/// How to run a nested supervisor: its name and the strategy it applies to its own children.
#[derive(Debug)]
pub struct SupervisorSpec {
    name: String,
    strategy: Strategy,
    backoff: Option<Backoff>,
}

impl SupervisorSpec {
    /// A supervisor named `name` whose children are governed by `strategy`.
    pub fn new(name: impl Into<String>, strategy: Strategy) -> Self {
        SupervisorSpec {
            name: name.into(),
            strategy,
            backoff: None,
        }
    }

    /// Waits with this backoff before each restart of this supervisor's subtree (overrides the
    /// parent strategy's default).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
}

/// A child's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    /// A receiver.
    Receiver,
    /// A nested supervisor.
    Supervisor,
}

/// A child's status as its supervisor records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildStatus {
    /// Running (possibly suspended during an escalation or a backoff).
    Running,
    /// Ended on its own, cleanly.
    Completed,
    /// Stopped for good, with the reason (the error of a Stop decision, or a shutdown).
    Stopped {
        /// Why.
        reason: String,
    },
}

/// What a supervisor knows about one child ([`SupervisorHandle::children`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    /// Name under its supervisor.
    pub name: String,
    /// Path in the tree, e.g. `root/ingest/socket-1`.
    pub path: String,
    /// Receiver or supervisor.
    pub kind: ChildKind,
    /// Current status.
    pub status: ChildStatus,
    /// Restarts over the child's life (counted and uncounted).
    pub restarts_total: u64,
    /// Restarts in the sliding window at the last failure decision.
    pub restarts_in_window: u32,
}

/// A handle to a running supervisor. Cheap to clone.
#[derive(Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    path: Arc<str>,
    bus: EventBus,
    exit: watch::Receiver<Option<Exit>>,
}

impl fmt::Debug for SupervisorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorHandle")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SupervisorHandle {
    /// This supervisor's path, e.g. `root/ingest`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Subscribes to the supervision events of the whole tree this supervisor belongs to.
    /// Events emitted before the call are not seen.
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisionEvent> {
        self.bus.subscribe()
    }

    /// Starts a receiver as a child of this supervisor and returns its reference.
    ///
    /// Fails with [`SupervisorError::StartFailed`] if its start hook fails (nothing is left
    /// running), with [`SupervisorError::Config`] for an empty, duplicate or `/`-containing name.
    pub async fn spawn_receiver<R: Receiver>(
        &self,
        spec: ReceiverSpec<R>,
    ) -> Result<ReceiverRef<R::Msg>, SupervisorError> {
        validate_name(&spec.name)?;
        if let Some(b) = &spec.backoff {
            b.validate()?;
        }
        let (ref_tx, ref_rx) = oneshot::channel();
        let name = spec.name.clone();
        let spawn: SpawnFn = Box::new(move |cx: SpawnCx| {
            Box::pin(async move {
                let (path, link) = cx.link(&spec.name, spec.backoff);
                let shared = link.shared.clone();
                let args = HostArgs {
                    store: spec.store,
                    link,
                };
                let host = ReceiverHost {
                    receiver: spec.receiver,
                };
                let (actor, _join) = Actor::spawn_linked(None, host, args, cx.myself.get_cell())
                    .await
                    .map_err(|e| spawn_error(&path, e))?;
                let entry = ChildEntry {
                    name: spec.name.into(),
                    path: path.clone(),
                    kind: ChildKind::Receiver,
                    cell: actor.get_cell(),
                    control: host::control_sender(actor.clone()),
                    shared,
                    status: ChildStatus::Running,
                };
                let _ = ref_tx.send(ReceiverRef::new(actor, path.clone()));
                Ok(entry)
            })
        });
        self.spawn_child(name, spawn).await?;
        ref_rx
            .await
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))
    }

    /// Starts a nested supervisor as a child of this one and returns its handle.
    pub async fn spawn_supervisor(
        &self,
        spec: SupervisorSpec,
    ) -> Result<SupervisorHandle, SupervisorError> {
        validate_name(&spec.name)?;
        spec.strategy.validate()?;
        if let Some(b) = &spec.backoff {
            b.validate()?;
        }
        let (handle_tx, handle_rx) = oneshot::channel();
        let name = spec.name.clone();
        let spawn: SpawnFn = Box::new(move |cx: SpawnCx| {
            Box::pin(async move {
                let (path, link) = cx.link(&spec.name, spec.backoff);
                let shared = link.shared.clone();
                let (exit_tx, exit_rx) = watch::channel(None);
                let args = SupArgs {
                    path: path.clone(),
                    strategy: Arc::new(spec.strategy),
                    link: Some(link),
                    bus: cx.bus.clone(),
                    exit: exit_tx,
                };
                let (actor, _join) =
                    Actor::spawn_linked(None, SupervisorActor, args, cx.myself.get_cell())
                        .await
                        .map_err(|e| spawn_error(&path, e))?;
                let sup = actor.clone();
                let entry = ChildEntry {
                    name: spec.name.into(),
                    path: path.clone(),
                    kind: ChildKind::Supervisor,
                    cell: actor.get_cell(),
                    control: Arc::new(move |c| sup.send_message(SupervisorMsg::Control(c)).is_ok()),
                    shared,
                    status: ChildStatus::Running,
                };
                let _ = handle_tx.send(SupervisorHandle {
                    actor,
                    path,
                    bus: cx.bus.clone(),
                    exit: exit_rx,
                });
                Ok(entry)
            })
        });
        self.spawn_child(name, spawn).await?;
        handle_rx
            .await
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))
    }

    async fn spawn_child(&self, name: String, spawn: SpawnFn) -> Result<(), SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.actor
            .send_message(SupervisorMsg::Spawn { name, spawn, reply })
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))?;
        rx.await
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))?
    }

    /// What this supervisor knows about its children, in the order they were started.
    pub async fn children(&self) -> Result<Vec<ChildInfo>, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.actor
            .send_message(SupervisorMsg::Children(reply))
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))?;
        rx.await
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))
    }

    /// Restarts the running child `name` in place (its stop hook, then its start hook; its
    /// mailbox is kept), without using its restart budget: for an operator, or when the
    /// resource a receiver is placed on goes away. Returns whether such a child was running.
    pub async fn restart_child(&self, name: &str) -> Result<bool, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.actor
            .send_message(SupervisorMsg::RestartChild {
                name: name.to_string(),
                reply,
            })
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))?;
        rx.await
            .map_err(|_| SupervisorError::NotRunning(self.path.to_string()))
    }

    /// Stops this supervisor: its children first (youngest first, each with its stop hook),
    /// then itself. Returns how the supervisor ended: `Ok(())` for this shutdown, or the error
    /// that had already ended it (e.g. [`SupervisorError::Escalated`]).
    pub async fn shutdown(&self) -> Result<(), SupervisorError> {
        self.actor.stop(None);
        self.wait().await
    }

    /// Waits until this supervisor has ended, and returns how: `Ok(())` after a shutdown,
    /// [`SupervisorError::Escalated`] when a failure escalated to the root,
    /// [`SupervisorError::Stopped`] when its own supervisor stopped it.
    pub async fn wait(&self) -> Result<(), SupervisorError> {
        let mut exit = self.exit.clone();
        let outcome = exit
            .wait_for(Option::is_some)
            .await
            .map(|e| e.clone())
            .map_err(|_| SupervisorError::Terminated(self.path.to_string()))?;
        match outcome {
            Some(Exit::Shutdown) => Ok(()),
            Some(Exit::Stopped { reason }) => Err(SupervisorError::Stopped { reason }),
            Some(Exit::Escalated { child, error }) => {
                Err(SupervisorError::Escalated { child, error })
            }
            None => Err(SupervisorError::Terminated(self.path.to_string())),
        }
    }

    /// Whether this supervisor has ended.
    pub fn is_finished(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

fn validate_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.contains('/') {
        return Err(ConfigError::new(
            "child.name",
            format!("must be non-empty and must not contain '/' (got {name:?})"),
        ));
    }
    Ok(())
}

fn spawn_error(path: &str, e: SpawnErr) -> SupervisorError {
    let error: SharedError = match e {
        SpawnErr::StartupFailed(inner) => Arc::from(inner),
        other => Arc::new(other),
    };
    SupervisorError::StartFailed {
        child: path.to_string(),
        error,
    }
}

/// How a supervisor ended.
#[derive(Debug, Clone)]
enum Exit {
    Shutdown,
    Stopped { reason: String },
    Escalated { child: String, error: SharedError },
}

type SpawnFn =
    Box<dyn FnOnce(SpawnCx) -> BoxFuture<'static, Result<ChildEntry, SupervisorError>> + Send>;

/// What a spawn closure gets from the supervisor that runs it.
pub(crate) struct SpawnCx {
    myself: ActorRef<SupervisorMsg>,
    path: Arc<str>,
    strategy: Arc<Strategy>,
    bus: EventBus,
}

impl SpawnCx {
    /// The path and the link to this supervisor of a new child named `name`.
    fn link(&self, name: &str, backoff: Option<Backoff>) -> (Arc<str>, ChildLink) {
        let path: Arc<str> = format!("{}/{}", self.path, name).into();
        let link = ChildLink::new(
            self.path.clone(),
            path.clone(),
            self.strategy.clone(),
            self.myself.clone(),
            backoff,
            self.bus.clone(),
        );
        (path, link)
    }
}

/// Messages of the supervisor actor.
pub(crate) enum SupervisorMsg {
    Spawn {
        name: String,
        spawn: SpawnFn,
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    /// A child failed and its decision was Escalate; it is suspended until a verdict.
    Escalate {
        child: ActorId,
        /// Path of the child where the failure happened (further down, for a nested escalation).
        origin: Arc<str>,
        error: BoxError,
    },
    /// An all-for-one sibling restarted (counted): restart the others.
    SiblingRestarted {
        child: ActorId,
    },
    /// From this supervisor's own supervisor.
    Control(Control),
    Children(oneshot::Sender<Vec<ChildInfo>>),
    RestartChild {
        name: String,
        reply: oneshot::Sender<bool>,
    },
}

impl ractor::Message for SupervisorMsg {}

impl fmt::Debug for SupervisorMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SupervisorMsg::Spawn { name, .. } => write!(f, "Spawn({name})"),
            SupervisorMsg::Escalate {
                child,
                origin,
                error,
            } => write!(f, "Escalate({child}, {origin}, {error})"),
            SupervisorMsg::SiblingRestarted { child } => write!(f, "SiblingRestarted({child})"),
            SupervisorMsg::Control(c) => write!(f, "Control({c:?})"),
            SupervisorMsg::Children(_) => f.write_str("Children"),
            SupervisorMsg::RestartChild { name, .. } => write!(f, "RestartChild({name})"),
        }
    }
}

pub(crate) struct ChildEntry {
    name: Arc<str>,
    path: Arc<str>,
    kind: ChildKind,
    cell: ActorCell,
    control: Arc<dyn Fn(Control) -> bool + Send + Sync>,
    shared: Arc<ChildShared>,
    status: ChildStatus,
}

impl ChildEntry {
    fn info(&self) -> ChildInfo {
        ChildInfo {
            name: self.name.to_string(),
            path: self.path.to_string(),
            kind: self.kind,
            status: self.status.clone(),
            restarts_total: self.shared.restarts_total.load(Ordering::Relaxed),
            restarts_in_window: self.shared.restarts_in_window.load(Ordering::Relaxed),
        }
    }
}

struct SupervisorActor;

struct SupArgs {
    path: Arc<str>,
    strategy: Arc<Strategy>,
    link: Option<ChildLink>,
    bus: EventBus,
    exit: watch::Sender<Option<Exit>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspension {
    AwaitingVerdict,
    Backoff,
}

struct SupState {
    path: Arc<str>,
    strategy: Arc<Strategy>,
    children: Vec<ChildEntry>,
    link: Option<ChildLink>,
    bus: EventBus,
    exit: watch::Sender<Option<Exit>>,
    exit_reason: Option<Exit>,
    /// Children suspended after escalating, waiting for this supervisor's verdict.
    waiting: Vec<ActorId>,
    suspended: Option<Suspension>,
}

impl SupState {
    fn emit(&self, child: Arc<str>, kind: EventKind) {
        SupervisionEvent {
            supervisor: self.path.clone(),
            child,
            kind,
        }
        .emit(&self.bus);
    }

    fn child_mut(&mut self, id: ActorId) -> Option<&mut ChildEntry> {
        self.children.iter_mut().find(|c| c.cell.get_id() == id)
    }

    /// Restarts children in place: waiting ones by verdict, running ones by request.
    fn restart_children(&mut self, except: Option<ActorId>) {
        let waiting = std::mem::take(&mut self.waiting);
        for child in &self.children {
            let id = child.cell.get_id();
            if child.status != ChildStatus::Running || Some(id) == except {
                continue;
            }
            if waiting.contains(&id) {
                (child.control)(Control::Verdict(Directive::Restart));
            } else {
                child.shared.restart_epoch.fetch_add(1, Ordering::AcqRel);
                (child.control)(Control::Restart);
            }
        }
    }

    fn resume_waiting(&mut self) {
        for id in std::mem::take(&mut self.waiting) {
            if let Some(child) = self.children.iter().find(|c| c.cell.get_id() == id) {
                (child.control)(Control::Verdict(Directive::Resume));
            }
        }
    }

    /// Ends this supervisor; `post_stop` stops the children.
    fn stop_self(&mut self, myself: &ActorRef<SupervisorMsg>, exit: Exit, reason: String) {
        self.exit_reason.get_or_insert(exit);
        for id in std::mem::take(&mut self.waiting) {
            if let Some(child) = self.children.iter().find(|c| c.cell.get_id() == id) {
                (child.control)(Control::Verdict(Directive::Stop));
            }
        }
        myself.stop(Some(reason));
    }

    /// This supervisor's restart (decided by its own supervisor): its subtree restarts in place.
    fn restart_self(&mut self, myself: &ActorRef<SupervisorMsg>, counted: bool) {
        self.restart_children(None);
        if let Some(link) = &self.link {
            link.restarted(&myself.get_cell(), counted);
        }
    }

    /// A failure (escalated by a child) that this supervisor now fails with.
    fn fail(&mut self, myself: &ActorRef<SupervisorMsg>, origin: Arc<str>, error: BoxError) {
        let Some(link) = self.link.as_mut() else {
            // The root: the tree ends with the error.
            let error: SharedError = Arc::from(error);
            self.emit(
                self.path.clone(),
                EventKind::TreeFailed {
                    error: error.to_string(),
                },
            );
            let reason = format!("failure escalated to the root from {origin}: {error}");
            self.stop_self(
                myself,
                Exit::Escalated {
                    child: origin.to_string(),
                    error,
                },
                reason,
            );
            return;
        };
        let decision = link.decide(&error, true);
        match decision.directive {
            Directive::Resume => self.resume_waiting(),
            Directive::Restart => match decision.delay {
                Some(delay) => {
                    self.suspended = Some(Suspension::Backoff);
                    let me = myself.clone();
                    send_after(delay, move || {
                        let _ = me.send_message(SupervisorMsg::Control(Control::BackoffElapsed));
                    });
                }
                None => self.restart_self(myself, true),
            },
            Directive::Stop => {
                let reason = error.to_string();
                self.stop_self(
                    myself,
                    Exit::Stopped {
                        reason: reason.clone(),
                    },
                    reason,
                );
            }
            Directive::Escalate => {
                self.suspended = Some(Suspension::AwaitingVerdict);
                if !link.escalate(&myself.get_cell(), error, origin) {
                    let reason = "escalated, but the supervisor is gone".to_string();
                    self.stop_self(
                        myself,
                        Exit::Stopped {
                            reason: reason.clone(),
                        },
                        reason,
                    );
                }
            }
        }
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupState;
    type Arguments = SupArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupState {
            path: args.path,
            strategy: args.strategy,
            children: Vec::new(),
            link: args.link,
            bus: args.bus,
            exit: args.exit,
            exit_reason: None,
            waiting: Vec::new(),
            suspended: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn { name, spawn, reply } => {
                if state.children.iter().any(|c| *c.name == *name) {
                    let _ = reply.send(Err(ConfigError::new(
                        "child.name",
                        format!("`{name}` is already a child of `{}`", state.path),
                    )
                    .into()));
                    return Ok(());
                }
                let cx = SpawnCx {
                    myself: myself.clone(),
                    path: state.path.clone(),
                    strategy: state.strategy.clone(),
                    bus: state.bus.clone(),
                };
                match spawn(cx).await {
                    Ok(entry) => {
                        state.emit(entry.path.clone(), EventKind::Started);
                        state.children.push(entry);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            SupervisorMsg::Escalate {
                child,
                origin,
                error,
            } => {
                let Some(entry) = state.child_mut(child) else {
                    return Ok(());
                };
                let child_path = entry.path.clone();
                state.waiting.push(child);
                if state.suspended.is_some() {
                    // Already failing: this child gets the same verdict as the first one.
                    tracing::warn!(
                        supervisor = %state.path, child = %child_path, %error,
                        "escalation while the supervisor is already failing; it shares the pending verdict"
                    );
                    return Ok(());
                }
                state.fail(&myself, origin, error);
            }
            SupervisorMsg::SiblingRestarted { child } => {
                if state.strategy.kind() == StrategyKind::AllForOne {
                    state.restart_children(Some(child));
                }
            }
            SupervisorMsg::Control(Control::Verdict(directive)) => {
                if state.suspended != Some(Suspension::AwaitingVerdict) {
                    return Ok(());
                }
                state.suspended = None;
                match directive {
                    Directive::Resume => state.resume_waiting(),
                    Directive::Restart => state.restart_self(&myself, false),
                    Directive::Stop | Directive::Escalate => {
                        let reason = "stopped by its supervisor after an escalation".to_string();
                        state.stop_self(
                            &myself,
                            Exit::Stopped {
                                reason: reason.clone(),
                            },
                            reason,
                        );
                    }
                }
            }
            SupervisorMsg::Control(Control::Restart) => {
                let requested = state
                    .link
                    .as_mut()
                    .is_some_and(|link| link.take_restart_request());
                if requested && state.suspended.is_none() {
                    state.restart_self(&myself, false);
                }
            }
            SupervisorMsg::Control(Control::BackoffElapsed) => {
                if state.suspended == Some(Suspension::Backoff) {
                    state.suspended = None;
                    state.restart_self(&myself, true);
                }
            }
            SupervisorMsg::Children(reply) => {
                let _ = reply.send(state.children.iter().map(ChildEntry::info).collect());
            }
            SupervisorMsg::RestartChild { name, reply } => {
                let found = state
                    .children
                    .iter()
                    .find(|c| *c.name == *name && c.status == ChildStatus::Running);
                if let Some(child) = found {
                    child.shared.restart_epoch.fetch_add(1, Ordering::AcqRel);
                    (child.control)(Control::Restart);
                }
                let _ = reply.send(found.is_some());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: ractor::SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Overridden so that a child's exit never stops the supervisor (ractor's default).
        let (cell, status) = match event {
            ractor::SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let status = match reason {
                    Some(reason) => ChildStatus::Stopped { reason },
                    None => ChildStatus::Completed,
                };
                (cell, status)
            }
            ractor::SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(supervisor = %state.path, %error, "child actor failed outside supervision");
                let status = ChildStatus::Stopped {
                    reason: format!("failed outside supervision: {error}"),
                };
                (cell, status)
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        state.waiting.retain(|w| *w != id);
        if let Some(entry) = state.child_mut(id) {
            if entry.status == ChildStatus::Running {
                entry.status = status.clone();
                let path = entry.path.clone();
                let kind = match status {
                    ChildStatus::Stopped { reason } => EventKind::Stopped { reason },
                    _ => EventKind::Completed,
                };
                state.emit(path, kind);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Children first, youngest first, each with its stop hook.
        let reason = format!("supervisor {} stopping", state.path);
        for i in (0..state.children.len()).rev() {
            if state.children[i].status != ChildStatus::Running {
                continue;
            }
            let cell = state.children[i].cell.clone();
            if state.waiting.contains(&cell.get_id()) {
                (state.children[i].control)(Control::Verdict(Directive::Stop));
            }
            // Any other error means it had already stopped.
            if let Err(ractor::RactorErr::Timeout) = cell
                .stop_and_wait(Some(reason.clone()), Some(CHILD_STOP_TIMEOUT))
                .await
            {
                tracing::warn!(
                    supervisor = %state.path, child = %state.children[i].path,
                    "child did not stop in time; killed without its stop hook"
                );
                cell.kill();
            }
            state.children[i].status = ChildStatus::Stopped {
                reason: reason.clone(),
            };
            state.emit(state.children[i].path.clone(), EventKind::ShutDown);
        }
        let exit = state.exit_reason.take().unwrap_or(Exit::Shutdown);
        state.exit.send_replace(Some(exit));
        Ok(())
    }
}
