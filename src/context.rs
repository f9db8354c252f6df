//! The streaming context: a thin lifecycle over the driver's stages.
//!
//! ```text
//!  builder ──build()──► StreamingContext ──receiver_stream()──► DStream ──for_each_batch()──► output
//!                              │ start(): the stages, in order
//!                              ▼
//!   Recovery ─► BlockManagerMaster (+ workers) ─► executors ─► ReceiverTracker (+ receivers)
//!            ─► JobScheduler
//!                              │ stop(), a failure escalated by the receivers, or a batch that
//!                              │ failed under OnBatchFailure::Stop
//!                              ▼
//!   the lifecycle task tears the stages down in reverse and publishes the outcome
//! ```
//!
//! Phases: *defining* (streams and outputs are added) → *starting* → *running* → *ended*.
//! Every path ends: a `start` that fails halfway tears down what it built and ends the context
//! with its error; a `stop` during `start` makes `start` undo its work; `stop` and
//! `await_termination` on an ended context return its outcome at once.
//!
//! Stopping gracefully stops the receivers (their stop hooks run), cuts what the block
//! generators still buffer into blocks, waits until every block is acknowledged, runs the
//! remaining batches, then stops the tracker (logs closed), executors and workers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{broadcast, mpsc, watch};

use crate::batch::{BatchInfo, Executor, ExecutorPool, TaskDef, TaskId, TaskRegistry, TaskRunner};
use crate::batch_clock::BatchClock;
use crate::block::{BlockId, Record};
use crate::checkpoint::Ledger;
use crate::cluster::node::DriverNode;
use crate::cluster::{WorkerConfig, WorkerExit};
use crate::config::StreamingContextBuilder;
use crate::direct::{DirectOptions, DirectSource, DirectStream, DirectStreams, DIRECT_STREAM_BASE};
use crate::driver::block_manager_master::BlockManagerMaster;
use crate::driver::direct_planner::DirectPlanner;
use crate::driver::job_scheduler::{JobScheduler, SchedulerParts};
use crate::driver::rate_controller::RateController;
use crate::driver::receiver_tracker::{
    PendingReceiver, ReceiverTracker, Starter, TrackerConfig, TrackerHandle, TrackerStart,
};
use crate::driver::recovery::{recover, RecoveryReport};
use crate::driver::worker_monitor;
use crate::error::{ConfigError, SupervisorError};

pub(crate) mod error;
use crate::receiver::{Receiver, ReceiverSpec};
use crate::store::Store;
use crate::stream::{DStream, OutputFn, OutputRegistry};
use crate::supervisor::{Directive, RestartLimit, Strategy, Supervisor, SupervisorHandle};
use crate::telemetry::SupervisionEvent;
pub use error::ContextError;

impl StreamingContextBuilder {
    /// Validates the configuration and builds a context (nothing runs until `start`).
    pub fn build(self) -> Result<StreamingContext, ConfigError> {
        self.validate()?;
        let (batches, _) = broadcast::channel(1024);
        let (termination, _) = watch::channel(None);
        Ok(StreamingContext {
            inner: Arc::new(Inner {
                config: self,
                defined: Mutex::new(Defined::default()),
                phase: Mutex::new(Phase::Defining),
                batches: Mutex::new(Some(batches)),
                termination,
                recovery: Mutex::new(None),
            }),
        })
    }
}

#[derive(Default)]
struct Defined {
    receivers: Vec<PendingReceiver>,
    direct: Vec<DirectStream>,
    outputs: Vec<OutputFn>,
    tasks: Vec<TaskDef>,
}

impl Defined {
    /// The job's stream names as the checkpoint marker and the job's fingerprint hold them:
    /// receivers, then direct streams.
    fn marker_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.receivers.iter().map(|r| r.name.clone()).collect();
        let direct: Vec<String> = self.direct.iter().map(|d| d.name.clone()).collect();
        names.extend(DirectStreams::marker_names(&direct));
        names
    }

    fn name_taken(&self, name: &str) -> bool {
        self.receivers.iter().any(|r| r.name == name) || self.direct.iter().any(|d| d.name == name)
    }
}

/// Where the context is in its life.
enum Phase {
    /// Streams and outputs are being added.
    Defining,
    /// `start` is building the stages; `stop` records its request here.
    Starting { stop: Option<bool> },
    /// The lifecycle task owns the stages.
    Running(Handles),
    /// Terminated; the outcome is in `termination`.
    Ended,
}

/// What the context keeps of a running job: the way to ask it to stop, and handles for the
/// inspection and fault-injection calls.
struct Handles {
    stop: mpsc::UnboundedSender<bool>,
    receivers: SupervisorHandle,
    blocks: BlockManagerMaster,
    tracker: TrackerHandle,
}

struct Inner {
    config: StreamingContextBuilder,
    defined: Mutex<Defined>,
    phase: Mutex<Phase>,
    /// Taken (closed) when the context terminates, so subscribers see the end of the stream.
    batches: Mutex<Option<broadcast::Sender<BatchInfo>>>,
    termination: watch::Sender<Option<Result<(), ContextError>>>,
    recovery: Mutex<Option<RecoveryReport>>,
}

impl Inner {
    /// The context has terminated with `outcome` (the first outcome is kept).
    fn end(&self, outcome: Result<(), ContextError>) {
        *lock(&self.phase) = Phase::Ended;
        lock(&self.batches).take();
        self.termination.send_if_modified(|t| {
            if t.is_none() {
                *t = Some(outcome);
                true
            } else {
                false
            }
        });
    }

    /// `Err(StoppedDuringStart)` if `stop` was called while starting.
    fn check_stop(&self) -> Result<(), ContextError> {
        match &*lock(&self.phase) {
            Phase::Starting { stop: Some(_) } => Err(ContextError::StoppedDuringStart),
            _ => Ok(()),
        }
    }

    fn running<T>(&self, f: impl FnOnce(&Handles) -> T) -> Option<T> {
        match &*lock(&self.phase) {
            Phase::Running(h) => Some(f(h)),
            _ => None,
        }
    }
}

impl OutputRegistry for Inner {
    fn register(&self, output: OutputFn) -> Result<(), ContextError> {
        if !matches!(*lock(&self.phase), Phase::Defining) {
            return Err(ContextError::AlreadyStarted);
        }
        lock(&self.defined).outputs.push(output);
        Ok(())
    }

    fn register_task(&self, work: TaskDef) -> TaskId {
        // Registered after start (a stream derived too late), it is never run: its output
        // cannot be registered any more.
        let mut d = lock(&self.defined);
        d.tasks.push(work);
        TaskId(u32::try_from(d.tasks.len() - 1).unwrap_or(u32::MAX))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stages of a running job, in the order they are built (each `None` until built).
#[derive(Default)]
struct Stages {
    blocks: Option<BlockManagerMaster>,
    executors: Option<SupervisorHandle>,
    tracker: Option<ReceiverTracker>,
    scheduler: Option<JobScheduler>,
}

impl Stages {
    /// Tears down what was built, in reverse order.
    async fn teardown(&mut self, graceful: bool) {
        if let Some(t) = &mut self.tracker {
            t.stop_receiving(graceful).await;
        }
        if let Some(s) = &mut self.scheduler {
            if graceful {
                s.drain().await;
            } else {
                s.abort().await;
            }
        }
        if let Some(t) = &mut self.tracker {
            t.close().await;
        }
        if let Some(e) = &self.executors {
            let _ = e.shutdown().await;
        }
        if let Some(b) = &self.blocks {
            b.shut_down().await;
        }
    }
}

/// Tears down a start that was abandoned (its future dropped) before it finished.
struct StartGuard {
    stages: Option<Stages>,
    inner: Arc<Inner>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        let Some(mut stages) = self.stages.take() else {
            return;
        };
        let inner = self.inner.clone();
        tracing::warn!("start() was abandoned before it finished; stopping what had started");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                stages.teardown(false).await;
                inner.end(Err(ContextError::StoppedDuringStart));
            });
        } else {
            inner.end(Err(ContextError::StoppedDuringStart));
        }
    }
}

/// Owns the running stages until something ends the job, then tears them down and
/// publishes the outcome. It is never aborted: it is what ends the context.
async fn lifecycle(inner: Arc<Inner>, mut stages: Stages, mut stop: mpsc::UnboundedReceiver<bool>) {
    let receivers = stages.tracker.as_ref().map(|t| t.receivers().clone());
    let remote = stages.tracker.as_ref().and_then(|t| t.remote_failures());
    let escalated_here = async move {
        if let Some(r) = receivers {
            if let Err(e) = r.wait().await {
                if !matches!(e, SupervisorError::Stopped { .. }) {
                    return e;
                }
            }
        }
        std::future::pending().await
    };
    // With receivers in worker processes: a failure that escalated there.
    let escalated_there = async move {
        if let Some(mut rx) = remote {
            if let Ok(e) = rx.wait_for(Option::is_some).await {
                if let Some(e) = e.clone() {
                    return e;
                }
            }
        }
        std::future::pending().await
    };
    let escalated = async move {
        tokio::select! {
            e = escalated_here => e,
            e = escalated_there => e,
        }
    };
    let (outcome, graceful) = {
        let scheduler_failed = async {
            match &mut stages.scheduler {
                Some(s) => s.failed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            g = stop.recv() => (Ok(()), g.unwrap_or(true)),
            e = escalated => {
                tracing::error!(error = %e, "a receiver failure escalated to the context: stopping");
                (Err(ContextError::Receivers(e)), true)
            }
            e = scheduler_failed => (Err(e), false),
        }
    };
    stages.teardown(graceful).await;
    tracing::info!(graceful, ok = outcome.is_ok(), "streaming context stopped");
    inner.end(outcome);
}

/// A streaming job: receivers, the block pipeline, and the batches computed from it.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tributary::StreamingContext;
/// # struct Lines; impl tributary::Receiver for Lines { type Msg = (); type State = (); type Record = String;
/// # async fn pre_start(&self, _: &tributary::ReceiverContext<Self>) -> Result<(), tributary::BoxError> { Ok(()) }
/// # async fn handle(&self, _: &tributary::ReceiverContext<Self>, _: (), _: &mut ()) -> Result<(), tributary::BoxError> { Ok(()) } }
/// let ctx = StreamingContext::builder()
///     .batch_interval(Duration::from_secs(1))
///     .replication(2)
///     .build()?;
/// let lines = ctx.receiver_stream("lines", Lines)?;
/// lines
///     .flat_map(|l: String| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
///     .map(|w| (w, 1u64))
///     .reduce_by_key(|a, b| a + b)
///     .for_each_batch(|batch| println!("{}: {} distinct words", batch.id, batch.records.len()))?;
/// ctx.start().await?;
/// ctx.await_termination().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct StreamingContext {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StreamingContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingContext")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl StreamingContext {
    /// A builder with the defaults.
    pub fn builder() -> StreamingContextBuilder {
        StreamingContextBuilder::default()
    }

    /// Adds a receiver as a stream. It starts with the context, supervised (any failure is
    /// restarted in place, with the configured backoff, at most 10 times per minute; beyond
    /// that the failure escalates and stops the context). Must be called before `start`.
    pub fn receiver_stream<R>(
        &self,
        name: impl Into<String>,
        receiver: R,
    ) -> Result<DStream<R::Record>, ContextError>
    where
        R: Receiver,
        R::Record: Record,
    {
        let name = name.into();
        if !matches!(*lock(&self.inner.phase), Phase::Defining) {
            return Err(ContextError::AlreadyStarted);
        }
        let mut d = lock(&self.inner.defined);
        if d.name_taken(&name) {
            return Err(ConfigError::new(
                "receiver name",
                format!("`{name}` is already used by another stream"),
            )
            .into());
        }
        let stream = u32::try_from(d.receivers.len()).unwrap_or(u32::MAX);
        let backoff = self.inner.config.receiver_backoff;
        let spawn_name = name.clone();
        let start: Starter = Box::new(move |sup, generator, durability| {
            async move {
                let mut spec =
                    ReceiverSpec::new(spawn_name, receiver, Store::blocks(generator, durability));
                if let Some(b) = backoff {
                    spec = spec.backoff(b);
                }
                sup.spawn_receiver(spec).await.map(|_| ())
            }
            .boxed()
        });
        d.receivers.push(PendingReceiver {
            stream,
            name,
            start,
        });
        drop(d);
        Ok(DStream::source(stream, self.inner.clone()))
    }

    /// A stream read from a replayable source by offset, exactly once: at every batch
    /// boundary the driver decides each partition's offset range (from where the last batch
    /// ended, up to what the source holds now), logs the ranges with the batch, and the
    /// batch's tasks read exactly those ranges (a retry or a restart reads the same ranges
    /// again). No receiver, no write-ahead log. Each batch handed to
    /// [`DStream::for_each_batch`] carries its [`offsets`](crate::Batch::offsets); with output
    /// keyed by batch id (or written with the offsets in one transaction), every record is in
    /// the output once, whatever crashes. Recovery needs a checkpoint directory
    /// ([`get_or_create`](Self::get_or_create)); without one, a new run starts from the
    /// source's start offsets.
    ///
    /// The adaptive rate (backpressure) applies; see [`direct_stream_with`](Self::direct_stream_with)
    /// for a fixed rate per partition. A range is read as one block: a record larger than
    /// [`max_block_bytes`](crate::StreamingContextBuilder::max_block_bytes) stops the stream
    /// with an error naming it, never dropped. Ranges are read by the executors in the
    /// driver's process.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tributary::{ByteString, StreamingContext};
    /// use tributary_receivers::file_log::FileLog;
    /// let ctx = StreamingContext::get_or_create("/var/lib/my-job", |b| b.build().map_err(Into::into))?;
    /// ctx.direct_stream("events", FileLog::open("/var/lib/events")?)?
    ///     .map(|line: ByteString| line.len() as u64)
    ///     .for_each_batch(|batch| println!("{} {:?}: {:?}", batch.id, batch.offsets, batch.records))?;
    /// # Ok(()) }
    /// ```
    pub fn direct_stream<S, T>(
        &self,
        name: impl Into<String>,
        source: S,
    ) -> Result<DStream<T>, ContextError>
    where
        S: DirectSource,
        T: Record,
    {
        self.direct_stream_with(name, source, DirectOptions::default())
    }

    /// [`direct_stream`](Self::direct_stream) with settings (a maximum rate per partition).
    pub fn direct_stream_with<S, T>(
        &self,
        name: impl Into<String>,
        source: S,
        options: DirectOptions,
    ) -> Result<DStream<T>, ContextError>
    where
        S: DirectSource,
        T: Record,
    {
        let name = name.into();
        if !matches!(*lock(&self.inner.phase), Phase::Defining) {
            return Err(ContextError::AlreadyStarted);
        }
        if options.max_rate_per_partition == Some(0) {
            return Err(ConfigError::new(
                "max_rate_per_partition",
                "must be at least 1 record per second (leave it unset for no limit)",
            )
            .into());
        }
        let mut d = lock(&self.inner.defined);
        if d.name_taken(&name) {
            return Err(ConfigError::new(
                "direct stream name",
                format!("`{name}` is already used by another stream"),
            )
            .into());
        }
        let stream = DIRECT_STREAM_BASE + u32::try_from(d.direct.len()).unwrap_or(u32::MAX >> 1);
        d.direct.push(DirectStream {
            stream,
            name,
            source: Arc::new(source),
            options,
        });
        drop(d);
        Ok(DStream::source(stream, self.inner.clone()))
    }

    /// Builds a context whose state survives the process: `define` gets a builder with the
    /// checkpoint directory `dir` set, adds its settings and streams (the same ones every time:
    /// closures cannot be stored, so the job is defined again by code, as with Spark's
    /// `getOrCreate`), and returns the context. On an empty directory this is a new job; on a
    /// directory used before, `start` recovers: batches allocated but not completed run again
    /// with the same ids and blocks, unprocessed blocks come back from the write-ahead log, and
    /// [`StreamingContext::recovery_report`] says what was found.
    ///
    /// A foreign, incompatible or unwritable directory is an error here, before anything runs.
    pub fn get_or_create<F>(
        dir: impl AsRef<std::path::Path>,
        define: F,
    ) -> Result<StreamingContext, ContextError>
    where
        F: FnOnce(StreamingContextBuilder) -> Result<StreamingContext, ContextError>,
    {
        let dir = dir.as_ref();
        let ctx = define(StreamingContext::builder().checkpoint_dir(dir))?;
        if ctx.inner.config.checkpoint_dir.as_deref() != Some(dir) {
            return Err(ConfigError::new(
                "checkpoint_dir",
                "get_or_create's directory must be kept by the builder it passes to `define`",
            )
            .into());
        }
        let names = lock(&ctx.inner.defined).marker_names();
        crate::checkpoint::load(dir, &names)?;
        Ok(ctx)
    }

    /// What `start` recovered from the checkpoint directory (`None` for a new job or without
    /// a checkpoint directory).
    pub fn recovery_report(&self) -> Option<RecoveryReport> {
        lock(&self.inner.recovery).clone()
    }

    /// Subscribes to per-batch reports (records, delays, losses, failures).
    ///
    /// The stream ends (`RecvError::Closed`) once the context has terminated; subscribing
    /// after that gives a stream that is already closed.
    pub fn subscribe_batches(&self) -> broadcast::Receiver<BatchInfo> {
        match lock(&self.inner.batches).as_ref() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Subscribes to the supervision events of the receivers (after `start`).
    pub fn supervision_events(
        &self,
    ) -> Result<broadcast::Receiver<SupervisionEvent>, ContextError> {
        self.inner
            .running(|h| h.receivers.subscribe())
            .ok_or(ContextError::NotRunning)
    }

    /// Starts the stages in order: recovery, workers, executors, receivers, the scheduler.
    ///
    /// If a stage fails, what was built is torn down (nothing keeps running), the error is
    /// returned, and the context has ended with it: `stop` and `await_termination` return it
    /// at once. A `stop` called meanwhile makes `start` undo its work and return
    /// [`ContextError::StoppedDuringStart`].
    pub async fn start(&self) -> Result<(), ContextError> {
        let (receivers, direct, outputs, tasks) = {
            let mut phase = lock(&self.inner.phase);
            if !matches!(*phase, Phase::Defining) {
                return Err(ContextError::AlreadyStarted);
            }
            *phase = Phase::Starting { stop: None };
            let mut d = lock(&self.inner.defined);
            let names = d.marker_names();
            (
                std::mem::take(&mut d.receivers),
                DirectStreams(Arc::new(std::mem::take(&mut d.direct))),
                std::mem::take(&mut d.outputs),
                TaskRegistry::new(std::mem::take(&mut d.tasks), &names),
            )
        };
        // If this future is dropped halfway (a caller's timeout), the guard tears down what
        // was built and ends the context, so nothing is left running.
        let mut guard = StartGuard {
            stages: Some(Stages::default()),
            inner: self.inner.clone(),
        };
        let built = match guard.stages.as_mut() {
            Some(stages) => {
                self.build_stages(stages, receivers, direct, outputs, tasks)
                    .await
            }
            None => Err(ContextError::NotRunning),
        };
        let mut stages = guard.stages.take().unwrap_or_default();
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let requested = {
            let mut phase = lock(&self.inner.phase);
            match (&built, &*phase) {
                (Ok((receivers, blocks, tracker)), Phase::Starting { stop: None }) => {
                    *phase = Phase::Running(Handles {
                        stop: stop_tx,
                        receivers: receivers.clone(),
                        blocks: blocks.clone(),
                        tracker: tracker.clone(),
                    });
                    None
                }
                (_, Phase::Starting { stop: Some(g) }) => Some(*g),
                _ => None,
            }
        };
        match (built, requested) {
            // Stopped while starting (and nothing failed on its own): the stop's outcome.
            (Ok(_) | Err(ContextError::StoppedDuringStart), Some(graceful)) => {
                stages.teardown(graceful).await;
                tracing::info!("stopped while starting");
                self.inner.end(Ok(()));
                Err(ContextError::StoppedDuringStart)
            }
            // A stage failed: that error wins, even if a stop was asked for meanwhile.
            (Err(e), _) => {
                tracing::error!(error = %e, "start failed; stopping what had started");
                stages.teardown(false).await;
                self.inner.end(Err(e.clone()));
                Err(e)
            }
            (Ok(_), None) => {
                tokio::spawn(lifecycle(self.inner.clone(), stages, stop_rx));
                let cfg = &self.inner.config;
                tracing::info!(
                    workers = cfg.workers,
                    replication = cfg.replication,
                    executors = cfg.executors,
                    batch_interval = ?cfg.batch_interval,
                    "streaming context started"
                );
                Ok(())
            }
        }
    }

    /// Builds the stages in order into `stages` (so that a failure can tear down what was
    /// built); returns the handles the context keeps while running.
    async fn build_stages(
        &self,
        stages: &mut Stages,
        receivers: Vec<PendingReceiver>,
        direct: DirectStreams,
        outputs: Vec<OutputFn>,
        tasks: TaskRegistry,
    ) -> Result<(SupervisorHandle, BlockManagerMaster, TrackerHandle), ContextError> {
        let cfg = &self.inner.config;
        let start_err = |what: &str, e: &dyn std::fmt::Display| ContextError::Start {
            what: what.to_string(),
            error: e.to_string(),
        };

        // Recovery: file I/O only, on the blocking pool.
        let mut names: Vec<String> = receivers.iter().map(|r| r.name.clone()).collect();
        let direct_names: Vec<String> = direct.0.iter().map(|d| d.name.clone()).collect();
        names.extend(DirectStreams::marker_names(&direct_names));
        let streams: Vec<u32> = receivers.iter().map(|r| r.stream).collect();
        let (dir, wal, wrap) = (
            cfg.checkpoint_dir.clone(),
            cfg.wal,
            cfg.storage_wrap.clone(),
        );
        let every = cfg.checkpoint_every;
        let recovered = tokio::task::spawn_blocking(move || {
            recover(dir.as_deref(), wal, wrap.as_ref(), every, &names, &streams)
        })
        .await
        .map_err(|e| start_err("recovery", &e))??;
        let direct_next = recovered.decisions.direct_next.clone();
        if let Some(r) = &recovered.report {
            report_recovery(r);
        }
        *lock(&self.inner.recovery) = recovered.report.clone();
        self.inner.check_stop()?;

        // Workers and the BlockManagerMaster, with the recovered blocks put back.
        // With a cluster: the node worker processes join, and the WorkerMonitor following it.
        let node = match &cfg.cluster {
            Some(c) => {
                let (node, events) = DriverNode::start(c)
                    .await
                    .map_err(|e| start_err("the cluster node", &e))?;
                Some((Arc::new(node), events, c.heartbeat_deadline))
            }
            None => None,
        };
        let (blocks, cluster) = BlockManagerMaster::start_with(
            cfg.workers,
            cfg.replication,
            cfg.memory_bytes,
            node.as_ref().map(|(n, _, _)| n.clone()),
            recovered.wal_storage.clone(),
        )
        .await
        .map_err(|e| start_err("workers", &e))?;
        // Where tasks run: the executors below, and those of worker processes as they join.
        let pool = ExecutorPool::new(cfg.workers);
        // With receivers in worker processes, their receiver hosts as they join.
        let (hosts_tx, hosts_rx) =
            if cfg.receiver_placement == crate::config::ReceiverPlacement::WorkerProcesses {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
        if let Some((node, events, deadline)) = node {
            tokio::spawn(worker_monitor::membership(
                node,
                events,
                blocks.clone(),
                worker_monitor::Jobs {
                    pool: pool.clone(),
                    fingerprint: tasks.fingerprint(),
                    receiver_hosts: hosts_tx,
                },
                deadline,
            ));
        }
        stages.blocks = Some(blocks.clone());
        // Recovered blocks stay in the log until their batch runs; their memory is taken
        // from the budget now, before any receiver can take it.
        let mut restorer = recovered.restorer;
        restorer
            .reserve(&blocks, cfg.workers)
            .await
            .map_err(|e| start_err("workers", &e))?;

        // Executors: Restart on any failure (a panicking task restarts its executor in place).
        // No cap: the failures come from user code in tasks, which `task_attempts` already
        // bounds per task; capping would shrink the pool for good after ten bad records.
        let exec_strategy = Strategy::one_for_one(10, Duration::from_secs(60))
            .limit(RestartLimit::Unlimited)
            .on_panic(Directive::Restart)
            .otherwise(Directive::Restart);
        let executors = Supervisor::start("executors", exec_strategy)
            .await
            .map_err(|e| start_err("executors", &e))?;
        stages.executors = Some(executors.clone());
        for i in 0..cfg.executors {
            // With no in-process worker (a cluster), every read is remote.
            let worker = i.checked_rem(cfg.workers).unwrap_or(usize::MAX);
            let (store, _unused) = Store::channel(1);
            let exec = Executor {
                worker,
                blocks: blocks.clone(),
                tasks: tasks.clone(),
                direct: direct.clone(),
                max_block_bytes: cfg.max_block_bytes,
            };
            let r = executors
                .spawn_receiver(ReceiverSpec::new(format!("executor-{i}"), exec, store))
                .await
                .map_err(|e| start_err("executors", &e))?;
            pool.add_local(worker, r);
        }
        let runner = TaskRunner::new(
            pool,
            tasks,
            blocks.clone(),
            cfg.task_attempts,
            cfg.early_tasks,
        );
        self.inner.check_stop()?;

        // The ReceiverTracker and the receivers.
        let rates = RateController::new(cfg.backpressure, cfg.batch_interval);
        // The batch boundaries, shared by the generators (which cut at each) and the scheduler.
        let clock = BatchClock::new(cfg.batch_interval, recovered.last_batch);
        let tracker = ReceiverTracker::start(
            TrackerConfig {
                workers: cfg.workers,
                max_block_bytes: cfg.max_block_bytes,
                block_queue: cfg.block_queue,
                rate_limit: cfg.rate_limit,
                rates: rates.clone(),
                memory_bytes: cfg.memory_bytes,
                block_interval: cfg.block_interval,
                clock: Some(clock),
                tasks: Some(runner.clone()),
                strategy: cfg.receivers_strategy(),
            },
            receivers,
            blocks.clone(),
            cluster,
            TrackerStart {
                meta: recovered.meta,
                wals: recovered.wals,
                unallocated: recovered.unallocated,
                recovered_bytes: restorer.sizes(),
                batch_bytes: cfg.memory_bytes as u64,
                first_seq: recovered.first_seq,
                decisions: recovered.decisions,
            },
            hosts_rx,
        )
        .await?;
        let handle = tracker.handle();
        let receivers = tracker.receivers().clone();
        // Held by the stages before any receiver starts: a start abandoned or failed from
        // here on tears the tracker down too.
        let tracker = stages.tracker.insert(tracker);
        tracker.start_receivers().await?;
        self.inner.check_stop()?;

        // The JobScheduler, and the planner of the direct streams' ranges (from where the
        // logged batches ended).
        let planner = DirectPlanner::new(
            direct.clone(),
            direct_next,
            cfg.batch_interval,
            rates.clone(),
            cfg.max_block_bytes,
        );
        let direct_names = direct
            .0
            .iter()
            .map(|d| (d.stream, d.name.clone()))
            .collect();
        stages.scheduler = Some(JobScheduler::start(SchedulerParts {
            clock,
            policy: cfg.on_batch_failure,
            rerun: recovered.rerun,
            restorer,
            lost_at_restart: recovered.lost_at_restart,
            tracker: handle.clone(),
            outputs,
            runner,
            blocks: blocks.clone(),
            rates,
            reports: lock(&self.inner.batches)
                .clone()
                .unwrap_or_else(|| broadcast::channel(1).0),
            direct: planner,
            direct_names,
        }));
        Ok((receivers, blocks, handle))
    }

    /// Runs this process as a worker process of the driver at `cfg.driver`, for this job: one
    /// binary, two roles. The program defines its job (streams and outputs) exactly as the
    /// driver does, then calls this instead of [`start`](Self::start): the process hosts a
    /// block store and an executor that runs the job's tasks over the blocks placed here
    /// (only ids and bytes cross the wire: the code is the same in both processes), and, with
    /// [`ReceiverPlacement::WorkerProcesses`](crate::ReceiverPlacement::WorkerProcesses) on the
    /// driver, the receivers the driver places here. `for_each_batch` functions run on the
    /// driver. The job's settings that matter here (receiver strategy, block size and
    /// interval, rate limit, memory) are this context's: build it as the driver's is.
    ///
    /// Returns when the driver goes away or fences this worker ([`WorkerExit::DriverGone`]:
    /// a process manager, or the driver's [`WorkerLauncher`](crate::cluster::WorkerLauncher),
    /// starts a new incarnation), or on Ctrl-C. The driver refuses a worker whose job differs
    /// from its own, and says why: this returns [`ClusterError::WrongJob`](crate::cluster::ClusterError::WrongJob)
    /// (as `ContextError::Cluster`). The context is used up: it has ended once this is called.
    ///
    /// ```no_run
    /// # async fn main_() -> Result<(), Box<dyn std::error::Error>> {
    /// # fn define(ctx: &tributary::StreamingContext) -> Result<(), tributary::ContextError> { Ok(()) }
    /// let ctx = tributary::StreamingContext::builder().build()?;
    /// define(&ctx)?; // streams and outputs, the same in both roles
    /// if let Some(worker) = tributary::cluster::worker_role()? {
    ///     ctx.run_as_worker(worker).await?;
    ///     return Ok(());
    /// }
    /// ctx.start().await?;
    /// # Ok(()) }
    /// ```
    pub async fn run_as_worker(&self, cfg: WorkerConfig) -> Result<WorkerExit, ContextError> {
        let tasks = {
            let phase = lock(&self.inner.phase);
            if !matches!(*phase, Phase::Defining) {
                return Err(ContextError::AlreadyStarted);
            }
            let mut d = lock(&self.inner.defined);
            let names = d.marker_names();
            d.outputs.clear();
            let cfg = &self.inner.config;
            let factory = cfg.clone();
            let receivers = crate::cluster::receiver_host::ReceiverJob {
                receivers: std::mem::take(&mut d.receivers),
                strategy: Box::new(move || factory.receivers_strategy()),
                max_block_bytes: cfg.max_block_bytes,
                block_queue: cfg.block_queue,
                rate_limit: cfg.rate_limit,
                memory_bytes: cfg.memory_bytes,
                block_interval: cfg.block_interval,
                direct: DirectStreams(Arc::new(std::mem::take(&mut d.direct))),
            };
            (
                TaskRegistry::new(std::mem::take(&mut d.tasks), &names),
                receivers,
            )
        };
        let (tasks, receivers) = tasks;
        self.inner.end(Ok(()));
        tracing::info!(
            tasks = tasks.len(),
            fingerprint = format_args!("{:016x}", tasks.fingerprint()),
            driver = %cfg.driver,
            "running as a worker process"
        );
        Ok(crate::cluster::worker_node::run_worker_with(cfg, Some((tasks, receivers))).await?)
    }

    /// Stops the context and returns its outcome. Graceful: receivers stop, buffered records
    /// are cut into blocks and acknowledged, the remaining batches run, then everything stops.
    /// Not graceful: stops now; unprocessed blocks are dropped. Before `start`, the context
    /// just ends; during `start`, `start` undoes its work; after the end, this returns the
    /// outcome at once.
    pub async fn stop(&self, graceful: bool) -> Result<(), ContextError> {
        let never_started = {
            let mut phase = lock(&self.inner.phase);
            match &mut *phase {
                Phase::Defining => true,
                Phase::Starting { stop } => {
                    stop.get_or_insert(graceful);
                    false
                }
                Phase::Running(h) => {
                    let _ = h.stop.send(graceful);
                    false
                }
                Phase::Ended => false,
            }
        };
        if never_started {
            self.inner.end(Ok(()));
        }
        self.await_termination().await
    }

    /// Waits until the context has stopped, and returns why: `Ok` after `stop`, an error if a
    /// failure stopped it.
    pub async fn await_termination(&self) -> Result<(), ContextError> {
        let mut rx = self.inner.termination.subscribe();
        let r = rx.wait_for(Option::is_some).await;
        match r {
            Ok(v) => v.clone().unwrap_or(Ok(())),
            Err(_) => Err(ContextError::NotRunning),
        }
    }

    /// Kills worker `w` abruptly, as a crash would: its blocks are gone; the survivors'
    /// replicas are re-replicated and receivers placed on it restart on another worker.
    /// For fault-injection tests and demos. Returns whether the worker was alive.
    pub async fn kill_worker(&self, w: usize) -> bool {
        match self.blocks() {
            Some(b) => b.kill_worker(w).await,
            None => false,
        }
    }

    /// Workers still alive (none when the context is not running).
    pub async fn live_workers(&self) -> Vec<usize> {
        match self.blocks() {
            Some(b) => b.live_workers().await,
            None => Vec::new(),
        }
    }

    /// The address worker processes join, with a [`cluster`](crate::StreamingContextBuilder::cluster)
    /// configuration, while running (the port the OS chose when the configured one is 0).
    pub fn cluster_addr(&self) -> Option<std::net::SocketAddr> {
        self.blocks()?.cluster_addr()
    }

    /// Blocks acknowledged but not yet freed (their batch has not completed, nor, with early
    /// tasks, all its work over them).
    pub async fn pending_blocks(&self) -> usize {
        match self.blocks() {
            Some(b) => b.tracked_blocks().await,
            None => 0,
        }
    }

    /// Blocks held by worker `w` right now (`None` if it is dead or the context is not running).
    pub async fn worker_block_count(&self, w: usize) -> Option<usize> {
        self.blocks()?.worker_block_count(w).await
    }

    /// Replica locations of every block not yet processed (for tests and status output).
    pub async fn block_locations(&self) -> Vec<(BlockId, Vec<usize>)> {
        match self.blocks() {
            Some(b) => b.all_locations().await,
            None => Vec::new(),
        }
    }

    /// Where every acknowledged record stands, per receiver: stored = completed + pending +
    /// lost, each loss with its cause (kept across restarts with a checkpoint directory).
    /// `None` when the context is not running; each [`BatchInfo`] carries it too.
    pub async fn ledger(&self) -> Option<Ledger> {
        let tracker = self.inner.running(|h| h.tracker.clone())?;
        tracker.ledger().await
    }

    /// The BlockManagerMaster's handle while running.
    fn blocks(&self) -> Option<BlockManagerMaster> {
        self.inner.running(|h| h.blocks.clone())
    }
}

/// Logs (and counts, for losses) what recovery found.
fn report_recovery(r: &RecoveryReport) {
    tracing::info!(
        rerun_batches = r.rerun_batches.len(),
        recovered_blocks = r.recovered_blocks,
        recovered_records = r.recovered_records,
        lost_blocks = r.lost_blocks,
        lost_records = r.lost_records,
        "recovered from the checkpoint directory"
    );
    if r.lost_blocks > 0 {
        metrics::counter!(crate::telemetry::BLOCKS_LOST_TOTAL).increment(r.lost_blocks as u64);
        metrics::counter!(crate::telemetry::RECORDS_LOST_TOTAL).increment(r.lost_records);
        tracing::error!(
            lost_blocks = r.lost_blocks,
            lost_records = r.lost_records,
            "unprocessed blocks were only in memory when the driver stopped: lost"
        );
    }
}
