//! Worker monitor: follows the cluster node's sessions for the BlockManagerMaster. A worker
//! process whose session is ready becomes a worker (with a heartbeat); one whose connection
//! closes, or that misses the heartbeat deadline, is lost (and fenced: its session closed).
//!
//! ```text
//!  NodeEvent::Ready ──► its executor's job fingerprint ≠ ours ──► refused (fenced)
//!                   ──► block_stores_of(node) ──► master.join(..) ──► heartbeat task
//!                   ──► a data link offered to its block store (Link(token))
//!                   ──► its executor's task slots into the ExecutorPool
//!  NodeEvent::Left ───► its data link closed, master.node_down(node), pool.remove_node(node)
//!  heartbeat: Ping every deadline/10; no answer for a deadline ──► master.worker_died(w),
//!             pool.remove_node(node), node.fence(node)
//! ```
//!
//! A worker process without an executor (started with [`crate::cluster::run_worker`], no job)
//! only holds blocks; the driver's own executors run the tasks over them.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::{mpsc, oneshot};

use crate::batch::ExecutorPool;
use crate::block_manager::{WorkerId, WorkerMsg};
use crate::cluster::node::{block_stores_of, DriverNode, NodeEvent};
use crate::cluster::protocol::{executors_of, receiver_hosts_of, TaskHostMsg};
use crate::driver::block_manager_master::BlockManagerMaster;
use crate::driver::remote_receivers::Host;
use crate::wire::Ser;

/// Where worker processes' executors go, and the job they must run.
#[derive(Clone)]
pub(crate) struct Jobs {
    pub(crate) pool: ExecutorPool,
    /// The driver's job fingerprint.
    pub(crate) fingerprint: u64,
    /// With receivers in worker processes: where their receiver hosts go.
    pub(crate) receiver_hosts: Option<mpsc::UnboundedSender<Host>>,
}

/// How long a joining worker's executor has to describe itself.
const DESCRIBE_DEADLINE_MS: u64 = 5_000;

/// The executor of the joining process `id` and its task slots; `Err` if it runs another
/// job (it must be refused: its tasks would compute something else).
async fn executor_of(
    id: u64,
    jobs: &Jobs,
) -> Result<Option<(ActorRef<TaskHostMsg>, usize)>, String> {
    let Some(exec) = executors_of(id).into_iter().next() else {
        return Ok(None);
    };
    match ractor::call_t!(exec, TaskHostMsg::Describe, DESCRIBE_DEADLINE_MS) {
        Ok(Ser(Some(d))) if d.fingerprint == jobs.fingerprint => Ok(Some((exec, d.slots as usize))),
        Ok(Ser(Some(d))) => Err(format!(
            "its job (fingerprint {:016x}) is not this driver's ({:016x}): another program, or another version of it, or streams and outputs defined differently",
            d.fingerprint, jobs.fingerprint
        )),
        Ok(Ser(None)) => Err("its executor's description did not decode".into()),
        Err(e) => Err(format!("its executor did not describe itself: {e}")),
    }
}

/// Follows the cluster node's sessions: a worker process that joins gets a worker (and a
/// heartbeat); one whose connection closes is lost.
pub(crate) async fn membership(
    node: Arc<DriverNode>,
    mut events: mpsc::UnboundedReceiver<NodeEvent>,
    master: BlockManagerMaster,
    jobs: Jobs,
    deadline: Duration,
) {
    while let Some(event) = events.recv().await {
        match event {
            NodeEvent::Ready { node: id, peer } => {
                let mut executor = match executor_of(id, &jobs).await {
                    Ok(e) => e,
                    Err(why) => {
                        tracing::error!(node = id, %peer, "a worker process was refused: {why}");
                        metrics::counter!(crate::telemetry::WORKERS_REFUSED_JOB_TOTAL).increment(1);
                        // Tell it why, then close its connection (a moment later, so the reason gets there).
                        if let Some(exec) = executors_of(id).into_iter().next() {
                            let _ = exec.send_message(TaskHostMsg::Refused(Ser::of(why)));
                        }
                        let (node, id) = (node.clone(), id);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            node.fence(id).await;
                        });
                        continue;
                    }
                };
                let stores = block_stores_of(id);
                if stores.is_empty() {
                    tracing::warn!(node = id, %peer, "a node joined without a block store; ignored");
                }
                for actor in stores {
                    let host = host_of(&peer);
                    let Some(w) = master.join(actor.clone(), id, host).await else {
                        return;
                    };
                    // Its blocks go on a data link of their own once the worker opens it.
                    if let Some(offer) = node.links().offer(id) {
                        let _ = actor.send_message(WorkerMsg::Link(offer));
                    }
                    if let Some((exec, slots)) = executor.take() {
                        tracing::info!(
                            worker = w,
                            node = id,
                            slots,
                            "a worker process's executor joined"
                        );
                        jobs.pool.add_remote(w, id, exec, slots);
                        if let Some(hosts) = &jobs.receiver_hosts {
                            for actor in receiver_hosts_of(id) {
                                let _ = hosts.send(Host {
                                    worker: w,
                                    node: id,
                                    actor,
                                });
                            }
                        }
                    }
                    tokio::spawn(heartbeat(
                        node.clone(),
                        master.clone(),
                        jobs.pool.clone(),
                        w,
                        id,
                        actor,
                        deadline,
                    ));
                }
            }
            NodeEvent::Left { node: id, peer } => {
                tracing::warn!(node = id, %peer, "a worker process's connection closed");
                node.links().close(id);
                master.node_down(id);
                jobs.pool.remove_node(id);
            }
            NodeEvent::Refused { peer } => {
                tracing::warn!(%peer, "a connection closed before authentication (wrong cookie, or not a Tributary worker)");
                metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
            }
        }
    }
}

/// The host of a peer address (`ip:port`); `None` for this machine (loopback).
fn host_of(peer: &str) -> Option<std::net::IpAddr> {
    let ip = peer.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok()?;
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    (!ip.is_loopback()).then_some(ip)
}

/// Pings worker `w` (in the process `id`) ten times per deadline; no answer for the deadline
/// since its last answer: the worker is lost, and its connection closed so that this
/// incarnation can never deliver into later batches (it exits; a new one joins as a new
/// worker). A frozen worker is so declared lost between 0.9 and 1 deadline after it froze.
async fn heartbeat(
    node: Arc<DriverNode>,
    master: BlockManagerMaster,
    pool: ExecutorPool,
    w: WorkerId,
    id: u64,
    actor: ActorRef<WorkerMsg>,
    deadline: Duration,
) {
    let every = (deadline / 10).max(Duration::from_millis(10));
    let mut last_answer = tokio::time::Instant::now();
    let mut n = 0u64;
    loop {
        if master.is_closed() {
            return;
        }
        n += 1;
        let sent = tokio::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        if actor.send_message(WorkerMsg::Ping(n, tx.into())).is_err() {
            return; // the session closed: NodeDown handles it
        }
        match tokio::time::timeout_at(last_answer + deadline, rx).await {
            Ok(Ok(_)) => {
                last_answer = tokio::time::Instant::now();
                tokio::time::sleep_until(sent + every).await;
            }
            Ok(Err(_)) => return, // the session closed
            Err(_) => {
                tracing::error!(
                    worker = w,
                    node = id,
                    ?deadline,
                    "worker missed the heartbeat deadline: lost, and fenced"
                );
                metrics::counter!(crate::telemetry::HEARTBEAT_MISSES_TOTAL).increment(1);
                master.worker_died(w);
                pool.remove_node(id);
                node.fence(id).await;
                return;
            }
        }
    }
}
