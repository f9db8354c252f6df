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

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;

use crate::block::{Block, BlockId};

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

/// Messages of a worker's block store.
pub(crate) enum WorkerMsg {
    /// Hold the block; reply once held.
    Put(Block, oneshot::Sender<()>),
    /// The block, if held.
    Get(BlockId, oneshot::Sender<Option<Block>>),
    /// Drop these blocks.
    Remove(Vec<BlockId>),
    /// How many blocks are held.
    Count(oneshot::Sender<usize>),
}

/// A worker's block store (an actor).
pub(crate) struct Worker;

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = HashMap<BlockId, Block>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<WorkerMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(HashMap::new())
    }

    async fn handle(
        &self,
        _: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        blocks: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Put(block, ack) => {
                blocks.insert(block.id, block);
                let _ = ack.send(());
            }
            WorkerMsg::Get(id, reply) => {
                let _ = reply.send(blocks.get(&id).cloned());
            }
            WorkerMsg::Remove(ids) => {
                for id in ids {
                    blocks.remove(&id);
                }
            }
            WorkerMsg::Count(reply) => {
                let _ = reply.send(blocks.len());
            }
        }
        Ok(())
    }
}
