//! The BlockManagerMaster: where each block lives, replication, re-replication and losses.
//!
//! ```text
//!  pusher ──put(block)──► BlockManagerMaster ──Put──► worker a ─┐
//!                          │ (metadata:  ──Put──► worker b ─┤ acks: the block is acknowledged
//!                          │  replicas)                    ┘ once k distinct workers hold it
//!                          └── worker dies ──► every block it held is copied from a survivor
//!                                              to another live worker until k copies exist;
//!                                              a block with no survivor is reported lost
//! ```
//!
//! Invariants: a block's metadata lists exactly the live workers that acknowledged holding it;
//! a block is freed (from every worker, and its memory budget returned) once the batch that
//! used it completed; a block is never dropped to make room: the memory budget makes the
//! pusher, and so `store`, wait instead. Blocks in this process are `Bytes`: replicas share one
//! buffer, so a replica costs a reference count, not a copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::block::{Block, BlockId};
use crate::block_manager::{BlockError, Worker, WorkerId, WorkerMsg};

/// What the block manager reports to the streaming context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClusterEvent {
    /// A worker died; its blocks were re-replicated or reported lost.
    WorkerLost(WorkerId),
    /// A block with no surviving replica.
    BlockLost { id: BlockId, records: u32 },
}

struct Meta {
    replicas: Vec<WorkerId>,
    records: u32,
    _memory: Option<OwnedSemaphorePermit>,
}

struct State {
    workers: Vec<Option<ActorRef<WorkerMsg>>>,
    meta: HashMap<BlockId, Meta>,
    next_worker: usize,
    shutting_down: bool,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub(crate) struct BlockManagerMaster {
    k: usize,
    state: Arc<Mutex<State>>,
    memory: Arc<Semaphore>,
    memory_kib: u32,
    events: mpsc::UnboundedSender<ClusterEvent>,
}

impl std::fmt::Debug for BlockManagerMaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockManagerMaster")
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Memory budget unit: KiB (a semaphore permit is a `u32`).
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .max(1)
}

impl BlockManagerMaster {
    /// Starts `workers` worker actors. `memory_bytes` bounds the bytes of unprocessed blocks.
    pub(crate) async fn start(
        workers: usize,
        k: usize,
        memory_bytes: usize,
    ) -> Result<(BlockManagerMaster, mpsc::UnboundedReceiver<ClusterEvent>), ractor::SpawnErr> {
        let (events, rx) = mpsc::unbounded_channel();
        let bm = BlockManagerMaster {
            k,
            state: Arc::new(Mutex::new(State {
                workers: Vec::with_capacity(workers),
                meta: HashMap::new(),
                next_worker: 0,
                shutting_down: false,
            })),
            memory: Arc::new(Semaphore::new(kib(memory_bytes) as usize)),
            memory_kib: kib(memory_bytes),
            events,
        };
        for id in 0..workers {
            let (actor, join) = Actor::spawn(None, Worker, ()).await?;
            bm.lock().workers.push(Some(actor));
            let watcher = bm.clone();
            tokio::spawn(async move {
                let _ = join.await;
                watcher.worker_lost(id).await;
            });
        }
        Ok((bm, rx))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock is a bug; the data is still consistent enough to
        // continue (each critical section is a few map operations), so ignore poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live workers.
    pub(crate) fn live_workers(&self) -> Vec<WorkerId> {
        let st = self.lock();
        (0..st.workers.len())
            .filter(|w| st.workers[*w].is_some())
            .collect()
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
            let targets = self.pick(preferred, self.k - holders.len(), &tried);
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
        let mut st = self.lock();
        // A holder may have died between its ack and now: keep only live ones.
        holders.retain(|w| st.workers[*w].is_some());
        if holders.is_empty() {
            drop(st);
            self.report_lost(id, block.records);
            return Err(BlockError::NoLiveWorker(id));
        }
        st.meta.insert(
            id,
            Meta {
                replicas: holders.clone(),
                records: block.records,
                _memory: memory,
            },
        );
        Ok(holders)
    }

    /// Up to `n` live workers not in `exclude`, round-robin from `preferred`.
    fn pick(
        &self,
        preferred: WorkerId,
        n: usize,
        exclude: &[WorkerId],
    ) -> Vec<(WorkerId, ActorRef<WorkerMsg>)> {
        let mut st = self.lock();
        let count = st.workers.len();
        let start = if preferred < count {
            preferred
        } else {
            st.next_worker
        };
        st.next_worker = (st.next_worker + 1) % count.max(1);
        (0..count)
            .map(|i| (start + i) % count)
            .filter(|w| !exclude.contains(w))
            .filter_map(|w| st.workers[w].clone().map(|a| (w, a)))
            .take(n)
            .collect()
    }

    /// Live workers holding `id`. A worker that has just died is left out even before its
    /// loss has been processed, so that no task is sent to a replica that is gone.
    pub(crate) fn locations(&self, id: BlockId) -> Vec<WorkerId> {
        let st = self.lock();
        let Some(meta) = st.meta.get(&id) else {
            return Vec::new();
        };
        meta.replicas
            .iter()
            .copied()
            .filter(|w| {
                st.workers[*w]
                    .as_ref()
                    .is_some_and(|a| a.get_status() == ractor::ActorStatus::Running)
            })
            .collect()
    }

    /// Replica locations of every tracked block, in id order.
    pub(crate) fn all_locations(&self) -> Vec<(BlockId, Vec<WorkerId>)> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .meta
            .iter()
            .map(|(id, m)| (*id, m.replicas.clone()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// Reads `id` from worker `w`, if it holds it.
    pub(crate) async fn get_from(&self, w: WorkerId, id: BlockId) -> Option<Block> {
        let actor = self.lock().workers.get(w)?.clone()?;
        let (tx, rx) = oneshot::channel();
        actor.send_message(WorkerMsg::Get(id, tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Frees blocks whose batch completed: removed from every worker, memory returned.
    pub(crate) fn free(&self, ids: &[BlockId]) {
        let mut st = self.lock();
        let mut per_worker: HashMap<WorkerId, Vec<BlockId>> = HashMap::new();
        for id in ids {
            if let Some(meta) = st.meta.remove(id) {
                for w in meta.replicas {
                    per_worker.entry(w).or_default().push(*id);
                }
            }
        }
        for (w, ids) in per_worker {
            if let Some(Some(actor)) = st.workers.get(w) {
                let _ = actor.send_message(WorkerMsg::Remove(ids));
            }
        }
    }

    /// Number of blocks tracked (unprocessed).
    pub(crate) fn tracked_blocks(&self) -> usize {
        self.lock().meta.len()
    }

    /// Blocks held by worker `w` (asks the worker).
    pub(crate) async fn worker_block_count(&self, w: WorkerId) -> Option<usize> {
        let actor = self.lock().workers.get(w)?.clone()?;
        let (tx, rx) = oneshot::channel();
        actor.send_message(WorkerMsg::Count(tx)).ok()?;
        rx.await.ok()
    }

    /// Kills worker `w` abruptly (its blocks are gone), as a crash would. For tests and demos.
    pub(crate) fn kill_worker(&self, w: WorkerId) -> bool {
        match self.lock().workers.get(w) {
            Some(Some(actor)) => {
                actor.kill();
                true
            }
            _ => false,
        }
    }

    fn report_lost(&self, id: BlockId, records: u32) {
        metrics::counter!(crate::telemetry::BLOCKS_LOST_TOTAL).increment(1);
        metrics::counter!(crate::telemetry::RECORDS_LOST_TOTAL).increment(u64::from(records));
        tracing::error!(block = %id, records, "block lost: no replica survived");
        let _ = self.events.send(ClusterEvent::BlockLost { id, records });
    }

    /// A worker died: copy each of its blocks from a survivor to another live worker; report
    /// blocks with no survivor as lost.
    async fn worker_lost(&self, w: WorkerId) {
        let affected: Vec<(BlockId, Vec<WorkerId>, u32)> = {
            let mut st = self.lock();
            if st.shutting_down {
                return;
            }
            st.workers[w] = None;
            let mut affected = Vec::new();
            let mut lost = Vec::new();
            for (id, meta) in st.meta.iter_mut() {
                if let Some(pos) = meta.replicas.iter().position(|r| *r == w) {
                    meta.replicas.remove(pos);
                    if meta.replicas.is_empty() {
                        lost.push((*id, meta.records));
                    } else {
                        affected.push((*id, meta.replicas.clone(), meta.records));
                    }
                }
            }
            for (id, _) in &lost {
                st.meta.remove(id);
            }
            drop(st);
            for (id, records) in lost {
                self.report_lost(id, records);
            }
            affected
        };
        tracing::warn!(
            worker = w,
            blocks = affected.len(),
            "worker lost; re-replicating its blocks"
        );
        metrics::counter!(crate::telemetry::WORKERS_LOST_TOTAL).increment(1);
        let mut restored = 0usize;
        for (id, survivors, _) in affected {
            let Some(block) = self.get_from(survivors[0], id).await else {
                continue;
            };
            let targets = self.pick(survivors[0], 1, &survivors);
            for (target, actor) in targets {
                let (tx, rx) = oneshot::channel();
                if actor
                    .send_message(WorkerMsg::Put(block.clone(), tx))
                    .is_ok()
                    && rx.await.is_ok()
                {
                    let mut st = self.lock();
                    let target_alive = st.workers[target].is_some();
                    if let Some(meta) = st.meta.get_mut(&id) {
                        if target_alive && !meta.replicas.contains(&target) {
                            meta.replicas.push(target);
                            restored += 1;
                        }
                    } else {
                        // Freed meanwhile: do not leave a stray copy.
                        let _ = actor.send_message(WorkerMsg::Remove(vec![id]));
                    }
                }
            }
        }
        metrics::counter!(crate::telemetry::BLOCKS_REREPLICATED_TOTAL).increment(restored as u64);
        tracing::info!(worker = w, restored, "re-replication done");
        let _ = self.events.send(ClusterEvent::WorkerLost(w));
    }

    /// Stops every worker (a clean shutdown: nothing is reported lost).
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        st.shutting_down = true;
        for actor in st.workers.iter().flatten() {
            actor.stop(None);
        }
        self.memory.close();
    }
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
        assert_eq!(bm.tracked_blocks(), 0);
        bm.shutdown();
    }

    #[tokio::test]
    async fn worker_death_re_replicates_from_a_survivor() {
        let (bm, mut rx) = BlockManagerMaster::start(3, 2, 1 << 20).await.unwrap();
        for seq in 0..10 {
            bm.put(block(seq), 0, None).await.unwrap();
        }
        assert!(bm.kill_worker(0));
        wait_event(&mut rx, &ClusterEvent::WorkerLost(0)).await;
        for seq in 0..10 {
            let at = bm.locations(BlockId { stream: 0, seq });
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
        bm.kill_worker(0);
        wait_event(
            &mut rx,
            &ClusterEvent::BlockLost {
                id: BlockId { stream: 0, seq: 0 },
                records: 10,
            },
        )
        .await;
        wait_event(&mut rx, &ClusterEvent::WorkerLost(0)).await;
        assert_eq!(bm.locations(BlockId { stream: 0, seq: 1 }), vec![1]);
        assert_eq!(bm.tracked_blocks(), 1);
        bm.shutdown();
    }
}
