//! The driver: the stages that run a streaming job, each owning its state.
//!
//! ```text
//!  Recovery ─────────► the state the others start from (checkpoint directory, WAL)
//!  Restorer ─────────► recovered blocks read back from the WAL one batch at a time, within
//!                      the memory budget (used by the JobScheduler before each batch)
//!  BlockManagerMaster  where each block lives; k replicas on workers; re-replication; losses
//!  WorkerMonitor ────► worker processes joining and leaving; heartbeats and fencing
//!  ReceiverTracker ──► receivers and their placement, acknowledged blocks, durability,
//!                      metadata log and write-ahead logs
//!  DirectPlanner ────► each batch's offset ranges of direct (replayable) streams, decided
//!                      at the boundary and logged with the batch's blocks
//!  JobScheduler ─────► batch cuts, allocation (asked of the tracker), ordered batch runs;
//!                      reports its own end on a channel
//! ```
//!
//! The context ([`StreamingContext`](crate::StreamingContext)) builds them in this order and
//! tears them down in reverse. Stages talk through messages and handles; what reaches the
//! workers (block stores, executors) is plain data: ids, names and blocks of bytes.

pub(crate) mod block_manager_master;
pub(crate) mod direct_planner;
pub(crate) mod job_scheduler;
pub(crate) mod rate_controller;
pub(crate) mod receiver_tracker;
pub(crate) mod recovery;
pub(crate) mod remote_receivers;
pub(crate) mod restorer;
pub(crate) mod worker_monitor;

pub use job_scheduler::OnBatchFailure;
pub use recovery::RecoveryReport;
