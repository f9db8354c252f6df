//! # Tributary: fault-tolerant stream ingestion
//!
//! Tributary does in Rust what Spark Streaming's receiver layer does on the JVM: user-written
//! **receivers** talk to sources and store records; they run as long-lived `ractor` actors under
//! **supervisors** that decide, per error type, whether a failed receiver is resumed, restarted,
//! stopped or whether the failure escalates.
//!
//! ```text
//!  source ──► Receiver actor ──store()──► BlockGenerator ──block──► BlockManager (k replicas)
//!               ▲   (user code)            (per receiver)              │      └─► WriteAheadLog
//!               │                                                      ▼
//!         Supervisor tree  ◄── failures ── ReceiverTracker ◄── block metadata
//!         (one-for-one, per-error                              │
//!          directives, 10 restarts/min)                        ▼
//!                      (acknowledged ──► early tasks) JobScheduler: every batch interval
//!                                             ──► merge + output, in batch order
//! ```
//!
//! Available today: receivers as actors ([`Receiver`]) and the [`Store`] they write to;
//! supervision trees ([`Supervisor`], [`Strategy`], [`Directive`]) with restart limits, backoff
//! and an event stream; and the in-process block pipeline: a [`StreamingContext`] cuts stored
//! records into [`Block`]s (cut at every batch boundary too), replicates them on `k` workers,
//! runs the user's [`DStream`] per-block operations on supervised executors as blocks are
//! acknowledged, and merges and outputs each batch at its boundary; with a checkpoint directory and the
//! [`wal`] (write-ahead log), acknowledged records survive a killed process
//! ([`StreamingContext::get_or_create`], [`Store::store_reliably`]).
//!
//! ## Directives
//!
//! | directive | the failed child |
//! | --- | --- |
//! | [`Directive::Resume`] | keeps its state; the failing message is dropped |
//! | [`Directive::Restart`] | state rebuilt by its start hook, **in place**: its mailbox and its [`ReceiverRef`] survive |
//! | [`Directive::Stop`] | stops for good; its supervisor records why |
//! | [`Directive::Escalate`] | its supervisor fails with the same error; the next supervisor up decides |
//!
//! A failure that no case matches escalates (as in Akka). At most 10 restarts of one child
//! within any 60 s (a sliding window; Akka's is tumbling and lets up to 20 through); the restart
//! that would exceed it stops the child (or escalates, if configured). Panics are failures like
//! errors and never take down a sibling or the process.
//!
//! ## A receiver under a supervisor
//!
//! ```
//! use std::time::Duration;
//! use tributary::{
//!     BoxError, Directive, ReceiverContext, Receiver, ReceiverSpec, Store, Strategy, Supervisor,
//! };
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("malformed line: {0}")]
//! struct Malformed(String);
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("connection lost")]
//! struct ConnectionLost;
//!
//! /// Parses `key=value` lines pushed to it and stores the values.
//! struct KvReceiver;
//!
//! impl Receiver for KvReceiver {
//!     type Msg = String;
//!     type State = u64; // lines parsed by this incarnation
//!     type Record = String;
//!
//!     async fn pre_start(&self, _ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
//!         Ok(0) // connect, subscribe, spawn a reader task...
//!     }
//!
//!     async fn handle(
//!         &self,
//!         ctx: &ReceiverContext<Self>,
//!         line: String,
//!         parsed: &mut u64,
//!     ) -> Result<(), BoxError> {
//!         if line == "EOF" {
//!             return Err(Box::new(ConnectionLost));
//!         }
//!         let (_, value) = line.split_once('=').ok_or_else(|| Malformed(line.clone()))?;
//!         *parsed += 1;
//!         ctx.store(value.to_string()).await?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let strategy = Strategy::one_for_one(10, Duration::from_secs(60))
//!     .on::<Malformed>(Directive::Resume)        // skip the bad line, keep going
//!     .on::<ConnectionLost>(Directive::Restart)  // reconnect, keep queued lines
//!     .otherwise(Directive::Escalate);
//! let root = Supervisor::start("root", strategy).await?;
//! let (store, mut records) = Store::channel(1024);
//! let rx = root.spawn_receiver(ReceiverSpec::new("kv", KvReceiver, store)).await?;
//!
//! for line in ["a=1", "garbage", "b=2", "EOF", "c=3"] {
//!     rx.send(line.to_string())?;
//! }
//! let mut got = Vec::new();
//! for _ in 0..3 {
//!     got.push(records.recv().await.unwrap());
//! }
//! assert_eq!(got, ["1", "2", "3"]); // nothing lost across the Resume and the Restart
//! root.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Nested supervisors ([`SupervisorHandle::spawn_supervisor`]) build trees; subscribe to their
//! decisions with [`SupervisorHandle::subscribe`]. For a whole streaming job (receivers, blocks,
//! batches), see [`StreamingContext`]. See `examples/` for runnable programs.
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

pub mod batch;
mod batch_clock;
pub mod block;
mod block_generator;
mod block_manager;
mod buffer_pool;
pub mod cluster;

pub mod checkpoint;
mod config;
mod context;
pub mod direct;
mod driver;
mod early_tasks;
mod error;
mod receiver;
mod store;
mod stream;
pub mod supervisor;
pub mod telemetry;
pub mod testing;
pub mod wal;
mod wire;

pub use batch::{Batch, BatchError, BatchId, BatchInfo};
pub use block::{Block, BlockId, ByteString, DecodeError, ReadAs, Record, WriteFrom};
pub use block_manager::BlockError;
pub use checkpoint::{Ledger, LossCause, StreamLedger};
pub use config::{ReceiverPlacement, StreamingContextBuilder};
pub use context::{ContextError, StreamingContext};
pub use direct::{
    DirectOptions, DirectSource, OffsetRange, PlannedRange, RangeLimits, RangeSink, SourceError,
};
pub use driver::rate_controller::Backpressure;
pub use driver::{OnBatchFailure, RecoveryReport};
pub use error::{
    BoxError, ConfigError, Error, PanicError, RemoteError, Result, SharedError, StoreError,
    SupervisorError,
};
pub use receiver::{Receiver, ReceiverContext, ReceiverRef, ReceiverSpec, SendError};
pub use store::Store;
pub use stream::DStream;
pub use supervisor::{
    Backoff, ChildInfo, ChildKind, ChildStatus, Directive, RestartLimit, Strategy, StrategyKind,
    Supervisor, SupervisorHandle, SupervisorSpec,
};
pub use telemetry::{EventKind, SupervisionEvent};
