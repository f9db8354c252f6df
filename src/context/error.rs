//! The errors of the streaming context ([`ContextError`]).

use crate::error::{ConfigError, SupervisorError};

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
    /// `stop` was called while `start` was still building the pipeline: `start` undid what it
    /// had built and the context ended (as stopped).
    #[error("the context was stopped before it finished starting")]
    StoppedDuringStart,
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
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The write-ahead log could not be recovered (e.g. corruption in the middle of a segment).
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    /// The cluster layer failed (e.g. a worker could not join its driver).
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A direct stream's source failed in a way retrying cannot fix (a partition gone, a
    /// file truncated or replaced under a recorded offset, a record larger than a block).
    /// Its offsets stay recorded: fix the source and start again, nothing is skipped.
    #[error("direct stream `{stream}`: {error}")]
    DirectSource {
        /// The stream.
        stream: String,
        /// What failed, naming the partition and offsets.
        error: String,
    },
    /// A batch failed and the context is configured to stop on batch failure.
    #[error("{id} failed: {error}")]
    BatchFailed {
        /// The batch.
        id: crate::block::BatchId,
        /// Why.
        error: crate::error::BatchError,
    },
}
