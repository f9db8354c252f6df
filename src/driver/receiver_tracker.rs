//! The ReceiverTracker: receivers, where they run, the blocks they produced, and durability.
//!
//! ```text
//!  receiver ──store──► block generator ──cut──► pusher ──put (k replicas)──► BlockManagerMaster
//!   (supervised)         (per receiver)            └──append──► write-ahead log (optional)
//!                                                  │ both done
//!                                                  ▼
//!  tracker task ◄──Added(id, records)── pusher     logs "added", queues the block, and only
//!     │                                            then the pusher settles the block's durability
//!     │ ◄──Allocate(batch)── JobScheduler          (store_reliably resolves; the source may ack)
//!     │ ◄──Completed(batch, blocks)── JobScheduler logs "done", frees the blocks, lets the WAL
//!     │                                            delete segments
//!     └ ◄── worker lost ── BlockManagerMaster      receivers placed there restart on a survivor
//! ```
//!
//! The tracker task owns the queue of acknowledged blocks not yet allocated, the metadata log
//! and the write-ahead logs, and each receiver's placement; everything else reaches that state
//! through messages ([`TrackerHandle`]). What the messages carry is plain data (ids, counts).
//! Metadata log writes are fsynced, so they run on the blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::batch::{BatchBlocks, TaskRunner};
use crate::batch_clock::BatchClock;
use crate::block::{BatchId, Block, BlockId};
use crate::block_generator::{BlockGenerator, Cut};
use crate::block_manager::WorkerId;
use crate::buffer_pool::BufferPool;
use crate::checkpoint::{
    Allocation, Completion, DriverState, Entry, Ledger, LossCause, MetadataLog,
};
use crate::context::error::ContextError;
use crate::direct::DirectRange;
use crate::driver::block_manager_master::{BlockManagerMaster, ClusterEvent};
use crate::driver::rate_controller::RateController;
use crate::driver::remote_receivers::{Host, Push, RemoteReceivers};
use crate::error::SupervisorError;
use crate::store::Durability;
use crate::supervisor::{Strategy, Supervisor, SupervisorHandle};
use crate::wal::Wal;

/// The longest a batch allocation waits for a stream's mark (at most a quarter of the batch
/// interval): a stream whose pipeline is behind (its queue full, a slow replica) does not hold
/// the others' batch back longer; its late blocks go into the next batch.
const MARK_GRACE: Duration = Duration::from_millis(100);

/// Retries of a batch completion that could not be logged (100 ms, doubling: ~3 s in all).
const COMPLETION_RETRIES: u32 = 5;

/// Spawns one receiver under the receivers' supervisor, storing into its generator.
pub(crate) type Starter = Box<
    dyn FnOnce(
            SupervisorHandle,
            Arc<BlockGenerator>,
            Arc<Durability>,
        ) -> BoxFuture<'static, Result<(), SupervisorError>>
        + Send,
>;

/// A receiver defined by the job, not started yet.
pub(crate) struct PendingReceiver {
    pub(crate) stream: u32,
    pub(crate) name: String,
    pub(crate) start: Starter,
}

/// The tracker's settings (from the context's configuration).
#[derive(Debug)]
pub(crate) struct TrackerConfig {
    pub(crate) workers: usize,
    pub(crate) max_block_bytes: usize,
    pub(crate) block_queue: usize,
    pub(crate) rate_limit: Option<f64>,
    /// The adaptive rates (backpressure on).
    pub(crate) rates: Option<RateController>,
    pub(crate) memory_bytes: usize,
    pub(crate) block_interval: Duration,
    /// The batch boundaries: in-process generators cut at each (`None`: block interval only).
    pub(crate) clock: Option<BatchClock>,
    /// Told of each acknowledged block, to start its tasks early.
    pub(crate) tasks: Option<TaskRunner>,
    pub(crate) strategy: Strategy,
}

/// What recovery hands the tracker.
#[derive(Default)]
pub(crate) struct TrackerStart {
    pub(crate) meta: Option<MetadataLog>,
    pub(crate) wals: HashMap<u32, Arc<Wal>>,
    pub(crate) unallocated: Vec<(BlockId, u32)>,
    /// Bytes of the recovered blocks still only in the write-ahead log.
    pub(crate) recovered_bytes: HashMap<BlockId, u64>,
    /// At most this many bytes of those go into one batch (the memory budget).
    pub(crate) batch_bytes: u64,
    pub(crate) first_seq: HashMap<u32, u64>,
    /// The driver's decisions so far (the ledger is derived from it).
    pub(crate) decisions: DriverState,
}

enum Command {
    Added {
        id: BlockId,
        records: u32,
        /// The boundary id that closes its batch (0: the next batch).
        batch: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A stream's blocks up to this boundary id are all recorded.
    Mark {
        stream: u32,
        upto: u64,
    },
    Allocate {
        id: BatchId,
        /// Take every acknowledged block, whatever its stamp, without waiting (the last batch).
        all: bool,
        /// The offset ranges of direct streams, logged with the blocks.
        ranges: Vec<DirectRange>,
        reply: oneshot::Sender<Result<BatchBlocks, String>>,
    },
    Completed {
        id: BatchId,
        blocks: Vec<BlockId>,
        lost: Vec<(BlockId, LossCause)>,
        reply: oneshot::Sender<Result<Ledger, String>>,
    },
    Ledger(oneshot::Sender<Ledger>),
    Close,
}

/// How the other stages reach the tracker. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct TrackerHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl TrackerHandle {
    /// Block `id` is replicated (and in the WAL): log it and queue it for its batch (the one
    /// boundary `batch` closes; 0: the next).
    async fn added(&self, id: BlockId, records: u32, batch: u64) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Added {
                id,
                records,
                batch,
                reply,
            })
            .map_err(|_| "the receiver tracker has stopped".to_string())?;
        rx.await
            .map_err(|_| "the receiver tracker has stopped".to_string())?
    }

    /// Stream `stream` has recorded every block of the batches up to boundary id `upto`.
    fn mark(&self, stream: u32, upto: u64) {
        let _ = self.tx.send(Command::Mark { stream, upto });
    }

    /// The acknowledged blocks of the batches up to `id` become batch `id` (logged first),
    /// once every stream has marked that boundary (or after a short grace: a stream that is
    /// behind does not hold the others back); with `all`, every acknowledged block, now.
    /// `Ok(None)` once the tracker has stopped; `Err` if the allocation could not be logged:
    /// then the blocks stay queued for the next batch, and this one must not run.
    pub(crate) async fn allocate(
        &self,
        id: BatchId,
        all: bool,
        ranges: Vec<DirectRange>,
    ) -> Result<Option<BatchBlocks>, String> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Allocate {
            id,
            all,
            ranges,
            reply,
        };
        if self.tx.send(cmd).is_err() {
            return Ok(None);
        }
        match rx.await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Batch `id` completed (or was given up on), with `lost` blocks: logged, then its
    /// blocks are freed; returns the ledger after it. `Err` if the completion could not be
    /// logged (after retries): then the blocks are kept (a restart runs the batch again, with
    /// the same id). `Ok(None)` once the tracker has stopped.
    pub(crate) async fn completed(
        &self,
        id: BatchId,
        blocks: Vec<BlockId>,
        lost: Vec<(BlockId, LossCause)>,
    ) -> Result<Option<Ledger>, String> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Completed {
                id,
                blocks,
                lost,
                reply,
            })
            .is_err()
        {
            return Ok(None);
        }
        match rx.await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Where every acknowledged record went, per receiver (`None` once stopped).
    pub(crate) async fn ledger(&self) -> Option<Ledger> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Ledger(reply)).ok()?;
        rx.await.ok()
    }
}

/// One receiver's path into the pipeline.
struct Feed {
    generator: Arc<BlockGenerator>,
    durability: Arc<Durability>,
    pusher: Option<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
}

/// The running tracker: its task, the receivers' supervisor and the receivers' feeds (or,
/// with receivers in worker processes, their placements and the driver's ingress).
pub(crate) struct ReceiverTracker {
    handle: TrackerHandle,
    receivers: SupervisorHandle,
    feeds: Vec<Feed>,
    remote: Option<Arc<RemoteReceivers>>,
    /// What `start_receivers` starts.
    starting: Option<Starting>,
    task: Option<JoinHandle<()>>,
}

/// A receiver prepared to start: its definition, generator, block queue and home worker.
type Prepared = (
    PendingReceiver,
    Arc<BlockGenerator>,
    mpsc::Receiver<Cut>,
    watch::Receiver<WorkerId>,
);

/// What the tracker keeps between `start` and `start_receivers`.
struct Starting {
    prepared: Vec<Prepared>,
    remote_hosts: Option<mpsc::UnboundedReceiver<Host>>,
    lost: mpsc::UnboundedReceiver<WorkerId>,
    first_seq: HashMap<u32, u64>,
    wals: HashMap<u32, Arc<Wal>>,
    blocks: BlockManagerMaster,
    block_interval: Duration,
    clock: Option<BatchClock>,
    rates: Option<RateController>,
}

impl std::fmt::Debug for ReceiverTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverTracker")
            .field("receivers", &self.feeds.len())
            .finish_non_exhaustive()
    }
}

impl ReceiverTracker {
    /// Starts the tracker task and prepares each receiver's generator; `start_receivers`
    /// starts them. With `remote_hosts`, the receivers run in worker processes instead (placed
    /// as their receiver hosts arrive there), their blocks taken in by the driver's ingress.
    pub(crate) async fn start(
        cfg: TrackerConfig,
        pending: Vec<PendingReceiver>,
        blocks: BlockManagerMaster,
        cluster: mpsc::UnboundedReceiver<ClusterEvent>,
        from: TrackerStart,
        remote_hosts: Option<mpsc::UnboundedReceiver<Host>>,
    ) -> Result<ReceiverTracker, ContextError> {
        let receivers = Supervisor::start("receivers", cfg.strategy)
            .await
            .map_err(|e| ContextError::Start {
                what: "receivers".into(),
                error: e.to_string(),
            })?;
        let pool = BufferPool::new(cfg.memory_bytes);
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = TrackerHandle { tx };
        let mut homes = Vec::with_capacity(pending.len());
        let mut prepared = Vec::with_capacity(pending.len());
        for p in pending {
            let (generator, queue) = BlockGenerator::starting_at(
                p.stream,
                from.first_seq.get(&p.stream).copied().unwrap_or(0),
                cfg.max_block_bytes,
                cfg.block_queue,
                cfg.rate_limit,
                cfg.rates.as_ref().map(|r| r.cell(p.stream)),
                pool.clone(),
            );
            let (home_tx, home_rx) = watch::channel(p.stream as usize % cfg.workers.max(1));
            homes.push((p.name.clone(), home_tx));
            prepared.push((p, Arc::new(generator), queue, home_rx));
        }
        let wals = from.wals;
        let names = prepared.iter().map(|(p, ..)| p.name.clone()).collect();
        let first_seq = from.first_seq.clone();
        let state = TrackerState {
            decisions: from.decisions,
            names,
            acked: from
                .unallocated
                .into_iter()
                .map(|(id, records)| (id, records, 0))
                .collect(),
            // In-process generators mark every boundary: wait for each from the first one.
            marks: if cfg.clock.is_some() && remote_hosts.is_none() {
                prepared.iter().map(|(p, ..)| (p.stream, 0)).collect()
            } else {
                HashMap::new()
            },
            parked: None,
            tasks: cfg.tasks.clone(),
            grace: cfg
                .clock
                .map_or(Duration::ZERO, |c| (c.interval() / 4).min(MARK_GRACE)),
            recovered_bytes: from.recovered_bytes,
            batch_bytes: from.batch_bytes,
            meta: from.meta.map(|m| Arc::new(Mutex::new(m))),
            wals: wals.clone(),
            homes,
            receivers: receivers.clone(),
            blocks: blocks.clone(),
        };
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(state.run(rx, cluster, lost_tx));
        let mut tracker = ReceiverTracker {
            handle: handle.clone(),
            receivers: receivers.clone(),
            feeds: Vec::new(),
            remote: None,
            starting: None,
            task: Some(task),
        };
        tracker.starting = Some(Starting {
            prepared,
            remote_hosts,
            lost: lost_rx,
            first_seq,
            wals,
            blocks,
            block_interval: cfg.block_interval,
            clock: cfg.clock,
            rates: cfg.rates.clone(),
        });
        Ok(tracker)
    }

    /// Starts the receivers (each with its generator and pusher), or, with receivers in
    /// worker processes, the ingress and the placer. A separate step from `start`, so that
    /// the context holds the tracker while receivers start: a start abandoned or failed
    /// halfway is torn down with the rest (the tracker closed, its logs too).
    pub(crate) async fn start_receivers(&mut self) -> Result<(), ContextError> {
        let Some(start) = self.starting.take() else {
            return Ok(());
        };
        let Starting {
            prepared,
            wals,
            blocks,
            ..
        } = start;
        let (handle, receivers) = (self.handle.clone(), self.receivers.clone());
        if let Some(hosts) = start.remote_hosts {
            let streams = prepared
                .iter()
                .map(|(p, ..)| {
                    let seq = start.first_seq.get(&p.stream).copied().unwrap_or(0);
                    (p.stream, p.name.clone(), seq)
                })
                .collect();
            let (b, t, w) = (blocks.clone(), handle.clone(), wals.clone());
            let push: Push = Arc::new(move |block, home| {
                let (b, t) = (b.clone(), t.clone());
                let wal = w.get(&block.id.stream).cloned();
                Box::pin(async move { push_one(block, &b, home, wal.as_ref(), &t).await })
            });
            let remote = RemoteReceivers::start(streams, hosts, push, start.rates.clone())
                .await
                .map_err(|e| ContextError::Start {
                    what: "the ingress of remote receivers".into(),
                    error: e,
                })?;
            let remote = Arc::new(remote);
            tokio::spawn(forward_losses(start.lost, remote.clone()));
            self.remote = Some(remote);
            return Ok(());
        }
        for (p, generator, queue, home) in prepared {
            let durability = Arc::new(Durability::new());
            let pusher = tokio::spawn(push_blocks(
                p.stream,
                queue,
                blocks.clone(),
                home,
                wals.get(&p.stream).cloned(),
                handle.clone(),
                durability.clone(),
            ));
            let flusher = tokio::spawn(crate::block_generator::flush_every(
                generator.clone(),
                start.block_interval,
                start.clock,
            ));
            self.feeds.push(Feed {
                generator: generator.clone(),
                durability: durability.clone(),
                pusher: Some(pusher),
                flusher: Some(flusher),
            });
            if let Err(e) = (p.start)(receivers.clone(), generator, durability).await {
                tracing::error!(receiver = %p.name, error = %e, "receiver failed to start; stopping what started");
                return Err(ContextError::Start {
                    what: format!("receiver `{}`", p.name),
                    error: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// How the scheduler reaches the tracker.
    pub(crate) fn handle(&self) -> TrackerHandle {
        self.handle.clone()
    }

    /// The receivers' supervisor (its `wait` ends when a failure escalates to it).
    pub(crate) fn receivers(&self) -> &SupervisorHandle {
        &self.receivers
    }

    /// With receivers in worker processes: a failure that escalated there.
    pub(crate) fn remote_failures(&self) -> Option<watch::Receiver<Option<SupervisorError>>> {
        self.remote.as_ref().map(|r| r.failures())
    }

    /// Stops the receivers (their stop hooks run). Graceful: what the generators still buffer
    /// is cut into blocks and every block is acknowledged before this returns. Not graceful:
    /// nothing more is acknowledged (receivers waiting in `store_reliably` are released with
    /// an error, so they do not ack their source).
    pub(crate) async fn stop_receiving(&mut self, graceful: bool) {
        if let Some(r) = &self.remote {
            r.stop(graceful).await;
        }
        if !graceful {
            for f in &mut self.feeds {
                if let Some(p) = &f.pusher {
                    p.abort();
                }
                f.durability.close();
            }
        }
        let _ = self.receivers.shutdown().await;
        for f in &self.feeds {
            f.generator.close().await;
        }
        for f in &mut self.feeds {
            if let Some(p) = f.pusher.take() {
                if !graceful {
                    p.abort();
                }
                let _ = p.await;
            }
            if let Some(t) = f.flusher.take() {
                t.abort();
                let _ = t.await;
            }
        }
    }

    /// Ends the tracker: durability waiters are released, the metadata log and the
    /// write-ahead logs are closed (their writer threads joined). Call after `stop_receiving`
    /// and after the scheduler ended.
    pub(crate) async fn close(&mut self) {
        if let Some(r) = self.remote.take() {
            r.close();
        }
        for f in &self.feeds {
            f.durability.close();
        }
        let _ = self.handle.tx.send(Command::Close);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Blocks of one receiver replicated at once. Each `put` waits for k acknowledgements, which
/// from worker processes take a round trip and a copy per replica: one block at a time left
/// the link idle most of the time. Their acknowledgements (and the tracker's records) stay in
/// order.
const PUSH_WINDOW: usize = 4;

/// Replicates each cut block (and appends it to the write-ahead log, concurrently), up to
/// [`PUSH_WINDOW`] at once; in order, has the tracker log and queue each, and settles its
/// durability. Marks pass through in order: the tracker hears of one after every block
/// before it is recorded.
async fn push_blocks(
    stream: u32,
    queue: mpsc::Receiver<Cut>,
    blocks: BlockManagerMaster,
    home: watch::Receiver<WorkerId>,
    wal: Option<Arc<Wal>>,
    tracker: TrackerHandle,
    durability: Arc<Durability>,
) {
    use futures::{FutureExt, StreamExt};
    let cut = futures::stream::unfold(queue, |mut q| async move { q.recv().await.map(|b| (b, q)) });
    let replicated = cut
        .map(|cut| match cut {
            Cut::Block(block, batch) => futures::future::Either::Left(
                replicate(block, batch, &blocks, *home.borrow(), wal.as_ref()).map(Pushed::Block),
            ),
            Cut::Mark(upto) => {
                futures::future::Either::Right(futures::future::ready(Pushed::Mark(upto)))
            }
        })
        .buffered(PUSH_WINDOW);
    let mut replicated = std::pin::pin!(replicated);
    while let Some(pushed) = replicated.next().await {
        match pushed {
            Pushed::Block(r) => {
                let seq = r.id.seq;
                let outcome = record(r, &blocks, &tracker).await;
                durability.settle(seq, outcome);
            }
            Pushed::Mark(upto) => tracker.mark(stream, upto),
        }
    }
}

/// One block into the pipeline: replicated (preferring `home`) and appended to the
/// write-ahead log concurrently, then logged and queued by the tracker. `Err`: not durable,
/// not acknowledged (its replicas and memory are given back).
async fn push_one(
    block: Block,
    blocks: &BlockManagerMaster,
    home: WorkerId,
    wal: Option<&Arc<Wal>>,
    tracker: &TrackerHandle,
) -> Result<(), String> {
    let r = replicate(block, 0, blocks, home, wal).await;
    record(r, blocks, tracker).await
}

/// A block pushed, or a mark passed through.
enum Pushed {
    Block(Replicated),
    Mark(u64),
}

/// A block replicated (or not) and appended to the write-ahead log (or not).
struct Replicated {
    id: BlockId,
    records: u32,
    batch: u64,
    outcome: Result<(), String>,
    put_ok: bool,
}

/// Replicates `block` (its memory reserved first) and appends it to the write-ahead log,
/// concurrently. The append is handed to the log now, so blocks are logged in call order.
fn replicate(
    block: Block,
    batch: u64,
    blocks: &BlockManagerMaster,
    home: WorkerId,
    wal: Option<&Arc<Wal>>,
) -> impl std::future::Future<Output = Replicated> + Send + 'static {
    let (id, records, bytes) = (block.id, block.records, block.len_bytes());
    let appended = wal.map(|w| w.append(block.clone()));
    let blocks = blocks.clone();
    async move {
        let permit = match blocks.reserve(bytes).await {
            Ok(p) => p,
            Err(e) => {
                return Replicated {
                    id,
                    records,
                    batch,
                    outcome: Err(e.to_string()),
                    put_ok: false,
                }
            }
        };
        let put = blocks.put(block, home, Some(permit));
        let (wal_result, put_result) = match appended {
            Some(appended) => {
                let (a, b) = tokio::join!(appended, put);
                if let (Ok(location), Ok(_)) = (&a, &b) {
                    // Should its replicas all be lost, it is read back from the log.
                    blocks.logged(id, location.clone());
                }
                (a.map(|_| ()).map_err(|e| e.to_string()), b)
            }
            None => (Ok(()), put.await),
        };
        let put_ok = put_result.is_ok();
        let outcome = match (wal_result, put_result) {
            (Ok(()), Ok(_)) => Ok(()),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e.to_string()),
        };
        Replicated {
            id,
            records,
            batch,
            outcome,
            put_ok,
        }
    }
}

/// Has the tracker log and queue a replicated block; on any failure, frees what it holds.
async fn record(
    r: Replicated,
    blocks: &BlockManagerMaster,
    tracker: &TrackerHandle,
) -> Result<(), String> {
    let (id, records) = (r.id, r.records);
    let outcome = match r.outcome {
        Ok(()) => tracker.added(id, records, r.batch).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &outcome {
        tracing::error!(block = %id, records, error = %e, "block could not be made durable; not acknowledged");
        // It will never be in a batch: give its replicas and memory back.
        if r.put_ok {
            blocks.free(&[id]);
        }
    }
    outcome
}

/// Hands the workers the tracker saw lost to the placer of remote receivers.
async fn forward_losses(mut lost: mpsc::UnboundedReceiver<WorkerId>, remote: Arc<RemoteReceivers>) {
    while let Some(w) = lost.recv().await {
        remote.worker_lost(w);
    }
}

/// An allocation request waiting for the streams' marks.
struct ParkedAlloc {
    id: BatchId,
    ranges: Vec<DirectRange>,
    reply: oneshot::Sender<Result<BatchBlocks, String>>,
}

/// The state the tracker task owns.
struct TrackerState {
    /// The decisions applied so far, as the metadata log holds them (the log keeps its own
    /// copy for compaction, on the blocking pool; this one is read here, on the runtime).
    decisions: DriverState,
    /// Receiver names, by stream.
    names: Vec<String>,
    /// Acknowledged blocks not allocated to a batch yet, in acknowledgement order, with the
    /// boundary id that closes each one's batch (0: the next batch).
    acked: Vec<(BlockId, u32, u64)>,
    /// Per stream, the last boundary id up to which its blocks are all recorded.
    marks: HashMap<u32, u64>,
    /// An allocation waiting for marks, and until when.
    parked: Option<(ParkedAlloc, tokio::time::Instant)>,
    /// How long an allocation waits for marks.
    grace: Duration,
    /// Told of each acknowledged block (early tasks).
    tasks: Option<TaskRunner>,
    /// Bytes of acknowledged blocks still only in the write-ahead log (recovered, read back
    /// when their batch runs).
    recovered_bytes: HashMap<BlockId, u64>,
    /// At most this many bytes of those per batch.
    batch_bytes: u64,
    meta: Option<Arc<Mutex<MetadataLog>>>,
    wals: HashMap<u32, Arc<Wal>>,
    /// Each receiver's name and the worker its blocks go to first.
    homes: Vec<(String, watch::Sender<WorkerId>)>,
    receivers: SupervisorHandle,
    blocks: BlockManagerMaster,
}

impl TrackerState {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut cluster: mpsc::UnboundedReceiver<ClusterEvent>,
        lost: mpsc::UnboundedSender<WorkerId>,
    ) {
        let mut cluster_open = true;
        loop {
            let parked_until = self.parked.as_ref().map(|(_, until)| *until);
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Close) => break,
                    Some(cmd) => self.command(cmd).await,
                },
                () = sleep_until_some(parked_until) => {
                    if let Some((p, _)) = self.parked.take() {
                        let behind: Vec<u32> = self
                            .marks
                            .iter()
                            .filter(|(_, m)| **m < p.id.0)
                            .map(|(s, _)| *s)
                            .collect();
                        tracing::debug!(id = %p.id, ?behind, "streams did not mark the boundary in time; their late blocks go into the next batch");
                        self.allocate(p.id, false, p.ranges, p.reply).await;
                    }
                },
                event = cluster.recv(), if cluster_open => match event {
                    Some(ClusterEvent::WorkerLost(dead)) => {
                        let _ = lost.send(dead);
                        self.worker_lost(dead).await
                    }
                    Some(ClusterEvent::BlockLost { .. }) => {}
                    None => cluster_open = false,
                },
            }
        }
        // Closing a write-ahead log joins its writer thread: do it off the runtime.
        let wals = std::mem::take(&mut self.wals);
        let meta = self.meta.take();
        let _ = tokio::task::spawn_blocking(move || drop((wals, meta))).await;
    }

    /// How many of the queued blocks the next batch takes: all of them, except that the
    /// recovered blocks it reads back from the write-ahead log stay within the memory budget
    /// (at least one block, so a batch always moves on). The rest wait, in order, for the
    /// next batch.
    fn allocatable(&self, eligible: &[(BlockId, u32, u64)]) -> usize {
        if self.recovered_bytes.is_empty() {
            return eligible.len();
        }
        let mut bytes = 0u64;
        for (i, (id, _, _)) in eligible.iter().enumerate() {
            if let Some(b) = self.recovered_bytes.get(id) {
                if i > 0 && bytes + b > self.batch_bytes {
                    return i;
                }
                bytes += b;
            }
        }
        eligible.len()
    }

    /// Whether every stream that marks boundaries has marked `id`.
    fn marked(&self, id: BatchId) -> bool {
        self.marks.values().all(|m| *m >= id.0)
    }

    /// Batch `id`: the acknowledged blocks of the batches up to it (all of them with `all`),
    /// logged, then handed to the scheduler.
    async fn allocate(
        &mut self,
        id: BatchId,
        all: bool,
        ranges: Vec<DirectRange>,
        reply: oneshot::Sender<Result<BatchBlocks, String>>,
    ) {
        let mut b = BatchBlocks::default();
        // Blocks of later batches (cut after this boundary) stay; stamps only grow along a
        // stream, so each stream keeps a suffix of its blocks, in order.
        let (eligible, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.acked)
            .into_iter()
            .partition(|(_, _, batch)| all || *batch <= id.0);
        let take = self.allocatable(&eligible);
        let mut eligible = eligible;
        let mut rest = eligible.split_off(take);
        rest.extend(later);
        self.acked = rest;
        let mut sizes = Vec::new();
        let mut stamps = HashMap::new();
        for (bid, records, batch) in eligible {
            if let Some(bytes) = self.recovered_bytes.remove(&bid) {
                sizes.push((bid, bytes));
            }
            stamps.insert(bid, batch);
            b.by_stream
                .entry(bid.stream)
                .or_default()
                .push((bid, records));
        }
        for v in b.by_stream.values_mut() {
            v.sort_by_key(|(bid, _)| bid.seq);
        }
        b.ranges = ranges;
        if b.len() > 0 || !b.ranges.is_empty() {
            let alloc = Allocation {
                id: id.0,
                time_ms: id.0,
                blocks: b
                    .by_stream
                    .values()
                    .flatten()
                    .map(|(bid, r)| (bid.stream, bid.seq, *r))
                    .collect(),
                ranges: b.ranges.clone(),
            };
            let logged = alloc.clone();
            if let Err(e) = self.log(move |m| m.allocated(logged)).await {
                // Not logged (rolled back): the batch does not exist. Its blocks go back to
                // the front of the queue, for the next batch.
                tracing::error!(%id, error = %e, "could not log the batch allocation; its blocks wait for the next batch");
                let mut back: Vec<(BlockId, u32, u64)> = b
                    .by_stream
                    .into_values()
                    .flatten()
                    .map(|(bid, r)| (bid, r, stamps.get(&bid).copied().unwrap_or(0)))
                    .collect();
                back.append(&mut self.acked);
                self.acked = back;
                self.recovered_bytes.extend(sizes);
                let _ = reply.send(Err(e));
                return;
            }
            self.decisions.apply(Entry::Alloc(alloc));
        }
        let _ = reply.send(Ok(b));
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Added {
                id,
                records,
                batch,
                reply,
            } => {
                let r = self.log(move |m| m.added(id, records)).await;
                if r.is_ok() {
                    if let Some(tasks) = &self.tasks {
                        tasks.acknowledged(id);
                    }
                    self.acked.push((id, records, batch));
                    self.decisions
                        .apply(Entry::Added((id.stream, id.seq, records)));
                }
                let _ = reply.send(r);
            }
            Command::Allocate {
                id,
                all,
                ranges,
                reply,
            } => {
                if all || self.grace.is_zero() || self.marked(id) {
                    self.allocate(id, all, ranges, reply).await;
                } else {
                    let until = tokio::time::Instant::now() + self.grace;
                    self.parked = Some((ParkedAlloc { id, ranges, reply }, until));
                }
            }
            Command::Mark { stream, upto } => {
                let m = self.marks.entry(stream).or_insert(0);
                *m = (*m).max(upto);
                if self.parked.as_ref().is_some_and(|(p, _)| self.marked(p.id)) {
                    if let Some((p, _)) = self.parked.take() {
                        self.allocate(p.id, false, p.ranges, p.reply).await;
                    }
                }
            }
            Command::Completed {
                id,
                blocks,
                lost,
                reply,
            } => {
                let done = Completion {
                    id: id.0,
                    lost: lost
                        .iter()
                        .map(|(b, cause)| (b.stream, b.seq, *cause))
                        .collect(),
                };
                // Logged when the batch was (it has blocks or offset ranges).
                if self.decisions.pending.contains_key(&id.0) {
                    // Logged before the blocks are released, so that a crash in between
                    // re-runs the batch rather than losing it. A failed write is retried a few
                    // times (a full disk may free up); after that the blocks are kept and the
                    // scheduler stops the context: a restart runs the batch again.
                    let mut attempt = 0u32;
                    loop {
                        let logged = done.clone();
                        match self.log(move |m| m.completed(logged)).await {
                            Ok(()) => break,
                            Err(e) if attempt < COMPLETION_RETRIES => {
                                tracing::warn!(%id, error = %e, attempt, "could not log the batch completion; retrying");
                                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                                attempt += 1;
                            }
                            Err(e) => {
                                tracing::error!(%id, error = %e, "could not log the batch completion; its blocks are kept");
                                let _ = reply.send(Err(e));
                                return;
                            }
                        }
                    }
                }
                self.blocks.free(&blocks);
                let mut per: HashMap<u32, Vec<BlockId>> = HashMap::new();
                for b in blocks {
                    per.entry(b.stream).or_default().push(b);
                }
                for (stream, ids) in per {
                    if let Some(w) = self.wals.get(&stream) {
                        w.processed(ids);
                    }
                }
                self.decisions.apply(Entry::Done(done));
                let _ = reply.send(Ok(self.decisions.ledger(&self.names)));
            }
            Command::Ledger(reply) => {
                let _ = reply.send(self.decisions.ledger(&self.names));
            }
            Command::Close => {}
        }
    }

    /// Writes to the metadata log (fsynced) on the blocking pool.
    async fn log<F>(&self, f: F) -> Result<(), String>
    where
        F: FnOnce(&mut MetadataLog) -> std::io::Result<()> + Send + 'static,
    {
        let Some(meta) = self.meta.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || f(&mut meta.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("metadata log: {e}"))
    }

    /// Re-places the receivers that were on the dead worker and restarts them there.
    async fn worker_lost(&mut self, dead: WorkerId) {
        let live = self.blocks.live_workers().await;
        if live.is_empty() {
            return;
        }
        for (i, (name, home)) in self.homes.iter().enumerate() {
            if *home.borrow() != dead {
                continue;
            }
            let to = live[i % live.len()];
            home.send_replace(to);
            tracing::warn!(receiver = %name, from = dead, to, "worker lost: restarting receiver on another worker");
            let _ = self.receivers.restart_child(name).await;
        }
    }
}

/// Sleeps until `until`, or forever with `None`.
async fn sleep_until_some(until: Option<tokio::time::Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
