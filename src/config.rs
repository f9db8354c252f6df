//! The configuration of a streaming context: plain data with defaults, validated before
//! anything runs ([`StreamingContextBuilder::validate`]); [`StreamingContextBuilder::build`]
//! turns it into a [`StreamingContext`](crate::StreamingContext).

use crate::driver::rate_controller::Backpressure;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::OnBatchFailure;
use crate::error::ConfigError;
use crate::supervisor::{Backoff, Directive, Strategy};
use crate::wal::{Storage, WalConfig};

/// Where a job's receivers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReceiverPlacement {
    /// In the driver's process (the default): blocks cross to worker processes for their
    /// replicas only.
    #[default]
    Driver,
    /// In worker processes (needs a cluster), as Spark runs receivers on executors: each
    /// receiver starts in a worker process that joins (the one running the fewest), under that
    /// process's supervisor and the job's receiver strategy, and is started on another when its
    /// process is lost (its source redelivers what was not acknowledged). Its blocks cross to
    /// the driver, which places their replicas and writes the write-ahead log, then answers
    /// (`store_reliably` resolves). No receiver runs until a worker process has joined.
    WorkerProcesses,
}

/// Configuration of a [`StreamingContext`](crate::StreamingContext). Plain data with defaults; see each setter.
#[derive(Debug, Clone)]
pub struct StreamingContextBuilder {
    pub(crate) batch_interval: Duration,
    pub(crate) block_interval: Duration,
    /// Whether `block_interval` was set (else it follows a shorter batch interval).
    block_interval_set: bool,
    pub(crate) workers: usize,
    pub(crate) replication: usize,
    pub(crate) executors: usize,
    pub(crate) rate_limit: Option<f64>,
    pub(crate) max_block_bytes: usize,
    pub(crate) block_queue: usize,
    pub(crate) memory_bytes: usize,
    pub(crate) task_attempts: u32,
    pub(crate) early_tasks: bool,
    pub(crate) on_batch_failure: OnBatchFailure,
    pub(crate) receiver_backoff: Option<Backoff>,
    pub(crate) receiver_strategy: Option<StrategyFactory>,
    pub(crate) checkpoint_dir: Option<std::path::PathBuf>,
    pub(crate) wal: Option<WalConfig>,
    pub(crate) storage_wrap: Option<StorageWrap>,
    pub(crate) checkpoint_every: u32,
    pub(crate) cluster: Option<crate::cluster::ClusterConfig>,
    pub(crate) receiver_placement: ReceiverPlacement,
    pub(crate) backpressure: Backpressure,
}

/// Wraps the storage of the checkpoint directory's logs (see
/// [`StreamingContextBuilder::wrap_storage`]).
#[derive(Clone)]
pub(crate) struct StorageWrap(pub(crate) Arc<WrapFn>);

/// The function of a [`StorageWrap`].
pub(crate) type WrapFn = dyn Fn(Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync;

impl std::fmt::Debug for StorageWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageWrap")
    }
}

/// Builds the receivers' strategy (a strategy holds closures, so it is built, not cloned).
#[derive(Clone)]
pub(crate) struct StrategyFactory(Arc<dyn Fn() -> Strategy + Send + Sync>);

impl std::fmt::Debug for StrategyFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StrategyFactory").field(&(self.0)()).finish()
    }
}

impl Default for StreamingContextBuilder {
    fn default() -> Self {
        StreamingContextBuilder {
            batch_interval: Duration::from_secs(1),
            block_interval: DEFAULT_BLOCK_INTERVAL,
            block_interval_set: false,
            workers: 2,
            replication: 2,
            executors: 2,
            rate_limit: None,
            max_block_bytes: 8 << 20,
            block_queue: 4,
            memory_bytes: 128 << 20,
            task_attempts: 4,
            early_tasks: true,
            on_batch_failure: OnBatchFailure::Continue,
            receiver_backoff: Some(Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(5),
            )),
            receiver_strategy: None,
            checkpoint_dir: None,
            wal: None,
            storage_wrap: None,
            checkpoint_every: 100,
            cluster: None,
            receiver_placement: ReceiverPlacement::Driver,
            backpressure: Backpressure::default(),
        }
    }
}

/// The block interval unless set (or the batch interval is shorter).
const DEFAULT_BLOCK_INTERVAL: Duration = Duration::from_millis(200);

impl StreamingContextBuilder {
    /// Every `interval`, the blocks received in it form one batch (default 1 s).
    pub fn batch_interval(mut self, interval: Duration) -> Self {
        self.batch_interval = interval;
        if !self.block_interval_set {
            self.block_interval = DEFAULT_BLOCK_INTERVAL.min(interval);
        }
        self
    }
    /// Receivers' records are cut into a block every `interval` (default 200 ms, or the
    /// batch interval if that is shorter). Must not be longer than the batch interval.
    pub fn block_interval(mut self, interval: Duration) -> Self {
        self.block_interval = interval;
        self.block_interval_set = true;
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
    /// At most `records_per_second` records stored per receiver (default: unlimited). With
    /// [`backpressure`](Self::backpressure) on, the adaptive rate stays within it too.
    pub fn rate_limit(mut self, records_per_second: f64) -> Self {
        self.rate_limit = Some(records_per_second);
        self
    }
    /// The adaptive ingestion rate (default: on; each receiver starts at 1,000 records/s until
    /// its stream's first batch is measured, and never goes below 100): each receiver's `store` is paced to the rate its stream was last
    /// processed at, so batches stay near one interval of work and the scheduling delay below
    /// one interval. [`Backpressure::off`] turns it off.
    /// Receivers in worker processes keep only the fixed [`rate_limit`](Self::rate_limit).
    pub fn backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = backpressure;
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
    /// (default 128 MiB; replicas in this process share memory, so this counts each block once).
    ///
    /// With early tasks (the default) a block leaves the budget as soon as its per-block work
    /// is done, so the budget holds the blocks not yet processed and is a safety net: the
    /// adaptive rate, not the budget, sets the pace. Without early tasks a block stays until
    /// its batch completes, so a batch holds at most this many bytes of records; raise it for
    /// long batch intervals at high rates (e.g. 1 GiB for ~8 M records of 100 bytes per batch).
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_bytes = bytes;
        self
    }
    /// Whether a block's per-block work (narrow operations and the map-side combine of
    /// `count`, `aggregate`, `reduce_by_key`) starts as soon as the block is acknowledged
    /// (default `true`), rather than at its batch boundary. The merge of the partial results
    /// and `for_each_batch` still run at the boundary, in batch order. On: the executors work
    /// as records arrive instead of idling between boundaries, and a batch's output follows
    /// its boundary by little more than its last block's work.
    pub fn early_tasks(mut self, on: bool) -> Self {
        self.early_tasks = on;
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
    /// [`StreamingContext::get_or_create`](crate::StreamingContext::get_or_create)).
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

    /// Accepts workers in other processes ([`crate::cluster`]): the driver listens on
    /// `config.listen` for workers started with [`crate::cluster::run_worker`] and the same
    /// cookie, and places block replicas in them, never two replicas of a block in one
    /// process. The in-process workers (see [`workers`](Self::workers)) stay, as one
    /// process: with k = 2, one replica is here and one in a worker process. Refused at build
    /// time: an empty cookie, a heartbeat deadline under 50 ms, or `max_block_bytes` above
    /// [`crate::cluster::MAX_CLUSTER_BLOCK_BYTES`].
    pub fn cluster(mut self, config: crate::cluster::ClusterConfig) -> Self {
        self.cluster = Some(config);
        self
    }

    /// Where receivers run (default: in the driver's process). With
    /// [`ReceiverPlacement::WorkerProcesses`] (needs a [`cluster`](Self::cluster)), each runs
    /// in a worker process started with
    /// [`StreamingContext::run_as_worker`](crate::StreamingContext::run_as_worker).
    pub fn receiver_placement(mut self, placement: ReceiverPlacement) -> Self {
        self.receiver_placement = placement;
        self
    }

    /// Compacts the metadata log into `checkpoint.json` every `batches` completed batches
    /// (default 100; must be at least 1).
    pub fn checkpoint_interval(mut self, batches: u32) -> Self {
        self.checkpoint_every = batches;
        self
    }

    /// Writes the checkpoint directory's logs (write-ahead log segments and `metadata.log`)
    /// through `wrap(storage)` instead of straight to the directory: for fault injection
    /// ([`FaultyStorage`](crate::testing::FaultyStorage) fails appends or syncs on command)
    /// and instrumentation. `wrap` is called once per log (the WAL's directory and the
    /// checkpoint directory). The marker and `checkpoint.json` are written directly.
    pub fn wrap_storage<F>(mut self, wrap: F) -> Self
    where
        F: Fn(Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync + 'static,
    {
        self.storage_wrap = Some(StorageWrap(Arc::new(wrap)));
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
        if self.workers == 0 && self.cluster.is_none() {
            return Err(ConfigError::new(
                "workers",
                "must be at least 1 (0 only with a cluster: every replica in worker processes)",
            ));
        }
        if self.replication == 0 {
            return Err(ConfigError::new("replication", "must be at least 1"));
        }
        if self.replication > self.workers && self.cluster.is_none() {
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
        self.backpressure.validate()?;
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
        if self.checkpoint_every == 0 {
            return Err(ConfigError::new(
                "checkpoint_interval",
                "must be at least 1 batch",
            ));
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
        if self.receiver_placement == ReceiverPlacement::WorkerProcesses && self.cluster.is_none() {
            return Err(ConfigError::new(
                "receiver_placement",
                "receivers in worker processes need a cluster (`cluster(ClusterConfig)`)",
            ));
        }
        if let Some(c) = &self.cluster {
            c.validate(self.max_block_bytes)
                .map_err(|e| ConfigError::new("cluster", e.to_string()))?;
        }
        if let Some(dir) = &self.checkpoint_dir {
            crate::checkpoint::check_usable(dir)
                .map_err(|e| ConfigError::new("checkpoint_dir", e.to_string()))?;
        }
        Ok(())
    }

    /// The receivers' strategy: the configured one, or the default (one-for-one, restart on
    /// any error or panic, at most 10 times per minute, then escalate).
    pub(crate) fn receivers_strategy(&self) -> Strategy {
        match &self.receiver_strategy {
            Some(make) => (make.0)(),
            None => Strategy::one_for_one(10, Duration::from_secs(60))
                .on_panic(Directive::Restart)
                .otherwise(Directive::Restart)
                .on_limit_exceeded(Directive::Escalate),
        }
    }
}
