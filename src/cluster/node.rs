//! The `ractor_cluster` nodes: the driver's (it accepts workers), and what a worker's node
//! shares with it (the node server, its session events, one node per process). The worker's
//! run is in `worker_node.rs`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServer, NodeServerMessage};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::block_manager::WorkerMsg;
use crate::cluster::data_plane::{Links, MAGIC};
use crate::cluster::{ClusterConfig, ClusterError, BLOCK_STORES};

/// A node's view of its sessions, as the driver's BlockManagerMaster and a worker need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeEvent {
    /// A peer authenticated and synchronised its actors and groups.
    Ready { node: u64, peer: String },
    /// An authenticated peer's connection closed.
    Left { node: u64, peer: String },
    /// A connection closed before it authenticated (a wrong cookie, or not a Tributary node).
    Refused { peer: String },
}

/// Forwards `ractor_cluster`'s session events into a channel.
struct Subscription {
    events: mpsc::UnboundedSender<NodeEvent>,
    authenticated: Arc<Mutex<HashSet<u64>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ractor_cluster::NodeEventSubscription for Subscription {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        lock(&self.authenticated).insert(ses.node_id);
    }

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let _ = self.events.send(NodeEvent::Ready {
            node: ses.node_id,
            peer: ses.peer_addr,
        });
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let was = lock(&self.authenticated).remove(&ses.node_id);
        let peer = ses.peer_addr;
        let _ = self.events.send(if was {
            NodeEvent::Left {
                node: ses.node_id,
                peer,
            }
        } else {
            NodeEvent::Refused { peer }
        });
    }
}

/// An accepted TCP connection handed to `ractor_cluster` (the driver accepts connections
/// itself, so that it knows the port the OS chose and binds only the configured address).
struct Tcp(TcpStream);

impl ClusterBidiStream for Tcp {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = self.0.into_split();
        (Box::new(r), Box::new(w))
    }
    fn peer_label(&self) -> Option<String> {
        self.0.peer_addr().ok().map(|a| a.to_string())
    }
    fn local_label(&self) -> Option<String> {
        self.0.local_addr().ok().map(|a| a.to_string())
    }
}

/// Whether this process runs a cluster node. `ractor`'s process groups and its remote actor
/// ids are process-wide, so two nodes in one process would see each other's workers: at most
/// one runs at a time.
static NODE_RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This process's one cluster node, released when dropped.
pub(crate) struct NodeSlot(());

impl NodeSlot {
    pub(crate) fn take() -> Result<NodeSlot, ClusterError> {
        use std::sync::atomic::Ordering;
        NODE_RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| NodeSlot(()))
            .map_err(|_| ClusterError::Start {
                what: "the cluster node".into(),
                reason: "another cluster node (a context with a cluster, or a worker) runs in this process: one at a time per process".into(),
            })
    }
}

impl Drop for NodeSlot {
    fn drop(&mut self) {
        NODE_RUNNING.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// An accepted TLS connection handed to `ractor_cluster`.
struct TlsTcp {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Option<String>,
    local: Option<String>,
}

impl ClusterBidiStream for TlsTcp {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self.stream);
        (Box::new(r), Box::new(w))
    }
    fn peer_label(&self) -> Option<String> {
        self.peer.clone()
    }
    fn local_label(&self) -> Option<String> {
        self.local.clone()
    }
}

/// How long a worker has to complete the TLS handshake.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Routes an accepted connection by its first byte: a data link (its magic) to `links`,
/// anything else to the node (a `ractor_cluster` session, or a TLS handshake before one).
/// Runs in its own task: a slow or silent peer holds up no one else.
async fn route(
    to: ActorRef<NodeServerMessage>,
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    links: Links,
) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut first = [0u8; 1];
    match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => {
            tracing::debug!(%peer, "a connection sent nothing in time; closed");
            return;
        }
    }
    if first[0] != MAGIC[0] {
        hand_over(&to, stream, tls.as_ref()).await;
        return;
    }
    let mut stream = stream;
    let mut magic = [0u8; 4];
    let read = tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, stream.read_exact(&mut magic)).await;
    if !matches!(read, Ok(Ok(_))) || magic != MAGIC {
        tracing::warn!(%peer, "a connection that is neither a worker's session nor its data link: closed");
        metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
        return;
    }
    match tls {
        None => links.accept(stream, peer).await,
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => links.accept(stream, peer).await,
                _ => {
                    tracing::warn!(%peer, "a data link's TLS handshake failed: refused");
                    metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
                }
            }
        }
    }
}

/// Hands an accepted connection to the node, after the TLS handshake when `tls` is on.
async fn hand_over(
    to: &ActorRef<NodeServerMessage>,
    stream: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) {
    let Some(acceptor) = tls.cloned() else {
        let _ = to.cast(NodeServerMessage::ConnectionOpenedExternal {
            stream: Box::new(Tcp(stream)),
            is_server: true,
        });
        return;
    };
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let local = stream.local_addr().ok().map(|a| a.to_string());
    match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let _ = to.cast(NodeServerMessage::ConnectionOpenedExternal {
                stream: Box::new(TlsTcp {
                    stream,
                    peer,
                    local,
                }),
                is_server: true,
            });
        }
        Ok(Err(e)) => {
            tracing::warn!(peer = ?peer, error = %e, "a worker's TLS handshake failed: refused");
            metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
        }
        Err(_) => {
            tracing::warn!(peer = ?peer, "a worker did not complete the TLS handshake in time: refused");
            metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
        }
    }
}

/// Starts a node server (its own listener on a loopback port the OS chooses, unused: the
/// driver accepts connections itself, a worker only connects out).
pub(crate) async fn node_server(
    name: String,
    cookie: String,
) -> Result<
    (
        ActorRef<NodeServerMessage>,
        mpsc::UnboundedReceiver<NodeEvent>,
    ),
    ClusterError,
> {
    let server = NodeServer::new(
        0,
        cookie,
        name,
        "127.0.0.1".into(),
        None,
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (server, _join) =
        Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClusterError::Start {
                what: "the cluster node".into(),
                reason: e.to_string(),
            })?;
    let (tx, rx) = mpsc::unbounded_channel();
    server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "tributary".into(),
            subscription: Box::new(Subscription {
                events: tx,
                authenticated: Arc::default(),
            }),
        })
        .map_err(|e| ClusterError::Start {
            what: "the cluster node".into(),
            reason: e.to_string(),
        })?;
    Ok((server, rx))
}

/// The driver's node: accepts workers on its address.
pub(crate) struct DriverNode {
    server: ActorRef<NodeServerMessage>,
    accept: JoinHandle<()>,
    /// Accepts links from worker processes on this host (shared memory), if on.
    #[cfg(target_os = "linux")]
    accept_local: Option<JoinHandle<()>>,
    addr: SocketAddr,
    /// Data links to worker processes.
    links: Links,
    /// Released by `stop` (not only on drop: tasks may hold the node a little longer).
    slot: Mutex<Option<NodeSlot>>,
}

impl std::fmt::Debug for DriverNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverNode")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DriverNode {
    /// Listens on `cfg.listen` and starts the node.
    pub(crate) async fn start(
        cfg: &ClusterConfig,
    ) -> Result<(DriverNode, mpsc::UnboundedReceiver<NodeEvent>), ClusterError> {
        let slot = NodeSlot::take()?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| ClusterError::Listen {
                addr: cfg.listen,
                reason: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| ClusterError::Listen {
            addr: cfg.listen,
            reason: e.to_string(),
        })?;
        let tls = cfg.tls.as_ref().map(|t| t.acceptor()).transpose()?;
        let name = format!("tributary-driver-{}-{}", std::process::id(), addr.port());
        let (server, events) = node_server(name, cfg.cookie.clone()).await?;
        let to = server.clone();
        let links = Links::default();
        #[cfg(target_os = "linux")]
        let accept_local = if cfg.shared_memory {
            local_links(&links, addr.port())
        } else {
            None
        };
        let routed = links.clone();
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tracing::debug!(%peer, "worker connection accepted");
                        tokio::spawn(route(to.clone(), stream, tls.clone(), routed.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a worker connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tracing::info!(%addr, "driver listening for workers");
        Ok((
            DriverNode {
                server,
                accept,
                #[cfg(target_os = "linux")]
                accept_local,
                addr,
                links,
                slot: Mutex::new(Some(slot)),
            },
            events,
        ))
    }

    /// The address workers connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The data links to worker processes.
    pub(crate) fn links(&self) -> Links {
        self.links.clone()
    }

    /// Closes the connection of `node` (and its data link): that incarnation of the worker
    /// can no longer reach the driver (it exits; a new one joins as a new worker).
    pub(crate) async fn fence(&self, node: u64) {
        self.links.close(node);
        let sessions = ractor::call_t!(self.server, NodeServerMessage::GetSessions, 2_000);
        if let Ok(sessions) = sessions {
            if let Some(s) = sessions.get(&node) {
                s.actor
                    .stop(Some("fenced: missed the heartbeat deadline".into()));
            }
        }
    }

    /// Stops accepting and closes every session.
    pub(crate) fn stop(&self) {
        self.accept.abort();
        #[cfg(target_os = "linux")]
        if let Some(a) = &self.accept_local {
            a.abort();
        }
        self.links.close_all();
        self.server.stop(None);
        lock(&self.slot).take();
    }
}

impl Drop for DriverNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Listens on an abstract Unix socket for the data links of worker processes on this host
/// (their blocks then go through shared memory) and offers it to workers with their tokens.
/// `None`, logged, if it cannot listen: every block takes TCP.
#[cfg(target_os = "linux")]
fn local_links(links: &Links, port: u16) -> Option<JoinHandle<()>> {
    let suffix = match crate::cluster::random_bytes::<8>() {
        Ok(b) => b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
        Err(e) => {
            tracing::warn!(error = %e, "no shared memory for worker processes on this host: no random name");
            return None;
        }
    };
    let name = format!("tributary-{}-{port}-{suffix}", std::process::id());
    let listener = match crate::cluster::shared_memory::listen(&name) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "no shared memory for worker processes on this host: cannot listen on a Unix socket");
            return None;
        }
    };
    links.set_local(name.clone());
    tracing::debug!(%name, "listening for worker processes on this host (shared memory)");
    let links = links.clone();
    Some(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let links = links.clone();
                    tokio::spawn(async move { links.accept_local(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a local worker's link failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }))
}

/// The block stores of the node `node` (a worker process), as the driver sees them.
pub(crate) fn block_stores_of(node: u64) -> Vec<ActorRef<WorkerMsg>> {
    ractor::pg::get_members(&BLOCK_STORES.to_string())
        .into_iter()
        .filter(|c: &ActorCell| !c.get_id().is_local() && c.get_id().node() == node)
        .map(ActorRef::from)
        .collect()
}
