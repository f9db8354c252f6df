//! A worker process's run: it joins its driver and hosts a block store and, with the job, an
//! executor and a receiver host, until the driver goes away or fences it, or Ctrl-C.

use std::time::Duration;

use ractor::{Actor, ActorCell};

use crate::batch::TaskRegistry;
use crate::block_manager::Worker;
use crate::cluster::data_plane::LinkTo;
use crate::cluster::executor::TaskHost;
use crate::cluster::node::{node_server, NodeEvent, NodeSlot};
use crate::cluster::protocol::{EXECUTORS, RECEIVER_HOSTS};
use crate::cluster::receiver_host::{ReceiverHost, ReceiverJob};
use crate::cluster::{ClusterError, WorkerConfig, BLOCK_STORES};

/// How a worker process's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// The driver went away or closed the connection (it fenced this worker, or stopped).
    DriverGone,
    /// Ctrl-C.
    Interrupted,
}

/// Runs a worker that only holds blocks: joins the driver at `cfg.driver` and hosts a block
/// store for it until the driver goes away (or fences this worker), or Ctrl-C. The driver's
/// own executors run the tasks over its blocks; to run them here, where the blocks are, use
/// [`StreamingContext::run_as_worker`](crate::StreamingContext::run_as_worker). A wrong
/// cookie is [`ClusterError::Refused`]; a driver that cannot be reached within
/// `cfg.connect_timeout` is [`ClusterError::Connect`].
pub async fn run_worker(cfg: WorkerConfig) -> Result<WorkerExit, ClusterError> {
    run_worker_with(cfg, None).await
}

/// Runs a worker; with the job (its tasks and receivers), it also hosts an executor for the
/// tasks and a receiver host for the receivers the driver places here.
pub(crate) async fn run_worker_with(
    cfg: WorkerConfig,
    job: Option<(TaskRegistry, ReceiverJob)>,
) -> Result<WorkerExit, ClusterError> {
    let _slot = NodeSlot::take()?;
    let name = format!("{}-{}", cfg.name, std::process::id());
    let (server, mut events) = node_server(name.clone(), cfg.cookie.clone()).await?;
    let guard = StopOnDrop(server.get_cell());
    let tls = match &cfg.tls {
        Some((t, name)) => Some((t.connector()?, crate::cluster::tls::server_name(name)?)),
        None => None,
    };
    let link_to = LinkTo {
        driver: cfg.driver.clone(),
        tls: tls.clone(),
    };
    let store = Worker {
        open_link: Some(link_to.opener()),
    };
    let (store, _join) = Actor::spawn(None, store, ())
        .await
        .map_err(|e| ClusterError::Start {
            what: "the block store".into(),
            reason: e.to_string(),
        })?;
    let _store_guard = StopOnDrop(store.get_cell());
    ractor::pg::join(BLOCK_STORES.to_string(), vec![store.get_cell()]);
    let (refused_tx, mut refused) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut _executor_guard = None;
    let mut _receivers_guard = None;
    if let Some((tasks, receivers)) = job {
        let (direct, max_block_bytes) = (receivers.direct.clone(), receivers.max_block_bytes);
        let (host, _join) = Actor::spawn(None, ReceiverHost, receivers)
            .await
            .map_err(|e| ClusterError::Start {
                what: "the receiver host".into(),
                reason: e.to_string(),
            })?;
        ractor::pg::join(RECEIVER_HOSTS.to_string(), vec![host.get_cell()]);
        _receivers_guard = Some(StopOnDrop(host.get_cell()));
        let host = TaskHost {
            store: store.clone(),
            tasks,
            slots: cfg.executors,
            direct,
            max_block_bytes,
            refused: refused_tx.clone(),
        };
        let (exec, _join) =
            Actor::spawn(None, host, ())
                .await
                .map_err(|e| ClusterError::Start {
                    what: "the executor".into(),
                    reason: e.to_string(),
                })?;
        ractor::pg::join(EXECUTORS.to_string(), vec![exec.get_cell()]);
        _executor_guard = Some(StopOnDrop(exec.get_cell()));
    }
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    loop {
        let connected = match &tls {
            Some((connector, name)) => {
                ractor_cluster::client_connect_enc(
                    &server,
                    cfg.driver.as_str(),
                    connector.clone(),
                    name.clone(),
                )
                .await
            }
            None => ractor_cluster::client_connect(&server, cfg.driver.as_str()).await,
        };
        match connected {
            Ok(()) => break,
            // A handshake the driver refused, or a driver whose certificate does not verify:
            // trying again would not change it.
            Err(ractor_cluster::ClientConnectErr::Encryption(e)) => {
                return Err(ClusterError::Tls(format!(
                    "the TLS handshake with the driver at {} failed: {e}",
                    cfg.driver
                )))
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(driver = %cfg.driver, error = %e, "driver not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(ClusterError::Connect {
                    addr: cfg.driver.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    let mut joined = false;
    let exit = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(NodeEvent::Ready { .. }) => {
                    joined = true;
                    tracing::info!(worker = %name, driver = %cfg.driver, "joined the driver");
                }
                Some(NodeEvent::Left { .. }) | None => {
                    tracing::warn!(worker = %name, "the driver closed the connection; exiting");
                    break Ok(WorkerExit::DriverGone);
                }
                Some(NodeEvent::Refused { .. }) => {
                    break Err(ClusterError::Refused { addr: cfg.driver.clone() });
                }
            },
            Some(reason) = refused.recv() => {
                tracing::error!(worker = %name, driver = %cfg.driver, %reason, "the driver refused this worker");
                break Err(ClusterError::WrongJob { addr: cfg.driver.clone(), reason });
            }
            _ = tokio::signal::ctrl_c() => break Ok(WorkerExit::Interrupted),
        }
    };
    if !joined && exit == Ok(WorkerExit::DriverGone) {
        return Err(ClusterError::Refused {
            addr: cfg.driver.clone(),
        });
    }
    drop(guard);
    exit
}

/// Stops an actor when dropped.
struct StopOnDrop(ActorCell);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop(None);
    }
}
