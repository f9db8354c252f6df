//! Early tasks: a block's per-block work starts as soon as the block is acknowledged, not at
//! its batch boundary.
//!
//! ```text
//!  block acknowledged ──► for each task the outputs ran over its stream: start it now
//!                              (executors busy between boundaries, not idle then bursting)
//!  batch boundary ──► the batch's tasks: take each block's early result (waiting for it if it
//!                     is still running), run the rest now; merge and output as before
//!  batch done ──► early work of its blocks not taken (an output that failed) is dropped
//! ```
//!
//! Which tasks a stream needs is learned from the batches themselves: the first batch runs
//! its tasks at the boundary, the next ones find them started. An early task is the same
//! attempt loop as a batch's (retries on a replica, losses found when the block has no replica
//! left), so every promise holds; only when it runs changes. A block whose replicas are all lost
//! after its early work finished is not lost: its partial results are computed already.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::block::BlockId;
use crate::error::BatchError;

/// A task of the job's registry, by its index (`batch::TaskId`'s number).
pub(crate) type Task = u32;

/// A task's outcome: its partial (whether it ran in a worker process, and how long its work
/// took), and the retries; `None`: the block has no replica left.
pub(crate) type Attempted = Result<(Option<Done>, u32), BatchError>;

/// A task's partial result, whether it ran in a worker process, and how long its work took.
pub(crate) type Done = (Box<dyn Any + Send>, bool, std::time::Duration);

/// The early work in flight or done, per block and task. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct EarlyTasks(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// The tasks the outputs ran over each stream's blocks.
    wanted: HashMap<u32, Vec<Task>>,
    started: HashMap<(BlockId, u32), JoinHandle<Attempted>>,
}

impl EarlyTasks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tasks to start now for an acknowledged block of `stream`.
    pub(crate) fn wanted(&self, stream: u32) -> Vec<Task> {
        self.state()
            .wanted
            .get(&stream)
            .cloned()
            .unwrap_or_default()
    }

    /// Keeps the early work of `task` over `block`.
    pub(crate) fn started(&self, block: BlockId, task: Task, work: JoinHandle<Attempted>) {
        if let Some(old) = self.state().started.insert((block, task), work) {
            old.abort();
        }
    }

    /// A batch runs `task` over `blocks` (of one stream): remembered for the next blocks, and
    /// the early work already started for these is handed over (in block order).
    pub(crate) fn take(
        &self,
        blocks: &[BlockId],
        task: Task,
    ) -> Vec<Option<JoinHandle<Attempted>>> {
        let mut s = self.state();
        if let Some(first) = blocks.first() {
            let wanted = s.wanted.entry(first.stream).or_default();
            if !wanted.contains(&task) {
                wanted.push(task);
            }
        }
        blocks
            .iter()
            .map(|b| s.started.remove(&(*b, task)))
            .collect()
    }

    /// Drops (and stops) the early work of these blocks that no output took.
    pub(crate) fn forget(&self, blocks: &[BlockId]) {
        let mut s = self.state();
        if s.started.is_empty() {
            return;
        }
        let tasks: Vec<Task> = s.wanted.values().flatten().copied().collect();
        for b in blocks {
            for t in &tasks {
                if let Some(work) = s.started.remove(&(*b, *t)) {
                    work.abort();
                }
            }
        }
    }

    /// Drops (and stops) all early work (the scheduler has ended).
    pub(crate) fn clear(&self) {
        for (_, work) in self.state().started.drain() {
            work.abort();
        }
    }

    /// Early work started and not taken yet.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.state().started.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seq: u64) -> BlockId {
        BlockId { stream: 0, seq }
    }

    fn done() -> JoinHandle<Attempted> {
        tokio::spawn(async { Ok((None, 0)) })
    }

    #[tokio::test]
    async fn work_is_handed_to_its_batch_once_and_dropped_when_no_output_takes_it() {
        let early = EarlyTasks::default();
        // Nothing is started for a stream before a batch ran its tasks.
        assert!(early.wanted(0).is_empty());
        assert!(early.take(&[block(0)], 3).iter().all(Option::is_none));
        assert_eq!(early.wanted(0), [3]);
        assert!(early.wanted(1).is_empty());
        early.started(block(1), 3, done());
        early.started(block(2), 3, done());
        assert_eq!(early.pending(), 2);
        let taken = early.take(&[block(1)], 3);
        assert!(taken[0].is_some());
        assert!(early.take(&[block(1)], 3)[0].is_none(), "taken once");
        early.forget(&[block(2)]);
        assert_eq!(early.pending(), 0);
        early.started(block(3), 3, done());
        early.clear();
        assert_eq!(early.pending(), 0);
    }
}
