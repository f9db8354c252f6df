//! Error types shared across the crate.
//!
//! Each subsystem has its own enum ([`SupervisorError`], [`StoreError`]); [`Error`] gathers them
//! for callers who do not care which subsystem failed. Failures of user code (a receiver's
//! handler or hooks) are [`BoxError`]s, exactly like `ractor`'s `ActorProcessingErr`, so that a
//! supervisor's decider can downcast them to their concrete type.

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// A failure returned by user code: any error type, boxed. Deciders match its concrete type.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A failure that has been handed to more than one place (events, the caller of a tree).
pub type SharedError = Arc<dyn StdError + Send + Sync + 'static>;

/// A failure that happened in a worker process, as it crossed to the driver: its message
/// (errors do not cross processes as types). E.g. the error of a receiver whose failures
/// escalated past its supervisor there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// A panic caught in a child's handler or hooks, turned into an error so that it is supervised
/// like any other failure. A panic carries only a message, not a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanicError {
    message: String,
}

impl PanicError {
    /// A panic error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        PanicError {
            message: message.into(),
        }
    }

    /// Builds the error from a caught panic payload.
    pub(crate) fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        };
        PanicError { message }
    }

    /// The panic message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PanicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "panicked: {}", self.message)
    }
}

impl StdError for PanicError {}

/// An invalid setting, refused before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{setting}` {fix}")]
pub struct ConfigError {
    /// The setting at fault, e.g. `strategy.window`.
    pub setting: &'static str,
    /// What is wrong and how to fix it.
    pub fix: String,
}

impl ConfigError {
    /// A configuration error for `setting`.
    pub fn new(setting: &'static str, fix: impl Into<String>) -> Self {
        ConfigError {
            setting,
            fix: fix.into(),
        }
    }
}

/// Errors of supervisors and supervision trees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SupervisorError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A child's start hook failed (or panicked) when it was first spawned; nothing was started.
    #[error("child `{child}` failed to start: {error}")]
    StartFailed {
        /// Path of the child, e.g. `root/ingest/socket-1`.
        child: String,
        /// The start hook's error.
        error: SharedError,
    },
    /// A failure escalated to the root of the tree, which stopped with it.
    #[error("failure escalated to the root from `{child}`: {error}")]
    Escalated {
        /// Path of the child where the failure happened.
        child: String,
        /// The child's error, as it returned it (downcast it with [`SupervisorError::downcast_ref`]).
        error: SharedError,
    },
    /// The supervisor was stopped for good by its own supervisor's Stop directive.
    #[error("supervisor stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// The supervisor is no longer running, so the request could not be served.
    #[error("supervisor `{0}` is not running")]
    NotRunning(String),
    /// The supervisor actor died without reporting an outcome (a bug in Tributary, or it was
    /// killed from outside).
    #[error("supervisor `{0}` terminated unexpectedly")]
    Terminated(String),
}

impl SupervisorError {
    /// For [`SupervisorError::Escalated`] and [`SupervisorError::StartFailed`]: the child's error
    /// as its concrete type `E`, if it is one.
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        match self {
            SupervisorError::Escalated { error, .. }
            | SupervisorError::StartFailed { error, .. } => {
                let error: &(dyn StdError + 'static) = error.as_ref();
                error.downcast_ref::<E>()
            }
            _ => None,
        }
    }
}

/// Errors of [`Store`](crate::Store): the record could not be handed to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The pipeline behind the store has shut down; the records were not stored. Returned from a
    /// receiver's handler, this goes to the supervisor's decider like any failure.
    #[error("the store is closed: the pipeline behind it has shut down ({unstored} record(s) not stored)")]
    Closed {
        /// How many records of the call were not stored.
        unstored: usize,
    },
    /// The records were stored but could not be made durable (a write-ahead log or
    /// replication failure): do not acknowledge the source; it should send them again.
    #[error("the records could not be made durable: {reason}")]
    NotDurable {
        /// Why.
        reason: String,
    },
}

/// Any Tributary error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// From supervision.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// From storing records.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// A task failed on every attempt.
    #[error("task for {block} failed after {attempts} attempts: {last_error}")]
    TaskFailed {
        /// The block of the task.
        block: crate::block::BlockId,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_error: String,
    },
    /// A direct stream's range task failed on every attempt (the range is read again on a
    /// restart: nothing is skipped).
    #[error("task for offsets {from}..{until} of partition {partition} failed after {attempts} attempts: {last_error}")]
    RangeTaskFailed {
        /// The partition.
        partition: u32,
        /// The range's first offset.
        from: u64,
        /// The offset after the range.
        until: u64,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_error: String,
    },
    /// The output function failed or panicked.
    #[error("output operation failed: {0}")]
    Output(String),
    /// No executor is running.
    #[error("no executor is running")]
    NoExecutor,
}
