//! Tributary: fault-tolerant stream ingestion.
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod error;
mod receiver;
mod store;
pub mod supervisor;
pub mod telemetry;

pub use error::{
    BoxError, ConfigError, Error, PanicError, Result, SharedError, StoreError, SupervisorError,
};
pub use receiver::{Receiver, ReceiverContext, ReceiverRef, ReceiverSpec, SendError};
pub use store::Store;
pub use supervisor::{
    Backoff, ChildInfo, ChildKind, ChildStatus, Directive, RestartLimit, Strategy, StrategyKind,
    Supervisor, SupervisorHandle, SupervisorSpec,
};
pub use telemetry::{EventKind, SupervisionEvent};
pub mod testing;
