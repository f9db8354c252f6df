//! Telemetry: metric names and the named events that write them.
//!
//! Every supervision decision is one [`SupervisionEvent`]; its `emit` writes a
//! `tracing` line, bumps the metrics below (through the `metrics` facade: install any recorder to
//! collect them) and publishes the event on the tree's broadcast stream
//! ([`SupervisorHandle::subscribe`](crate::SupervisorHandle::subscribe)). Events are emitted per
//! failure or lifecycle change, never per record.

use std::fmt;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::supervisor::decider::Directive;

/// Counter: supervision decisions, labelled `directive`.
pub const SUPERVISOR_DECISIONS_TOTAL: &str = "tributary_supervisor_decisions_total";
/// Counter: in-place restarts that completed (start hook succeeded).
pub const SUPERVISOR_RESTARTS_TOTAL: &str = "tributary_supervisor_restarts_total";
/// Counter: restarts refused because the child's restart limit was reached.
pub const SUPERVISOR_RESTART_LIMIT_EXCEEDED_TOTAL: &str =
    "tributary_supervisor_restart_limit_exceeded_total";
/// Counter: children that stopped for good because of a Stop decision.
pub const SUPERVISOR_CHILDREN_STOPPED_TOTAL: &str = "tributary_supervisor_children_stopped_total";

/// One observable supervision event. Cloned to every subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisionEvent {
    /// Path of the supervisor whose strategy applies, e.g. `root/ingest`.
    pub supervisor: Arc<str>,
    /// Path of the child concerned, e.g. `root/ingest/socket-1`.
    pub child: Arc<str>,
    /// What happened.
    pub kind: EventKind,
}

/// What a [`SupervisionEvent`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The child started for the first time.
    Started,
    /// The child failed and the supervisor's strategy decided.
    Failed {
        /// The error's text (`Display`).
        error: String,
        /// The decision, after the restart limit was applied.
        directive: Directive,
        /// Restarts of this child in the current window, this one included when it is a restart.
        restarts_in_window: u32,
        /// Whether a Restart was turned into `directive` because the limit was reached.
        limit_exceeded: bool,
    },
    /// The child's state was rebuilt in place and it is processing messages again.
    Restarted {
        /// Restarts of this child in the current window.
        restarts_in_window: u32,
        /// `false` when the restart came from a sibling's or ancestor's restart (all-for-one, or
        /// an escalation decided as Restart higher up): those do not use the child's budget.
        counted: bool,
    },
    /// The child stopped for good; its supervisor recorded the reason.
    Stopped {
        /// Why it stopped.
        reason: String,
    },
    /// The child ended on its own, cleanly. Not a failure.
    Completed,
    /// The child was stopped because its supervisor stopped (shutdown, or a Stop or escalation
    /// higher up); its stop hook ran.
    ShutDown,
    /// The root supervisor ended the tree because a failure escalated to it.
    TreeFailed {
        /// The error's text.
        error: String,
    },
}

impl fmt::Display for SupervisionEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EventKind::Started => write!(f, "{} started", self.child),
            EventKind::Failed {
                error,
                directive,
                restarts_in_window,
                limit_exceeded,
            } => {
                write!(
                    f,
                    "{} failed ({error}) -> {directive} [restarts in window: {restarts_in_window}",
                    self.child
                )?;
                if *limit_exceeded {
                    f.write_str(", limit exceeded")?;
                }
                f.write_str("]")
            }
            EventKind::Restarted {
                restarts_in_window,
                counted,
            } => write!(
                f,
                "{} restarted [restarts in window: {restarts_in_window}{}]",
                self.child,
                if *counted { "" } else { ", uncounted" }
            ),
            EventKind::Stopped { reason } => write!(f, "{} stopped: {reason}", self.child),
            EventKind::Completed => write!(f, "{} completed", self.child),
            EventKind::ShutDown => write!(f, "{} shut down with its supervisor", self.child),
            EventKind::TreeFailed { error } => write!(f, "tree {} failed: {error}", self.child),
        }
    }
}

impl SupervisionEvent {
    /// Writes the `tracing` line and the metrics, then publishes the event on `bus`.
    pub(crate) fn emit(self, bus: &EventBus) {
        match &self.kind {
            EventKind::Started => {
                tracing::debug!(supervisor = %self.supervisor, child = %self.child, "child started")
            }
            EventKind::Failed {
                error,
                directive,
                restarts_in_window,
                limit_exceeded,
            } => {
                metrics::counter!(SUPERVISOR_DECISIONS_TOTAL, "directive" => directive.as_str())
                    .increment(1);
                if *limit_exceeded {
                    metrics::counter!(SUPERVISOR_RESTART_LIMIT_EXCEEDED_TOTAL).increment(1);
                }
                match directive {
                    Directive::Resume => tracing::warn!(
                        supervisor = %self.supervisor, child = %self.child, %error,
                        %directive, restarts_in_window, limit_exceeded, "child failed"
                    ),
                    _ => tracing::error!(
                        supervisor = %self.supervisor, child = %self.child, %error,
                        %directive, restarts_in_window, limit_exceeded, "child failed"
                    ),
                }
            }
            EventKind::Restarted {
                restarts_in_window,
                counted,
            } => {
                metrics::counter!(SUPERVISOR_RESTARTS_TOTAL).increment(1);
                tracing::info!(
                    supervisor = %self.supervisor, child = %self.child,
                    restarts_in_window, counted, "child restarted"
                );
            }
            EventKind::Stopped { reason } => {
                metrics::counter!(SUPERVISOR_CHILDREN_STOPPED_TOTAL).increment(1);
                tracing::warn!(supervisor = %self.supervisor, child = %self.child, %reason, "child stopped")
            }
            EventKind::Completed => {
                tracing::info!(supervisor = %self.supervisor, child = %self.child, "child completed")
            }
            EventKind::ShutDown => {
                tracing::debug!(supervisor = %self.supervisor, child = %self.child, "child shut down")
            }
            EventKind::TreeFailed { error } => {
                tracing::error!(root = %self.child, %error, "supervision tree failed")
            }
        }
        bus.publish(self);
    }
}

/// The broadcast stream of one supervision tree. A subscriber that falls more than
/// [`EventBus::CAPACITY`] events behind is told how many it missed
/// (`broadcast::error::RecvError::Lagged`): events are never dropped silently.
#[derive(Debug, Clone)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<SupervisionEvent>,
}

impl EventBus {
    /// Events buffered per subscriber.
    pub(crate) const CAPACITY: usize = 4096;

    pub(crate) fn new() -> Self {
        EventBus {
            tx: broadcast::channel(Self::CAPACITY).0,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<SupervisionEvent> {
        self.tx.subscribe()
    }

    fn publish(&self, event: SupervisionEvent) {
        // No subscriber is fine: the event was logged and counted.
        let _ = self.tx.send(event);
    }
}

/// Counter: blocks lost because no replica survived.
pub const BLOCKS_LOST_TOTAL: &str = "tributary_blocks_lost_total";
/// Counter: records in lost blocks.
pub const RECORDS_LOST_TOTAL: &str = "tributary_records_lost_total";
/// Counter: block replicas re-created after a worker died.
pub const BLOCKS_REREPLICATED_TOTAL: &str = "tributary_blocks_rereplicated_total";
/// Counter: workers lost.
pub const WORKERS_LOST_TOTAL: &str = "tributary_workers_lost_total";
/// Counter: worker processes relaunched by a [`crate::cluster::WorkerLauncher`].
pub const WORKER_RELAUNCHES_TOTAL: &str = "tributary_worker_relaunches_total";
/// Counter: blocks whose replicas were all lost, read back from the write-ahead log.
pub const BLOCKS_RELOADED_TOTAL: &str = "tributary_blocks_reloaded_total";
/// Counter: worker processes that joined the driver.
pub const WORKERS_JOINED_TOTAL: &str = "tributary_workers_joined_total";
/// Counter: worker processes declared lost because they missed the heartbeat deadline.
pub const HEARTBEAT_MISSES_TOTAL: &str = "tributary_heartbeat_misses_total";
/// Counter: connections closed before they authenticated (e.g. a wrong cookie).
pub const CLUSTER_REFUSED_TOTAL: &str = "tributary_cluster_refused_total";
/// Counter: tasks a worker process's executor ran (counted in that process).
pub const TASKS_RUN_REMOTELY_TOTAL: &str = "tributary_tasks_run_remotely_total";
/// Counter: data links opened by worker processes (the driver's count; one per worker
/// incarnation unless a link fails).
pub const DATA_LINKS_OPENED_TOTAL: &str = "tributary_data_links_opened_total";
/// Counter: blocks the driver sent to worker processes on data links (the rest went through
/// the `ractor_cluster` session).
pub const DATA_LINK_BLOCKS_TOTAL: &str = "tributary_data_link_blocks_total";
/// Counter: of those, blocks that went through shared memory (worker processes on the
/// driver's host, Linux): one memfd per block whatever the number of replicas on this host.
pub const SHARED_MEMORY_BLOCKS_TOTAL: &str = "tributary_shared_memory_blocks_total";
/// Counter: worker processes refused because their job is not the driver's (another program,
/// or another version of it).
pub const WORKERS_REFUSED_JOB_TOTAL: &str = "tributary_workers_refused_job_total";
/// Counter: batches completed (or failed).
pub const BATCHES_TOTAL: &str = "tributary_batches_total";
/// Counter: batches that failed.
pub const BATCHES_FAILED_TOTAL: &str = "tributary_batches_failed_total";
/// Counter: batch boundaries skipped because batches were queued behind a slow one (their
/// blocks went into the next batch).
pub const BATCHES_SKIPPED_TOTAL: &str = "tributary_batches_skipped_total";
/// Counter: records in completed batches.
pub const BATCH_RECORDS_TOTAL: &str = "tributary_batch_records_total";
/// Gauge: a receiver's adaptive ingestion rate (records per second), labelled `stream` (its
/// stream id); see [`Backpressure`](crate::Backpressure).
pub const RECEIVER_RATE: &str = "tributary_receiver_rate";
/// Counter: write-ahead log syncs (group commits).
pub const WAL_SYNCS_TOTAL: &str = "tributary_wal_syncs_total";
/// Counter: metadata log appends that failed and were rolled back.
pub const METADATA_WRITE_FAILURES_TOTAL: &str = "tributary_metadata_write_failures_total";
/// Counter: write-ahead log writes or syncs that failed (the blocks were not acknowledged).
pub const WAL_WRITE_FAILURES_TOTAL: &str = "tributary_wal_write_failures_total";
/// Counter: times a failed write-ahead log was repaired and took appends again.
pub const WAL_RECOVERED_TOTAL: &str = "tributary_wal_recovered_total";
/// Gauge: the ledger, per receiver stream (`stream` label) and `kind` (stored, completed,
/// pending, lost), after each batch.
pub const LEDGER_RECORDS: &str = "tributary_ledger_records";
/// Counter: batch boundaries at which a direct stream's source was unavailable (its records
/// wait in the source; retried with backoff), labelled `stream` (its name).
pub const DIRECT_SOURCE_UNAVAILABLE_TOTAL: &str = "tributary_direct_source_unavailable_total";
/// Counter: records read from direct streams' offset ranges, labelled `stream` (its name).
pub const DIRECT_RECORDS_TOTAL: &str = "tributary_direct_records_total";
