//! Workers in other processes: the driver listens, workers join it, and the driver places block
//! replicas in their block stores. Built on `ractor_cluster`, the distribution layer of the
//! actor runtime Tributary runs on (cookie authentication, remote actors, process groups).
//!
//! ```text
//!  driver process                                   worker process (the same binary)
//!  StreamingContext + ClusterConfig                 cluster::run_worker(WorkerConfig)
//!    NodeServer ◄──── TCP, cookie challenge ──────── NodeServer
//!    BlockManagerMaster ──Put/Get/Remove/Ping──────► block store (joins "tributary.block-stores")
//!      blocks (Put, Get) on a data link of their own ─► block store (see `data_plane`)
//!      heartbeat: no Ping answer within the deadline ⇒ the worker is lost and its connection
//!      is closed (fenced: that incarnation can never deliver into later batches)
//!    TaskRunner ──Run(block id, task id)───────────► executor (joins "tributary.executors"),
//!               ◄──the partial result's bytes──────     runs the task over its own replica
//! ```
//!
//! One binary, two roles: the program defines its job (streams, outputs) the same way in both;
//! the driver calls [`StreamingContext::start`](crate::StreamingContext::start), a worker
//! [`StreamingContext::run_as_worker`](crate::StreamingContext::run_as_worker), which hosts a
//! block store and an executor for the job's tasks. Tasks run where a replica of their block
//! is; their partial results (e.g. `reduce_by_key`'s per-block combine) cross to the driver,
//! which merges them and runs `for_each_batch`. A worker whose job differs from the driver's
//! (its fingerprint: streams, tasks and their result types) is refused when it joins.
//!
//! Only ids and bytes cross the wire ([`crate::Block`]s in Tributary's own encoding), never
//! closures. A worker exits when its driver goes away (or fences it): a process manager, or the
//! driver in the one-machine mode, starts a new incarnation, which joins as a new worker.
//!
//! Authentication is `ractor_cluster`'s cookie challenge; with [`ClusterTls`] on both sides
//! ([`ClusterConfig::tls`], [`WorkerConfig::tls`]) the connection is also mutual TLS
//! (rustls, as `ractor_cluster` uses it): encrypted, and only certificates of the cluster's CA
//! get as far as the cookie.
//!
//! What `ractor_cluster` does not do, and what this module does instead: a node is only seen
//! down when its connection closes, so a frozen process would go unnoticed; the driver runs a
//! heartbeat with a deadline of its own ([`ClusterConfig::heartbeat_deadline`]). Its frames
//! are capped at 16 MiB, so blocks are refused at configuration time above
//! [`MAX_CLUSTER_BLOCK_BYTES`]. Its session writer queue is unbounded; Tributary never lets it
//! grow with the input rate, since a block is sent only when the previous ones of the same
//! receiver were acknowledged (the block queue bounds what is in flight). Its transport copies
//! a block several times per hop, so blocks between the driver and a worker's block store go
//! on a second connection to the same port, a *data link* (written as they are, read into a
//! buffer of their size; authenticated by a one-time token given over the session, TLS when
//! the session is); with no link open they go through the session. The same credit window
//! bounds what a link has in flight.

pub(crate) mod data_plane;
pub(crate) mod executor;
mod launcher;
pub(crate) mod node;
pub(crate) mod protocol;
pub(crate) mod receiver_host;
#[cfg(target_os = "linux")]
mod shared_memory;
mod tls;
pub(crate) mod worker_node;

use std::net::SocketAddr;
use std::time::Duration;

pub use launcher::{LaunchConfig, WorkerLauncher, WORKER_OF};
pub use tls::ClusterTls;
pub use worker_node::{run_worker, WorkerExit};

/// The largest block (encoded records) that may cross to a worker process: `ractor_cluster`
/// refuses frames above 16 MiB, and a block travels in one frame with a small envelope.
pub const MAX_CLUSTER_BLOCK_BYTES: usize = 15 << 20;

/// The process group workers' block stores join (how the driver finds them).
pub(crate) const BLOCK_STORES: &str = "tributary.block-stores";

/// Errors of the cluster layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The driver could not listen on its address.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A worker could not reach its driver.
    #[error("cannot connect to the driver at {addr}: {reason}")]
    Connect {
        /// The driver's address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The driver closed the connection before the worker was authenticated: a wrong cookie
    /// (the shared secret), or not a Tributary driver.
    #[error(
        "the driver at {addr} refused this worker before authentication (wrong cookie, or not a Tributary driver)"
    )]
    Refused {
        /// The driver's address.
        addr: String,
    },
    /// The driver refused this worker after it authenticated: its job is not the driver's
    /// (another program, another version, or streams defined differently).
    #[error("the driver at {addr} refused this worker: {reason}")]
    WrongJob {
        /// The driver's address.
        addr: String,
        /// The driver's reason.
        reason: String,
    },
    /// The actor runtime could not start a part of the node.
    #[error("could not start {what}: {reason}")]
    Start {
        /// Which part.
        what: String,
        /// Why.
        reason: String,
    },
    /// A setting is invalid.
    #[error("invalid cluster setting: {0}")]
    Config(String),
    /// TLS could not be set up (bad certificates or key), or its handshake failed (a peer
    /// whose certificate the CA did not sign, or whose name is not the expected one).
    #[error("TLS: {0}")]
    Tls(String),
}

/// The worker role, if this process was started as one: `TRIBUTARY_WORKER_OF=HOST:PORT`
/// (set by [`LaunchConfig::this_program`], or by hand) and the cookie in `TRIBUTARY_COOKIE`.
/// A program that defines its job once starts with it:
///
/// ```no_run
/// # async fn main_() -> Result<(), Box<dyn std::error::Error>> {
/// if let Some(worker) = tributary::cluster::worker_role()? {
///     tributary::cluster::run_worker(worker).await?;
///     return Ok(());
/// }
/// // ... the driver: build the context, define the job, start it ...
/// # Ok(()) }
/// ```
///
/// `Err` when `TRIBUTARY_WORKER_OF` is set without a cookie.
pub fn worker_role() -> Result<Option<WorkerConfig>, ClusterError> {
    let Ok(driver) = std::env::var(WORKER_OF) else {
        return Ok(None);
    };
    let cookie = std::env::var("TRIBUTARY_COOKIE").map_err(|_| {
        ClusterError::Config(format!(
            "{WORKER_OF} is set ({driver}) but TRIBUTARY_COOKIE is not"
        ))
    })?;
    Ok(Some(WorkerConfig::new(driver, cookie)))
}

/// A fresh random cookie (128 bits from the OS, as hex), for a driver that launches its own
/// workers ([`WorkerLauncher`]) and so can hand it to them.
pub fn random_cookie() -> Result<String, ClusterError> {
    let bytes = random_bytes::<16>().map_err(|e| ClusterError::Start {
        what: "a random cookie".into(),
        reason: e.to_string(),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `N` bytes from the OS's random source.
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes))?;
    Ok(bytes)
}

/// The driver's side of a cluster: where it listens for workers, the shared secret they must
/// know, and how quickly a silent worker is declared lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Address to listen on for workers (port 0: one chosen by the OS, see
    /// [`StreamingContext::cluster_addr`](crate::StreamingContext::cluster_addr)).
    pub listen: SocketAddr,
    /// The shared secret (cookie) a worker must prove it knows to join.
    pub cookie: String,
    /// A worker that answers no heartbeat for this long is lost (default 2 s).
    pub heartbeat_deadline: Duration,
    /// TLS for the workers' connections (default: none, the cookie only).
    pub tls: Option<ClusterTls>,
    /// Blocks for worker processes on the driver's host go through shared memory (default:
    /// on, Linux only): see [`ClusterConfig::shared_memory`].
    pub shared_memory: bool,
}

impl ClusterConfig {
    /// Listen on `listen`; workers must know `cookie`.
    pub fn new(listen: SocketAddr, cookie: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            listen,
            cookie: cookie.into(),
            heartbeat_deadline: Duration::from_secs(2),
            tls: None,
            shared_memory: true,
        }
    }

    /// Workers connect with mutual TLS: they must present a certificate signed by `tls`'s CA,
    /// and this driver presents `tls`'s certificate. A worker without TLS, or with a
    /// certificate from another CA, is refused before the cookie challenge.
    pub fn tls(mut self, tls: ClusterTls) -> ClusterConfig {
        self.tls = Some(tls);
        self
    }

    /// Whether blocks for worker processes on the driver's host go through shared memory
    /// (default: on; Linux only, elsewhere it has no effect).
    ///
    /// On: a worker that reaches the driver's Unix socket (abstract, so only on the same host
    /// and network namespace) gets each block as a sealed memfd it maps read-only. A block is
    /// then written once whatever the number of replicas on this host, and not copied through
    /// loopback TCP; its memory is shared by the processes holding it and lives while one of
    /// them does, so it survives the death of any one process, as separate copies did, and
    /// not the host's, as they did not. Workers on other hosts take the TCP data link. The
    /// Unix socket is authenticated by the same one-time token as the TCP link, not by TLS
    /// (it never leaves the host). Off: every block takes the TCP link.
    pub fn shared_memory(mut self, on: bool) -> ClusterConfig {
        self.shared_memory = on;
        self
    }

    /// A worker silent for `deadline` is lost (default 2 s; at least 50 ms).
    pub fn heartbeat_deadline(mut self, deadline: Duration) -> ClusterConfig {
        self.heartbeat_deadline = deadline;
        self
    }

    pub(crate) fn validate(&self, max_block_bytes: usize) -> Result<(), ClusterError> {
        if self.cookie.is_empty() {
            return Err(ClusterError::Config(
                "the cookie (shared secret) must not be empty".into(),
            ));
        }
        if self.heartbeat_deadline < Duration::from_millis(50) {
            return Err(ClusterError::Config(format!(
                "heartbeat_deadline {:?} is below 50 ms",
                self.heartbeat_deadline
            )));
        }
        if max_block_bytes > MAX_CLUSTER_BLOCK_BYTES {
            return Err(ClusterError::Config(format!(
                "max_block_bytes {max_block_bytes} is above {MAX_CLUSTER_BLOCK_BYTES}, the largest block that crosses to a worker process"
            )));
        }
        Ok(())
    }
}

/// A worker process's settings: the driver to join and the shared secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The driver's cluster address, `host:port` (a name is resolved at each connection
    /// attempt).
    pub driver: String,
    /// The shared secret (cookie), the same as the driver's.
    pub cookie: String,
    /// This worker's name, for logs (made unique with the process id).
    pub name: String,
    /// How long to keep trying to reach the driver at start (default 10 s).
    pub connect_timeout: Duration,
    /// Tasks this worker's executor runs at once (default: the machine's parallelism),
    /// when it runs the job ([`StreamingContext::run_as_worker`](crate::StreamingContext::run_as_worker)).
    pub executors: usize,
    /// TLS, and the driver's name its certificate must carry (default: none).
    pub tls: Option<(ClusterTls, String)>,
}

impl WorkerConfig {
    /// Join the driver at `driver` with `cookie`.
    pub fn new(driver: impl Into<String>, cookie: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            driver: driver.into(),
            cookie: cookie.into(),
            name: "worker".into(),
            connect_timeout: Duration::from_secs(10),
            executors: std::thread::available_parallelism().map_or(2, usize::from),
            tls: None,
        }
    }

    /// Connect with mutual TLS: present `tls`'s certificate, and accept only a driver whose
    /// certificate `tls`'s CA signed for `driver_name` (a DNS name or an IP address).
    pub fn tls(mut self, tls: ClusterTls, driver_name: impl Into<String>) -> WorkerConfig {
        self.tls = Some((tls, driver_name.into()));
        self
    }

    /// Run up to `n` tasks at once (at least 1).
    pub fn executors(mut self, n: usize) -> WorkerConfig {
        self.executors = n.max(1);
        self
    }
}
