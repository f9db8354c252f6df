//! The block store of one worker: the blocks it holds, reached by messages.
//!
//! ```text
//!  BlockManagerMaster ──Put(block)──► worker ──ack──►   (the master counts k acks)
//!                     ──Get(id)─────►        ──block──► (tasks, re-replication)
//!                     ──Remove(ids)─►                   (the batch that used them completed)
//! ```
//!
//! Everything a worker is sent is plain data (ids and blocks of bytes), so that a worker can
//! live in another process: nothing here refers to the driver's state.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef, BytesConvertable, RpcReplyPort};

use crate::block::{Block, BlockId};
pub(crate) use crate::wire::Wire;
use crate::wire::{call, cast, port_in, port_out};

/// A worker's index.
pub(crate) type WorkerId = usize;

/// Errors of the block manager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// No worker is alive to hold the block; it was not stored.
    #[error("no live worker can hold {0}")]
    NoLiveWorker(BlockId),
    /// The block manager has shut down.
    #[error("the block manager has shut down")]
    ShutDown,
}

/// Messages of a worker's block store. They are serializable: a block store may live in
/// another process (a worker started with [`crate::cluster::run_worker`]) and be reached
/// through `ractor_cluster`. In this process nothing is serialized.
pub(crate) enum WorkerMsg {
    /// Hold the block; reply `true` once held (`false`: it arrived damaged, not held).
    Put(Wire<Block>, RpcReplyPort<bool>),
    /// The block, if held.
    Get(Wire<BlockId>, RpcReplyPort<Wire<Option<Block>>>),
    /// Drop these blocks.
    Remove(Wire<Vec<BlockId>>),
    /// How many blocks are held.
    Count(RpcReplyPort<u64>),
    /// Liveness: echoes the number (the driver's heartbeat).
    Ping(u64, RpcReplyPort<u64>),
    /// Open a data link to the driver as offered (a block store in a worker process; see
    /// [`crate::cluster::data_plane`]).
    Link(Offer),
}

/// By hand rather than derived: a block is the message's only argument and goes as is, which
/// saves a copy of every block on each side of the wire (measured: ~3% of the CPU of the
/// cluster bench).
impl ractor::Message for WorkerMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        Ok(match self {
            WorkerMsg::Put(block, r) => call("Put", block.into_bytes(), port_out(r)),
            WorkerMsg::Get(id, r) => call("Get", id.into_bytes(), port_out(r)),
            WorkerMsg::Remove(ids) => cast("Remove", ids.into_bytes()),
            WorkerMsg::Count(r) => call("Count", Vec::new(), port_out(r)),
            WorkerMsg::Ping(n, r) => call("Ping", n.into_bytes(), port_out(r)),
            WorkerMsg::Link(offer) => cast("Link", offer.to_bytes()),
        })
    }

    fn deserialize(msg: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match msg {
            SerializedMessage::Call {
                variant,
                args,
                reply,
                ..
            } => match variant.as_str() {
                "Put" => Ok(WorkerMsg::Put(Wire::from_bytes(args), port_in(reply))),
                "Get" => Ok(WorkerMsg::Get(Wire::from_bytes(args), port_in(reply))),
                "Count" => Ok(WorkerMsg::Count(port_in(reply))),
                "Ping" if args.len() == 8 => {
                    Ok(WorkerMsg::Ping(u64::from_bytes(args), port_in(reply)))
                }
                _ => Err(BoxedDowncastErr),
            },
            SerializedMessage::Cast { variant, args, .. } => match variant.as_str() {
                "Remove" => Ok(WorkerMsg::Remove(Wire::from_bytes(args))),
                "Link" => Offer::from_bytes(&args)
                    .map(WorkerMsg::Link)
                    .ok_or(BoxedDowncastErr),
                _ => Err(BoxedDowncastErr),
            },
            _ => Err(BoxedDowncastErr),
        }
    }
}

/// What authenticates a data link: given to a worker process over its session, valid once.
pub(crate) type Token = [u8; 16];

/// A data link offered to a worker process: its one-time token, and the driver's Unix socket
/// when it has one (a worker that reaches it is on the driver's host and links there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    pub(crate) token: Token,
    pub(crate) local: Option<String>,
}

impl Offer {
    /// The token, then the socket's name (UTF-8, may be empty: none).
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.token.to_vec();
        out.extend_from_slice(self.local.as_deref().unwrap_or("").as_bytes());
        out
    }

    /// The inverse of [`Offer::to_bytes`]; `None` if damaged.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Offer> {
        let token = Token::try_from(bytes.get(..16)?).ok()?;
        let name = std::str::from_utf8(&bytes[16..]).ok()?;
        Some(Offer {
            token,
            local: (!name.is_empty()).then(|| name.to_string()),
        })
    }
}

/// Opens a data link to the driver as offered, serving it with the given block store (a
/// worker process's; see [`crate::cluster::data_plane`]).
pub(crate) type OpenLink =
    Arc<dyn Fn(Offer, ActorRef<WorkerMsg>) -> tokio::task::JoinHandle<()> + Send + Sync>;

/// A worker's block store (an actor). In a worker process it can open a data link to its
/// driver when the driver offers one.
#[derive(Default)]
pub(crate) struct Worker {
    pub(crate) open_link: Option<OpenLink>,
}

/// What a block store holds.
pub(crate) struct Store {
    blocks: HashMap<BlockId, Block>,
    /// Its data link to the driver, if open.
    link: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = Store;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<WorkerMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Store {
            blocks: HashMap::new(),
            link: None,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<WorkerMsg>,
        store: &mut Store,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(link) = store.link.take() {
            link.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        store: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let blocks = &mut store.blocks;
        match msg {
            WorkerMsg::Put(Wire(block), ack) => {
                let held = block.is_some();
                if let Some(block) = block {
                    blocks.insert(block.id, block);
                } else {
                    tracing::error!("a block arrived damaged; not held");
                }
                let _ = ack.send(held);
            }
            WorkerMsg::Get(Wire(id), reply) => {
                let found = id.and_then(|id| blocks.get(&id).cloned());
                let _ = reply.send(Wire::of(found));
            }
            WorkerMsg::Remove(Wire(ids)) => {
                for id in ids.unwrap_or_default() {
                    blocks.remove(&id);
                }
            }
            WorkerMsg::Count(reply) => {
                let _ = reply.send(blocks.len() as u64);
            }
            WorkerMsg::Ping(n, reply) => {
                let _ = reply.send(n);
            }
            WorkerMsg::Link(offer) => {
                let Some(open) = &self.open_link else {
                    tracing::warn!(
                        "offered a data link, but this block store has no driver to link to"
                    );
                    return Ok(());
                };
                if let Some(old) = store.link.take() {
                    old.abort();
                }
                store.link = Some(open(offer, myself));
            }
        }
        Ok(())
    }
}
