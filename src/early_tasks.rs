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
//!
//! Hence a block is freed (its replicas dropped, its bytes back in the memory budget) as soon
//! as every task its batch will run over it has its partial, not when its batch completes:
//! what the batch needs of it is computed. That holds once a batch ran all its outputs over
//! the block's stream (the stream's tasks are then all known: a job's outputs are fixed when
//! it starts); until then, and for a block whose early work failed, the block stays until its
//! batch completes, as without early tasks. The partials stay in the memory budget, at their
//! encoded size, until the batch completes, so a slow output still makes `store` wait. So the
//! budget holds the blocks not yet processed and the partials not yet merged, not a whole
//! batch of blocks: at full speed a batch interval's records never sit in memory at once.
//! (A write-ahead log keeps its copy until the batch completes, for recovery.)

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use crate::block::BlockId;
use crate::error::BatchError;

/// A task of the job's registry, by its index (`batch::TaskId`'s number).
pub(crate) type Task = u32;

/// A task's outcome: its partial (whether it ran in a worker process, and how long its work
/// took), and the retries; `None`: the block has no replica left.
pub(crate) type Attempted = Result<(Option<Done>, u32), BatchError>;

/// An early task's outcome, and the memory budget its block's partials hold when the block
/// was freed after it (kept with the batch's results until the batch completes).
pub(crate) type Early = (Attempted, Option<OwnedSemaphorePermit>);

/// A task's partial result, whether it ran in a worker process, and how long its work took.
pub(crate) type Done = (Box<dyn Any + Send>, bool, std::time::Duration);

/// The early work in flight or done, per block and task. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct EarlyTasks(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// The tasks the outputs ran over each stream's blocks.
    wanted: HashMap<u32, Vec<Task>>,
    /// Streams whose tasks are all known (a batch ran all its outputs over them).
    known: HashSet<u32>,
    started: HashMap<(BlockId, u32), JoinHandle<Early>>,
    /// Blocks a batch ran (or took) a task over, until the batch is done: no early work
    /// starts for them after that.
    taken: HashSet<BlockId>,
}

impl EarlyTasks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the early work of an acknowledged block: `spawn(tasks, all)` starts the tasks
    /// its stream's outputs ran so far (`all`: they are all its batch will run over it, so the
    /// block may be freed once they are done). Nothing starts if its batch already ran a task
    /// over it. Atomic with [`take`](Self::take): a batch either takes all of a block's early
    /// work or none was started, so a block is never freed under a task its batch runs.
    pub(crate) fn start(
        &self,
        block: BlockId,
        spawn: impl FnOnce(&[Task], bool) -> Vec<(Task, JoinHandle<Early>)>,
    ) {
        let mut s = self.state();
        if s.taken.contains(&block) {
            return;
        }
        let Some(tasks) = s.wanted.get(&block.stream).cloned() else {
            return;
        };
        if tasks.iter().any(|t| s.started.contains_key(&(block, *t))) {
            return; // acknowledged twice: its work is under way
        }
        let all = s.known.contains(&block.stream);
        for (task, work) in spawn(&tasks, all) {
            s.started.insert((block, task), work);
        }
    }

    /// A batch ran all its outputs over blocks of these streams: their tasks are all known.
    pub(crate) fn learned(&self, streams: impl IntoIterator<Item = u32>) {
        let mut s = self.state();
        for stream in streams {
            if s.wanted.contains_key(&stream) {
                s.known.insert(stream);
            }
        }
    }

    /// A batch runs `task` over `blocks` (of one stream): remembered for the next blocks, and
    /// the early work already started for these is handed over (in block order).
    pub(crate) fn take(&self, blocks: &[BlockId], task: Task) -> Vec<Option<JoinHandle<Early>>> {
        let mut s = self.state();
        if let Some(first) = blocks.first() {
            let wanted = s.wanted.entry(first.stream).or_default();
            if !wanted.contains(&task) {
                wanted.push(task);
            }
        }
        let taken = blocks
            .iter()
            .map(|b| s.started.remove(&(*b, task)))
            .collect();
        s.taken.extend(blocks);
        taken
    }

    /// Drops (and stops) the early work of these blocks that no output took.
    pub(crate) fn forget(&self, blocks: &[BlockId]) {
        let mut s = self.state();
        for b in blocks {
            s.taken.remove(b);
        }
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
        let mut s = self.state();
        for (_, work) in s.started.drain() {
            work.abort();
        }
        s.taken.clear();
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

    fn done() -> JoinHandle<Early> {
        tokio::spawn(async { (Ok((None, 0)), None) })
    }

    /// Starts `block`'s early work as the runner would: the tasks and `all` it was given.
    fn start(early: &EarlyTasks, b: BlockId) -> Option<(Vec<Task>, bool)> {
        let mut seen = None;
        early.start(b, |tasks, all| {
            seen = Some((tasks.to_vec(), all));
            tasks.iter().map(|t| (*t, done())).collect()
        });
        seen
    }

    #[tokio::test]
    async fn work_is_handed_to_its_batch_once_and_dropped_when_no_output_takes_it() {
        let early = EarlyTasks::default();
        // Nothing is started for a stream before a batch ran its tasks.
        assert_eq!(start(&early, block(0)), None);
        assert!(early.take(&[block(0)], 3).iter().all(Option::is_none));
        assert_eq!(
            start(&early, block(1)),
            Some((vec![3], false)),
            "not all known before a batch completed"
        );
        early.learned([0, 1]);
        assert_eq!(start(&early, block(2)), Some((vec![3], true)));
        assert_eq!(start(&early, block(2)), None, "started once");
        let other = BlockId { stream: 1, seq: 0 };
        assert_eq!(start(&early, other), None, "a stream no task ran over");
        assert_eq!(early.pending(), 2);
        let taken = early.take(&[block(1)], 3);
        assert!(taken[0].is_some());
        assert!(early.take(&[block(1)], 3)[0].is_none(), "taken once");
        early.forget(&[block(2)]);
        assert_eq!(early.pending(), 0);
        start(&early, block(3));
        early.clear();
        assert_eq!(early.pending(), 0);
    }

    #[tokio::test]
    async fn no_early_work_starts_for_a_block_its_batch_already_ran_over() {
        let early = EarlyTasks::default();
        early.take(&[block(0)], 3);
        early.learned([0]);
        // The batch of block 1 reached it before its acknowledgement did: the batch runs the
        // task itself, so nothing may start (and free the block under it).
        assert!(early.take(&[block(1)], 3)[0].is_none());
        assert_eq!(start(&early, block(1)), None);
        // Once that batch is done, the block id is forgotten.
        early.forget(&[block(1)]);
        assert_eq!(start(&early, block(1)), Some((vec![3], true)));
    }
}
