//! Batches and the executors that run them.
//!
//! ```text
//!  every batch interval: blocks acknowledged since the last batch ──► Batch (id = batch time)
//!  batches run in order; within a batch, one task per block:
//!     task ──► an executor whose worker holds a replica of the block
//!              └─ executor dies (panic) or lost its replica ──► retried on another executor
//!                 holding a replica, up to `task_attempts` (default 4), then the batch fails
//! ```
//!
//! Executors are receivers under a supervisor (Restart on any failure), so a task that panics
//! restarts its executor in place; the scheduler sees the task's reply dropped and retries it.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ractor::ActorRef;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};

pub use crate::block::BatchId;
use crate::block::{Block, BlockId};
use crate::block_manager::WorkerId;
use crate::cluster::protocol::{TaskHostMsg, TaskReply, TaskRequest};
use crate::direct::{read_block, DirectRange, DirectStreams, OffsetRange, DIRECT_STREAM_BASE};
use crate::driver::block_manager_master::BlockManagerMaster;
use crate::early_tasks::{Attempted, EarlyTasks};
pub use crate::error::BatchError;
use crate::error::BoxError;
use crate::receiver::{Receiver, ReceiverContext, ReceiverRef};
use crate::wire::Ser;

/// The records of one batch, as given to [`DStream::for_each_batch`](crate::DStream::for_each_batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<T> {
    /// The batch id (its batch time in ms since the Unix epoch).
    pub id: BatchId,
    /// The batch time: the end of the interval whose blocks form this batch.
    pub time: SystemTime,
    /// The records, in block order (blocks in stream and sequence order).
    pub records: Vec<T>,
    /// For a stream read from a [`DirectSource`](crate::DirectSource): the offset ranges
    /// this batch covers, per partition (write them with the output, in one transaction, for
    /// exactly-once without idempotent keys). Empty for receiver streams.
    pub offsets: Vec<OffsetRange>,
}

/// What happened to one batch, reported to [`StreamingContext::subscribe_batches`](crate::StreamingContext::subscribe_batches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    /// The batch id.
    pub id: BatchId,
    /// Records in the batch's blocks and offset ranges.
    pub records: u64,
    /// Blocks in the batch.
    pub blocks: usize,
    /// Blocks of this batch that were lost (no replica survived) and records in them.
    pub lost_blocks: usize,
    /// Records in lost blocks.
    pub lost_records: u64,
    /// From the batch time to the start of processing.
    pub scheduling_delay: Duration,
    /// From the start to the end of processing.
    pub processing_time: Duration,
    /// From the batch time to the end of processing.
    pub total_delay: Duration,
    /// Task attempts that had to be retried (executor died, replica gone).
    pub task_retries: u32,
    /// Tasks that ran in worker processes (where their block's replica was), the others
    /// ran in the driver's process.
    pub remote_tasks: u32,
    /// Why the batch failed, if it did.
    pub failed: Option<String>,
    /// Where every acknowledged record stands after this batch, per receiver: stored =
    /// completed + pending + lost (each loss with its cause).
    pub ledger: crate::checkpoint::Ledger,
    /// The offset ranges the batch read, per direct stream (by name).
    pub offsets: BTreeMap<String, Vec<OffsetRange>>,
}

/// The work of one task: runs over a block and returns a partial result.
pub(crate) type TaskFn = Arc<dyn Fn(&Block) -> Result<Box<dyn Any + Send>, BoxError> + Send + Sync>;

/// A partial result as bytes, to cross from a worker process to the driver, and back.
type EncodeFn = fn(Box<dyn Any + Send>) -> Result<Vec<u8>, BoxError>;
type DecodeFn = fn(&[u8]) -> Result<Box<dyn Any + Send>, BoxError>;
/// About how many bytes a partial result holds: its encoded size (counted, not encoded).
type WeighFn = fn(&(dyn Any + Send)) -> usize;

/// One task of the job: its work, and how its partial result crosses processes (Tributary's
/// partials are `serde` types, encoded with `postcard`).
#[derive(Clone)]
pub(crate) struct TaskDef {
    pub(crate) run: TaskFn,
    pub(crate) encode: EncodeFn,
    pub(crate) decode: DecodeFn,
    pub(crate) weigh: WeighFn,
    /// The partial's type, for the job's fingerprint.
    output: &'static str,
}

impl TaskDef {
    /// A task whose work `f` returns a `P` for each block.
    pub(crate) fn new<P, F>(f: F) -> TaskDef
    where
        P: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
        F: Fn(&Block) -> Result<P, BoxError> + Send + Sync + 'static,
    {
        TaskDef {
            run: Arc::new(move |b| f(b).map(|p| Box::new(p) as Box<dyn Any + Send>)),
            encode: encode_partial::<P>,
            decode: decode_partial::<P>,
            weigh: weigh_partial::<P>,
            output: std::any::type_name::<P>(),
        }
    }
}

fn encode_partial<P: serde::Serialize + 'static>(
    part: Box<dyn Any + Send>,
) -> Result<Vec<u8>, BoxError> {
    let part = part
        .downcast::<P>()
        .map_err(|_| "a task returned a partial of another type")?;
    Ok(postcard::to_stdvec(&*part)?)
}

fn weigh_partial<P: serde::Serialize + 'static>(part: &(dyn Any + Send)) -> usize {
    part.downcast_ref::<P>().map_or(0, |p| {
        postcard::serialize_with_flavor(p, postcard::ser_flavors::Size::default()).unwrap_or(0)
    })
}

fn decode_partial<P: serde::de::DeserializeOwned + Send + 'static>(
    bytes: &[u8],
) -> Result<Box<dyn Any + Send>, BoxError> {
    Ok(Box::new(postcard::from_bytes::<P>(bytes)?))
}

/// Names a task's work in the job's [`TaskRegistry`]: executors are sent this id, never a
/// closure, so what crosses to a worker stays plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaskId(pub(crate) u32);

/// The job's task functions, built from its definition before it starts, indexed by
/// [`TaskId`]. The same program builds the same registry in the driver and in every worker
/// process; the [fingerprint](TaskRegistry::fingerprint) checks that it did.
#[derive(Clone, Default)]
pub(crate) struct TaskRegistry {
    tasks: Arc<Vec<TaskDef>>,
    fingerprint: u64,
}

impl TaskRegistry {
    /// The job's tasks; `streams` are its receivers' names, in order.
    pub(crate) fn new(tasks: Vec<TaskDef>, streams: &[String]) -> Self {
        // FNV-1a over what a job is made of (stable across processes and builds, unlike
        // std's hasher): its streams, its tasks and their partials' types.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes.iter().chain(&[0xff]) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for s in streams {
            eat(s.as_bytes());
        }
        eat(&(tasks.len() as u64).to_le_bytes());
        for t in &tasks {
            eat(t.output.as_bytes());
        }
        TaskRegistry {
            tasks: Arc::new(tasks),
            fingerprint: h,
        }
    }

    pub(crate) fn get(&self, id: TaskId) -> Option<&TaskDef> {
        self.tasks.get(id.0 as usize)
    }

    /// Identifies the job's definition: a worker process whose job differs is refused.
    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// Why a task attempt did not produce a result.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("executor's worker does not hold the block")]
    NotLocal,
    #[error("executor died while running the task")]
    ExecutorDied,
    /// A direct stream's source is unavailable (retried with backoff, not counted as an
    /// attempt, within [`SOURCE_PATIENCE`]).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

/// A task attempt's partial result and how long its work took.
pub(crate) type Worked = (Box<dyn Any + Send>, Duration);

pub(crate) enum ExecMsg {
    Run {
        block: BlockId,
        /// Live workers holding a replica; the executor reads from its own worker when it is
        /// one of them, from the first otherwise (a remote read).
        locations: Vec<WorkerId>,
        task: TaskId,
        reply: oneshot::Sender<Result<Worked, AttemptError>>,
    },
    /// Read a direct stream's offset range, then run `task` over its records.
    RunRange {
        range: DirectRange,
        task: TaskId,
        reply: oneshot::Sender<Result<Worked, AttemptError>>,
    },
}

impl ractor::Message for ExecMsg {}

/// An executor: runs tasks over blocks held by its worker.
pub(crate) struct Executor {
    pub(crate) worker: WorkerId,
    pub(crate) blocks: BlockManagerMaster,
    pub(crate) tasks: TaskRegistry,
    /// The job's direct streams (their ranges are read here).
    pub(crate) direct: DirectStreams,
    /// The block size: a range is read as one block.
    pub(crate) max_block_bytes: usize,
}

impl Executor {
    /// Reads `range` from its source as one block.
    async fn read_range(&self, range: &DirectRange) -> Result<Block, AttemptError> {
        read_block(&self.direct, self.max_block_bytes, range)
            .await
            .map_err(|e| {
                if e.retryable {
                    AttemptError::Unavailable(e.text)
                } else {
                    AttemptError::Failed(e.text)
                }
            })
    }
}

impl Receiver for Executor {
    type Msg = ExecMsg;
    type State = u64;
    type Record = ();

    async fn pre_start(&self, _ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        Ok(0)
    }

    async fn handle(
        &self,
        _ctx: &ReceiverContext<Self>,
        msg: ExecMsg,
        done: &mut u64,
    ) -> Result<(), BoxError> {
        let (block, task, reply) = match msg {
            ExecMsg::Run {
                block,
                locations,
                task,
                reply,
            } => {
                let from = if locations.contains(&self.worker) || locations.is_empty() {
                    self.worker
                } else {
                    locations[0]
                };
                let Some(block) = self.blocks.get_from(from, block).await else {
                    let _ = reply.send(Err(AttemptError::NotLocal));
                    return Ok(());
                };
                (block, task, reply)
            }
            ExecMsg::RunRange { range, task, reply } => match self.read_range(&range).await {
                Ok(block) => (block, task, reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
            },
        };
        let Some(work) = self.tasks.get(task).map(|t| t.run.clone()) else {
            let _ = reply.send(Err(AttemptError::Failed(format!("unknown task {task:?}"))));
            return Ok(());
        };
        // User code runs on the blocking pool, never on the runtime's worker threads, so a
        // slow or blocking task cannot stall receivers, timers or supervision. A panic in
        // `work` is re-raised here: `reply` is dropped (the scheduler retries elsewhere) and
        // the supervisor restarts this executor in place.
        let result = match tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            work(&block).map(|part| (part, started.elapsed()))
        })
        .await
        {
            Ok(r) => r.map_err(|e| AttemptError::Failed(e.to_string())),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(AttemptError::Failed(e.to_string())),
        };
        *done += 1;
        let _ = reply.send(result);
        Ok(())
    }
}

/// One attempt on an executor of this process: the message `msg` makes, and its answer (a
/// dropped reply is an executor that died: it restarts in place, the attempt is retried).
async fn ask_local(
    exec: &ReceiverRef<ExecMsg>,
    msg: impl FnOnce(oneshot::Sender<Result<Worked, AttemptError>>) -> ExecMsg,
) -> Result<Worked, AttemptError> {
    let (tx, rx) = oneshot::channel();
    if exec.send(msg(tx)).is_err() {
        return Err(AttemptError::ExecutorDied);
    }
    rx.await.unwrap_or(Err(AttemptError::ExecutorDied))
}

/// Where a task can run.
pub(crate) enum ExecutorRef {
    /// An executor in this process: reads any block (from a worker process's block store
    /// when no replica is in this process).
    Local(ReceiverRef<ExecMsg>),
    /// A task slot of a worker process's executor: runs tasks over the blocks its process
    /// holds; `gone` turns `true` when the process is lost.
    Remote {
        actor: ActorRef<TaskHostMsg>,
        gone: watch::Receiver<bool>,
    },
}

/// One place to run tasks, and the tasks sent to it and not answered yet.
struct Slot {
    id: u64,
    worker: WorkerId,
    node: Option<u64>,
    exec: ExecutorRef,
    in_flight: AtomicUsize,
}

impl Slot {
    fn running(&self) -> bool {
        match &self.exec {
            ExecutorRef::Local(r) => r.is_running(),
            ExecutorRef::Remote { actor, gone } => {
                !*gone.borrow() && actor.get_status() == ractor::ActorStatus::Running
            }
        }
    }
}

/// The executors tasks can run on: the driver's own (fixed) and the task slots of worker
/// processes (they come and go with their processes). Cheap to clone.
#[derive(Clone)]
pub(crate) struct ExecutorPool(Arc<Mutex<PoolState>>);

struct PoolState {
    /// Copied on write: a batch's tasks pick from a snapshot.
    slots: Arc<Vec<Arc<Slot>>>,
    gone: HashMap<u64, watch::Sender<bool>>,
    next_id: u64,
    /// Workers `0..in_process` are in this process.
    in_process: usize,
}

impl ExecutorPool {
    /// A pool whose workers `0..in_process_workers` live in this process.
    pub(crate) fn new(in_process_workers: usize) -> Self {
        ExecutorPool(Arc::new(Mutex::new(PoolState {
            slots: Arc::default(),
            gone: HashMap::new(),
            next_id: 0,
            in_process: in_process_workers,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, worker: WorkerId, node: Option<u64>, exec: ExecutorRef) {
        let mut s = self.state();
        let id = s.next_id;
        s.next_id += 1;
        let mut slots = Vec::clone(&s.slots);
        slots.push(Arc::new(Slot {
            id,
            worker,
            node,
            exec,
            in_flight: AtomicUsize::new(0),
        }));
        s.slots = Arc::new(slots);
    }

    /// An executor in this process, next to in-process worker `worker` (`usize::MAX`: none).
    pub(crate) fn add_local(&self, worker: WorkerId, exec: ReceiverRef<ExecMsg>) {
        self.push(worker, None, ExecutorRef::Local(exec));
    }

    /// The executor of the worker process `node`, whose block store is worker `worker`,
    /// running up to `slots` tasks at once.
    pub(crate) fn add_remote(
        &self,
        worker: WorkerId,
        node: u64,
        actor: ActorRef<TaskHostMsg>,
        slots: usize,
    ) {
        let gone = {
            let mut s = self.state();
            s.gone
                .entry(node)
                .or_insert_with(|| watch::channel(false).0)
                .subscribe()
        };
        for _ in 0..slots.max(1) {
            let exec = ExecutorRef::Remote {
                actor: actor.clone(),
                gone: gone.clone(),
            };
            self.push(worker, Some(node), exec);
        }
    }

    /// The worker process `node` is lost: its task slots are removed, and the tasks running
    /// there end as failed attempts (retried on a replica).
    pub(crate) fn remove_node(&self, node: u64) {
        let mut s = self.state();
        if let Some(gone) = s.gone.remove(&node) {
            let _ = gone.send(true);
        }
        let slots = s
            .slots
            .iter()
            .filter(|slot| slot.node != Some(node))
            .cloned()
            .collect();
        s.slots = Arc::new(slots);
    }

    fn snapshot(&self) -> (Arc<Vec<Arc<Slot>>>, usize) {
        let s = self.state();
        (s.slots.clone(), s.in_process)
    }
}

/// The executors of a context and the policy to run tasks on them.
#[derive(Clone)]
pub(crate) struct TaskRunner {
    pool: ExecutorPool,
    tasks: TaskRegistry,
    pub(crate) blocks: BlockManagerMaster,
    pub(crate) attempts: u32,
    next: Arc<AtomicUsize>,
    /// Tasks started as their blocks are acknowledged (`None`: only at the batch boundary).
    early: Option<EarlyTasks>,
}

impl std::fmt::Debug for TaskRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRunner")
            .field("attempts", &self.attempts)
            .field("early", &self.early.is_some())
            .finish_non_exhaustive()
    }
}

/// Decrements an executor's in-flight count when the attempt ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Output of running one stream's tasks over a batch.
pub(crate) struct TaskOutputs {
    /// Partial results, in block order (lost blocks omitted).
    pub(crate) parts: Vec<Box<dyn Any + Send>>,
    pub(crate) lost: Vec<BlockId>,
    pub(crate) retries: u32,
    /// Tasks that ran in worker processes.
    pub(crate) remote: u32,
    /// Time the tasks' work took, summed (not their waits).
    pub(crate) busy: Duration,
    /// The memory budget the partials of blocks freed after their early work hold.
    pub(crate) held: Vec<OwnedSemaphorePermit>,
}

/// How long a range's read waits for an unavailable source (a broker restarting) before its
/// batch fails (and, being a direct stream's, stops the context with the batch pending).
pub(crate) const SOURCE_PATIENCE: Duration = Duration::from_secs(60);

/// Partials larger than this are decoded on the blocking pool, not on the runtime.
const DECODE_INLINE_BYTES: usize = 64 << 10;

/// How much busier (in tasks) an executor holding a replica may be before one that must read
/// the block from another process is chosen instead: a block is megabytes, a partial small.
/// Measured (cluster bench, 2 worker processes, 3 runs each): never reading across processes
/// when a holder is usable gave 2.34–2.53 M records/s; with this penalty the driver's idle
/// executors take ~10% of the tasks and it gave 2.76–3.00 M.
const CROSS_PROCESS_READ_PENALTY: usize = 8;

impl TaskRunner {
    pub(crate) fn new(
        pool: ExecutorPool,
        tasks: TaskRegistry,
        blocks: BlockManagerMaster,
        attempts: u32,
        early: bool,
    ) -> Self {
        TaskRunner {
            pool,
            tasks,
            blocks,
            attempts,
            next: Arc::new(AtomicUsize::new(0)),
            early: early.then(EarlyTasks::default),
        }
    }

    /// Block `block` is acknowledged: the tasks its stream's outputs run start now (early
    /// tasks on), their results kept for its batch.
    pub(crate) fn acknowledged(&self, block: BlockId) {
        let Some(early) = &self.early else {
            return;
        };
        early.start(block, |tasks, all| {
            // When these are all its batch's tasks over the block, the last to succeed frees
            // it (see `early_tasks`), the partials' weight staying in the memory budget until
            // the batch completes; a failed one leaves the block to its batch.
            let done = all.then(|| Arc::new((AtomicUsize::new(tasks.len()), AtomicUsize::new(0))));
            tasks
                .iter()
                .map(|&task| {
                    let (me, done) = (self.clone(), done.clone());
                    let work = tokio::spawn(async move {
                        let attempted = me.run_one(block, TaskId(task)).await;
                        let mut held = None;
                        if let (Some(done), Ok((Some((part, _, _)), _))) = (&done, &attempted) {
                            let weight =
                                me.tasks.get(TaskId(task)).map_or(0, |t| (t.weigh)(&**part));
                            done.1.fetch_add(weight, Ordering::AcqRel);
                            if done.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                                let weight = done.1.load(Ordering::Acquire);
                                held = me.blocks.processed(block, weight).await;
                            }
                        }
                        (attempted, held)
                    });
                    (task, work)
                })
                .collect()
        });
    }

    /// A batch ran all its outputs over blocks of these streams (see [`EarlyTasks::learned`]).
    pub(crate) fn learned(&self, streams: impl IntoIterator<Item = u32>) {
        if let Some(early) = &self.early {
            early.learned(streams);
        }
    }

    /// How many tasks can do work at once: the task slots of worker processes, and this
    /// process's executors up to its cores (more executors than cores share them).
    pub(crate) fn parallelism(&self) -> u32 {
        let (slots, _) = self.pool.snapshot();
        let local = slots
            .iter()
            .filter(|s| matches!(s.exec, ExecutorRef::Local(_)))
            .count();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = local.min(cores) + (slots.len() - local);
        u32::try_from(n.max(1)).unwrap_or(u32::MAX)
    }

    /// The batch of these blocks is done: early work no output took is dropped.
    pub(crate) fn forget(&self, blocks: &[BlockId]) {
        if let Some(early) = &self.early {
            early.forget(blocks);
        }
    }

    /// All early work is dropped (the scheduler has ended).
    pub(crate) fn clear_early(&self) {
        if let Some(early) = &self.early {
            early.clear();
        }
    }

    /// Runs `task` over every block (concurrently across executors), taking the results of
    /// tasks started early.
    pub(crate) async fn run(
        &self,
        blocks: &[BlockId],
        task: TaskId,
    ) -> Result<TaskOutputs, BatchError> {
        let started = match &self.early {
            Some(early) => early.take(blocks, task.0),
            None => Vec::new(),
        };
        let mut started = started.into_iter();
        let futures = blocks.iter().map(|b| {
            let early = started.next().flatten();
            async move {
                match early {
                    Some(work) => match work.await {
                        Ok(r) => r,
                        // Stopped (or it panicked, which the attempt loop never does): now.
                        Err(_) => (self.run_one(*b, task).await, None),
                    },
                    None => (self.run_one(*b, task).await, None),
                }
            }
        });
        let results = futures::future::join_all(futures).await;
        let mut out = TaskOutputs {
            parts: Vec::with_capacity(blocks.len()),
            lost: Vec::new(),
            retries: 0,
            remote: 0,
            busy: Duration::ZERO,
            held: Vec::new(),
        };
        for (block, (r, held)) in blocks.iter().zip(results) {
            out.held.extend(held);
            let (part, retries) = r?;
            out.retries += retries;
            match part {
                Some((p, remote, busy)) => {
                    out.parts.push(p);
                    out.remote += u32::from(remote);
                    out.busy += busy;
                }
                None => out.lost.push(*block),
            }
        }
        Ok(out)
    }

    /// Runs `task` over the records of each direct-stream range (read where the task runs:
    /// an executor of this process or of a worker process; a failed attempt reads the same
    /// range again, on another executor).
    pub(crate) async fn run_ranges(
        &self,
        ranges: &[DirectRange],
        task: TaskId,
    ) -> Result<TaskOutputs, BatchError> {
        let futures = ranges.iter().map(|r| self.run_range(r, task));
        let results = futures::future::join_all(futures).await;
        let mut out = TaskOutputs {
            parts: Vec::with_capacity(ranges.len()),
            lost: Vec::new(),
            retries: 0,
            remote: 0,
            busy: Duration::ZERO,
            held: Vec::new(),
        };
        for r in results {
            let ((part, busy), retries, remote) = r?;
            out.parts.push(part);
            out.retries += retries;
            out.remote += u32::from(remote);
            out.busy += busy;
        }
        Ok(out)
    }

    /// One range's task with retries, on the least busy executor (of this process or a
    /// worker process): its partial, its retries, and whether it ran in a worker process.
    async fn run_range(
        &self,
        range: &DirectRange,
        task: TaskId,
    ) -> Result<(Worked, u32, bool), BatchError> {
        let mut tried: Vec<u64> = Vec::new();
        let mut last_error = String::from("not attempted");
        let id = BlockId {
            stream: range.stream,
            seq: range.range.from,
        };
        let started = tokio::time::Instant::now();
        let mut waits = 0u32;
        let mut attempt = 0;
        while attempt < self.attempts {
            // Any executor can read a range (the source is defined in every process of the
            // job): the least busy, one not tried yet if possible.
            let (slots, _) = self.pool.snapshot();
            let usable = |s: &&Arc<Slot>| s.running();
            let slot = slots
                .iter()
                .filter(usable)
                .filter(|s| !tried.contains(&s.id))
                .min_by_key(|s| s.in_flight.load(Ordering::Relaxed))
                .or_else(|| {
                    slots
                        .iter()
                        .filter(usable)
                        .min_by_key(|s| s.in_flight.load(Ordering::Relaxed))
                })
                .cloned();
            let Some(slot) = slot else {
                return Err(BatchError::NoExecutor);
            };
            tracing::trace!(slot = slot.id, node = ?slot.node, "range task placed");
            tried.push(slot.id);
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = {
                let _in_flight = InFlight(&slot.in_flight);
                match &slot.exec {
                    ExecutorRef::Local(exec) => {
                        ask_local(exec, |reply| ExecMsg::RunRange {
                            range: range.clone(),
                            task,
                            reply,
                        })
                        .await
                    }
                    ExecutorRef::Remote { actor, gone } => {
                        let request = TaskRequest {
                            block: id,
                            task: task.0,
                            range: Some(range.clone()),
                        };
                        self.run_remote(actor, gone.clone(), request).await
                    }
                }
            };
            match result {
                Ok(worked) => return Ok((worked, attempt, slot.node.is_some())),
                // The source is away: the same range, again, after a backoff, not counted
                // as an attempt (within the patience).
                Err(AttemptError::Unavailable(e)) if started.elapsed() < SOURCE_PATIENCE => {
                    tried.pop();
                    waits += 1;
                    let wait = Duration::from_millis(50 << waits.min(5));
                    if waits.is_power_of_two() {
                        tracing::warn!(partition = range.range.partition, from = range.range.from, error = %e, ?wait, "direct source unavailable while reading a range; retrying");
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => last_error = e.to_string(),
            }
            attempt += 1;
            tracing::warn!(block = %id, partition = range.range.partition, from = range.range.from, until = range.range.until, attempt, error = %last_error, "direct range task failed; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(6))).await;
        }
        Err(BatchError::RangeTaskFailed {
            partition: range.range.partition,
            from: range.range.from,
            until: range.range.until,
            attempts: self.attempts,
            last_error,
        })
    }

    /// One task with retries: its partial and whether it ran in a worker process, and the
    /// retries. `None`: the block has no replica left (lost, reported).
    async fn run_one(&self, block: BlockId, task: TaskId) -> Attempted {
        let mut tried: Vec<u64> = Vec::new();
        let mut last_error = String::from("not attempted");
        for attempt in 0..self.attempts {
            let locations = self.blocks.locations(block).await;
            if locations.is_empty() {
                return Ok((None, attempt));
            }
            let Some(slot) = self.pick(&locations, &tried, attempt == 0) else {
                return Err(BatchError::NoExecutor);
            };
            tried.push(slot.id);
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = {
                let _in_flight = InFlight(&slot.in_flight);
                match &slot.exec {
                    ExecutorRef::Local(exec) => {
                        ask_local(exec, |reply| ExecMsg::Run {
                            block,
                            locations: locations.clone(),
                            task,
                            reply,
                        })
                        .await
                    }
                    ExecutorRef::Remote { actor, gone } => {
                        let request = TaskRequest {
                            block,
                            task: task.0,
                            range: None,
                        };
                        self.run_remote(actor, gone.clone(), request).await
                    }
                }
            };
            match result {
                Ok((part, busy)) => return Ok((Some((part, slot.node.is_some(), busy)), attempt)),
                Err(e) => last_error = e.to_string(),
            }
            tracing::warn!(%block, attempt = attempt + 1, error = %last_error, "task attempt failed; retrying");
            // Give failure detection (a dead worker or executor) a moment before the next try.
            tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(6))).await;
        }
        Err(BatchError::TaskFailed {
            block,
            attempts: self.attempts,
            last_error,
        })
    }

    /// One attempt on a worker process's executor; its partial comes back as bytes.
    async fn run_remote(
        &self,
        actor: &ActorRef<TaskHostMsg>,
        mut gone: watch::Receiver<bool>,
        request: TaskRequest,
    ) -> Result<Worked, AttemptError> {
        let task = TaskId(request.task);
        let def = self
            .tasks
            .get(task)
            .ok_or_else(|| AttemptError::Failed(format!("unknown task {task:?}")))?;
        let decode = def.decode;
        let (tx, rx) = oneshot::channel();
        let request = Ser::of(request);
        actor
            .send_message(TaskHostMsg::Run(request, tx.into()))
            .map_err(|_| AttemptError::ExecutorDied)?;
        let lost = async move {
            if gone.wait_for(|g| *g).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let reply = tokio::select! {
            r = rx => r.map_err(|_| AttemptError::ExecutorDied)?,
            () = lost => return Err(AttemptError::ExecutorDied),
        };
        match reply {
            TaskReply::Done(bytes, busy_us) if bytes.len() <= DECODE_INLINE_BYTES => decode(&bytes)
                .map(|p| (p, Duration::from_micros(busy_us)))
                .map_err(|e| AttemptError::Failed(format!("a partial result did not decode: {e}"))),
            TaskReply::Done(bytes, busy_us) => {
                match tokio::task::spawn_blocking(move || decode(&bytes)).await {
                    Ok(r) => r.map(|p| (p, Duration::from_micros(busy_us))).map_err(|e| {
                        AttemptError::Failed(format!("a partial result did not decode: {e}"))
                    }),
                    Err(e) => Err(AttemptError::Failed(e.to_string())),
                }
            }
            TaskReply::NotLocal => Err(AttemptError::NotLocal),
            TaskReply::Failed(e) => Err(AttemptError::Failed(e)),
            TaskReply::Unavailable(e) => Err(AttemptError::Unavailable(e)),
            TaskReply::Damaged => Err(AttemptError::Failed(
                "the worker's reply arrived damaged".into(),
            )),
        }
    }

    /// The executor for an attempt. One that can run it: a worker process's slot only where
    /// its process holds a replica; one in this process anywhere (reading remotely if needed).
    /// First attempt: the least busy, preferring a replica's holder (ties), and much preferring
    /// one that need not read the block from another process. Retries: a holder not tried
    /// yet if possible.
    fn pick(&self, locations: &[WorkerId], tried: &[u64], first: bool) -> Option<Arc<Slot>> {
        let (slots, in_process) = self.pool.snapshot();
        let n = slots.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let order = (0..n).map(|i| &slots[(start + i) % n]);
        let holds = |s: &&Arc<Slot>| locations.contains(&s.worker);
        let usable =
            |s: &&Arc<Slot>| s.running() && (matches!(s.exec, ExecutorRef::Local(_)) || holds(s));
        let replica_here = locations.iter().any(|w| *w < in_process);
        let cost = |s: &&Arc<Slot>| {
            let load = s.in_flight.load(Ordering::Relaxed);
            let cross = matches!(s.exec, ExecutorRef::Local(_)) && !replica_here;
            (
                load + if cross { CROSS_PROCESS_READ_PENALTY } else { 0 },
                !holds(s),
            )
        };
        let chosen = if first {
            order.clone().filter(usable).min_by_key(cost)
        } else {
            order
                .clone()
                .find(|s| usable(s) && holds(s) && !tried.contains(&s.id))
                .or_else(|| order.clone().find(|s| usable(s) && holds(s)))
                .or_else(|| order.clone().find(|s| usable(s) && !tried.contains(&s.id)))
                .or_else(|| order.clone().find(usable))
        };
        chosen.cloned()
    }
}

/// Blocks of one batch, per stream, in sequence order.
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchBlocks {
    pub(crate) by_stream: BTreeMap<u32, Vec<(BlockId, u32)>>,
    /// A batch allocated before a driver restart, run again by recovery.
    pub(crate) recovered: bool,
    /// The offset ranges of direct streams, in stream and partition order.
    pub(crate) ranges: Vec<DirectRange>,
}

impl BatchBlocks {
    pub(crate) fn ids(&self, stream: u32) -> Vec<BlockId> {
        self.by_stream
            .get(&stream)
            .map(|v| v.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default()
    }

    pub(crate) fn all_ids(&self) -> Vec<BlockId> {
        self.by_stream
            .values()
            .flatten()
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn records(&self) -> u64 {
        let ranges: u64 = self.ranges.iter().map(|r| r.range.records).sum();
        self.by_stream
            .values()
            .flatten()
            .map(|(_, r)| u64::from(*r))
            .sum::<u64>()
            + ranges
    }

    /// The ranges of direct stream `stream`.
    pub(crate) fn ranges_of(&self, stream: u32) -> Vec<DirectRange> {
        self.ranges
            .iter()
            .filter(|r| r.stream == stream)
            .cloned()
            .collect()
    }

    /// The offset ranges of direct stream `stream`, as handed to its outputs.
    pub(crate) fn offsets(&self, stream: u32) -> Vec<OffsetRange> {
        self.ranges
            .iter()
            .filter(|r| r.stream == stream)
            .map(|r| r.range)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_stream.values().map(Vec::len).sum()
    }
}

/// Everything an output operation needs to run over one batch.
#[derive(Clone)]
pub(crate) struct BatchRun {
    pub(crate) id: BatchId,
    pub(crate) time: SystemTime,
    pub(crate) blocks: Arc<BatchBlocks>,
    pub(crate) runner: TaskRunner,
    pub(crate) stats: Arc<std::sync::Mutex<RunStats>>,
}

/// Accumulated over the output operations of one batch.
#[derive(Debug, Default)]
pub(crate) struct RunStats {
    pub(crate) lost: Vec<BlockId>,
    pub(crate) retries: u32,
    pub(crate) remote: u32,
    /// Time the tasks' work took, summed.
    pub(crate) busy: Duration,
    /// The memory budget the batch's partials hold (of blocks freed after their early
    /// work): returned when the batch completes.
    pub(crate) held: Vec<OwnedSemaphorePermit>,
}

impl BatchRun {
    /// Runs `task` over the blocks of `stream`, recording lost blocks and retries.
    pub(crate) async fn tasks(
        &self,
        stream: u32,
        task: TaskId,
    ) -> Result<Vec<Box<dyn Any + Send>>, BatchError> {
        let out = if stream >= DIRECT_STREAM_BASE {
            self.runner
                .run_ranges(&self.blocks.ranges_of(stream), task)
                .await?
        } else {
            self.runner.run(&self.blocks.ids(stream), task).await?
        };
        if let Ok(mut s) = self.stats.lock() {
            for id in out.lost {
                if !s.lost.contains(&id) {
                    s.lost.push(id);
                }
            }
            s.retries += out.retries;
            s.remote += out.remote;
            s.busy += out.busy;
            s.held.extend(out.held);
        }
        Ok(out.parts)
    }
}
