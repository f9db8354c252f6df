//! The host actor that runs a [`Receiver`] and carries out supervision decisions in place.
//!
//! ```text
//!  mailbox ──► Envelope::User(msg) ──► suspended? ──yes──► stash (kept, in order)
//!                                          │no
//!                                          ▼
//!                              receiver.handle()  (errors and panics caught)
//!                                          │ failure
//!                                          ▼
//!                   link.decide(): supervisor's strategy + this child's budget
//!        Resume: keep state │ Restart: post_stop, pre_start │ Stop: post_stop, stop
//!        Escalate: suspend, send the error up, wait for Control::Verdict in the mailbox
//! ```
//!
//! Invariants: the `ractor` actor never sees a failure of user code, so its reference and
//! mailbox outlive every Resume and Restart; a failing message is dropped, never re-run; while
//! suspended (awaiting a verdict or a backoff) messages are stashed in arrival order and
//! processed after the suspension ends; the host never blocks its handler waiting on another
//! actor, so stop requests are always served.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::error::{BoxError, PanicError};
use crate::receiver::{Receiver, ReceiverContext, ReceiverRef};
use crate::store::Store;
use crate::supervisor::decider::Directive;
use crate::supervisor::link::{send_after, ChildLink, Control};

/// What travels in a receiver host's mailbox.
#[derive(Debug)]
pub(crate) enum Envelope<M> {
    User(M),
    Control(Control),
}

// Users' message types need no `Message` impl of their own: only the envelope crosses
// ractor's mailbox (and it never crosses processes).
impl<M: Send + 'static> ractor::Message for Envelope<M> {}

pub(crate) struct ReceiverHost<R: Receiver> {
    pub(crate) receiver: R,
}

pub(crate) struct HostArgs<R: Receiver> {
    pub(crate) store: Store<R::Record>,
    pub(crate) link: ChildLink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspension {
    AwaitingVerdict,
    Backoff,
}

pub(crate) struct HostState<R: Receiver> {
    ctx: ReceiverContext<R>,
    user: Option<R::State>,
    link: ChildLink,
    suspended: Option<Suspension>,
    stash: VecDeque<R::Msg>,
    stopped: bool,
}

async fn catch<T>(
    fut: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(Box::new(PanicError::from_payload(payload))),
    }
}

impl<R: Receiver> ReceiverHost<R> {
    /// Handles one user message, then any failure it caused.
    async fn process(&self, state: &mut HostState<R>, msg: R::Msg) {
        let Some(user) = state.user.as_mut() else {
            // No state (a start hook failed and the decision left us without one): the message
            // cannot be handled. Unreachable in practice: such decisions restart or stop.
            tracing::error!(child = %state.link.path, "message dropped: receiver has no state");
            return;
        };
        let outcome = AssertUnwindSafe(self.receiver.handle(&state.ctx, msg, user))
            .catch_unwind()
            .await;
        let error: BoxError = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(payload) => Box::new(PanicError::from_payload(payload)),
        };
        // Boxed: the failure path (stop and start hooks, decisions) is cold, and keeping its
        // futures out of this one keeps the hot path's future small.
        Box::pin(self.on_failure(state, error, true)).await;
    }

    /// Applies the supervisor's decision to a failure, looping while restarts fail in the
    /// start hook (each such failure is decided again and uses the budget).
    async fn on_failure(&self, state: &mut HostState<R>, mut error: BoxError, resumable: bool) {
        let mut resumable = resumable && state.user.is_some();
        loop {
            let decision = state.link.decide(&error, resumable);
            match decision.directive {
                Directive::Resume => return,
                Directive::Restart => {
                    self.stop_user(state).await;
                    if let Some(delay) = decision.delay {
                        state.suspended = Some(Suspension::Backoff);
                        let me = state.ctx.myself().actor.clone();
                        send_after(delay, move || {
                            let _ = me.send_message(Envelope::Control(Control::BackoffElapsed));
                        });
                        return;
                    }
                    match self.start_user(state).await {
                        Ok(()) => {
                            state.link.restarted(state.ctx.myself().cell(), true);
                            return;
                        }
                        Err(e) => {
                            error = e;
                            resumable = false;
                        }
                    }
                }
                Directive::Stop => {
                    self.stop_for_good(state, error.to_string()).await;
                    return;
                }
                Directive::Escalate => {
                    state.suspended = Some(Suspension::AwaitingVerdict);
                    let origin = state.link.path.clone();
                    if !state
                        .link
                        .escalate(state.ctx.myself().cell(), error, origin)
                    {
                        self.stop_for_good(state, "escalated, but the supervisor is gone".into())
                            .await;
                    }
                    return;
                }
            }
        }
    }

    /// An uncounted restart (ordered by the supervisor).
    async fn restart_uncounted(&self, state: &mut HostState<R>) {
        self.stop_user(state).await;
        match self.start_user(state).await {
            Ok(()) => state.link.restarted(state.ctx.myself().cell(), false),
            Err(error) => Box::pin(self.on_failure(state, error, false)).await,
        }
    }

    async fn start_user(&self, state: &mut HostState<R>) -> Result<(), BoxError> {
        let user = catch(self.receiver.pre_start(&state.ctx)).await?;
        state.user = Some(user);
        Ok(())
    }

    /// Runs the stop hook, if there is a state; its errors are logged only.
    async fn stop_user(&self, state: &mut HostState<R>) {
        if let Some(mut user) = state.user.take() {
            if let Err(error) = catch(self.receiver.post_stop(&state.ctx, &mut user)).await {
                tracing::warn!(child = %state.link.path, %error, "receiver stop hook failed");
            }
        }
    }

    async fn stop_for_good(&self, state: &mut HostState<R>, reason: String) {
        self.stop_user(state).await;
        state.stopped = true;
        state.stash.clear();
        state.ctx.myself().cell().stop(Some(reason));
    }

    /// After a suspension ends: handle stashed messages in order, until empty or suspended again.
    async fn drain_stash(&self, state: &mut HostState<R>) {
        while state.suspended.is_none() && !state.stopped {
            let Some(msg) = state.stash.pop_front() else {
                break;
            };
            self.process(state, msg).await;
        }
    }

    /// Control messages, and user messages while stopped, suspended or asked to restart.
    async fn handle_slow(&self, state: &mut HostState<R>, msg: Envelope<R::Msg>) {
        if state.stopped {
            return;
        }
        match msg {
            Envelope::User(msg) => {
                if state.suspended.is_some() {
                    state.stash.push_back(msg);
                    return;
                }
                if state.link.take_restart_request() {
                    self.restart_uncounted(state).await;
                    if state.suspended.is_some() || state.stopped {
                        state.stash.push_back(msg);
                        return;
                    }
                }
                self.process(state, msg).await;
            }
            Envelope::Control(Control::Restart) => {
                if state.suspended.is_none() && state.link.take_restart_request() {
                    self.restart_uncounted(state).await;
                }
            }
            Envelope::Control(Control::Verdict(directive)) => {
                if state.suspended != Some(Suspension::AwaitingVerdict) {
                    return;
                }
                state.suspended = None;
                match directive {
                    Directive::Resume if state.user.is_some() => {}
                    Directive::Resume | Directive::Restart => self.restart_uncounted(state).await,
                    Directive::Stop | Directive::Escalate => {
                        let reason = "stopped by its supervisor after an escalation".to_string();
                        self.stop_for_good(state, reason).await
                    }
                }
                self.drain_stash(state).await;
            }
            Envelope::Control(Control::BackoffElapsed) => {
                if state.suspended != Some(Suspension::Backoff) {
                    return;
                }
                state.suspended = None;
                // A restart requested meanwhile is served by this one.
                state.link.take_restart_request();
                match self.start_user(state).await {
                    Ok(()) => state.link.restarted(state.ctx.myself().cell(), true),
                    Err(error) => self.on_failure(state, error, false).await,
                }
                self.drain_stash(state).await;
            }
        }
    }
}

impl<R: Receiver> Actor for ReceiverHost<R> {
    type Msg = Envelope<R::Msg>;
    type State = HostState<R>;
    type Arguments = HostArgs<R>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let path = args.link.path.clone();
        let ctx = ReceiverContext::new(ReceiverRef::new(myself, path.clone()), args.store, path);
        let user = catch(self.receiver.pre_start(&ctx)).await?;
        Ok(HostState {
            ctx,
            user: Some(user),
            link: args.link,
            suspended: None,
            stash: VecDeque::new(),
            stopped: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // The hot path: a user message for a running receiver with nothing pending.
            Envelope::User(msg)
                if !state.stopped
                    && state.suspended.is_none()
                    && !state.link.restart_pending()
                    && state.user.is_some() =>
            {
                // `process`, inlined: one future layer less on the path every message takes.
                let HostState { ctx, user, .. } = state;
                let Some(user) = user.as_mut() else {
                    return Ok(());
                };
                let outcome = AssertUnwindSafe(self.receiver.handle(ctx, msg, user))
                    .catch_unwind()
                    .await;
                let error: BoxError = match outcome {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(error)) => error,
                    Err(payload) => Box::new(PanicError::from_payload(payload)),
                };
                Box::pin(self.on_failure(state, error, true)).await;
            }
            // Everything else is cold; boxed so that its futures do not grow the hot one.
            other => Box::pin(self.handle_slow(state, other)).await,
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.stop_user(state).await;
        Ok(())
    }
}

/// Shortcut used by the supervisor to send control messages to a receiver host.
pub(crate) fn control_sender<M: Send + 'static>(
    actor: ActorRef<Envelope<M>>,
) -> Arc<dyn Fn(Control) -> bool + Send + Sync> {
    Arc::new(move |c| actor.send_message(Envelope::Control(c)).is_ok())
}
