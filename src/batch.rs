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
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

pub use crate::block::BatchId;
use crate::block::{Block, BlockId};
use crate::block_manager::WorkerId;
use crate::driver::block_manager_master::BlockManagerMaster;
pub use crate::error::BatchError;
use crate::error::BoxError;
use crate::receiver::{Receiver, ReceiverContext, ReceiverRef};

/// The records of one batch, as given to [`DStream::for_each_batch`](crate::DStream::for_each_batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<T> {
    /// The batch id (its batch time in ms since the Unix epoch).
    pub id: BatchId,
    /// The batch time: the end of the interval whose blocks form this batch.
    pub time: SystemTime,
    /// The records, in block order (blocks in stream and sequence order).
    pub records: Vec<T>,
}

/// What happened to one batch, reported to [`StreamingContext::subscribe_batches`](crate::StreamingContext::subscribe_batches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    /// The batch id.
    pub id: BatchId,
    /// Records in the batch's blocks.
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
    /// Why the batch failed, if it did.
    pub failed: Option<String>,
    /// Where every acknowledged record stands after this batch, per receiver: stored =
    /// completed + pending + lost (each loss with its cause).
    pub ledger: crate::checkpoint::Ledger,
}

/// The work of one task: runs over a block and returns a partial result.
pub(crate) type TaskFn = Arc<dyn Fn(&Block) -> Result<Box<dyn Any + Send>, BoxError> + Send + Sync>;

/// Names a task's work in the job's [`TaskRegistry`]: executors are sent this id, never a
/// closure, so what crosses to a worker stays plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaskId(pub(crate) u32);

/// The job's task functions, built from its definition before it starts, indexed by
/// [`TaskId`].
#[derive(Clone, Default)]
pub(crate) struct TaskRegistry(Arc<Vec<TaskFn>>);

impl TaskRegistry {
    pub(crate) fn new(tasks: Vec<TaskFn>) -> Self {
        TaskRegistry(Arc::new(tasks))
    }

    fn get(&self, id: TaskId) -> Option<&TaskFn> {
        self.0.get(id.0 as usize)
    }
}

/// Why a task attempt did not produce a result.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("executor's worker does not hold the block")]
    NotLocal,
    #[error("executor died while running the task")]
    ExecutorDied,
    #[error("{0}")]
    Failed(String),
}

pub(crate) enum ExecMsg {
    Run {
        block: BlockId,
        /// Live workers holding a replica; the executor reads from its own worker when it is
        /// one of them, from the first otherwise (a remote read).
        locations: Vec<WorkerId>,
        task: TaskId,
        reply: oneshot::Sender<Result<Box<dyn Any + Send>, AttemptError>>,
    },
}

impl ractor::Message for ExecMsg {}

/// An executor: runs tasks over blocks held by its worker.
pub(crate) struct Executor {
    pub(crate) worker: WorkerId,
    pub(crate) blocks: BlockManagerMaster,
    pub(crate) tasks: TaskRegistry,
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
        let ExecMsg::Run {
            block,
            locations,
            task,
            reply,
        } = msg;
        let Some(work) = self.tasks.get(task).cloned() else {
            let _ = reply.send(Err(AttemptError::Failed(format!("unknown task {task:?}"))));
            return Ok(());
        };
        let from = if locations.contains(&self.worker) || locations.is_empty() {
            self.worker
        } else {
            locations[0]
        };
        let Some(block) = self.blocks.get_from(from, block).await else {
            let _ = reply.send(Err(AttemptError::NotLocal));
            return Ok(());
        };
        // User code runs on the blocking pool, never on the runtime's worker threads, so a
        // slow or blocking task cannot stall receivers, timers or supervision. A panic in
        // `work` is re-raised here: `reply` is dropped (the scheduler retries elsewhere) and
        // the supervisor restarts this executor in place.
        let result = match tokio::task::spawn_blocking(move || work(&block)).await {
            Ok(r) => r.map_err(|e| AttemptError::Failed(e.to_string())),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(AttemptError::Failed(e.to_string())),
        };
        *done += 1;
        let _ = reply.send(result);
        Ok(())
    }
}

/// The executors of a context and the policy to run tasks on them.
#[derive(Clone)]
pub(crate) struct TaskRunner {
    pub(crate) executors: Arc<Vec<(WorkerId, ReceiverRef<ExecMsg>)>>,
    pub(crate) blocks: BlockManagerMaster,
    pub(crate) attempts: u32,
    next: Arc<AtomicUsize>,
    /// Tasks sent to each executor and not answered yet.
    in_flight: Arc<Vec<AtomicUsize>>,
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
}

impl TaskRunner {
    pub(crate) fn new(
        executors: Vec<(WorkerId, ReceiverRef<ExecMsg>)>,
        blocks: BlockManagerMaster,
        attempts: u32,
    ) -> Self {
        let in_flight = Arc::new((0..executors.len()).map(|_| AtomicUsize::new(0)).collect());
        TaskRunner {
            executors: Arc::new(executors),
            in_flight,
            blocks,
            attempts,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Runs `task` over every block (concurrently across executors).
    pub(crate) async fn run(
        &self,
        blocks: &[BlockId],
        task: TaskId,
    ) -> Result<TaskOutputs, BatchError> {
        let futures = blocks.iter().map(|b| self.run_one(*b, task));
        let results = futures::future::join_all(futures).await;
        let mut out = TaskOutputs {
            parts: Vec::with_capacity(blocks.len()),
            lost: Vec::new(),
            retries: 0,
        };
        for (block, r) in blocks.iter().zip(results) {
            let (part, retries) = r?;
            out.retries += retries;
            match part {
                Some(p) => out.parts.push(p),
                None => out.lost.push(*block),
            }
        }
        Ok(out)
    }

    /// One task with retries. `Ok(None)`: the block has no replica left (lost, reported).
    async fn run_one(
        &self,
        block: BlockId,
        task: TaskId,
    ) -> Result<(Option<Box<dyn Any + Send>>, u32), BatchError> {
        let mut tried: Vec<usize> = Vec::new();
        let mut last_error = String::from("not attempted");
        for attempt in 0..self.attempts {
            let locations = self.blocks.locations(block).await;
            if locations.is_empty() {
                return Ok((None, attempt));
            }
            let Some(exec) = self.pick(&locations, &tried, attempt == 0) else {
                return Err(BatchError::NoExecutor);
            };
            tried.push(exec);
            self.in_flight[exec].fetch_add(1, Ordering::Relaxed);
            let _in_flight = InFlight(&self.in_flight[exec]);
            let (tx, rx) = oneshot::channel();
            let msg = ExecMsg::Run {
                block,
                locations: locations.clone(),
                task,
                reply: tx,
            };
            if self.executors[exec].1.send(msg).is_err() {
                last_error = "executor has stopped".into();
                continue;
            }
            match rx.await {
                Ok(Ok(part)) => return Ok((Some(part), attempt)),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = AttemptError::ExecutorDied.to_string(),
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

    /// The executor for an attempt. First attempt: the least busy running executor,
    /// preferring one whose worker holds a replica (others read the block remotely), so that
    /// every executor works even when all replicas sit on one worker (k = 1). Retries: a
    /// running executor whose worker holds a replica, not tried yet if possible.
    fn pick(&self, locations: &[WorkerId], tried: &[usize], first: bool) -> Option<usize> {
        let n = self.executors.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let order = (0..n).map(|i| (start + i) % n);
        let running = |e: &usize| self.executors[*e].1.is_running();
        let local = |e: &usize| locations.contains(&self.executors[*e].0);
        if first {
            let load = |e: &usize| (self.in_flight[*e].load(Ordering::Relaxed), !local(e));
            if let Some(e) = order.clone().filter(running).min_by_key(load) {
                return Some(e);
            }
        }
        order
            .clone()
            .find(|e| running(e) && local(e) && !tried.contains(e))
            .or_else(|| order.clone().find(|e| running(e) && local(e)))
            .or_else(|| order.clone().find(|e| running(e) && !tried.contains(e)))
            .or_else(|| order.clone().find(running))
    }
}

/// Blocks of one batch, per stream, in sequence order.
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchBlocks {
    pub(crate) by_stream: BTreeMap<u32, Vec<(BlockId, u32)>>,
    /// A batch allocated before a driver restart, run again by recovery.
    pub(crate) recovered: bool,
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
        self.by_stream
            .values()
            .flatten()
            .map(|(_, r)| u64::from(*r))
            .sum()
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
}

impl BatchRun {
    /// Runs `task` over the blocks of `stream`, recording lost blocks and retries.
    pub(crate) async fn tasks(
        &self,
        stream: u32,
        task: TaskId,
    ) -> Result<Vec<Box<dyn Any + Send>>, BatchError> {
        let ids = self.blocks.ids(stream);
        let out = self.runner.run(&ids, task).await?;
        if let Ok(mut s) = self.stats.lock() {
            for id in out.lost {
                if !s.lost.contains(&id) {
                    s.lost.push(id);
                }
            }
            s.retries += out.retries;
        }
        Ok(out.parts)
    }
}
