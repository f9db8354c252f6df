//! The BlockManagerMaster: where each block lives, replication, re-replication and losses.
//!
//! ```text
//!  pusher ──reserve(bytes)──► memory budget (permits; full ⇒ the pusher, and so store, waits)
//!         ──put(block)──► master task: pick k live workers ──► pusher sends Put to each
//!                          ◄──Register(id, holders)── once they all acknowledged
//!  worker dies ──► master task: drop it from every block; a block with no survivor is
//!                  reported lost; a re-replication task copies the others from a survivor
//!                  to another live worker (AddReplica) until k copies exist again, then the
//!                  ReceiverTracker hears WorkerLost
//! ```
//!
//! The master task owns the table of blocks (replicas, records, memory permit) and the
//! workers; everything reaches it through [`BlockManagerMaster`], a handle that sends it
//! messages. Block bytes never pass through the master: pushers and executors talk to the
//! workers' block stores directly, with plain-data messages.
//!
//! Invariants: a block's entry lists exactly the live workers that acknowledged holding it;
//! a block is freed (from every worker, and its memory budget returned) once the batch that
//! used it completed; a block is never dropped to make room: the memory budget makes the
//! pusher, and so `store`, wait instead. Blocks in this process are `Bytes`: replicas share one
//! buffer, so a replica costs a reference count, not a copy.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::block::{Block, BlockId};
use crate::block_manager::{BlockError, Worker, WorkerId, WorkerMsg};

/// What the block manager reports to the ReceiverTracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClusterEvent {
    /// A worker died; its blocks were re-replicated or reported lost.
    WorkerLost(WorkerId),
    /// A block with no surviving replica.
    BlockLost { id: BlockId, records: u32 },
}

type Reply<T> = oneshot::Sender<T>;

enum Cmd {
    /// Up to `n` live workers not in `exclude`, round-robin from `preferred`.
    Pick {
        preferred: WorkerId,
        n: usize,
        exclude: Vec<WorkerId>,
        reply: Reply<Vec<(WorkerId, ActorRef<WorkerMsg>)>>,
    },
    /// `holders` acknowledged the block: track it (live holders only).
    Register {
        id: BlockId,
        holders: Vec<WorkerId>,
        records: u32,
        memory: Option<OwnedSemaphorePermit>,
        reply: Reply<Vec<WorkerId>>,
    },
    Locations(BlockId, Reply<Vec<WorkerId>>),
    AllLocations(Reply<Vec<(BlockId, Vec<WorkerId>)>>),
    LiveWorkers(Reply<Vec<WorkerId>>),
    Worker(WorkerId, Reply<Option<ActorRef<WorkerMsg>>>),
    Tracked(Reply<usize>),
    Free(Vec<BlockId>),
    Kill(WorkerId, Reply<bool>),
    /// A worker's actor ended.
    WorkerDied(WorkerId),
    /// Re-replication copied `id` to `target`.
    AddReplica {
        id: BlockId,
        target: WorkerId,
        reply: Reply<bool>,
    },
    Shutdown,
}

/// The handle to the master task. Cheap to clone.
#[derive(Clone)]
pub(crate) struct BlockManagerMaster {
    k: usize,
    tx: mpsc::UnboundedSender<Cmd>,
    memory: Arc<Semaphore>,
    memory_kib: u32,
}

impl std::fmt::Debug for BlockManagerMaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockManagerMaster")
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Memory budget unit: KiB (a semaphore permit is a `u32`).
pub(crate) fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .max(1)
}

impl BlockManagerMaster {
    /// Starts `workers` worker actors and the master task. `memory_bytes` bounds the bytes of
    /// unprocessed blocks.
    pub(crate) async fn start(
        workers: usize,
        k: usize,
        memory_bytes: usize,
    ) -> Result<(BlockManagerMaster, mpsc::UnboundedReceiver<ClusterEvent>), ractor::SpawnErr> {
        let (events, rx) = mpsc::unbounded_channel();
        let (tx, commands) = mpsc::unbounded_channel();
        let bm = BlockManagerMaster {
            k,
            tx: tx.clone(),
            memory: Arc::new(Semaphore::new(kib(memory_bytes) as usize)),
            memory_kib: kib(memory_bytes),
        };
        let mut refs = Vec::with_capacity(workers);
        for id in 0..workers {
            let (actor, join) = match Actor::spawn(None, Worker, ()).await {
                Ok(spawned) => spawned,
                Err(e) => {
                    for a in &refs {
                        let a: &ActorRef<WorkerMsg> = a;
                        a.stop(None);
                    }
                    return Err(e);
                }
            };
            refs.push(actor);
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = join.await;
                let _ = tx.send(Cmd::WorkerDied(id));
            });
        }
        let state = MasterState {
            workers: refs.into_iter().map(Some).collect(),
            meta: HashMap::new(),
            next_worker: 0,
            shutting_down: false,
            events,
            master: bm.clone(),
        };
        tokio::spawn(state.run(commands));
        Ok((bm, rx))
    }

    async fn ask<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(cmd(reply)).ok()?;
        rx.await.ok()
    }

    /// Live workers.
    pub(crate) async fn live_workers(&self) -> Vec<WorkerId> {
        self.ask(Cmd::LiveWorkers).await.unwrap_or_default()
    }

    /// Reserves memory for a block of `bytes`; waits while the budget is spent.
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, BlockError> {
        // A block larger than the whole budget still fits, alone.
        let want = kib(bytes).min(self.memory_kib);
        self.memory
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| BlockError::ShutDown)
    }

    /// Stores `block` on `k` distinct live workers (starting at `preferred`) and returns once
    /// they all acknowledged it. With fewer live workers than `k`, it is stored on all of them
    /// and a warning is logged.
    pub(crate) async fn put(
        &self,
        block: Block,
        preferred: WorkerId,
        memory: Option<OwnedSemaphorePermit>,
    ) -> Result<Vec<WorkerId>, BlockError> {
        let id = block.id;
        let mut holders = Vec::with_capacity(self.k);
        let mut tried = Vec::new();
        while holders.len() < self.k {
            let n = self.k - holders.len();
            let exclude = tried.clone();
            let targets = self
                .ask(|reply| Cmd::Pick {
                    preferred,
                    n,
                    exclude,
                    reply,
                })
                .await
                .ok_or(BlockError::ShutDown)?;
            if targets.is_empty() {
                break;
            }
            let mut acks = Vec::with_capacity(targets.len());
            for (w, actor) in targets {
                tried.push(w);
                let (tx, rx) = oneshot::channel();
                if actor
                    .send_message(WorkerMsg::Put(block.clone(), tx))
                    .is_ok()
                {
                    acks.push((w, rx));
                }
            }
            for (w, rx) in acks {
                if rx.await.is_ok() {
                    holders.push(w);
                }
            }
        }
        if holders.is_empty() {
            return Err(BlockError::NoLiveWorker(id));
        }
        if holders.len() < self.k {
            tracing::warn!(block = %id, replicas = holders.len(), k = self.k, "block under-replicated: not enough live workers");
        }
        let records = block.records;
        let holders = self
            .ask(|reply| Cmd::Register {
                id,
                holders,
                records,
                memory,
                reply,
            })
            .await
            .ok_or(BlockError::ShutDown)?;
        if holders.is_empty() {
            return Err(BlockError::NoLiveWorker(id));
        }
        Ok(holders)
    }

    /// Live workers holding `id`.
    pub(crate) async fn locations(&self, id: BlockId) -> Vec<WorkerId> {
        self.ask(|r| Cmd::Locations(id, r))
            .await
            .unwrap_or_default()
    }

    /// Replica locations of every tracked block, in id order.
    pub(crate) async fn all_locations(&self) -> Vec<(BlockId, Vec<WorkerId>)> {
        self.ask(Cmd::AllLocations).await.unwrap_or_default()
    }

    /// Reads `id` from worker `w`, if it holds it.
    pub(crate) async fn get_from(&self, w: WorkerId, id: BlockId) -> Option<Block> {
        let actor = self.ask(|r| Cmd::Worker(w, r)).await??;
        let (tx, rx) = oneshot::channel();
        actor.send_message(WorkerMsg::Get(id, tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Frees blocks whose batch completed: removed from every worker, memory returned.
    pub(crate) fn free(&self, ids: &[BlockId]) {
        let _ = self.tx.send(Cmd::Free(ids.to_vec()));
    }

    /// Number of blocks tracked (unprocessed).
    pub(crate) async fn tracked_blocks(&self) -> usize {
        self.ask(Cmd::Tracked).await.unwrap_or(0)
    }

    /// Blocks held by worker `w` (asks the worker).
    pub(crate) async fn worker_block_count(&self, w: WorkerId) -> Option<usize> {
        let actor = self.ask(|r| Cmd::Worker(w, r)).await??;
        let (tx, rx) = oneshot::channel();
        actor.send_message(WorkerMsg::Count(tx)).ok()?;
        rx.await.ok()
    }

    /// Kills worker `w` abruptly (its blocks are gone), as a crash would. For tests and demos.
    pub(crate) async fn kill_worker(&self, w: WorkerId) -> bool {
        self.ask(|r| Cmd::Kill(w, r)).await.unwrap_or(false)
    }

    /// Stops every worker (a clean shutdown: nothing is reported lost) and the master task.
    pub(crate) fn shutdown(&self) {
        self.memory.close();
        let _ = self.tx.send(Cmd::Shutdown);
    }
}

struct Meta {
    replicas: Vec<WorkerId>,
    records: u32,
    _memory: Option<OwnedSemaphorePermit>,
}

/// What the master task owns.
struct MasterState {
    workers: Vec<Option<ActorRef<WorkerMsg>>>,
    meta: HashMap<BlockId, Meta>,
    next_worker: usize,
    shutting_down: bool,
    events: mpsc::UnboundedSender<ClusterEvent>,
    /// For the re-replication tasks it spawns.
    master: BlockManagerMaster,
}

impl MasterState {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(cmd) = commands.recv().await {
            if !self.handle(cmd) {
                break;
            }
        }
    }

    /// Handles one command; `false` ends the task.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Pick {
                preferred,
                n,
                exclude,
                reply,
            } => {
                let _ = reply.send(self.pick(preferred, n, &exclude));
            }
            Cmd::Register {
                id,
                mut holders,
                records,
                memory,
                reply,
            } => {
                // A holder may have died between its ack and now: keep only live ones.
                holders.retain(|w| self.alive(*w));
                if holders.is_empty() {
                    self.report_lost(id, records);
                } else {
                    self.meta.insert(
                        id,
                        Meta {
                            replicas: holders.clone(),
                            records,
                            _memory: memory,
                        },
                    );
                }
                let _ = reply.send(holders);
            }
            Cmd::Locations(id, reply) => {
                let at = self
                    .meta
                    .get(&id)
                    .map(|m| {
                        m.replicas
                            .iter()
                            .copied()
                            .filter(|w| self.running(*w))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(at);
            }
            Cmd::AllLocations(reply) => {
                let mut v: Vec<_> = self
                    .meta
                    .iter()
                    .map(|(id, m)| (*id, m.replicas.clone()))
                    .collect();
                v.sort_by_key(|(id, _)| *id);
                let _ = reply.send(v);
            }
            Cmd::LiveWorkers(reply) => {
                let live = (0..self.workers.len()).filter(|w| self.alive(*w)).collect();
                let _ = reply.send(live);
            }
            Cmd::Worker(w, reply) => {
                let _ = reply.send(self.workers.get(w).cloned().flatten());
            }
            Cmd::Tracked(reply) => {
                let _ = reply.send(self.meta.len());
            }
            Cmd::Free(ids) => self.free(&ids),
            Cmd::Kill(w, reply) => {
                let alive = match self.workers.get(w) {
                    Some(Some(actor)) => {
                        actor.kill();
                        true
                    }
                    _ => false,
                };
                let _ = reply.send(alive);
            }
            Cmd::WorkerDied(w) => self.worker_lost(w),
            Cmd::AddReplica { id, target, reply } => {
                let target_alive = self.alive(target);
                let added = match self.meta.get_mut(&id) {
                    Some(meta) if target_alive && !meta.replicas.contains(&target) => {
                        meta.replicas.push(target);
                        true
                    }
                    Some(_) => false,
                    None => {
                        // Freed meanwhile: do not leave a stray copy.
                        if let Some(Some(actor)) = self.workers.get(target) {
                            let _ = actor.send_message(WorkerMsg::Remove(vec![id]));
                        }
                        false
                    }
                };
                let _ = reply.send(added);
            }
            Cmd::Shutdown => {
                self.shutting_down = true;
                for actor in self.workers.iter().flatten() {
                    actor.stop(None);
                }
                self.meta.clear();
                return false;
            }
        }
        true
    }

    fn alive(&self, w: WorkerId) -> bool {
        matches!(self.workers.get(w), Some(Some(_)))
    }

    /// Alive and its actor still running: a worker that has just died is left out even
    /// before its loss has been processed, so that no task is sent to a replica that is gone.
    fn running(&self, w: WorkerId) -> bool {
        matches!(self.workers.get(w), Some(Some(a)) if a.get_status() == ractor::ActorStatus::Running)
    }

    fn pick(
        &mut self,
        preferred: WorkerId,
        n: usize,
        exclude: &[WorkerId],
    ) -> Vec<(WorkerId, ActorRef<WorkerMsg>)> {
        let count = self.workers.len();
        let start = if preferred < count {
            preferred
        } else {
            self.next_worker
        };
        self.next_worker = (self.next_worker + 1) % count.max(1);
        (0..count)
            .map(|i| (start + i) % count)
            .filter(|w| !exclude.contains(w))
            .filter_map(|w| self.workers[w].clone().map(|a| (w, a)))
            .take(n)
            .collect()
    }

    fn free(&mut self, ids: &[BlockId]) {
        let mut per_worker: HashMap<WorkerId, Vec<BlockId>> = HashMap::new();
        for id in ids {
            if let Some(meta) = self.meta.remove(id) {
                for w in meta.replicas {
                    per_worker.entry(w).or_default().push(*id);
                }
            }
        }
        for (w, ids) in per_worker {
            if let Some(Some(actor)) = self.workers.get(w) {
                let _ = actor.send_message(WorkerMsg::Remove(ids));
            }
        }
    }

    fn report_lost(&self, id: BlockId, records: u32) {
        metrics::counter!(crate::telemetry::BLOCKS_LOST_TOTAL).increment(1);
        metrics::counter!(crate::telemetry::RECORDS_LOST_TOTAL).increment(u64::from(records));
        tracing::error!(block = %id, records, "block lost: no replica survived");
        let _ = self.events.send(ClusterEvent::BlockLost { id, records });
    }

    /// A worker died: drop it from every block, report blocks with no survivor as lost, and
    /// start copying the others from a survivor to another live worker.
    fn worker_lost(&mut self, w: WorkerId) {
        if self.shutting_down || !self.alive(w) {
            return;
        }
        self.workers[w] = None;
        let mut affected = Vec::new();
        let mut lost = Vec::new();
        for (id, meta) in self.meta.iter_mut() {
            if let Some(pos) = meta.replicas.iter().position(|r| *r == w) {
                meta.replicas.remove(pos);
                if meta.replicas.is_empty() {
                    lost.push((*id, meta.records));
                } else {
                    affected.push((*id, meta.replicas.clone()));
                }
            }
        }
        for (id, records) in lost {
            self.meta.remove(&id);
            self.report_lost(id, records);
        }
        tracing::warn!(
            worker = w,
            blocks = affected.len(),
            "worker lost; re-replicating its blocks"
        );
        metrics::counter!(crate::telemetry::WORKERS_LOST_TOTAL).increment(1);
        tokio::spawn(re_replicate(
            self.master.clone(),
            self.events.clone(),
            w,
            affected,
        ));
    }
}

/// Copies each block from its first survivor to one more live worker, then reports the loss
/// of worker `w` to the tracker.
async fn re_replicate(
    master: BlockManagerMaster,
    events: mpsc::UnboundedSender<ClusterEvent>,
    w: WorkerId,
    affected: Vec<(BlockId, Vec<WorkerId>)>,
) {
    let mut restored = 0usize;
    for (id, survivors) in affected {
        let Some(block) = master.get_from(survivors[0], id).await else {
            continue;
        };
        let exclude = survivors.clone();
        let Some(targets) = master
            .ask(|reply| Cmd::Pick {
                preferred: survivors[0],
                n: 1,
                exclude,
                reply,
            })
            .await
        else {
            return;
        };
        for (target, actor) in targets {
            let (tx, rx) = oneshot::channel();
            if actor
                .send_message(WorkerMsg::Put(block.clone(), tx))
                .is_ok()
                && rx.await.is_ok()
                && master
                    .ask(|reply| Cmd::AddReplica { id, target, reply })
                    .await
                    .unwrap_or(false)
            {
                restored += 1;
            }
        }
    }
    metrics::counter!(crate::telemetry::BLOCKS_REREPLICATED_TOTAL).increment(restored as u64);
    tracing::info!(worker = w, restored, "re-replication done");
    let _ = events.send(ClusterEvent::WorkerLost(w));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn block(seq: u64) -> Block {
        Block {
            id: BlockId { stream: 0, seq },
            created: SystemTime::now(),
            records: 10,
            data: bytes::Bytes::from_static(b"0123456789"),
        }
    }

    async fn wait_event(rx: &mut mpsc::UnboundedReceiver<ClusterEvent>, want: &ClusterEvent) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = rx.recv().await {
                if &e == want {
                    return;
                }
            }
        })
        .await
        .expect("event");
    }

    #[tokio::test]
    async fn a_block_is_acknowledged_on_k_distinct_workers_and_freed_everywhere() {
        let (bm, _rx) = BlockManagerMaster::start(3, 2, 1 << 20).await.unwrap();
        let holders = bm.put(block(0), 1, None).await.unwrap();
        assert_eq!(holders, vec![1, 2]);
        assert_eq!(bm.worker_block_count(1).await, Some(1));
        assert_eq!(bm.worker_block_count(2).await, Some(1));
        assert_eq!(bm.worker_block_count(0).await, Some(0));
        bm.free(&[BlockId { stream: 0, seq: 0 }]);
        assert_eq!(bm.worker_block_count(1).await, Some(0));
        assert_eq!(bm.tracked_blocks().await, 0);
        bm.shutdown();
    }

    #[tokio::test]
    async fn worker_death_re_replicates_from_a_survivor() {
        let (bm, mut rx) = BlockManagerMaster::start(3, 2, 1 << 20).await.unwrap();
        for seq in 0..10 {
            bm.put(block(seq), 0, None).await.unwrap();
        }
        assert!(bm.kill_worker(0).await);
        wait_event(&mut rx, &ClusterEvent::WorkerLost(0)).await;
        for seq in 0..10 {
            let at = bm.locations(BlockId { stream: 0, seq }).await;
            assert_eq!(at.len(), 2, "k restored for block {seq}: {at:?}");
            assert!(!at.contains(&0));
        }
        assert_eq!(bm.worker_block_count(1).await, Some(10));
        assert_eq!(bm.worker_block_count(2).await, Some(10));
        bm.shutdown();
    }

    #[tokio::test]
    async fn with_k_1_a_dead_worker_s_blocks_are_reported_lost() {
        let (bm, mut rx) = BlockManagerMaster::start(2, 1, 1 << 20).await.unwrap();
        bm.put(block(0), 0, None).await.unwrap();
        bm.put(block(1), 1, None).await.unwrap();
        bm.kill_worker(0).await;
        wait_event(
            &mut rx,
            &ClusterEvent::BlockLost {
                id: BlockId { stream: 0, seq: 0 },
                records: 10,
            },
        )
        .await;
        wait_event(&mut rx, &ClusterEvent::WorkerLost(0)).await;
        assert_eq!(bm.locations(BlockId { stream: 0, seq: 1 }).await, vec![1]);
        assert_eq!(bm.tracked_blocks().await, 1);
        bm.shutdown();
    }
}
