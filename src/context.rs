//! The streaming context: configuration, lifecycle, and the driver-side loops.
//!
//! ```text
//!  builder ──build()──► StreamingContext ──receiver_stream()──► DStream ──for_each_batch()──► output
//!                              │ start()
//!                              ▼
//!   receivers (supervised) ──store──► block generators ──► pushers ──put (k replicas)──► block manager
//!                                                           │ acked blocks
//!                                                           ▼
//!   scheduler: every batch interval, acked blocks ──► batch ──► runner (in order) ──tasks──► executors
//! ```
//!
//! Stopping gracefully stops the receivers (their stop hooks run), cuts what the block
//! generators still buffer into blocks, waits until every block is acknowledged, runs the
//! remaining batches, then stops executors and workers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::batch::{
    BatchBlocks, BatchError, BatchId, BatchInfo, BatchRun, Executor, RunStats, TaskRunner,
};
use crate::block::{BlockId, Record};
use crate::block_generator::BlockGenerator;
use crate::block_manager::{BlockManager, ClusterEvent, WorkerId};
use crate::checkpoint::{Allocation, CheckpointError, DriverState, MetadataLog};
use crate::error::{ConfigError, SupervisorError};
use crate::receiver::{Receiver, ReceiverSpec};
use crate::store::{Durability, Store};
use crate::stream::{DStream, OutputFn, OutputRegistry};
use crate::supervisor::{Backoff, Directive, Strategy, Supervisor, SupervisorHandle};
use crate::telemetry::SupervisionEvent;
use crate::wal::{DirStorage, Location, Storage, Wal, WalConfig, WalError};

/// Errors of the streaming context.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ContextError {
    /// Invalid configuration, refused at build time.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The operation needs a context that has not started yet (adding streams and outputs).
    #[error("the context has already started; add streams and outputs before start()")]
    AlreadyStarted,
    /// The operation needs a running context.
    #[error("the context is not running")]
    NotRunning,
    /// Starting a part of the pipeline failed.
    #[error("could not start {what}: {error}")]
    Start {
        /// Which part.
        what: String,
        /// Why.
        error: String,
    },
    /// A receiver failure escalated to the root of the receivers' supervision tree.
    #[error("receivers failed: {0}")]
    Receivers(SupervisorError),
    /// The checkpoint directory is unusable, foreign, incompatible or damaged.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The write-ahead log could not be recovered (e.g. corruption in the middle of a segment).
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A batch failed and the context is configured to stop on batch failure.
    #[error("{id} failed: {error}")]
    BatchFailed {
        /// The batch.
        id: BatchId,
        /// Why.
        error: BatchError,
    },
}

/// What to do when a batch fails (a task failed on every attempt, or the output function failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBatchFailure {
    /// Report it (in [`BatchInfo::failed`]) and go on with the next batch.
    Continue,
    /// Stop the context with [`ContextError::BatchFailed`].
    Stop,
}

/// Configuration of a [`StreamingContext`]. Plain data with defaults; see each setter.
#[derive(Debug, Clone)]
pub struct StreamingContextBuilder {
    batch_interval: Duration,
    block_interval: Duration,
    workers: usize,
    replication: usize,
    executors: usize,
    rate_limit: Option<f64>,
    max_block_bytes: usize,
    block_queue: usize,
    memory_bytes: usize,
    task_attempts: u32,
    on_batch_failure: OnBatchFailure,
    receiver_backoff: Option<Backoff>,
    receiver_strategy: Option<StrategyFactory>,
    checkpoint_dir: Option<std::path::PathBuf>,
    wal: Option<WalConfig>,
}

/// Builds the receivers' strategy (a strategy holds closures, so it is built, not cloned).
#[derive(Clone)]
struct StrategyFactory(Arc<dyn Fn() -> Strategy + Send + Sync>);

impl std::fmt::Debug for StrategyFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StrategyFactory").field(&(self.0)()).finish()
    }
}

impl Default for StreamingContextBuilder {
    fn default() -> Self {
        StreamingContextBuilder {
            batch_interval: Duration::from_secs(1),
            block_interval: Duration::from_millis(200),
            workers: 2,
            replication: 2,
            executors: 2,
            rate_limit: None,
            max_block_bytes: 8 << 20,
            block_queue: 4,
            memory_bytes: 1 << 30,
            task_attempts: 4,
            on_batch_failure: OnBatchFailure::Continue,
            receiver_backoff: Some(Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(5),
            )),
            receiver_strategy: None,
            checkpoint_dir: None,
            wal: None,
        }
    }
}

impl StreamingContextBuilder {
    /// Every `interval`, the blocks received in it form one batch (default 1 s).
    pub fn batch_interval(mut self, interval: Duration) -> Self {
        self.batch_interval = interval;
        self
    }
    /// Receivers' records are cut into a block every `interval` (default 200 ms).
    pub fn block_interval(mut self, interval: Duration) -> Self {
        self.block_interval = interval;
        self
    }
    /// In-process workers holding blocks (default 2).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// Replicas per block, `k` (default 2); a block is acknowledged once `k` workers hold it.
    pub fn replication(mut self, k: usize) -> Self {
        self.replication = k;
        self
    }
    /// Executor actors running tasks (default 2).
    pub fn executors(mut self, n: usize) -> Self {
        self.executors = n;
        self
    }
    /// At most `records_per_second` records stored per receiver (default: unlimited).
    pub fn rate_limit(mut self, records_per_second: f64) -> Self {
        self.rate_limit = Some(records_per_second);
        self
    }
    /// A block is cut early when its encoded size reaches `bytes` (default 8 MiB).
    pub fn max_block_bytes(mut self, bytes: usize) -> Self {
        self.max_block_bytes = bytes;
        self
    }
    /// Cut blocks waiting to be replicated, per receiver, before `store` waits (default 4).
    pub fn block_queue(mut self, blocks: usize) -> Self {
        self.block_queue = blocks;
        self
    }
    /// Bytes of unprocessed blocks kept in memory before receivers are made to wait
    /// (default 1 GiB; replicas in this process share memory, so this counts each block once).
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_bytes = bytes;
        self
    }
    /// Attempts per task before the batch fails (default 4).
    pub fn task_attempts(mut self, attempts: u32) -> Self {
        self.task_attempts = attempts;
        self
    }
    /// What a failed batch does to the context (default: continue).
    pub fn on_batch_failure(mut self, policy: OnBatchFailure) -> Self {
        self.on_batch_failure = policy;
        self
    }
    /// Backoff between receiver restarts (default 100 ms doubling to 5 s; `None` for none).
    pub fn receiver_backoff(mut self, backoff: Option<Backoff>) -> Self {
        self.receiver_backoff = backoff;
        self
    }

    /// The strategy of the supervisor that runs the receivers. Default: one-for-one, any
    /// error or panic restarts the receiver (with the receiver backoff), at most 10 times per
    /// minute; beyond that the failure escalates and stops the context.
    pub fn receiver_strategy<F>(mut self, strategy: F) -> Self
    where
        F: Fn() -> Strategy + Send + Sync + 'static,
    {
        self.receiver_strategy = Some(StrategyFactory(Arc::new(strategy)));
        self
    }

    /// Where the driver keeps its metadata log and checkpoints (and the write-ahead log, when
    /// enabled). A directory used before is recovered at `start` (see
    /// [`StreamingContext::get_or_create`]).
    pub fn checkpoint_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Turns on the write-ahead log (in the checkpoint directory): every block is appended and
    /// synced per `config` before it is acknowledged. Requires `checkpoint_dir`.
    pub fn write_ahead_log(mut self, config: WalConfig) -> Self {
        self.wal = Some(config);
        self
    }

    /// Checks every setting; the error names the setting and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_interval.is_zero() {
            return Err(ConfigError::new(
                "batch_interval",
                "must be longer than zero",
            ));
        }
        if self.block_interval.is_zero() {
            return Err(ConfigError::new(
                "block_interval",
                "must be longer than zero",
            ));
        }
        if self.block_interval > self.batch_interval {
            return Err(ConfigError::new(
                "block_interval",
                format!(
                    "must not be longer than batch_interval ({:?} > {:?})",
                    self.block_interval, self.batch_interval
                ),
            ));
        }
        if self.workers == 0 {
            return Err(ConfigError::new("workers", "must be at least 1"));
        }
        if self.replication == 0 {
            return Err(ConfigError::new("replication", "must be at least 1"));
        }
        if self.replication > self.workers {
            return Err(ConfigError::new(
                "replication",
                format!(
                    "({}) must not exceed workers ({}): raise workers or lower replication",
                    self.replication, self.workers
                ),
            ));
        }
        if self.executors == 0 {
            return Err(ConfigError::new("executors", "must be at least 1"));
        }
        if let Some(rate) = self.rate_limit {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::new(
                    "rate_limit",
                    "must be a positive number of records per second",
                ));
            }
        }
        if self.max_block_bytes < 64 {
            return Err(ConfigError::new("max_block_bytes", "must be at least 64"));
        }
        if self.block_queue == 0 {
            return Err(ConfigError::new("block_queue", "must be at least 1"));
        }
        if self.memory_bytes < self.max_block_bytes {
            return Err(ConfigError::new(
                "memory_limit",
                "must be at least max_block_bytes",
            ));
        }
        if self.task_attempts == 0 {
            return Err(ConfigError::new("task_attempts", "must be at least 1"));
        }
        if let Some(b) = &self.receiver_backoff {
            b.validate()?;
        }
        if let Some(make) = &self.receiver_strategy {
            (make.0)().validate()?;
        }
        if self.wal.is_some() && self.checkpoint_dir.is_none() {
            return Err(ConfigError::new(
                "write_ahead_log",
                "requires checkpoint_dir: the log is kept in the checkpoint directory",
            ));
        }
        if let Some(w) = &self.wal {
            if w.segment_bytes == 0 || w.segment_age.is_zero() {
                return Err(ConfigError::new(
                    "write_ahead_log",
                    "segment_bytes and segment_age must be greater than zero",
                ));
            }
        }
        if let Some(dir) = &self.checkpoint_dir {
            crate::checkpoint::check_usable(dir)
                .map_err(|e| ConfigError::new("checkpoint_dir", e.to_string()))?;
        }
        Ok(())
    }

    /// Validates the configuration and builds a context (nothing runs until `start`).
    pub fn build(self) -> Result<StreamingContext, ConfigError> {
        self.validate()?;
        let (batches, _) = broadcast::channel(1024);
        let (termination, _) = watch::channel(None);
        Ok(StreamingContext {
            inner: Arc::new(Inner {
                config: self,
                defined: Mutex::new(Defined::default()),
                running: Mutex::new(None),
                batches: Mutex::new(Some(batches)),
                termination,
                recovery: Mutex::new(None),
            }),
        })
    }
}

type Starter = Box<
    dyn FnOnce(
            SupervisorHandle,
            Arc<BlockGenerator>,
            Arc<Durability>,
        ) -> BoxFuture<'static, Result<(), SupervisorError>>
        + Send,
>;

struct PendingReceiver {
    stream: u32,
    name: String,
    start: Starter,
}

#[derive(Default)]
struct Defined {
    receivers: Vec<PendingReceiver>,
    outputs: Vec<OutputFn>,
    started: bool,
}

struct Running {
    blocks: BlockManager,
    receivers: SupervisorHandle,
    executors: SupervisorHandle,
    generators: Vec<Arc<BlockGenerator>>,
    pushers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    drain: Option<tokio::sync::oneshot::Sender<()>>,
    runner: Option<JoinHandle<()>>,
    durabilities: Vec<Arc<Durability>>,
}

struct Inner {
    config: StreamingContextBuilder,
    defined: Mutex<Defined>,
    running: Mutex<Option<Running>>,
    /// Taken (closed) when the context terminates, so subscribers see the end of the stream.
    batches: Mutex<Option<broadcast::Sender<BatchInfo>>>,
    termination: watch::Sender<Option<Result<(), ContextError>>>,
    recovery: Mutex<Option<RecoveryReport>>,
}

/// What a context found in its checkpoint directory at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Batches that were allocated but not completed; they run again with the same ids and
    /// the same blocks before any new batch.
    pub rerun_batches: Vec<BatchId>,
    /// Unprocessed blocks recovered from the write-ahead log.
    pub recovered_blocks: usize,
    /// Records in them.
    pub recovered_records: u64,
    /// Unprocessed blocks that were only in memory (no write-ahead log) and are gone.
    pub lost_blocks: usize,
    /// Records in them.
    pub lost_records: u64,
    /// Write-ahead log segments whose torn tail was truncated, with the bytes cut.
    pub truncated_segments: Vec<(String, u64)>,
}

/// The durable side of a running context: metadata log and write-ahead logs.
#[derive(Clone, Default)]
struct Persistence {
    meta: Option<Arc<Mutex<MetadataLog>>>,
    wals: Arc<std::collections::HashMap<u32, Arc<Wal>>>,
}

impl Persistence {
    async fn log<F>(&self, f: F) -> Result<(), String>
    where
        F: FnOnce(&mut MetadataLog) -> std::io::Result<()> + Send + 'static,
    {
        let Some(meta) = self.meta.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || f(&mut lock(&meta)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("metadata log: {e}"))
    }

    fn processed(&self, ids: &[BlockId]) {
        let mut per: std::collections::HashMap<u32, Vec<BlockId>> = Default::default();
        for id in ids {
            per.entry(id.stream).or_default().push(*id);
        }
        for (stream, ids) in per {
            if let Some(w) = self.wals.get(&stream) {
                w.processed(ids);
            }
        }
    }
}

impl OutputRegistry for Inner {
    fn register(&self, output: OutputFn) -> Result<(), ContextError> {
        let mut d = lock(&self.defined);
        if d.started {
            return Err(ContextError::AlreadyStarted);
        }
        d.outputs.push(output);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut d = lock(&self.inner.defined);
        if d.started {
            return Err(ContextError::AlreadyStarted);
        }
        if d.receivers.iter().any(|r| r.name == name) {
            return Err(ConfigError::new(
                "receiver name",
                format!("`{name}` is already used by another stream"),
            )
            .into());
        }
        let stream = u32::try_from(d.receivers.len()).unwrap_or(u32::MAX);
        let backoff = self.inner.config.receiver_backoff;
        let spawn_name = name.clone();
        let start: Starter = Box::new(
            move |sup: SupervisorHandle,
                  generator: Arc<BlockGenerator>,
                  durability: Arc<Durability>| {
                async move {
                    let mut spec = ReceiverSpec::new(
                        spawn_name,
                        receiver,
                        Store::blocks(generator, durability),
                    );
                    if let Some(b) = backoff {
                        spec = spec.backoff(b);
                    }
                    sup.spawn_receiver(spec).await.map(|_| ())
                }
                .boxed()
            },
        );
        d.receivers.push(PendingReceiver {
            stream,
            name,
            start,
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
        let names: Vec<String> = lock(&ctx.inner.defined)
            .receivers
            .iter()
            .map(|r| r.name.clone())
            .collect();
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
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.receivers.subscribe())
            .ok_or(ContextError::NotRunning)
    }

    /// Starts workers, executors, receivers and the batch scheduler.
    pub async fn start(&self) -> Result<(), ContextError> {
        let (receivers, outputs) = {
            let mut d = lock(&self.inner.defined);
            if d.started {
                return Err(ContextError::AlreadyStarted);
            }
            d.started = true;
            (
                std::mem::take(&mut d.receivers),
                std::mem::take(&mut d.outputs),
            )
        };
        let cfg = &self.inner.config;
        let start_err = |what: &str, e: &dyn std::fmt::Display| ContextError::Start {
            what: what.to_string(),
            error: e.to_string(),
        };
        let names: Vec<String> = receivers.iter().map(|r| r.name.clone()).collect();
        let streams: Vec<u32> = receivers.iter().map(|r| r.stream).collect();
        let (persistence, recovered) = open_persistence(cfg, &names, &streams)?;
        let (blocks, cluster_events) =
            BlockManager::start(cfg.workers, cfg.replication, cfg.memory_bytes)
                .await
                .map_err(|e| start_err("workers", &e))?;

        // Executors: Restart on any failure (a panicking task restarts its executor in place).
        // No cap: the failures come from user code in tasks, which `task_attempts` already
        // bounds per task; capping would shrink the pool for good after ten bad records.
        let exec_strategy = Strategy::one_for_one(10, Duration::from_secs(60))
            .limit(crate::supervisor::RestartLimit::Unlimited)
            .on_panic(Directive::Restart)
            .otherwise(Directive::Restart);
        let executors_sup = Supervisor::start("executors", exec_strategy)
            .await
            .map_err(|e| start_err("executors", &e))?;
        let mut execs = Vec::with_capacity(cfg.executors);
        for i in 0..cfg.executors {
            let worker = i % cfg.workers;
            let (store, _unused) = Store::channel(1);
            let exec = Executor {
                worker,
                blocks: blocks.clone(),
            };
            let r = executors_sup
                .spawn_receiver(ReceiverSpec::new(format!("executor-{i}"), exec, store))
                .await
                .map_err(|e| start_err("executors", &e))?;
            execs.push((worker, r));
        }
        let runner = TaskRunner::new(execs, blocks.clone(), cfg.task_attempts);

        // Receivers.
        let strategy = match &cfg.receiver_strategy {
            Some(make) => (make.0)(),
            None => Strategy::one_for_one(10, Duration::from_secs(60))
                .on_panic(Directive::Restart)
                .otherwise(Directive::Restart)
                .on_limit_exceeded(Directive::Escalate),
        };
        let receivers_sup = Supervisor::start("receivers", strategy)
            .await
            .map_err(|e| start_err("receivers", &e))?;
        let acked: Arc<Mutex<Vec<(BlockId, u32)>>> = Arc::default();
        let (rerun, first_seq, last_batch, report) =
            restore(recovered, &blocks, &acked, cfg.workers).await;
        if let Some(r) = &report {
            tracing::info!(
                rerun_batches = r.rerun_batches.len(),
                recovered_blocks = r.recovered_blocks,
                recovered_records = r.recovered_records,
                lost_blocks = r.lost_blocks,
                lost_records = r.lost_records,
                "recovered from the checkpoint directory"
            );
            if r.lost_blocks > 0 {
                metrics::counter!(crate::telemetry::BLOCKS_LOST_TOTAL)
                    .increment(r.lost_blocks as u64);
                metrics::counter!(crate::telemetry::RECORDS_LOST_TOTAL).increment(r.lost_records);
                tracing::error!(
                    lost_blocks = r.lost_blocks,
                    lost_records = r.lost_records,
                    "unprocessed blocks were only in memory when the driver stopped: lost"
                );
            }
        }
        *lock(&self.inner.recovery) = report;
        let mut durabilities = Vec::new();
        let mut generators = Vec::new();
        let mut pushers = Vec::new();
        let mut background = Vec::new();
        let mut homes = Vec::new();
        let pool = crate::buffer_pool::BufferPool::new(cfg.memory_bytes);
        for pending in receivers {
            let (generator, queue) = BlockGenerator::starting_at(
                pending.stream,
                first_seq.get(&pending.stream).copied().unwrap_or(0),
                cfg.max_block_bytes,
                cfg.block_queue,
                cfg.rate_limit,
                pool.clone(),
            );
            let generator = Arc::new(generator);
            let durability = Arc::new(Durability::new());
            let home = Arc::new(AtomicUsize::new(pending.stream as usize % cfg.workers));
            pushers.push(tokio::spawn(push_blocks(
                queue,
                blocks.clone(),
                home.clone(),
                acked.clone(),
                persistence.clone(),
                durability.clone(),
            )));
            let g = generator.clone();
            let block_interval = cfg.block_interval;
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(block_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if !g.flush().await {
                        break;
                    }
                }
            }));
            (pending.start)(receivers_sup.clone(), generator.clone(), durability.clone())
                .await
                .map_err(|e| start_err(&format!("receiver `{}`", pending.name), &e))?;
            homes.push((pending.name, home));
            generators.push(generator);
            durabilities.push(durability);
        }
        background.push(tokio::spawn(watch_cluster(
            cluster_events,
            blocks.clone(),
            receivers_sup.clone(),
            homes,
        )));

        // Scheduler and runner.
        let (batch_tx, batch_rx) = mpsc::unbounded_channel();
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel();
        // Batches the previous run allocated but did not complete go first, unchanged.
        for batch in rerun {
            let _ = batch_tx.send(batch);
        }
        background.push(tokio::spawn(schedule(
            cfg.batch_interval,
            acked,
            batch_tx,
            drain_rx,
            last_batch,
            persistence.clone(),
        )));
        let run = tokio::spawn(run_batches(
            batch_rx,
            outputs,
            runner,
            blocks.clone(),
            lock(&self.inner.batches)
                .clone()
                .unwrap_or_else(|| broadcast::channel(1).0),
            cfg.on_batch_failure,
            self.clone(),
            persistence,
        ));

        // A failure escalated to the receivers' root ends the context.
        let ctx = self.clone();
        let sup = receivers_sup.clone();
        background.push(tokio::spawn(async move {
            if let Err(e) = sup.wait().await {
                if !matches!(e, SupervisorError::Stopped { .. }) {
                    ctx.finish(Err(ContextError::Receivers(e)), true).await;
                }
            }
        }));

        *lock(&self.inner.running) = Some(Running {
            blocks,
            receivers: receivers_sup,
            executors: executors_sup,
            generators,
            pushers,
            background,
            drain: Some(drain_tx),
            runner: Some(run),
            durabilities,
        });
        tracing::info!(
            workers = cfg.workers,
            replication = cfg.replication,
            executors = cfg.executors,
            batch_interval = ?cfg.batch_interval,
            "streaming context started"
        );
        Ok(())
    }

    /// Stops the context. Graceful: receivers stop, buffered records are cut into blocks and
    /// acknowledged, the remaining batches run, then everything stops. Not graceful: stops now;
    /// unprocessed blocks are dropped.
    pub async fn stop(&self, graceful: bool) -> Result<(), ContextError> {
        self.finish(Ok(()), graceful).await;
        self.await_termination().await
    }

    async fn finish(&self, outcome: Result<(), ContextError>, graceful: bool) {
        let Some(mut running) = lock(&self.inner.running).take() else {
            // Never started: it ends here (and cannot be started any more). Otherwise it is
            // already stopping or stopped: keep the first outcome.
            let mut d = lock(&self.inner.defined);
            if !d.started {
                d.started = true;
                self.inner.termination.send_replace(Some(outcome));
            }
            return;
        };
        if !graceful {
            // Nothing more will be acknowledged: release receivers waiting in store_reliably
            // (they must not ack their source), then stop them.
            for p in running.pushers.drain(..) {
                p.abort();
            }
            for d in &running.durabilities {
                d.close();
            }
        }
        let _ = running.receivers.shutdown().await;
        if graceful {
            for g in &running.generators {
                g.close().await;
            }
            for p in running.pushers.drain(..) {
                let _ = p.await;
            }
            if let Some(drain) = running.drain.take() {
                let _ = drain.send(());
            }
            if let Some(runner) = running.runner.take() {
                let _ = runner.await;
            }
            for d in &running.durabilities {
                d.close();
            }
        } else {
            for g in &running.generators {
                g.close().await;
            }
            for p in running.pushers.drain(..) {
                p.abort();
            }
            if let Some(runner) = running.runner.take() {
                runner.abort();
            }
        }
        for task in running.background.drain(..) {
            task.abort();
        }
        let _ = running.executors.shutdown().await;
        running.blocks.shutdown();
        tracing::info!(graceful, ok = outcome.is_ok(), "streaming context stopped");
        lock(&self.inner.batches).take();
        self.inner.termination.send_replace(Some(outcome));
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
    pub fn kill_worker(&self, w: usize) -> bool {
        lock(&self.inner.running)
            .as_ref()
            .is_some_and(|r| r.blocks.kill_worker(w))
    }

    /// Workers still alive.
    pub fn live_workers(&self) -> Vec<usize> {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.blocks.live_workers())
            .unwrap_or_default()
    }

    /// Blocks acknowledged but not yet freed (their batch has not completed).
    pub fn pending_blocks(&self) -> usize {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.blocks.tracked_blocks())
            .unwrap_or(0)
    }

    /// Blocks held by worker `w` right now (`None` if it is dead or the context is not running).
    pub async fn worker_block_count(&self, w: usize) -> Option<usize> {
        let blocks = lock(&self.inner.running)
            .as_ref()
            .map(|r| r.blocks.clone())?;
        blocks.worker_block_count(w).await
    }

    /// Replica locations of every block not yet processed (for tests and status output).
    pub fn block_locations(&self) -> Vec<(BlockId, Vec<usize>)> {
        lock(&self.inner.running)
            .as_ref()
            .map(|r| r.blocks.all_locations())
            .unwrap_or_default()
    }
}

/// Replicates each cut block (and appends it to the write-ahead log, concurrently), logs it,
/// records it as acknowledged, and settles its durability, in order.
async fn push_blocks(
    mut queue: mpsc::Receiver<crate::block::Block>,
    blocks: BlockManager,
    home: Arc<AtomicUsize>,
    acked: Arc<Mutex<Vec<(BlockId, u32)>>>,
    persistence: Persistence,
    durability: Arc<Durability>,
) {
    while let Some(block) = queue.recv().await {
        let (id, records) = (block.id, block.records);
        let permit = match blocks.reserve(block.len_bytes()).await {
            Ok(p) => p,
            Err(_) => return,
        };
        let wal = persistence.wals.get(&id.stream).cloned();
        let put = blocks.put(block.clone(), home.load(Ordering::Relaxed), Some(permit));
        let (wal_result, put_result) = match wal {
            Some(w) => {
                let (a, b) = tokio::join!(w.append(block), put);
                (a.map(|_| ()).map_err(|e| e.to_string()), b)
            }
            None => (Ok(()), put.await),
        };
        let outcome = match (wal_result, put_result) {
            (Ok(()), Ok(_)) => persistence.log(move |m| m.added(id, records)).await,
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e.to_string()),
        };
        match &outcome {
            Ok(()) => lock(&acked).push((id, records)),
            Err(e) => {
                tracing::error!(block = %id, records, error = %e, "block could not be made durable")
            }
        }
        durability.settle(id.seq, outcome);
    }
}

/// Opens the metadata log and the write-ahead logs, recovering what a previous run left.
#[allow(clippy::type_complexity)]
fn open_persistence(
    cfg: &StreamingContextBuilder,
    names: &[String],
    streams: &[u32],
) -> Result<
    (
        Persistence,
        Option<(DriverState, Vec<crate::wal::Recovered>)>,
    ),
    ContextError,
> {
    let Some(dir) = &cfg.checkpoint_dir else {
        return Ok((Persistence::default(), None));
    };
    let state = crate::checkpoint::load(dir, names)?;
    let fresh = state.is_none();
    let state = state.unwrap_or_default();
    let mut wals = std::collections::HashMap::new();
    let mut recovered = Vec::new();
    if let Some(wcfg) = cfg.wal {
        let storage: Arc<dyn Storage> = Arc::new(DirStorage::new(dir.join("wal")).map_err(
            |e| CheckpointError::Unusable {
                dir: dir.join("wal").display().to_string(),
                reason: e.to_string(),
            },
        )?);
        for &stream in streams {
            let r = crate::wal::recover(storage.as_ref(), stream)?;
            let live: Vec<(BlockId, Location)> = r
                .blocks
                .iter()
                .filter(|(b, _)| !state.is_processed(b.id))
                .map(|(b, l)| (b.id, l.clone()))
                .collect();
            let done: Vec<BlockId> = r
                .blocks
                .iter()
                .filter(|(b, _)| state.is_processed(b.id))
                .map(|(b, _)| b.id)
                .collect();
            let wal = Wal::open(storage.clone(), stream, wcfg, r.next_segment, &live);
            if !done.is_empty() {
                wal.processed(done);
            }
            wals.insert(stream, Arc::new(wal));
            recovered.push(r);
        }
    }
    let meta = MetadataLog::open(dir, names, state.clone())?;
    let persistence = Persistence {
        meta: Some(Arc::new(Mutex::new(meta))),
        wals: Arc::new(wals),
    };
    Ok((persistence, (!fresh).then_some((state, recovered))))
}

type Rerun = Vec<(BatchId, SystemTime, BatchBlocks)>;

/// Puts recovered blocks back on the workers; returns the batches to run again, the first
/// block sequence number of each stream, the last batch id, and the report.
async fn restore(
    recovered: Option<(DriverState, Vec<crate::wal::Recovered>)>,
    blocks: &BlockManager,
    acked: &Arc<Mutex<Vec<(BlockId, u32)>>>,
    workers: usize,
) -> (
    Rerun,
    std::collections::HashMap<u32, u64>,
    u64,
    Option<RecoveryReport>,
) {
    let mut first_seq = std::collections::HashMap::new();
    let Some((state, wal)) = recovered else {
        return (Vec::new(), first_seq, 0, None);
    };
    let mut report = RecoveryReport::default();
    let mut in_wal: std::collections::BTreeMap<BlockId, crate::block::Block> = Default::default();
    for r in wal {
        report.truncated_segments.extend(r.truncated);
        for (b, _) in r.blocks {
            let next = first_seq.entry(b.id.stream).or_insert(0);
            *next = (*next).max(b.id.seq + 1);
            if !state.is_processed(b.id) {
                in_wal.insert(b.id, b);
            }
        }
    }
    for (stream, seq) in &state.max_seq {
        let next = first_seq.entry(*stream).or_insert(0);
        *next = (*next).max(seq + 1);
    }
    for (stream, seq) in &state.processed_through {
        let next = first_seq.entry(*stream).or_insert(0);
        *next = (*next).max(seq + 1);
    }
    fn restore_one(
        in_wal: &mut std::collections::BTreeMap<BlockId, crate::block::Block>,
        id: BlockId,
        records: u32,
        report: &mut RecoveryReport,
    ) -> Option<crate::block::Block> {
        match in_wal.remove(&id) {
            Some(block) => {
                report.recovered_blocks += 1;
                report.recovered_records += u64::from(records);
                Some(block)
            }
            None => {
                report.lost_blocks += 1;
                report.lost_records += u64::from(records);
                None
            }
        }
    }
    let mut rerun = Vec::new();
    let mut to_put = Vec::new();
    for (id, alloc) in &state.pending {
        let mut bb = BatchBlocks {
            recovered: true,
            ..BatchBlocks::default()
        };
        for &(stream, seq, records) in &alloc.blocks {
            let bid = BlockId { stream, seq };
            if let Some(block) = restore_one(&mut in_wal, bid, records, &mut report) {
                to_put.push(block);
            }
            bb.by_stream.entry(stream).or_default().push((bid, records));
        }
        report.rerun_batches.push(BatchId(*id));
        rerun.push((
            BatchId(*id),
            UNIX_EPOCH + Duration::from_millis(alloc.time_ms),
            bb,
        ));
    }
    // Acknowledged but not allocated: from the log, and whatever else the WAL holds.
    let mut unallocated: std::collections::BTreeMap<BlockId, u32> = state
        .unallocated
        .iter()
        .map(|((stream, seq), records)| {
            (
                BlockId {
                    stream: *stream,
                    seq: *seq,
                },
                *records,
            )
        })
        .collect();
    for (id, b) in &in_wal {
        unallocated.insert(*id, b.records);
    }
    for (id, records) in unallocated {
        if let Some(block) = restore_one(&mut in_wal, id, records, &mut report) {
            to_put.push(block);
        }
        // A lost block still goes into the next batch, which reports it lost and lets the
        // log record it as processed.
        lock(acked).push((id, records));
    }
    for block in to_put {
        let home = block.id.stream as usize % workers.max(1);
        if let Err(e) = blocks.put(block, home, None).await {
            tracing::error!(error = %e, "could not restore a recovered block");
        }
    }
    (rerun, first_seq, state.last_batch, Some(report))
}

/// Worker losses: re-place the receivers that were on the dead worker and restart them there.
async fn watch_cluster(
    mut events: mpsc::UnboundedReceiver<ClusterEvent>,
    blocks: BlockManager,
    receivers: SupervisorHandle,
    homes: Vec<(String, Arc<AtomicUsize>)>,
) {
    while let Some(event) = events.recv().await {
        if let ClusterEvent::WorkerLost(dead) = event {
            let live = blocks.live_workers();
            for (i, (name, home)) in homes.iter().enumerate() {
                if home.load(Ordering::Relaxed) != dead || live.is_empty() {
                    continue;
                }
                let new_home: WorkerId = live[i % live.len()];
                home.store(new_home, Ordering::Relaxed);
                tracing::warn!(receiver = %name, from = dead, to = new_home, "worker lost: restarting receiver on another worker");
                let _ = receivers.restart_child(name).await;
            }
        }
    }
}

fn batch_id(t: SystemTime) -> BatchId {
    BatchId(
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// Every batch interval, the blocks acknowledged since the last batch become one batch.
async fn schedule(
    interval: Duration,
    acked: Arc<Mutex<Vec<(BlockId, u32)>>>,
    batches: mpsc::UnboundedSender<(BatchId, SystemTime, BatchBlocks)>,
    mut drain: tokio::sync::oneshot::Receiver<()>,
    after_ms: u64,
    persistence: Persistence,
) {
    // New batch ids come after every id a previous run used.
    let start_sys = SystemTime::now().max(UNIX_EPOCH + Duration::from_millis(after_ms + 1));
    let start = tokio::time::Instant::now();
    let mut k: u32 = 0;
    loop {
        k += 1;
        let due = start + interval * k;
        let draining = tokio::select! {
            _ = tokio::time::sleep_until(due) => false,
            _ = &mut drain => true,
        };
        // The final (drain) batch is cut now rather than at the next boundary.
        let time = if draining {
            SystemTime::now().max(start_sys + interval * (k - 1) + Duration::from_millis(1))
        } else {
            start_sys + interval * k
        };
        let taken = std::mem::take(&mut *lock(&acked));
        let mut b = BatchBlocks::default();
        for (id, records) in taken {
            b.by_stream
                .entry(id.stream)
                .or_default()
                .push((id, records));
        }
        for v in b.by_stream.values_mut() {
            v.sort_by_key(|(id, _)| id.seq);
        }
        let id = batch_id(time);
        if b.len() > 0 {
            let alloc = Allocation {
                id: id.0,
                time_ms: id.0,
                blocks: b
                    .by_stream
                    .values()
                    .flatten()
                    .map(|(bid, r)| (bid.stream, bid.seq, *r))
                    .collect(),
            };
            if let Err(e) = persistence.log(move |m| m.allocated(alloc)).await {
                tracing::error!(%id, error = %e, "could not log the batch allocation");
            }
        }
        if batches.send((id, time, b)).is_err() || draining {
            return;
        }
    }
}

/// Runs batches in order: every output operation, then frees the blocks and reports.
#[allow(clippy::too_many_arguments)] // the runner's whole context, passed once at start
async fn run_batches(
    mut batches: mpsc::UnboundedReceiver<(BatchId, SystemTime, BatchBlocks)>,
    outputs: Vec<OutputFn>,
    runner: TaskRunner,
    blocks: BlockManager,
    reports: broadcast::Sender<BatchInfo>,
    policy: OnBatchFailure,
    ctx: StreamingContext,
    persistence: Persistence,
) {
    while let Some((id, time, batch)) = batches.recv().await {
        let started = SystemTime::now();
        let batch = Arc::new(batch);
        let run = BatchRun {
            id,
            time,
            blocks: batch.clone(),
            runner: runner.clone(),
            stats: Arc::new(Mutex::new(RunStats::default())),
        };
        let mut failed = None;
        let all = batch.all_ids();
        // A recovered batch whose blocks were all lost (in memory only when the driver died)
        // is not run again: it has nothing to compute, and its outputs may already have been
        // applied before the crash, complete; running them again with no records would
        // replace that result. It is reported with its losses like any other batch.
        let all_lost = batch.recovered
            && !all.is_empty()
            && all.iter().all(|b| blocks.locations(*b).is_empty());
        if all_lost {
            lock(&run.stats).lost = all.clone();
            tracing::warn!(%id, blocks = all.len(), "recovered batch lost all its blocks; outputs not re-run");
        } else {
            for output in &outputs {
                if let Err(e) = output(run.clone()).await {
                    failed = Some(e);
                    break;
                }
            }
        }
        if batch.len() > 0 {
            // Completed (or failed and given up on): logged before its blocks are released,
            // so that a crash in between re-runs it rather than losing it.
            if let Err(e) = persistence.log(move |m| m.completed(id.0)).await {
                tracing::error!(%id, error = %e, "could not log the batch completion");
            }
        }
        blocks.free(&all);
        persistence.processed(&all);
        let ended = SystemTime::now();
        let stats = std::mem::take(&mut *lock(&run.stats));
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
            failed: failed.as_ref().map(|e| e.to_string()),
        };
        if info.lost_blocks > 0 {
            tracing::error!(%id, lost_blocks = info.lost_blocks, lost_records, "batch lost blocks");
        }
        metrics::counter!(crate::telemetry::BATCHES_TOTAL).increment(1);
        metrics::counter!(crate::telemetry::BATCH_RECORDS_TOTAL).increment(info.records);
        tracing::debug!(%id, records = info.records, processing = ?info.processing_time, "batch done");
        let _ = reports.send(info);
        if let Some(error) = failed {
            tracing::error!(%id, %error, "batch failed");
            metrics::counter!(crate::telemetry::BATCHES_FAILED_TOTAL).increment(1);
            if policy == OnBatchFailure::Stop {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    ctx.finish(Err(ContextError::BatchFailed { id, error }), false)
                        .await
                });
                return;
            }
        }
    }
}
