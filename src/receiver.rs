//! Receivers: user code that talks to a source, written as an actor.
//!
//! A receiver is shaped like a `ractor::Actor`: its own message type, a state built by a start
//! hook ([`Receiver::pre_start`]), a handler ([`Receiver::handle`]) and a stop hook
//! ([`Receiver::post_stop`]). Behaviour lives in `&self` (plain configuration); everything
//! mutable lives in `State`, so that a Restart can drop the state and build it again from the
//! same configuration, in place.
//!
//! A receiver runs inside a *host* actor spawned by its supervisor
//! ([`SupervisorHandle::spawn_receiver`](crate::SupervisorHandle::spawn_receiver)). The host
//! catches every error and panic of the receiver before `ractor` sees it and asks the
//! supervisor's strategy what to do, so the receiver's [`ReceiverRef`] and its mailbox survive
//! Resume and Restart.
//!
//! Inside the hooks, the [`ReceiverContext`] gives [`store`](ReceiverContext::store) and
//! [`store_many`](ReceiverContext::store_many) (where records enter the pipeline), a reference to
//! the receiver itself (to send itself messages, e.g. from a socket-reading task) and
//! [`stop`](ReceiverContext::stop) to end cleanly.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use ractor::{ActorCell, ActorRef};

use crate::error::{BoxError, StoreError};
use crate::store::Store;
use crate::supervisor::backoff::Backoff;

pub(crate) mod host;

/// A custom receiver. See the [crate docs](crate) for a complete example.
///
/// Errors returned from any hook (and panics inside them) are failures handed to the
/// supervisor's decider; their concrete type selects the [`Directive`](crate::Directive).
pub trait Receiver: Sized + Send + Sync + 'static {
    /// Messages the receiver handles (from a source-reading task, a publisher actor, itself).
    type Msg: Send + 'static;
    /// Everything mutable: connections, counters, buffers. Built by `pre_start`.
    type State: Send + 'static;
    /// What the receiver stores.
    type Record: Send + 'static;

    /// Builds the state: connect, subscribe, spawn reader tasks. Runs at first start and again
    /// on every Restart. A failure here at first start is returned to whoever spawned the
    /// receiver; during a restart it counts as another failure of the child.
    fn pre_start(
        &self,
        ctx: &ReceiverContext<Self>,
    ) -> impl Future<Output = Result<Self::State, BoxError>> + Send;

    /// Handles one message. Returning `Err` (or panicking) hands the error to the decider; the
    /// message is not processed again.
    fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Releases the state: close connections, unsubscribe. Runs when the receiver stops and
    /// before each Restart (as Akka's default `preRestart`). Its errors are logged, not supervised.
    fn post_stop(
        &self,
        ctx: &ReceiverContext<Self>,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = (ctx, state);
        async { Ok(()) }
    }
}

/// What a receiver's hooks can use: the store, a reference to itself, its path in the tree.
pub struct ReceiverContext<R: Receiver> {
    myself: ReceiverRef<R::Msg>,
    store: Store<R::Record>,
    path: Arc<str>,
}

impl<R: Receiver> fmt::Debug for ReceiverContext<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverContext")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<R: Receiver> ReceiverContext<R> {
    pub(crate) fn new(
        myself: ReceiverRef<R::Msg>,
        store: Store<R::Record>,
        path: Arc<str>,
    ) -> Self {
        ReceiverContext {
            myself,
            store,
            path,
        }
    }

    /// Stores one record; waits while the pipeline is full (backpressure, never a drop).
    pub async fn store(&self, record: R::Record) -> Result<(), StoreError> {
        self.store.store(record).await
    }

    /// Stores records in order; waits while the pipeline is full.
    pub async fn store_many<I>(&self, records: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = R::Record>,
    {
        self.store.store_many(records).await
    }

    /// Stores one record given as a `&B` (a `&str` slice of a read buffer for text records):
    /// no record made, its bytes copied once into the block. See [`Store::store_as`].
    pub async fn store_as<B: ?Sized>(&self, record: &B) -> Result<(), StoreError>
    where
        R::Record: crate::block::WriteFrom<B>,
    {
        self.store.store_as(record).await
    }

    /// Stores records given as `&B`s, in order; waits while the pipeline is full. See
    /// [`Store::store_many_as`].
    pub async fn store_many_as<'a, B, I>(&self, records: I) -> Result<(), StoreError>
    where
        B: ?Sized + 'a,
        R::Record: crate::block::WriteFrom<B>,
        I: IntoIterator<Item = &'a B>,
    {
        self.store.store_many_as(records).await
    }

    /// Stores records and resolves once they are durable (replicated `k` times and, with the
    /// write-ahead log on, synced): only then acknowledge the source. See
    /// [`Store::store_reliably`].
    pub async fn store_reliably<I>(&self, records: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = R::Record>,
    {
        self.store.store_reliably(records).await
    }

    /// The store handle itself, e.g. to give to a task that the receiver spawns.
    pub fn store_handle(&self) -> &Store<R::Record> {
        &self.store
    }

    /// A reference to this receiver; it stays valid across Resume and Restart.
    pub fn myself(&self) -> &ReceiverRef<R::Msg> {
        &self.myself
    }

    /// This receiver's path in the supervision tree, e.g. `root/ingest/socket-1`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Ends this receiver cleanly once the current message is handled: its stop hook runs and
    /// its supervisor records it as completed (not a failure).
    pub fn stop(&self) {
        self.myself.cell.stop(None);
    }
}

/// A typed reference to a running receiver. Stays valid across Resume and Restart.
pub struct ReceiverRef<M> {
    actor: ActorRef<host::Envelope<M>>,
    cell: ActorCell,
    path: Arc<str>,
}

impl<M> Clone for ReceiverRef<M> {
    fn clone(&self) -> Self {
        ReceiverRef {
            actor: self.actor.clone(),
            cell: self.cell.clone(),
            path: self.path.clone(),
        }
    }
}

impl<M> fmt::Debug for ReceiverRef<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ReceiverRef")
            .field(&self.cell.get_id())
            .finish()
    }
}

/// A message could not be delivered to a receiver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError<M> {
    /// The receiver has stopped (or is stopping); the message is handed back.
    #[error("the receiver has stopped; message not delivered")]
    Stopped(M),
    /// The actor runtime refused the message without handing it back (it could not be boxed
    /// for its destination; not expected for a receiver in this process).
    #[error("the actor runtime refused the message")]
    Rejected,
}

impl<M> SendError<M> {
    /// The undelivered message, when the runtime handed it back.
    pub fn into_inner(self) -> Option<M> {
        match self {
            SendError::Stopped(m) => Some(m),
            SendError::Rejected => None,
        }
    }
}

impl<M: Send + 'static> ReceiverRef<M> {
    pub(crate) fn new(actor: ActorRef<host::Envelope<M>>, path: Arc<str>) -> Self {
        let cell = actor.get_cell();
        ReceiverRef { actor, cell, path }
    }

    /// The receiver's path in the supervision tree, e.g. `root/ingest/socket-1`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Sends a message to the receiver's mailbox (unbounded: carry control messages here, and
    /// records through the bounded [`Store`]). Fails, handing the message back, only if the
    /// receiver has stopped.
    pub fn send(&self, msg: M) -> Result<(), SendError<M>> {
        self.actor
            .send_message(host::Envelope::User(msg))
            .map_err(|e| match e {
                ractor::MessagingErr::SendErr(host::Envelope::User(m)) => SendError::Stopped(m),
                _ => SendError::Rejected,
            })
    }

    /// Whether the receiver is still running (it may stop right after this returns).
    pub fn is_running(&self) -> bool {
        matches!(
            self.cell.get_status(),
            ractor::ActorStatus::Running | ractor::ActorStatus::Starting
        )
    }

    /// Waits until the receiver has stopped for good.
    pub async fn wait_stopped(&self) {
        // `None`: no timeout, so this cannot fail.
        let _ = self.cell.wait(None).await;
    }

    /// The underlying `ractor` cell (for monitors, process groups, the registry).
    pub fn cell(&self) -> &ActorCell {
        &self.cell
    }
}

/// How to run a receiver: its name under the supervisor, the receiver (its configuration), the
/// store its records go to, and an optional backoff between restarts.
pub struct ReceiverSpec<R: Receiver> {
    pub(crate) name: String,
    pub(crate) receiver: R,
    pub(crate) store: Store<R::Record>,
    pub(crate) backoff: Option<Backoff>,
}

impl<R: Receiver> fmt::Debug for ReceiverSpec<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverSpec")
            .field("name", &self.name)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl<R: Receiver> ReceiverSpec<R> {
    /// A receiver named `name` whose records go to `store`.
    pub fn new(name: impl Into<String>, receiver: R, store: Store<R::Record>) -> Self {
        ReceiverSpec {
            name: name.into(),
            receiver,
            store,
            backoff: None,
        }
    }

    /// Waits with this backoff before each restart (overrides the strategy's default).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
}
