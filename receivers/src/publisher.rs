//! A receiver that subscribes to a publisher actor and stores everything it is pushed.
//!
//! This is Spark Streaming's actor receiver (`ActorReceiver` subscribing to a remote feeder
//! actor) on `ractor`: the receiver's start hook sends [`PublisherMsg::Subscribe`] with its own
//! reference, the publisher pushes messages to every subscriber, and the stop hook sends
//! [`PublisherMsg::Unsubscribe`]. Because a Restart happens in place, the reference the
//! publisher holds stays valid; the restarted receiver subscribes again and the publisher
//! should treat a repeated subscription of the same receiver as one ([`Subscribers`] does).
//!
//! ```text
//!  publisher actor ──push T──► SubscriberReceiver ──store(T)──► pipeline
//!        ▲   Subscribe(ref) / Unsubscribe(id)   │
//!        └──────────────────────────────────────┘
//! ```

use std::fmt;

use ractor::{ActorId, ActorRef};
use tributary::{BoxError, Receiver, ReceiverContext, ReceiverRef};

/// The protocol a publisher actor speaks with its subscribers.
pub enum PublisherMsg<T> {
    /// Start pushing `T`s to this receiver.
    Subscribe(ReceiverRef<T>),
    /// Stop pushing to the receiver with this id.
    Unsubscribe(ActorId),
}

// `ractor` runs with its `cluster` feature in Tributary, so message types say they are
// messages (local only: a `ReceiverRef` never crosses processes).
impl<T: Send + 'static> ractor::Message for PublisherMsg<T> {}

impl<T> fmt::Debug for PublisherMsg<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublisherMsg::Subscribe(r) => f.debug_tuple("Subscribe").field(r).finish(),
            PublisherMsg::Unsubscribe(id) => f.debug_tuple("Unsubscribe").field(id).finish(),
        }
    }
}

/// The publisher could not be reached: it has stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("publisher actor {publisher} is not running")]
pub struct PublisherGone {
    /// The publisher's actor id.
    pub publisher: ActorId,
}

/// Stores every `T` a publisher pushes to it.
///
/// The publisher is any actor whose message type `M` can be built from a [`PublisherMsg<T>`]
/// (so it can have messages of its own too); by default `M` is `PublisherMsg<T>` itself.
/// Failures go to the supervisor's decider: [`PublisherGone`] when subscribing fails, and
/// [`tributary::StoreError`] when the pipeline has shut down.
pub struct SubscriberReceiver<T, M = PublisherMsg<T>> {
    publisher: ActorRef<M>,
    _records: std::marker::PhantomData<fn() -> T>,
}

impl<T, M> fmt::Debug for SubscriberReceiver<T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriberReceiver")
            .field("publisher", &self.publisher.get_id())
            .finish()
    }
}

impl<T, M> SubscriberReceiver<T, M> {
    /// A receiver that subscribes to `publisher`.
    pub fn new(publisher: ActorRef<M>) -> Self {
        SubscriberReceiver {
            publisher,
            _records: std::marker::PhantomData,
        }
    }
}

/// State of a [`SubscriberReceiver`]: how many messages this incarnation stored.
#[derive(Debug, Default)]
pub struct SubscriberState {
    /// Messages stored since the last (re)start.
    pub stored: u64,
}

impl<T, M> Receiver for SubscriberReceiver<T, M>
where
    T: Send + 'static,
    M: From<PublisherMsg<T>> + ractor::Message,
{
    type Msg = T;
    type State = SubscriberState;
    type Record = T;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<SubscriberState, BoxError> {
        self.publisher
            .send_message(PublisherMsg::Subscribe(ctx.myself().clone()).into())
            .map_err(|_| PublisherGone {
                publisher: self.publisher.get_id(),
            })?;
        tracing::debug!(receiver = ctx.path(), "subscribed to publisher");
        Ok(SubscriberState::default())
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        msg: T,
        state: &mut SubscriberState,
    ) -> Result<(), BoxError> {
        ctx.store(msg).await?;
        state.stored += 1;
        Ok(())
    }

    async fn post_stop(
        &self,
        ctx: &ReceiverContext<Self>,
        state: &mut SubscriberState,
    ) -> Result<(), BoxError> {
        // The publisher may already be gone; nothing to undo then.
        let _ = self
            .publisher
            .send_message(PublisherMsg::Unsubscribe(ctx.myself().cell().get_id()).into());
        tracing::debug!(receiver = ctx.path(), stored = state.stored, "unsubscribed");
        Ok(())
    }
}

/// The subscriber list a publisher actor keeps: subscribing twice is idempotent, and
/// receivers that have stopped are dropped on the next push.
#[derive(Debug)]
pub struct Subscribers<T> {
    list: Vec<ReceiverRef<T>>,
}

impl<T> Default for Subscribers<T> {
    fn default() -> Self {
        Subscribers { list: Vec::new() }
    }
}

impl<T: Clone + Send + 'static> Subscribers<T> {
    /// Applies a subscription message.
    pub fn apply(&mut self, msg: PublisherMsg<T>) {
        match msg {
            PublisherMsg::Subscribe(r) => {
                let id = r.cell().get_id();
                if !self.list.iter().any(|s| s.cell().get_id() == id) {
                    self.list.push(r);
                }
            }
            PublisherMsg::Unsubscribe(id) => self.list.retain(|s| s.cell().get_id() != id),
        }
    }

    /// Pushes a clone of `item` to every subscriber; returns how many received it.
    pub fn push(&mut self, item: &T) -> usize {
        self.list.retain(|s| s.send(item.clone()).is_ok());
        self.list.len()
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no subscribers.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
