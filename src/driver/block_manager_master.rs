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
//! used it completed, or earlier, once all its batch's work over it is done (early tasks: what
//! its partials weigh stays in the budget until the batch completes); a block is never dropped to make room: the memory budget makes the
//! pusher, and so `store`, wait instead. Blocks in this process are `Bytes`: replicas share one
//! buffer, so a replica costs a reference count, not a copy.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use std::time::Duration;

use crate::block::{Block, BlockId};
use crate::block_manager::{BlockError, Wire, Worker, WorkerId, WorkerMsg};
use crate::cluster::data_plane::{Links, Region};
use crate::cluster::node::DriverNode;
#[cfg(test)]
use crate::cluster::ClusterConfig;
use crate::wal::{Location, Storage};

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
    /// Its batch's work over the block is done: freed like `Free`, except that `keep_kib` of
    /// its memory permit (what its partial results weigh) is handed back, to be held until
    /// its batch completes.
    Processed {
        id: BlockId,
        keep_kib: u32,
        reply: Reply<Option<OwnedSemaphorePermit>>,
    },
    Kill(WorkerId, Reply<bool>),
    /// A worker's actor ended (or its process missed the heartbeat deadline).
    WorkerDied(WorkerId),
    /// A worker process's block store joined: a new worker, in the process `node`.
    Join {
        actor: ActorRef<WorkerMsg>,
        node: u64,
        host: Option<std::net::IpAddr>,
        reply: Reply<WorkerId>,
    },
    /// The connection to the process `node` closed: every worker there is lost.
    NodeDown(u64),
    /// Block `id` is in the write-ahead log at `location`.
    Logged {
        id: BlockId,
        location: Location,
    },
    /// Block `id`, whose replicas were all lost, was read back from the write-ahead log and
    /// placed on `holders` (empty: it could not be).
    Reloaded {
        id: BlockId,
        holders: Vec<WorkerId>,
    },
    /// Re-replication copied `id` to `target`.
    AddReplica {
        id: BlockId,
        target: WorkerId,
        reply: Reply<bool>,
    },
    /// Stop everything; the reply once the cluster node is stopped too.
    Shutdown(Option<Reply<()>>),
}

/// The handle to the master task. Cheap to clone.
#[derive(Clone)]
pub(crate) struct BlockManagerMaster {
    k: usize,
    /// Where worker processes join (with a cluster configuration).
    cluster_addr: Option<std::net::SocketAddr>,
    /// Data links to worker processes (with a cluster): blocks go there when one is open.
    links: Option<Links>,
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

/// How long a worker has to answer a request. A worker in another process that does not is
/// treated as not holding the block (its heartbeat declares it lost soon after).
const REPLY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a worker acknowledged holding a block, within the deadline.
async fn held(rx: oneshot::Receiver<bool>) -> bool {
    matches!(tokio::time::timeout(REPLY_DEADLINE, rx).await, Ok(Ok(true)))
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
    #[cfg(test)]
    pub(crate) async fn start(
        workers: usize,
        k: usize,
        memory_bytes: usize,
    ) -> Result<(BlockManagerMaster, mpsc::UnboundedReceiver<ClusterEvent>), ractor::SpawnErr> {
        Self::start_with(workers, k, memory_bytes, None, None).await
    }

    /// Like [`start`](Self::start); with a cluster `node`, worker processes may join (the
    /// WorkerMonitor follows them); with `wal`, blocks whose replicas are all lost are read
    /// back from the write-ahead log.
    pub(crate) async fn start_with(
        workers: usize,
        k: usize,
        memory_bytes: usize,
        node: Option<Arc<DriverNode>>,
        wal: Option<Arc<dyn Storage>>,
    ) -> Result<(BlockManagerMaster, mpsc::UnboundedReceiver<ClusterEvent>), ractor::SpawnErr> {
        let (events, rx) = mpsc::unbounded_channel();
        let (tx, commands) = mpsc::unbounded_channel();
        let bm = BlockManagerMaster {
            k,
            cluster_addr: node.as_ref().map(|n| n.addr()),
            links: node.as_ref().map(|n| n.links()),
            tx: tx.clone(),
            memory: Arc::new(Semaphore::new(kib(memory_bytes) as usize)),
            memory_kib: kib(memory_bytes),
        };
        let mut refs = Vec::with_capacity(workers);
        for id in 0..workers {
            let (actor, join) = match Actor::spawn(None, Worker::default(), ()).await {
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
        // In-process workers are one process when worker processes may join (replicas go to
        // distinct processes); without a cluster each is its own placement domain, as before.
        let domains = (0..workers)
            .map(|w| {
                if node.is_some() {
                    Domain::Driver
                } else {
                    Domain::Local(w)
                }
            })
            .collect();
        let state = MasterState {
            workers: refs.into_iter().map(Some).collect(),
            domains,
            hosts: vec![None; workers],
            meta: HashMap::new(),
            next_worker: 0,
            shutting_down: false,
            events,
            master: bm.clone(),
            node,
            wal,
            waiting: HashMap::new(),
        };
        tokio::spawn(state.run(commands));
        Ok((bm, rx))
    }

    /// A worker process's block store joined (in the process `node`, on `host`): its worker
    /// id, or `None` once the master has stopped.
    pub(crate) async fn join(
        &self,
        actor: ActorRef<WorkerMsg>,
        node: u64,
        host: Option<std::net::IpAddr>,
    ) -> Option<WorkerId> {
        self.ask(|reply| Cmd::Join {
            actor,
            node,
            host,
            reply,
        })
        .await
    }

    /// The connection to the process `node` closed.
    pub(crate) fn node_down(&self, node: u64) {
        let _ = self.tx.send(Cmd::NodeDown(node));
    }

    /// Worker `w` is lost (e.g. it missed the heartbeat deadline).
    pub(crate) fn worker_died(&self, w: WorkerId) {
        let _ = self.tx.send(Cmd::WorkerDied(w));
    }

    /// Whether the master has stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Where worker processes join, with a cluster configuration.
    pub(crate) fn cluster_addr(&self) -> Option<std::net::SocketAddr> {
        self.cluster_addr
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
        let records = block.records;
        let holders = self.place(&block, preferred).await?;
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

    /// Puts `block` on `k` distinct live workers (in distinct processes) and returns those
    /// that acknowledged it; the master does not track it yet.
    async fn place(&self, block: &Block, preferred: WorkerId) -> Result<Vec<WorkerId>, BlockError> {
        let id = block.id;
        let mut holders = Vec::with_capacity(self.k);
        let mut tried = Vec::new();
        let mut waited = 0u64;
        // One shared-memory copy of the block for every replica on this host.
        let mut region = Region::default();
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
                if holders.is_empty() && self.cluster_addr.is_some() {
                    // No worker at all yet (or none left): with worker processes to come,
                    // `store` waits for one rather than failing.
                    if waited.is_multiple_of(100) {
                        tracing::warn!(block = %id, "no live worker to hold the block; waiting for a worker process to join");
                    }
                    waited += 1;
                    tried.clear();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                break;
            }
            let mut acks = Vec::with_capacity(targets.len());
            for (w, actor) in targets {
                tried.push(w);
                if let Some(rx) = self.send_put(&actor, block, &mut region) {
                    acks.push((w, rx));
                }
            }
            for (w, rx) in acks {
                if held(rx).await {
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
        Ok(holders)
    }

    /// Block `id` is in the write-ahead log at `location`: if its last replica is lost
    /// before its batch completes, it is read back from there instead of being lost.
    pub(crate) fn logged(&self, id: BlockId, location: Location) {
        let _ = self.tx.send(Cmd::Logged { id, location });
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
        if let Some(rx) = self.links.as_ref().and_then(|l| l.get(&actor, id)) {
            return tokio::time::timeout(REPLY_DEADLINE, rx).await.ok()?.ok()?;
        }
        let (tx, rx) = oneshot::channel();
        actor
            .send_message(WorkerMsg::Get(Wire::of(id), tx.into()))
            .ok()?;
        match tokio::time::timeout(REPLY_DEADLINE, rx).await {
            Ok(Ok(Wire(Some(found)))) => found,
            _ => None,
        }
    }

    /// Sends `block` to the block store `actor`: on its process's data link when one is open,
    /// else as a message. The answer is whether it is held; `None` if it could not be sent.
    /// `region` is the block's shared memory, for the replicas of one block on this host.
    fn send_put(
        &self,
        actor: &ActorRef<WorkerMsg>,
        block: &Block,
        region: &mut Region,
    ) -> Option<oneshot::Receiver<bool>> {
        if let Some(rx) = self
            .links
            .as_ref()
            .and_then(|l| l.put(actor, block, region))
        {
            return Some(rx);
        }
        let (tx, rx) = oneshot::channel();
        actor
            .send_message(WorkerMsg::Put(Wire::of(block.clone()), tx.into()))
            .ok()?;
        Some(rx)
    }

    /// Frees blocks whose batch completed: removed from every worker, memory returned.
    pub(crate) fn free(&self, ids: &[BlockId]) {
        let _ = self.tx.send(Cmd::Free(ids.to_vec()));
    }

    /// All the work of its batch over block `id` is done (its partial results computed, which
    /// weigh about `partial_bytes`): its replicas are dropped and its memory returned now,
    /// but for a permit of `partial_bytes` returned here, for the caller to hold until the
    /// batch completes. `None`: the block is not tracked (or held no permit).
    pub(crate) async fn processed(
        &self,
        id: BlockId,
        partial_bytes: usize,
    ) -> Option<OwnedSemaphorePermit> {
        // Rounded to the nearest KiB: partials under 512 bytes (a count, a small map) hold
        // none, so a block of tiny partials does not weigh 1 KiB (at most 512 bytes unseen).
        let keep_kib = u32::try_from(partial_bytes.saturating_add(512) / 1024).unwrap_or(u32::MAX);
        self.ask(|reply| Cmd::Processed {
            id,
            keep_kib,
            reply,
        })
        .await
        .flatten()
    }

    /// Number of blocks tracked (unprocessed).
    pub(crate) async fn tracked_blocks(&self) -> usize {
        self.ask(Cmd::Tracked).await.unwrap_or(0)
    }

    /// Blocks held by worker `w` (asks the worker).
    pub(crate) async fn worker_block_count(&self, w: WorkerId) -> Option<usize> {
        let actor = self.ask(|r| Cmd::Worker(w, r)).await??;
        let (tx, rx) = oneshot::channel();
        actor.send_message(WorkerMsg::Count(tx.into())).ok()?;
        let n = tokio::time::timeout(REPLY_DEADLINE, rx).await.ok()?.ok()?;
        usize::try_from(n).ok()
    }

    /// Kills worker `w` abruptly (its blocks are gone), as a crash would. For tests and demos.
    pub(crate) async fn kill_worker(&self, w: WorkerId) -> bool {
        self.ask(|r| Cmd::Kill(w, r)).await.unwrap_or(false)
    }

    /// Stops every worker (a clean shutdown: nothing is reported lost) and the master task.
    #[cfg(test)]
    pub(crate) fn shutdown(&self) {
        self.memory.close();
        let _ = self.tx.send(Cmd::Shutdown(None));
    }

    /// Like `shutdown`, and returns once the master has stopped its workers and the cluster
    /// node (so that another context may start one in this process right away).
    pub(crate) async fn shut_down(&self) {
        self.memory.close();
        let (reply, done) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(Some(reply))).is_ok() {
            let _ = done.await;
        }
    }
}

struct Meta {
    replicas: Vec<WorkerId>,
    records: u32,
    memory: Option<OwnedSemaphorePermit>,
    /// Where it is in the write-ahead log, when it is there.
    logged: Option<Location>,
    /// Its replicas were all lost and it is being read back from the write-ahead log.
    reloading: bool,
    /// Its replicas were all lost before its log position was known (its log write was
    /// still being synced): read back once it is.
    awaiting_log: bool,
}

/// What the master task owns.
struct MasterState {
    workers: Vec<Option<ActorRef<WorkerMsg>>>,
    /// Each worker's placement domain (the process it is in): replicas of a block go to
    /// distinct domains.
    domains: Vec<Domain>,
    /// Each worker's host (`None`: this machine): replicas go to distinct hosts first.
    hosts: Vec<Option<std::net::IpAddr>>,
    /// The cluster node, with a cluster configuration.
    node: Option<Arc<DriverNode>>,
    /// The write-ahead log's storage (when on): blocks that lose every replica are read
    /// back from it.
    wal: Option<Arc<dyn Storage>>,
    /// Asked for the locations of a block being read back: answered once it is placed.
    waiting: HashMap<BlockId, Vec<Reply<Vec<WorkerId>>>>,
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
                            memory,
                            logged: None,
                            reloading: false,
                            awaiting_log: false,
                        },
                    );
                }
                let _ = reply.send(holders);
            }
            Cmd::Locations(id, reply) if self.meta.get(&id).is_some_and(|m| m.reloading) => {
                self.waiting.entry(id).or_default().push(reply);
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
            Cmd::Processed {
                id,
                keep_kib,
                reply,
            } => {
                let kept = self.meta.get_mut(&id).and_then(|m| {
                    let permit = m.memory.as_mut()?;
                    let keep = (keep_kib as usize).min(permit.num_permits());
                    if keep == 0 {
                        return None;
                    }
                    permit.split(keep)
                });
                self.free(&[id]);
                let _ = reply.send(kept);
            }
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
            Cmd::Join {
                actor,
                node,
                host,
                reply,
            } => {
                let w = self.workers.len();
                self.workers.push(Some(actor));
                self.domains.push(Domain::Node(node));
                self.hosts.push(host);
                tracing::info!(worker = w, node, "a worker process joined");
                metrics::counter!(crate::telemetry::WORKERS_JOINED_TOTAL).increment(1);
                let _ = reply.send(w);
                self.top_up();
            }
            Cmd::Logged { id, location } => {
                if let Some(m) = self.meta.get_mut(&id) {
                    m.logged = Some(location.clone());
                    if m.awaiting_log {
                        m.awaiting_log = false;
                        if let Some(storage) = self.wal.clone() {
                            tokio::spawn(reload(self.master.clone(), storage, id, location));
                        }
                    }
                }
            }
            Cmd::Reloaded { id, mut holders } => {
                holders.retain(|w| self.alive(*w));
                let waiters = self.waiting.remove(&id).unwrap_or_default();
                match self.meta.get_mut(&id) {
                    Some(m) if !holders.is_empty() => {
                        m.replicas = holders.clone();
                        m.reloading = false;
                        metrics::counter!(crate::telemetry::BLOCKS_RELOADED_TOTAL).increment(1);
                        tracing::info!(block = %id, replicas = holders.len(), "block read back from the write-ahead log after its replicas were lost");
                    }
                    Some(m) => {
                        let records = m.records;
                        self.meta.remove(&id);
                        self.report_lost(id, records);
                    }
                    None => {
                        // Freed meanwhile: do not leave stray copies.
                        for w in &holders {
                            if let Some(Some(actor)) = self.workers.get(*w) {
                                let _ = actor.send_message(WorkerMsg::Remove(Wire::of(vec![id])));
                            }
                        }
                        holders.clear();
                    }
                }
                for w in waiters {
                    let _ = w.send(holders.clone());
                }
            }
            Cmd::NodeDown(node) => {
                let gone: Vec<WorkerId> = (0..self.workers.len())
                    .filter(|w| self.domains[*w] == Domain::Node(node) && self.alive(*w))
                    .collect();
                for w in gone {
                    self.worker_lost(w);
                }
            }
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
                            let _ = actor.send_message(WorkerMsg::Remove(Wire::of(vec![id])));
                        }
                        false
                    }
                };
                let _ = reply.send(added);
            }
            Cmd::Shutdown(done) => {
                self.shutting_down = true;
                if let Some(node) = self.node.take() {
                    node.stop();
                }
                for actor in self.workers.iter().flatten() {
                    actor.stop(None);
                }
                self.meta.clear();
                if let Some(done) = done {
                    let _ = done.send(());
                }
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

    /// Up to `n` live workers, round-robin from `preferred`, none in `exclude`, and each in a
    /// placement domain (process) that neither `exclude` nor an earlier pick is in; on hosts
    /// not used yet first, when there are such.
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
        let mut used: Vec<Domain> = exclude
            .iter()
            .filter_map(|w| self.domains.get(*w).copied())
            .collect();
        let mut hosts: Vec<Option<std::net::IpAddr>> = exclude
            .iter()
            .filter_map(|w| self.hosts.get(*w).copied())
            .collect();
        let mut out = Vec::with_capacity(n);
        // First pass: distinct hosts (and so distinct processes); second: distinct processes.
        for distinct_hosts in [true, false] {
            for w in (0..count).map(|i| (start + i) % count) {
                if out.len() == n {
                    return out;
                }
                if exclude.contains(&w)
                    || used.contains(&self.domains[w])
                    || (distinct_hosts && hosts.contains(&self.hosts[w]))
                {
                    continue;
                }
                if let Some(a) = self.workers[w].clone() {
                    used.push(self.domains[w]);
                    hosts.push(self.hosts[w]);
                    out.push((w, a));
                }
            }
        }
        out
    }

    /// Copies under-replicated blocks to more workers (a worker process joined).
    fn top_up(&mut self) {
        let short: Vec<(BlockId, Vec<WorkerId>)> = self
            .meta
            .iter()
            .filter(|(_, m)| m.replicas.len() < self.master.k)
            .map(|(id, m)| (*id, m.replicas.clone()))
            .collect();
        if !short.is_empty() {
            tracing::info!(
                blocks = short.len(),
                "copying under-replicated blocks to the new worker"
            );
            tokio::spawn(re_replicate(
                self.master.clone(),
                self.events.clone(),
                None,
                short,
            ));
        }
    }

    fn free(&mut self, ids: &[BlockId]) {
        let mut per_worker: HashMap<WorkerId, Vec<BlockId>> = HashMap::new();
        for id in ids {
            for w in self.waiting.remove(id).unwrap_or_default() {
                let _ = w.send(Vec::new());
            }
            if let Some(meta) = self.meta.remove(id) {
                for w in meta.replicas {
                    per_worker.entry(w).or_default().push(*id);
                }
            }
        }
        for (w, ids) in per_worker {
            if let Some(Some(actor)) = self.workers.get(w) {
                let _ = actor.send_message(WorkerMsg::Remove(Wire::of(ids)));
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
            let logged = self.meta.get(&id).and_then(|m| m.logged.clone());
            match (logged, self.wal.clone()) {
                (Some(location), Some(storage)) => {
                    if let Some(m) = self.meta.get_mut(&id) {
                        m.reloading = true;
                    }
                    tracing::warn!(block = %id, "every replica lost; reading the block back from the write-ahead log");
                    tokio::spawn(reload(self.master.clone(), storage, id, location));
                }
                (None, Some(_)) => {
                    // Replicated, but its log write is still being synced: read it back
                    // once the log says where it is (or drop it, if that write fails: then it
                    // was never acknowledged).
                    if let Some(m) = self.meta.get_mut(&id) {
                        m.reloading = true;
                        m.awaiting_log = true;
                    }
                    tracing::warn!(block = %id, "every replica lost while its log write is in flight; reading it back once logged");
                }
                _ => {
                    self.meta.remove(&id);
                    self.report_lost(id, records);
                }
            }
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
            Some(w),
            affected,
        ));
    }
}

/// Copies each block from its first survivor to more live workers until it has k replicas
/// (or no other process can take one), then reports the loss of worker `lost`, if any, to
/// the tracker.
async fn re_replicate(
    master: BlockManagerMaster,
    events: mpsc::UnboundedSender<ClusterEvent>,
    lost: Option<WorkerId>,
    affected: Vec<(BlockId, Vec<WorkerId>)>,
) {
    // A few copies at a time: each is a read from a survivor and a write to another worker,
    // often in other processes.
    use futures::StreamExt;
    let restored = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(affected)
        .for_each_concurrent(4, |(id, survivors)| {
            let master = &master;
            let restored = &restored;
            async move {
                let n = master.k.saturating_sub(survivors.len());
                if n == 0 {
                    return;
                }
                let Some(block) = master.get_from(survivors[0], id).await else {
                    return;
                };
                let exclude = survivors.clone();
                let Some(targets) = master
                    .ask(|reply| Cmd::Pick {
                        preferred: survivors[0],
                        n,
                        exclude,
                        reply,
                    })
                    .await
                else {
                    return;
                };
                let mut region = Region::default();
                for (target, actor) in targets {
                    let Some(rx) = master.send_put(&actor, &block, &mut region) else {
                        continue;
                    };
                    if held(rx).await
                        && master
                            .ask(|reply| Cmd::AddReplica { id, target, reply })
                            .await
                            .unwrap_or(false)
                    {
                        restored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
    let restored = restored.into_inner();
    metrics::counter!(crate::telemetry::BLOCKS_REREPLICATED_TOTAL).increment(restored as u64);
    tracing::info!(worker = ?lost, restored, "re-replication done");
    if let Some(w) = lost {
        let _ = events.send(ClusterEvent::WorkerLost(w));
    }
}

/// Reads block `id` back from the write-ahead log and places it on k workers again.
async fn reload(
    master: BlockManagerMaster,
    storage: Arc<dyn Storage>,
    id: BlockId,
    location: Location,
) {
    let read =
        tokio::task::spawn_blocking(move || crate::wal::load(storage.as_ref(), &location)).await;
    let holders = match read {
        Ok(Ok(block)) if block.id == id => master
            .place(&block, id.stream as usize)
            .await
            .unwrap_or_default(),
        Ok(Ok(_)) => {
            tracing::error!(block = %id, "the write-ahead log holds another block at its location");
            Vec::new()
        }
        Ok(Err(e)) => {
            tracing::error!(block = %id, error = %e, "could not read the block back from the write-ahead log");
            Vec::new()
        }
        Err(_) => Vec::new(),
    };
    let _ = master.tx.send(Cmd::Reloaded { id, holders });
}

/// A worker's placement domain: the process it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Domain {
    /// An in-process worker, without a cluster: its own domain.
    Local(WorkerId),
    /// The driver's process (in-process workers, with a cluster).
    Driver,
    /// A worker process, by its `ractor_cluster` node id.
    Node(u64),
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
    async fn replicas_go_to_distinct_hosts_first_then_distinct_processes() {
        let cfg = ClusterConfig::new(([127, 0, 0, 1], 0).into(), "c");
        let (node, _events) = DriverNode::start(&cfg).await.unwrap();
        let (bm, _rx) = BlockManagerMaster::start_with(1, 2, 1 << 20, Some(Arc::new(node)), None)
            .await
            .unwrap();
        let (a, b) = ("10.0.0.1".parse().ok(), "10.0.0.2".parse().ok());
        // Worker 0: in the driver. 1 and 2: two processes on host a. 3: a process on host b.
        for (node, host) in [(10, a), (11, a), (12, b)] {
            let (actor, _) = Actor::spawn(None, Worker::default(), ()).await.unwrap();
            bm.ask(|reply| Cmd::Join {
                actor,
                node,
                host,
                reply,
            })
            .await
            .unwrap();
        }
        let pick = |preferred: WorkerId, n: usize, exclude: Vec<WorkerId>| {
            let bm = bm.clone();
            async move {
                bm.ask(|reply| Cmd::Pick {
                    preferred,
                    n,
                    exclude,
                    reply,
                })
                .await
                .unwrap()
                .into_iter()
                .map(|(w, _)| w)
                .collect::<Vec<_>>()
            }
        };
        assert_eq!(pick(1, 2, vec![]).await, vec![1, 3], "distinct hosts first");
        assert_eq!(pick(1, 3, vec![]).await, vec![1, 3, 0]);
        assert_eq!(
            pick(2, 2, vec![1]).await,
            vec![3, 0],
            "not next to the replica on host a"
        );
        assert_eq!(
            pick(1, 2, vec![3, 0]).await,
            vec![1, 2],
            "then distinct processes on one host"
        );
        assert_eq!(
            pick(0, 5, vec![]).await.len(),
            4,
            "never two in one process"
        );
        bm.shutdown();
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
