//! The data plane: blocks between the driver and a worker process on a connection of their
//! own, beside `ractor_cluster`'s session (which keeps every control message: heartbeats,
//! tasks, receivers, removals).
//!
//! ```text
//!  driver                                             worker process
//!  worker monitor ──Link(token), on the authenticated session──► block store
//!  accept loop ◄──TCP: "TRBD" [TLS handshake] token──────────── connects to the driver's address
//!  master ──PUT(req, block)──► ──► block store ──► ◄──ACK(req, held)──
//!         ──GET(req, id)─────►                      ◄──FOUND(req, block or none)──
//!  frame: [length u32 LE, of what follows][kind u8][req u64 LE][body]
//! ```
//!
//! Why a connection of our own: measured on the cluster bench, `ractor_cluster`'s transport
//! copies each block's bytes about five times per hop (encoding into its frame, reading in
//! small pieces into a growing buffer, decoding out of it), and a block of megabytes waits in
//! one queue with the heartbeat. Here a block is written as it is (one vectored write of a
//! small header and the block's bytes) and read straight into a buffer of its size: only the
//! kernel copies it.
//!
//! A worker process on the driver's host links through a Unix socket instead, and its blocks
//! go through shared memory: written once into a sealed memfd whatever the number of
//! replicas, passed with a small `PUT_SHARED` frame, mapped read-only by each worker
//! (see [`crate::cluster::shared_memory`]). Everything else on that link is as on TCP.
//!
//! The link is a faster path, never the only one: with no link (not yet open, or closed) a
//! block goes through the session as before. It is authenticated by a token of 16 random
//! bytes the driver gives the worker over its authenticated session, valid for one link; with
//! TLS the link is TLS too (the same certificates). A worker declared lost has its link closed
//! with its session (fenced): requests in flight end unanswered, which counts as not held.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ractor::ActorRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::block::{Block, BlockId};
use crate::block_manager::{Offer, OpenLink, Token, WorkerMsg};
use crate::wire::{block_from, block_header, get_id, put_id, Wire, HEADER};

/// The first bytes of a link (a `ractor_cluster` session starts with a zero byte, TLS with
/// 0x16: the driver tells them apart on one port).
pub(crate) const MAGIC: [u8; 4] = *b"TRBD";

const PUT: u8 = 1;
const GET: u8 = 2;
const ACK: u8 = 3;
const FOUND: u8 = 4;
/// A put whose block is in the memfd passed with the frame: the body is the block's header
/// and its length (u64 LE).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const PUT_SHARED: u8 = 5;

/// A file descriptor passed with a frame (a block's memfd, on a Unix link).
#[cfg(target_os = "linux")]
type Fd = Arc<std::os::fd::OwnedFd>;
/// No descriptors pass off Linux.
#[cfg(not(target_os = "linux"))]
type Fd = std::convert::Infallible;

#[cfg(target_os = "linux")]
pub(crate) use crate::cluster::shared_memory::Region;

/// Off Linux blocks never go through shared memory: nothing to share.
#[cfg(not(target_os = "linux"))]
#[derive(Default)]
pub(crate) struct Region;

/// Kind and request number, after the length.
const ENVELOPE: usize = 1 + 8;

/// The largest frame read. Blocks are at most
/// [`MAX_CLUSTER_BLOCK_BYTES`](crate::cluster::MAX_CLUSTER_BLOCK_BYTES) plus the record that
/// crossed that size (it goes in whole); the link takes those up to this size (the session's
/// transport stops at 16 MiB).
const MAX_FRAME: usize = 256 << 20;

/// How long a link has to present its token.
const TOKEN_DEADLINE: Duration = Duration::from_secs(10);

/// A frame to write: its head (length, kind, request, the body's first bytes), the rest of
/// its body as it is, and a descriptor to pass with it (Unix links only).
struct Out {
    head: Vec<u8>,
    rest: Bytes,
    fd: Option<Fd>,
}

impl Out {
    fn new(head: Vec<u8>, rest: Bytes) -> Out {
        Out {
            head,
            rest,
            fd: None,
        }
    }
}

fn head(kind: u8, req: u64, body: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(4 + ENVELOPE + 1 + HEADER);
    let len = u32::try_from(ENVELOPE + body).unwrap_or(u32::MAX);
    h.extend_from_slice(&len.to_le_bytes());
    h.push(kind);
    h.extend_from_slice(&req.to_le_bytes());
    h
}

struct Frame {
    kind: u8,
    req: u64,
    body: Bytes,
}

/// The next frame, read into a buffer of its size; `None` at the end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(ENVELOPE..=MAX_FRAME).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let mut body = buf.freeze();
    let kind = body.get_u8();
    let req = body.get_u64_le();
    Ok(Some(Frame { kind, req, body }))
}

/// Writes the frames it is given, each as one vectored write, until the senders are gone.
async fn write_frames<W: AsyncWrite + Unpin>(mut w: W, mut frames: mpsc::UnboundedReceiver<Out>) {
    while let Some(out) = frames.recv().await {
        debug_assert!(out.fd.is_none(), "a descriptor on a TCP link");
        let mut frame = Bytes::from(out.head).chain(out.rest);
        if let Err(e) = w.write_all_buf(&mut frame).await {
            tracing::debug!(error = %e, "data link: write failed");
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// [`write_frames`] on a Unix link: a frame with a descriptor passes it with its first byte.
#[cfg(target_os = "linux")]
async fn write_frames_local(
    mut w: tokio::net::unix::OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Out>,
) {
    use crate::cluster::shared_memory::send_with_fd;
    while let Some(out) = frames.recv().await {
        let written = match &out.fd {
            Some(fd) => match send_with_fd(&mut w, &out.head, fd).await {
                Ok(()) => w.write_all(&out.rest).await,
                Err(e) => Err(e),
            },
            None => {
                let mut frame = Bytes::from(out.head).chain(out.rest);
                w.write_all_buf(&mut frame).await
            }
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "data link (shared memory): write failed");
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// The read half of a link, and the descriptors passed on it (Unix links only).
trait LinkRead: AsyncRead + Unpin {
    /// The oldest descriptor passed and not yet taken.
    fn passed(&mut self) -> Option<PassedFd> {
        None
    }
}

#[cfg(target_os = "linux")]
type PassedFd = std::os::fd::OwnedFd;
#[cfg(not(target_os = "linux"))]
type PassedFd = std::convert::Infallible;

impl<S: AsyncRead + Unpin> LinkRead for tokio::io::ReadHalf<S> {}

#[cfg(target_os = "linux")]
impl LinkRead for crate::cluster::shared_memory::FdReader {
    fn passed(&mut self) -> Option<PassedFd> {
        self.take_fd()
    }
}

/// The block of a `PUT_SHARED` frame: its header from `body`, its bytes mapped from `fd`.
/// `None` (not held) when anything is wrong, with the reason logged.
#[cfg(target_os = "linux")]
fn shared_block(body: &Bytes, fd: Option<PassedFd>) -> Option<Block> {
    let len = body
        .get(HEADER..HEADER + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|l| usize::try_from(l).ok());
    let (Some(mut block), Some(len)) = (block_from(body.slice(..HEADER.min(body.len()))), len)
    else {
        tracing::error!("a shared block with a damaged header");
        return None;
    };
    let Some(fd) = fd else {
        tracing::error!(block = %block.id, "a shared block came without its memory");
        return None;
    };
    match crate::cluster::shared_memory::map(fd, len) {
        Ok(data) => {
            block.data = data;
            Some(block)
        }
        Err(e) => {
            tracing::error!(block = %block.id, error = %e, "a shared block could not be mapped");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn shared_block(_: &Bytes, _: Option<PassedFd>) -> Option<Block> {
    tracing::error!("a shared block, but shared memory is Linux only");
    None
}

fn block_frame(kind: u8, req: u64, tag: Option<u8>, block: &Block) -> Out {
    let tagged = usize::from(tag.is_some());
    let mut h = head(kind, req, tagged + HEADER + block.data.len());
    h.extend(tag);
    h.extend_from_slice(&block_header(block));
    Out::new(h, block.data.clone())
}

/// A `PUT_SHARED` frame: `block`'s header and length, with `fd`, its memory.
#[cfg(target_os = "linux")]
fn shared_frame(req: u64, block: &Block, fd: Fd) -> Out {
    let mut h = head(PUT_SHARED, req, HEADER + 8);
    h.extend_from_slice(&block_header(block));
    h.extend_from_slice(&(block.data.len() as u64).to_le_bytes());
    Out {
        head: h,
        rest: Bytes::new(),
        fd: Some(fd),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request waiting for its answer.
enum Pending {
    Ack(oneshot::Sender<bool>),
    Found(oneshot::Sender<Option<Block>>),
}

/// The driver's end of one worker process's link.
struct Link {
    generation: u64,
    /// A Unix link (the worker process is on this host): blocks go through shared memory.
    shared: bool,
    frames: mpsc::UnboundedSender<Out>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    next: AtomicU64,
    _tasks: [AbortOnDrop; 2],
}

impl Link {
    /// Asks for block `id` on this link; `None` when the link is closed.
    fn get(&self, id: BlockId) -> Option<oneshot::Receiver<Option<Block>>> {
        let (tx, rx) = oneshot::channel();
        self.request(Pending::Found(tx), |req| {
            let mut h = head(GET, req, 12);
            put_id(id, &mut h);
            Out::new(h, Bytes::new())
        })
        .then_some(rx)
    }

    fn request(&self, pending: Pending, frame: impl FnOnce(u64) -> Out) -> bool {
        let req = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert(req, pending);
        if self.frames.send(frame(req)).is_err() {
            lock(&self.pending).remove(&req);
            return false;
        }
        true
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Requests in flight end unanswered: not held, not found.
        lock(&self.pending).clear();
    }
}

#[derive(Default)]
struct Table {
    /// Tokens given to worker processes whose links have not opened yet.
    offered: HashMap<Token, u64>,
    /// Open links, by the worker process's node id.
    open: HashMap<u64, Arc<Link>>,
    generation: u64,
    /// The abstract name of the driver's Unix socket for workers on its host, if it has one.
    local: Option<String>,
}

/// The driver's links to worker processes. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Links(Arc<Mutex<Table>>);

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("open", &lock(&self.0).open.len())
            .finish()
    }
}

impl Links {
    /// Worker processes on this host may link through the Unix socket `name` (abstract).
    #[cfg(target_os = "linux")]
    pub(crate) fn set_local(&self, name: String) {
        lock(&self.0).local = Some(name);
    }

    /// A link for the worker process `node`; `None` if no randomness could be read for its
    /// token (its blocks then go through the session).
    pub(crate) fn offer(&self, node: u64) -> Option<Offer> {
        let token = match crate::cluster::random_bytes::<16>() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(node, error = %e, "no data link for a worker process: no random token");
                return None;
            }
        };
        let mut t = lock(&self.0);
        t.offered.insert(token, node);
        Some(Offer {
            token,
            local: t.local.clone(),
        })
    }

    /// Closes the link of `node` (and forgets its token): its requests in flight end
    /// unanswered.
    pub(crate) fn close(&self, node: u64) {
        let link = {
            let mut t = lock(&self.0);
            t.offered.retain(|_, n| *n != node);
            t.open.remove(&node)
        };
        drop(link);
    }

    /// Closes every link.
    pub(crate) fn close_all(&self) {
        let links = {
            let mut t = lock(&self.0);
            t.offered.clear();
            std::mem::take(&mut t.open)
        };
        drop(links);
    }

    fn link(&self, actor: &ActorRef<WorkerMsg>) -> Option<Arc<Link>> {
        let id = actor.get_id();
        if id.is_local() {
            return None;
        }
        lock(&self.0).open.get(&id.node()).cloned()
    }

    /// Sends `block` to the block store `actor` on its process's link: the answer is whether
    /// it is held. `None` when that process has no open link. On a Unix link the block goes
    /// through shared memory: `region`, made at the first such put, serves every replica.
    pub(crate) fn put(
        &self,
        actor: &ActorRef<WorkerMsg>,
        block: &Block,
        region: &mut Region,
    ) -> Option<oneshot::Receiver<bool>> {
        let link = self.link(actor)?;
        let (tx, rx) = oneshot::channel();
        #[cfg(target_os = "linux")]
        if link.shared && !block.data.is_empty() {
            if let Some(fd) = region.of(&block.data) {
                let sent = link.request(Pending::Ack(tx), |req| shared_frame(req, block, fd));
                if sent {
                    metrics::counter!(crate::telemetry::DATA_LINK_BLOCKS_TOTAL).increment(1);
                    metrics::counter!(crate::telemetry::SHARED_MEMORY_BLOCKS_TOTAL).increment(1);
                }
                return sent.then_some(rx);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = region;
        let sent = link.request(Pending::Ack(tx), |req| block_frame(PUT, req, None, block));
        if sent {
            metrics::counter!(crate::telemetry::DATA_LINK_BLOCKS_TOTAL).increment(1);
        }
        sent.then_some(rx)
    }

    /// Asks the block store `actor` for block `id` on its process's link. `None` when that
    /// process has no open link.
    pub(crate) fn get(
        &self,
        actor: &ActorRef<WorkerMsg>,
        id: BlockId,
    ) -> Option<oneshot::Receiver<Option<Block>>> {
        self.link(actor)?.get(id)
    }

    /// Serves a link whose magic was read (and TLS handshake done): it must present a token
    /// offered to a worker process.
    pub(crate) async fn accept<S>(&self, mut stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(node) = self.authenticate(&mut stream, &peer).await else {
            return;
        };
        let (r, w) = tokio::io::split(stream);
        let (frames, out) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames(w, out));
        self.open(node, &peer, r, frames, writer, false);
    }

    /// Serves a link on the driver's Unix socket (a worker process on this host): it must
    /// present a token offered to a worker process; its blocks then go through shared memory.
    #[cfg(target_os = "linux")]
    pub(crate) async fn accept_local(&self, mut stream: tokio::net::UnixStream) {
        let peer = "this host (Unix socket)";
        let Some(node) = self.authenticate(&mut stream, peer).await else {
            return;
        };
        let (r, w) = stream.into_split();
        let (frames, out) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames_local(w, out));
        self.open(node, peer, r, frames, writer, true);
    }

    /// The node whose offered token `stream` presents first; `None` (refused, logged and
    /// counted) for an unknown token or none in time.
    async fn authenticate<S: AsyncRead + Unpin>(&self, stream: &mut S, peer: &str) -> Option<u64> {
        let mut token = Token::default();
        match tokio::time::timeout(TOKEN_DEADLINE, stream.read_exact(&mut token)).await {
            Ok(Ok(_)) => {}
            _ => {
                tracing::warn!(%peer, "a data link did not present its token in time: refused");
                metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
                return None;
            }
        }
        let node = lock(&self.0).offered.remove(&token);
        if node.is_none() {
            tracing::warn!(%peer, "a data link presented an unknown token: refused");
            metrics::counter!(crate::telemetry::CLUSTER_REFUSED_TOTAL).increment(1);
        }
        node
    }

    /// Opens the link of `node`: `r` its answers, `frames` the requests `writer` writes.
    fn open<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        node: u64,
        peer: &str,
        r: R,
        frames: mpsc::UnboundedSender<Out>,
        writer: tokio::task::JoinHandle<()>,
        shared: bool,
    ) {
        let pending = Arc::new(Mutex::new(HashMap::new()));
        let generation = {
            let mut t = lock(&self.0);
            t.generation += 1;
            t.generation
        };
        let reader = tokio::spawn(answers(r, pending.clone(), self.clone(), node, generation));
        let link = Arc::new(Link {
            generation,
            shared,
            frames,
            pending,
            next: AtomicU64::new(0),
            _tasks: [
                AbortOnDrop(writer.abort_handle()),
                AbortOnDrop(reader.abort_handle()),
            ],
        });
        tracing::info!(node, %peer, shared_memory = shared, "data link to a worker process open");
        metrics::counter!(crate::telemetry::DATA_LINKS_OPENED_TOTAL).increment(1);
        let old = lock(&self.0).open.insert(node, link);
        drop(old);
    }

    fn closed(&self, node: u64, generation: u64) {
        let link = {
            let mut t = lock(&self.0);
            match t.open.get(&node) {
                Some(l) if l.generation == generation => t.open.remove(&node),
                _ => None,
            }
        };
        drop(link);
    }
}

/// Hands the worker's answers to their requests, until the link closes (then later blocks of
/// that process go through its session).
async fn answers<R: AsyncRead + Unpin>(
    mut r: R,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    links: Links,
    node: u64,
    generation: u64,
) {
    loop {
        let frame = match read_frame(&mut r).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(node, error = %e, "data link: a bad frame; closing the link");
                break;
            }
        };
        let waiting = lock(&pending).remove(&frame.req);
        match (frame.kind, waiting) {
            (ACK, Some(Pending::Ack(tx))) => {
                let _ = tx.send(frame.body.first() == Some(&1));
            }
            (FOUND, Some(Pending::Found(tx))) => {
                let found = match frame.body.first() {
                    Some(1) => block_from(frame.body.slice(1..)),
                    _ => None,
                };
                let _ = tx.send(found);
            }
            (kind, _) => {
                tracing::warn!(
                    node,
                    kind,
                    req = frame.req,
                    "data link: an answer to no request; closing the link"
                );
                break;
            }
        }
    }
    tracing::info!(
        node,
        "data link to a worker process closed; its blocks go through its session"
    );
    links.closed(node, generation);
}

/// Where a worker process's block store opens its link: the driver's address, and TLS as
/// the session uses it.
#[derive(Clone)]
pub(crate) struct LinkTo {
    pub(crate) driver: String,
    pub(crate) tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl LinkTo {
    /// How a worker process's block store opens its link when offered one.
    pub(crate) fn opener(self) -> OpenLink {
        Arc::new(move |offer, store| {
            let to = self.clone();
            tokio::spawn(async move {
                let driver = to.driver.clone();
                match serve(to, offer, store).await {
                    Ok(()) => tracing::debug!(%driver, "data link to the driver closed"),
                    Err(e) => {
                        tracing::warn!(%driver, error = %e, "data link to the driver failed; blocks go through the session")
                    }
                }
            })
        })
    }
}

/// A worker process's end: connects to the driver (on its Unix socket when it is on this
/// host, else on TCP), presents the offer's token, and serves the driver's requests with the
/// block store `store` until the link closes.
pub(crate) async fn serve(to: LinkTo, offer: Offer, store: ActorRef<WorkerMsg>) -> io::Result<()> {
    let token = offer.token;
    #[cfg(target_os = "linux")]
    if let Some(name) = offer.local {
        match crate::cluster::shared_memory::connect(name).await {
            Ok(mut unix) => {
                unix.write_all(&token).await?;
                tracing::info!("data link to the driver open (shared memory: same host)");
                let (r, w) = unix.into_split();
                let r = crate::cluster::shared_memory::FdReader::new(r);
                return serve_on(r, w, store).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "the driver's Unix socket is not reachable (another host): TCP link");
            }
        }
    }
    let mut tcp = TcpStream::connect(to.driver.as_str()).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&MAGIC).await?;
    match to.tls {
        Some((connector, name)) => {
            let mut tls = connector.connect(name, tcp).await?;
            tls.write_all(&token).await?;
            tls.flush().await?;
            tracing::info!("data link to the driver open");
            let (r, w) = tokio::io::split(tls);
            serve_on(r, w, store).await
        }
        None => {
            tcp.write_all(&token).await?;
            tracing::info!("data link to the driver open");
            let (r, w) = tokio::io::split(tcp);
            serve_on(r, w, store).await
        }
    }
}

async fn serve_on<R, W>(mut r: R, w: W, store: ActorRef<WorkerMsg>) -> io::Result<()>
where
    R: LinkRead,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (frames, out) = mpsc::unbounded_channel::<Out>();
    let _writer = AbortOnDrop(tokio::spawn(write_frames(w, out)).abort_handle());
    let gone = || io::Error::other("the block store stopped");
    while let Some(frame) = read_frame(&mut r).await? {
        let req = frame.req;
        let frames = frames.clone();
        match frame.kind {
            PUT | PUT_SHARED => {
                let block = if frame.kind == PUT {
                    block_from(frame.body)
                } else {
                    shared_block(&frame.body, r.passed())
                };
                let (tx, rx) = oneshot::channel();
                store
                    .send_message(WorkerMsg::Put(Wire(block), tx.into()))
                    .map_err(|_| gone())?;
                tokio::spawn(async move {
                    let held = rx.await.unwrap_or(false);
                    let mut h = head(ACK, req, 1);
                    h.push(u8::from(held));
                    let _ = frames.send(Out::new(h, Bytes::new()));
                });
            }
            GET => {
                let id = get_id(&frame.body).filter(|_| frame.body.len() == 12);
                let (tx, rx) = oneshot::channel();
                store
                    .send_message(WorkerMsg::Get(Wire(id), tx.into()))
                    .map_err(|_| gone())?;
                tokio::spawn(async move {
                    let out = match rx.await {
                        Ok(Wire(Some(Some(block)))) => block_frame(FOUND, req, Some(1), &block),
                        _ => {
                            let mut h = head(FOUND, req, 1);
                            h.push(0);
                            Out::new(h, Bytes::new())
                        }
                    };
                    let _ = frames.send(out);
                });
            }
            kind => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a frame of unknown kind {kind}"),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::Actor;
    use std::time::SystemTime;

    fn block(seq: u64, len: usize) -> Block {
        Block {
            id: BlockId { stream: 1, seq },
            created: SystemTime::now(),
            records: 7,
            data: Bytes::from(vec![seq as u8; len]),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let out = block_frame(FOUND, 42, Some(1), &block(3, 1000));
        a.write_all(&out.head).await.unwrap();
        a.write_all(&out.rest).await.unwrap();
        let f = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((f.kind, f.req, f.body[0]), (FOUND, 42, 1));
        let got = block_from(f.body.slice(1..)).unwrap();
        assert_eq!((got.id.seq, got.records, got.data.len()), (3, 7, 1000));
        a.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
        assert!(read_frame(&mut b).await.is_err(), "an oversized frame");
        drop(a);
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[5, 0, 0, 0, 1]).await.unwrap();
        assert!(
            read_frame(&mut b).await.is_err(),
            "a frame under its envelope"
        );
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_frame(&mut b).await.unwrap().is_none(), "the end");
    }

    /// The driver's end and a worker's end over an in-memory stream: puts are held by the
    /// store and acknowledged, gets find them, and closing the link ends what is in flight.
    #[tokio::test]
    async fn a_link_carries_puts_and_gets_to_a_block_store() {
        let (store, _) = Actor::spawn(None, crate::block_manager::Worker::default(), ())
            .await
            .unwrap();
        let links = Links::default();
        let token = links.offer(9).unwrap();
        let (driver_end, mut worker_end) = tokio::io::duplex(1 << 16);
        // The worker's first bytes after the magic are its token.
        worker_end.write_all(&token.token).await.unwrap();
        let (r, w) = tokio::io::split(worker_end);
        let serving = tokio::spawn(serve_on(r, w, store.clone()));
        links.accept(driver_end, "test".into()).await;
        assert_eq!(lock(&links.0).open.len(), 1, "the link opened");
        // `put`/`get` route by a remote actor's node; this store is local, so use the link.
        let link = lock(&links.0).open.get(&9).cloned().unwrap();
        let (tx, rx) = oneshot::channel();
        let big = block(5, 200_000);
        assert!(link.request(Pending::Ack(tx), |req| block_frame(PUT, req, None, &big)));
        assert!(rx.await.unwrap(), "held");
        let rx = link.get(big.id).expect("link open");
        let found = rx.await.unwrap().expect("found");
        assert_eq!(found.data, big.data);
        let rx = link.get(BlockId { stream: 1, seq: 99 }).expect("link open");
        assert!(rx.await.unwrap().is_none(), "not held: none");
        drop(link);
        links.close(9);
        assert!(lock(&links.0).open.is_empty());
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(
            ended.is_ok(),
            "the worker's end ends when the driver closes"
        );
        store.stop(None);
    }

    /// A worker that never answers (frozen): closing its link (as fencing does) ends the
    /// put in flight as not held, at once.
    #[tokio::test]
    async fn closing_a_link_ends_its_requests_in_flight_as_not_held() {
        let links = Links::default();
        let token = links.offer(3).unwrap().token;
        let (driver_end, mut worker_end) = tokio::io::duplex(1 << 16);
        worker_end.write_all(&token).await.unwrap();
        links.accept(driver_end, "test".into()).await;
        let link = lock(&links.0).open.get(&3).cloned().unwrap();
        let (tx, rx) = oneshot::channel();
        assert!(link.request(Pending::Ack(tx), |req| block_frame(
            PUT,
            req,
            None,
            &block(1, 10)
        )));
        drop(link);
        links.close(3);
        let answer = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert!(matches!(answer, Ok(Err(_))), "unanswered, not held");
        drop(worker_end);
    }

    /// A Unix link: a put goes as a sealed memfd, is held (mapped) by the store and found by
    /// a get with the same bytes, after the driver's end let go of its memory; an unsealed
    /// memfd is refused (not held), and the link goes on.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_unix_link_carries_blocks_in_shared_memory() {
        use crate::cluster::shared_memory::FdReader;
        use std::io::Write;
        let (store, _) = Actor::spawn(None, crate::block_manager::Worker::default(), ())
            .await
            .unwrap();
        let links = Links::default();
        let token = links.offer(4).unwrap().token;
        let (driver_end, mut worker_end) = tokio::net::UnixStream::pair().unwrap();
        worker_end.write_all(&token).await.unwrap();
        let (r, w) = worker_end.into_split();
        let serving = tokio::spawn(serve_on(FdReader::new(r), w, store.clone()));
        links.accept_local(driver_end).await;
        let link = lock(&links.0).open.get(&4).cloned().unwrap();
        assert!(link.shared, "a Unix link shares memory");
        let big = block(8, 3_000_000);
        let mut region = Region::default();
        let fd = region.of(&big.data).unwrap();
        let (tx, rx) = oneshot::channel();
        assert!(link.request(Pending::Ack(tx), |req| shared_frame(req, &big, fd)));
        assert!(rx.await.unwrap(), "held");
        drop(region);
        // An unsealed memfd: refused.
        let raw = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = std::fs::File::from(raw);
        f.write_all(&[1u8; 100]).unwrap();
        let bad = block(9, 100);
        let (tx, rx) = oneshot::channel();
        assert!(link.request(Pending::Ack(tx), |req| shared_frame(
            req,
            &bad,
            Arc::new(f.into())
        )));
        assert!(!rx.await.unwrap(), "an unsealed memfd is not held");
        let rx = link.get(big.id).expect("link open");
        let found = rx.await.unwrap().expect("found");
        assert_eq!(found.data, big.data);
        // The store's own block, read in this process.
        let (tx, rx) = oneshot::channel();
        store
            .send_message(WorkerMsg::Get(Wire::of(big.id), tx.into()))
            .unwrap();
        let held = rx.await.unwrap().0.flatten().unwrap();
        assert_eq!(held.data.len(), big.data.len());
        drop(link);
        links.close(4);
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(
            ended.is_ok(),
            "the worker's end ends when the driver closes"
        );
        // The block outlives the link and the driver's memfd.
        assert_eq!(held.data, big.data);
        store.stop(None);
    }

    #[tokio::test]
    async fn a_link_with_an_unknown_token_is_refused() {
        let links = Links::default();
        let _ = links.offer(1).unwrap();
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[7u8; 16]).await.unwrap();
        links.accept(b, "test".into()).await;
        assert!(lock(&links.0).open.is_empty());
        assert_eq!(
            lock(&links.0).offered.len(),
            1,
            "the real token is still offered"
        );
    }
}
