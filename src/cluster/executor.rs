//! The executor of a worker process: runs the job's tasks over the blocks its own block store
//! holds, up to its number of task slots at once, and answers with the partial results as
//! bytes. The job's code is the driver's (the same program defined the same job; the driver
//! checks the fingerprint when the worker joins), so only ids and bytes cross the wire.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;

use crate::batch::{TaskId, TaskRegistry};
use crate::block_manager::WorkerMsg;
use crate::cluster::protocol::{Description, TaskHostMsg, TaskReply, TaskRequest};
use crate::direct::{read_block, DirectStreams};
use crate::wire::Ser;
use crate::wire::Wire;

/// A worker process's executor (an actor, in the [`EXECUTORS`](crate::cluster::protocol::EXECUTORS)
/// group).
pub(crate) struct TaskHost {
    /// This process's block store.
    pub(crate) store: ActorRef<WorkerMsg>,
    pub(crate) tasks: TaskRegistry,
    pub(crate) slots: usize,
    /// The job's direct streams: their ranges are read here when the driver places a
    /// range's task here.
    pub(crate) direct: DirectStreams,
    /// The block size (a range is read as one block).
    pub(crate) max_block_bytes: usize,
    /// Where the driver's refusal (and its reason) goes: the worker exits with it.
    pub(crate) refused: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Actor for TaskHost {
    type Msg = TaskHostMsg;
    type State = Arc<Semaphore>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<TaskHostMsg>,
        _: (),
    ) -> Result<Arc<Semaphore>, ActorProcessingErr> {
        Ok(Arc::new(Semaphore::new(self.slots.max(1))))
    }

    async fn handle(
        &self,
        _: ActorRef<TaskHostMsg>,
        msg: TaskHostMsg,
        slots: &mut Arc<Semaphore>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TaskHostMsg::Describe(reply) => {
                let _ = reply.send(Ser::of(Description {
                    fingerprint: self.tasks.fingerprint(),
                    slots: u32::try_from(self.slots.max(1)).unwrap_or(u32::MAX),
                }));
            }
            TaskHostMsg::Refused(Ser(reason)) => {
                let reason = reason.unwrap_or_else(|| "no reason given".into());
                let _ = self.refused.send(reason);
            }
            TaskHostMsg::Run(Ser(request), reply) => {
                // Each task runs in its own task (the actor goes on receiving), at most
                // `slots` at once.
                let (store, tasks, slots) = (self.store.clone(), self.tasks.clone(), slots.clone());
                let (direct, max_bytes) = (self.direct.clone(), self.max_block_bytes);
                tokio::spawn(async move {
                    let answer = match request {
                        Some(r) => run(store, tasks, slots, r, (direct, max_bytes)).await,
                        None => TaskReply::Failed("a task request arrived damaged".into()),
                    };
                    let _ = reply.send(answer);
                });
            }
        }
        Ok(())
    }
}

/// Runs one task: the block from this process's store, the work on the blocking pool (user
/// code never runs on the runtime's threads), the partial encoded there too.
async fn run(
    store: ActorRef<WorkerMsg>,
    tasks: TaskRegistry,
    slots: Arc<Semaphore>,
    r: TaskRequest,
    (direct, max_bytes): (DirectStreams, usize),
) -> TaskReply {
    let Some(def) = tasks.get(TaskId(r.task)).cloned() else {
        return TaskReply::Failed(format!(
            "task {} is not in this worker's job ({} tasks)",
            r.task,
            tasks.len()
        ));
    };
    let Ok(_permit) = slots.acquire_owned().await else {
        return TaskReply::Failed("the executor is stopping".into());
    };
    let block = match &r.range {
        // A direct stream's range: read from its source, here.
        Some(range) => match read_block(&direct, max_bytes, range).await {
            Ok(block) => block,
            Err(e) if e.retryable => return TaskReply::Unavailable(e.text),
            Err(e) => return TaskReply::Failed(e.text),
        },
        None => match ractor::call!(store, WorkerMsg::Get, Wire::of(r.block)) {
            Ok(Wire(Some(Some(block)))) => block,
            Ok(_) => return TaskReply::NotLocal,
            Err(e) => return TaskReply::Failed(format!("the block store did not answer: {e}")),
        },
    };
    let work = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let part = (def.run)(&block).and_then(|part| (def.encode)(part));
        part.map(|p| (p, started.elapsed()))
    });
    match work.await {
        Ok(Ok((bytes, busy))) => {
            metrics::counter!(crate::telemetry::TASKS_RUN_REMOTELY_TOTAL).increment(1);
            TaskReply::Done(bytes, u64::try_from(busy.as_micros()).unwrap_or(u64::MAX))
        }
        Ok(Err(e)) => TaskReply::Failed(e.to_string()),
        Err(e) if e.is_panic() => TaskReply::Failed(format!(
            "the task panicked: {}",
            crate::error::PanicError::from_payload(e.into_panic())
        )),
        Err(e) => TaskReply::Failed(e.to_string()),
    }
}
