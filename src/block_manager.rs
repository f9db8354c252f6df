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

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, BytesConvertable, RpcReplyPort};

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

/// Messages of a worker's block store. They are serializable: a block store may live in
/// another process (a worker started with [`crate::cluster::run_worker`]) and be reached
/// through `ractor_cluster`. In this process nothing is serialized.
#[derive(ractor_cluster::RactorClusterMessage)]
pub(crate) enum WorkerMsg {
    /// Hold the block; reply `true` once held (`false`: it arrived damaged, not held).
    #[rpc]
    Put(Wire<Block>, RpcReplyPort<bool>),
    /// The block, if held.
    #[rpc]
    Get(Wire<BlockId>, RpcReplyPort<Wire<Option<Block>>>),
    /// Drop these blocks.
    Remove(Wire<Vec<BlockId>>),
    /// How many blocks are held.
    #[rpc]
    Count(RpcReplyPort<u64>),
    /// Liveness: echoes the number (the driver's heartbeat).
    #[rpc]
    Ping(u64, RpcReplyPort<u64>),
}

/// A value as it crosses to another process: `None` if the bytes did not decode (a peer of
/// another version, or damage), which the receiving side treats as an error rather than
/// panicking (`ractor`'s decoding cannot fail).
#[derive(Debug, Clone)]
pub(crate) struct Wire<T>(pub(crate) Option<T>);

impl<T> Wire<T> {
    pub(crate) fn of(v: T) -> Wire<T> {
        Wire(Some(v))
    }
}

fn put_id(id: BlockId, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.stream.to_le_bytes());
    out.extend_from_slice(&id.seq.to_le_bytes());
}

fn get_id(b: &[u8]) -> Option<BlockId> {
    Some(BlockId {
        stream: u32::from_le_bytes(b.get(0..4)?.try_into().ok()?),
        seq: u64::from_le_bytes(b.get(4..12)?.try_into().ok()?),
    })
}

fn put_block(block: &Block, out: &mut Vec<u8>) {
    put_id(block.id, out);
    let created = block
        .created
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    out.extend_from_slice(&created.to_le_bytes());
    out.extend_from_slice(&block.records.to_le_bytes());
    out.extend_from_slice(&block.data);
}

fn get_block(bytes: Vec<u8>) -> Option<Block> {
    let id = get_id(&bytes)?;
    let created = u64::from_le_bytes(bytes.get(12..20)?.try_into().ok()?);
    let records = u32::from_le_bytes(bytes.get(20..24)?.try_into().ok()?);
    if bytes.len() < 24 {
        return None;
    }
    Some(Block {
        id,
        created: UNIX_EPOCH + Duration::from_micros(created),
        records,
        data: Bytes::from(bytes).slice(24..),
    })
}

impl BytesConvertable for Wire<Block> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(b) = &self.0 {
            out.reserve(24 + b.data.len());
            put_block(b, &mut out);
        }
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Wire(get_block(bytes))
    }
}

/// A block with a number before it (a receiver placement's epoch, as it forwards a block).
impl BytesConvertable for Wire<(u64, Block)> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some((n, b)) = &self.0 {
            out.reserve(32 + b.data.len());
            out.extend_from_slice(&n.to_le_bytes());
            put_block(b, &mut out);
        }
        out
    }
    fn from_bytes(mut bytes: Vec<u8>) -> Self {
        let Some(n) = bytes.get(0..8).and_then(|b| b.try_into().ok()) else {
            return Wire(None);
        };
        let n = u64::from_le_bytes(n);
        bytes.drain(0..8);
        Wire(get_block(bytes).map(|b| (n, b)))
    }
}

impl BytesConvertable for Wire<Option<Block>> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.0 {
            Some(Some(b)) => {
                out.push(1);
                put_block(&b, &mut out);
            }
            _ => out.push(0),
        }
        out
    }
    fn from_bytes(mut bytes: Vec<u8>) -> Self {
        match bytes.first() {
            Some(0) if bytes.len() == 1 => Wire(Some(None)),
            Some(1) => {
                bytes.remove(0);
                Wire(get_block(bytes).map(Some))
            }
            _ => Wire(None),
        }
    }
}

impl BytesConvertable for Wire<BlockId> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12);
        if let Some(id) = self.0 {
            put_id(id, &mut out);
        }
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Wire(get_id(&bytes).filter(|_| bytes.len() == 12))
    }
}

impl BytesConvertable for Wire<Vec<BlockId>> {
    fn into_bytes(self) -> Vec<u8> {
        let ids = self.0.unwrap_or_default();
        let mut out = Vec::with_capacity(12 * ids.len());
        for id in ids {
            put_id(id, &mut out);
        }
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        if !bytes.len().is_multiple_of(12) {
            return Wire(None);
        }
        Wire(bytes.chunks_exact(12).map(get_id).collect())
    }
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
        }
        Ok(())
    }
}
