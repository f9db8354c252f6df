//! The JobScheduler: batch cuts, allocation, and ordered batch runs.
//!
//! ```text
//!  timer task: every batch interval ──Allocate(batch id)──► ReceiverTracker ──blocks──┐
//!     (recovered batches first, unchanged)                                            │
//!                                                                                     ▼
//!  runner task: batches in order ──► every output operation (tasks on the executors)
//!     ──Completed(batch, blocks)──► ReceiverTracker (logged, freed) ──► BatchInfo report
//!     a failed batch under OnBatchFailure::Stop ──► `ended` channel (the context stops)
//! ```
//!
//! Batch ids are batch times (ms since the epoch) and come after every id a previous run used.
//! The timer never waits for the runner: a slow batch delays the batches after it (scheduling
//! delay), never the cuts. The scheduler reports its own end on a channel; it never calls
//! back into the context.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::batch::{BatchBlocks, BatchInfo, BatchRun, RunStats, TaskRunner};
use crate::batch_clock::{batch_id, BatchClock};
use std::collections::HashMap;

use crate::block::BlockId;
use crate::checkpoint::{CheckpointError, LossCause};
use crate::context::error::ContextError;
use crate::driver::block_manager_master::BlockManagerMaster;
use crate::driver::direct_planner::DirectPlanner;
use crate::driver::rate_controller::RateController;
use crate::driver::receiver_tracker::TrackerHandle;
use crate::driver::recovery::ScheduledBatch;
use crate::driver::restorer::Restorer;
use crate::stream::OutputFn;

/// What to do when a batch fails (a task failed on every attempt, or the output function failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBatchFailure {
    /// Report it (in [`BatchInfo::failed`]) and go on with the next batch.
    Continue,
    /// Stop the context with [`ContextError::BatchFailed`].
    Stop,
}

/// What the scheduler runs and where it reports.
pub(crate) struct SchedulerParts {
    /// The batch boundaries (shared with the block generators).
    pub(crate) clock: BatchClock,
    pub(crate) policy: OnBatchFailure,
    /// Batches a previous run allocated and did not complete.
    pub(crate) rerun: Vec<ScheduledBatch>,
    /// Blocks recovered from the write-ahead log, read back as their batches come.
    pub(crate) restorer: Restorer,
    /// Acknowledged blocks recovery found gone, and why.
    pub(crate) lost_at_restart: HashMap<BlockId, LossCause>,
    pub(crate) tracker: TrackerHandle,
    pub(crate) outputs: Vec<OutputFn>,
    pub(crate) runner: TaskRunner,
    pub(crate) blocks: BlockManagerMaster,
    /// The adaptive rates, fed each batch's figures (backpressure on).
    pub(crate) rates: Option<RateController>,
    pub(crate) reports: broadcast::Sender<BatchInfo>,
    /// Decides the offset ranges of direct streams at each boundary.
    pub(crate) direct: DirectPlanner,
    /// Direct streams' names, by stream id.
    pub(crate) direct_names: HashMap<u32, String>,
}

/// The running scheduler: its timer and runner tasks and its end channel.
#[derive(Debug)]
pub(crate) struct JobScheduler {
    drain: Option<oneshot::Sender<()>>,
    timer: Option<JoinHandle<()>>,
    runner: Option<JoinHandle<()>>,
    ended: Option<oneshot::Receiver<Result<(), ContextError>>>,
}

impl JobScheduler {
    /// Starts the timer and the runner.
    pub(crate) fn start(parts: SchedulerParts) -> JobScheduler {
        // Room for the batches to re-run and the queue's bound.
        let (batch_tx, batch_rx) = mpsc::channel(parts.rerun.len() + QUEUED_BATCHES);
        let (drain_tx, drain_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        // Batches the previous run allocated but did not complete go first, unchanged.
        for batch in parts.rerun {
            let _ = batch_tx.try_send(Ok(batch));
        }
        let timer = tokio::spawn(cut_batches(
            parts.clock,
            parts.tracker.clone(),
            parts.direct,
            batch_tx,
            drain_rx,
        ));
        let runner = Runner {
            restorer: parts.restorer,
            lost_at_restart: parts.lost_at_restart,
            outputs: parts.outputs,
            runner: parts.runner,
            blocks: parts.blocks,
            tracker: parts.tracker,
            reports: parts.reports,
            policy: parts.policy,
            rates: parts.rates,
            direct_names: parts.direct_names,
        };
        let runner = tokio::spawn(async move {
            let tasks = runner.runner.clone();
            let outcome = runner.run(batch_rx).await;
            tasks.clear_early();
            let _ = ended_tx.send(outcome);
        });
        JobScheduler {
            drain: Some(drain_tx),
            timer: Some(timer),
            runner: Some(runner),
            ended: Some(ended_rx),
        }
    }

    /// Resolves when the scheduler ended by itself with an error (a failed batch under
    /// [`OnBatchFailure::Stop`]); pending otherwise. Cancel-safe.
    pub(crate) async fn failed(&mut self) -> ContextError {
        if let Some(rx) = &mut self.ended {
            if let Ok(Err(e)) = rx.await {
                self.ended = None;
                return e;
            }
            self.ended = None;
        }
        std::future::pending().await
    }

    /// Cuts the final batch now, runs every batch still queued, and returns when done.
    pub(crate) async fn drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            let _ = drain.send(());
        }
        if let Some(t) = self.timer.take() {
            let _ = t.await;
        }
        if let Some(r) = self.runner.take() {
            let _ = r.await;
        }
    }

    /// Stops now: queued batches are not run.
    pub(crate) async fn abort(&mut self) {
        for t in [self.timer.take(), self.runner.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Batches cut and not run yet, at most: past this, a boundary is skipped (its blocks go
/// into the next batch), so a job that falls far behind makes batches larger, not a queue
/// longer. The adaptive rate keeps the queue near empty; this is the safety net.
const QUEUED_BATCHES: usize = 16;

/// At every batch boundary, the blocks of the batch it closes become one batch.
async fn cut_batches(
    clock: BatchClock,
    tracker: TrackerHandle,
    mut direct: DirectPlanner,
    batches: mpsc::Sender<Result<ScheduledBatch, ContextError>>,
    mut drain: oneshot::Receiver<()>,
) {
    let mut k: u32 = 0;
    let mut skipped = 0u64;
    loop {
        k += 1;
        let draining = tokio::select! {
            _ = tokio::time::sleep_until(clock.deadline(k)) => false,
            _ = &mut drain => true,
        };
        // The queue is full: no batch at this boundary (the drain batch waits for room).
        let permit = if draining {
            batches.reserve().await
        } else {
            match batches.try_reserve() {
                Ok(p) => Ok(p),
                Err(mpsc::error::TrySendError::Full(())) => {
                    skipped += 1;
                    metrics::counter!(crate::telemetry::BATCHES_SKIPPED_TOTAL).increment(1);
                    if skipped.is_power_of_two() {
                        tracing::warn!(queued = QUEUED_BATCHES, skipped, "batches are queued behind a slow one: a boundary is skipped, its blocks go into the next batch");
                    }
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        };
        let Ok(permit) = permit else { return };
        // The final (drain) batch is cut now rather than at the next boundary, and takes
        // every block acknowledged (the receivers have stopped).
        let time = if draining {
            SystemTime::now().max(clock.previous_time(k) + Duration::from_millis(1))
        } else {
            clock.time(k)
        };
        let id = batch_id(time);
        // The direct streams' ranges, decided now and logged with the batch.
        let ranges = if direct.is_empty() {
            Vec::new()
        } else {
            match direct.plan().await {
                Ok(r) => r,
                Err(e) => {
                    permit.send(Err(ContextError::DirectSource {
                        stream: e.stream,
                        error: e.error,
                    }));
                    return;
                }
            }
        };
        match tracker.allocate(id, draining, ranges.clone()).await {
            Ok(Some(blocks)) => {
                // Logged: the next ranges start where these end.
                direct.commit(&ranges);
                permit.send(Ok((id, time, blocks)));
                if draining {
                    return;
                }
            }
            Ok(None) => return,
            // Not logged: this batch does not exist; its blocks go into the next one.
            Err(_) if !draining => {}
            Err(_) => return,
        }
    }
}

/// A batch's offset ranges per direct stream name.
fn offsets_by_name(
    batch: &BatchBlocks,
    names: &HashMap<u32, String>,
) -> std::collections::BTreeMap<String, Vec<crate::direct::OffsetRange>> {
    let mut out: std::collections::BTreeMap<String, Vec<_>> = Default::default();
    for r in &batch.ranges {
        let name = names
            .get(&r.stream)
            .cloned()
            .unwrap_or_else(|| r.stream.to_string());
        out.entry(name).or_default().push(r.range);
    }
    out
}

/// Runs batches in order.
struct Runner {
    restorer: Restorer,
    lost_at_restart: HashMap<BlockId, LossCause>,
    outputs: Vec<OutputFn>,
    runner: TaskRunner,
    blocks: BlockManagerMaster,
    tracker: TrackerHandle,
    reports: broadcast::Sender<BatchInfo>,
    policy: OnBatchFailure,
    rates: Option<RateController>,
    direct_names: HashMap<u32, String>,
}

impl Runner {
    /// Until the batch channel closes (`Ok`) or a batch fails under the Stop policy.
    async fn run(
        mut self,
        mut batches: mpsc::Receiver<Result<ScheduledBatch, ContextError>>,
    ) -> Result<(), ContextError> {
        while let Some(next) = batches.recv().await {
            let (id, time, batch) = next?;
            let started = SystemTime::now();
            let batch = Arc::new(batch);
            let run = BatchRun {
                id,
                time,
                blocks: batch.clone(),
                runner: self.runner.clone(),
                stats: Arc::new(Mutex::new(RunStats::default())),
            };
            // Its blocks that are only in the write-ahead log go back on the workers first.
            // A log that cannot be read now stops the context: the batch stays pending, and
            // the next start runs it again (or refuses, naming the damage).
            if let Err(e) = self.restorer.restore(&batch, &self.blocks).await {
                tracing::error!(%id, error = %e, "could not read recovered blocks back from the write-ahead log");
                return Err(ContextError::Wal(e));
            }
            let mut failed = None;
            let all = batch.all_ids();
            // A recovered batch whose blocks were all lost (in memory only when the driver
            // died) is not run again: it has nothing to compute, and its outputs may already
            // have been applied before the crash, complete; running them again with no records
            // would replace that result. It is reported with its losses like any other batch.
            let mut all_lost = batch.recovered && !all.is_empty() && batch.ranges.is_empty();
            for b in &all {
                if !all_lost {
                    break;
                }
                all_lost = self.blocks.locations(*b).await.is_empty();
            }
            if all_lost {
                run.stats.lock().unwrap_or_else(|p| p.into_inner()).lost = all.clone();
                tracing::warn!(%id, blocks = all.len(), "recovered batch lost all its blocks; outputs not re-run");
            } else {
                for output in &self.outputs {
                    if let Err(e) = output(run.clone()).await {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let stats = std::mem::take(&mut *run.stats.lock().unwrap_or_else(|p| p.into_inner()));
            let lost: Vec<(BlockId, LossCause)> = stats
                .lost
                .iter()
                .map(|b| {
                    let cause = self
                        .lost_at_restart
                        .get(b)
                        .copied()
                        .unwrap_or(LossCause::WorkerLost);
                    (*b, cause)
                })
                .collect();
            // Early work of these blocks that no output took (one failed) is not needed.
            self.runner.forget(&all);
            if failed.is_none() && !all_lost {
                // Every output ran over these streams: their tasks are all known now.
                self.runner.learned(batch.by_stream.keys().copied());
            }
            // A failed batch that read offset ranges is not skipped (its records would be
            // missing from the output for good): it stays pending, and the context stops;
            // the next start runs it again on the same ranges.
            if let Some(error) = &failed {
                if !batch.ranges.is_empty() {
                    tracing::error!(%id, %error, "a batch of a direct stream failed; stopping with it pending (a restart re-reads its ranges)");
                    metrics::counter!(crate::telemetry::BATCHES_FAILED_TOTAL).increment(1);
                    return Err(ContextError::BatchFailed {
                        id,
                        error: error.clone(),
                    });
                }
            }
            let logged = self.tracker.completed(id, all, lost).await;
            let ended = SystemTime::now();
            let lost_records: u64 = batch
                .by_stream
                .values()
                .flatten()
                .filter(|(id, _)| stats.lost.contains(id))
                .map(|(_, r)| u64::from(*r))
                .sum();
            let info = BatchInfo {
                id,
                records: batch.records(),
                blocks: batch.len(),
                lost_blocks: stats.lost.len(),
                lost_records,
                scheduling_delay: started.duration_since(time).unwrap_or_default(),
                processing_time: ended.duration_since(started).unwrap_or_default(),
                total_delay: ended.duration_since(time).unwrap_or_default(),
                task_retries: stats.retries,
                remote_tasks: stats.remote,
                failed: failed.as_ref().map(|e| e.to_string()),
                ledger: logged.clone().ok().flatten().unwrap_or_default(),
                offsets: offsets_by_name(&batch, &self.direct_names),
            };
            if let Some(rates) = &self.rates {
                let mut per_stream: Vec<(u32, u64)> = batch
                    .by_stream
                    .iter()
                    .map(|(s, blocks)| (*s, blocks.iter().map(|(_, r)| u64::from(*r)).sum()))
                    .collect();
                for r in &batch.ranges {
                    match per_stream.iter_mut().find(|(s, _)| *s == r.stream) {
                        Some((_, n)) => *n += r.range.records,
                        None => per_stream.push((r.stream, r.range.records)),
                    }
                }
                // What the batch cost: its time at the boundary, or, when its tasks ran mostly
                // before it (early tasks), their work spread over the executors, if longer.
                // The time at the boundary alone would read a saturated job as idle.
                let work = stats.busy / self.runner.parallelism();
                rates.batch_done(
                    ended,
                    per_stream,
                    info.processing_time.max(work),
                    info.scheduling_delay,
                );
            }
            if info.lost_blocks > 0 {
                tracing::error!(%id, lost_blocks = info.lost_blocks, lost_records, "batch lost blocks");
            }
            metrics::counter!(crate::telemetry::BATCHES_TOTAL).increment(1);
            metrics::counter!(crate::telemetry::BATCH_RECORDS_TOTAL).increment(info.records);
            tracing::debug!(%id, records = info.records, processing = ?info.processing_time, "batch done");
            for (name, l) in &info.ledger.streams {
                for (kind, n) in [
                    ("stored", l.stored),
                    ("completed", l.completed),
                    ("pending", l.pending),
                    ("lost", l.lost_total()),
                ] {
                    metrics::gauge!(crate::telemetry::LEDGER_RECORDS, "stream" => name.clone(), "kind" => kind)
                        .set(n as f64);
                }
            }
            let _ = self.reports.send(info);
            if let Err(reason) = &logged {
                let reason = reason.clone();
                // The output ran but its completion is not in the log: stop here, keeping
                // the blocks; a restart runs this batch again with the same id.
                return Err(ContextError::Checkpoint(CheckpointError::WriteFailed {
                    file: "metadata.log".into(),
                    reason,
                }));
            }
            if let Some(error) = failed {
                tracing::error!(%id, %error, "batch failed");
                metrics::counter!(crate::telemetry::BATCHES_FAILED_TOTAL).increment(1);
                if self.policy == OnBatchFailure::Stop {
                    return Err(ContextError::BatchFailed { id, error });
                }
            }
        }
        Ok(())
    }
}
