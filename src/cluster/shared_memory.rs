//! Blocks for worker processes on the driver's host, through shared memory (Linux).
//!
//! ```text
//!  driver                                                worker process (same host)
//!  block ──write once──► memfd, sealed (no write, shrink or grow)
//!  links ──Unix socket: PUT_SHARED(req, header, length) + the memfd (SCM_RIGHTS)──► link
//!                                                        mmap read-only ──► Bytes ──► block store
//! ```
//!
//! Over loopback TCP a block is copied four times per replica (into the driver's socket
//! buffer, out of it into the worker's buffer, and the worker's allocation), and each of the
//! k replicas is a copy of its own. Here it is copied once, into the memfd, whatever k is: the
//! workers map the same pages, read-only. The memory lives while one process maps it, so a
//! block survives the death of any one process (the driver, or a worker holding it), as its
//! copies in separate processes did; like them, it does not survive the host.
//!
//! The worker maps only a memfd sealed against writes and shrinking: its mapping can neither
//! change under it nor be cut short (no `SIGBUS`). Anything else is refused: not held.
//!
//! The Unix socket is abstract (no file, nothing to clean up after a crash) and scoped by the
//! network namespace: a worker in another host, or in a container with a network of its own,
//! cannot reach it and takes the TCP link. It is authenticated by the same one-time token as
//! the TCP link; it is not TLS (it never leaves the host).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncRead, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

/// The seals a worker requires before it maps a block: its pages cannot change or go away.
const REQUIRED: SealFlags = SealFlags::WRITE.union(SealFlags::SHRINK);

/// A block's bytes in a sealed memfd, to hand to worker processes on this host.
pub(crate) fn region_of(data: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        "tributary-block",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(data)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    Ok(file.into())
}

/// Maps the block of `len` bytes in `fd` read-only, if it is a sealed memfd of that size.
pub(crate) fn map(fd: OwnedFd, len: usize) -> io::Result<Bytes> {
    let seals = rustix::fs::fcntl_get_seals(&fd)?;
    if !seals.contains(REQUIRED) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a shared block that is not sealed against writes and shrinking",
        ));
    }
    let file = File::from(fd);
    let size = file.metadata()?.len();
    if size != len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a shared block of {size} bytes, announced as {len}"),
        ));
    }
    // SAFETY: the memfd is sealed against writes and shrinking (checked above), so no one can
    // change the mapped bytes or truncate them under the mapping.
    let map = unsafe { memmap2::MmapOptions::new().len(len).populate().map(&file)? };
    Ok(Bytes::from_owner(map))
}

/// The driver's Unix socket for worker processes on its host, at an abstract address.
pub(crate) fn listen(name: &str) -> io::Result<UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Connects to the driver's Unix socket `name`: an error when the driver is not on this host
/// (or not in this network namespace).
pub(crate) async fn connect(name: String) -> io::Result<UnixStream> {
    let stream = tokio::task::spawn_blocking(move || {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name)?;
        std::os::unix::net::UnixStream::connect_addr(&addr)
    })
    .await
    .map_err(io::Error::other)??;
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Writes `head` with `fd` attached (to its first byte).
pub(crate) async fn send_with_fd(
    w: &mut OwnedWriteHalf,
    head: &[u8],
    fd: &OwnedFd,
) -> io::Result<()> {
    let sent = w
        .as_ref()
        .async_io(Interest::WRITABLE, || {
            let fds = [fd.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(
                w.as_ref(),
                &[IoSlice::new(head)],
                &mut control,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            )
            .map_err(io::Error::from)
        })
        .await?;
    // A short write: the fd went with the first bytes; the rest follows as plain bytes.
    w.write_all(&head[sent..]).await
}

/// The read half of a Unix link that keeps the file descriptors passed with its bytes, in
/// the order they came (each is attached to the first byte of its frame, so it arrives no
/// later than that frame).
pub(crate) struct FdReader {
    half: OwnedReadHalf,
    fds: VecDeque<OwnedFd>,
}

impl FdReader {
    pub(crate) fn new(half: OwnedReadHalf) -> FdReader {
        FdReader {
            half,
            fds: VecDeque::new(),
        }
    }

    /// The oldest descriptor received and not yet taken.
    pub(crate) fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.half.as_ref().poll_read_ready(cx))?;
            let fds = &mut this.fds;
            let stream: &UnixStream = this.half.as_ref();
            let unfilled = buf.initialize_unfilled();
            let got = stream.try_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    stream,
                    &mut [IoSliceMut::new(unfilled)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
                )
                .map_err(io::Error::from)?;
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(passed) = m {
                        fds.extend(passed);
                    }
                }
                if msg.flags.contains(ReturnFlags::CTRUNC) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "more file descriptors than expected on a data link",
                    ));
                }
                Ok(msg.bytes)
            });
            match got {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// A memfd shared by the puts of one block's replicas: made at the first put on a Unix link
/// and handed to every worker process on this host that holds a replica.
#[derive(Default)]
pub(crate) struct Region {
    fd: Option<Arc<OwnedFd>>,
    failed: bool,
}

impl Region {
    /// The memfd holding `data`, made once; `None` if it could not be made (then the block
    /// goes as bytes).
    pub(crate) fn of(&mut self, data: &[u8]) -> Option<Arc<OwnedFd>> {
        if self.fd.is_none() && !self.failed {
            match region_of(data) {
                Ok(fd) => self.fd = Some(Arc::new(fd)),
                Err(e) => {
                    self.failed = true;
                    tracing::warn!(error = %e, bytes = data.len(), "no shared memory for a block; it goes as bytes");
                }
            }
        }
        self.fd.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_region_maps_to_its_bytes_and_an_unsealed_one_is_refused() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let fd = region_of(&data).unwrap();
        let dup = fd.try_clone().unwrap();
        let mapped = map(fd, data.len()).unwrap();
        assert_eq!(&mapped[..], &data[..]);
        // Sealed: the sender cannot change or shrink it any more.
        let mut f = File::from(dup);
        assert!(f.write_all(b"x").is_err(), "sealed against writes");
        assert!(f.set_len(10).is_err(), "sealed against shrinking");
        // The wrong length is refused.
        let fd = region_of(&data).unwrap();
        assert!(map(fd, 10).is_err());
        // An unsealed memfd is refused.
        let fd =
            rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        let mut f = File::from(fd);
        f.write_all(&data).unwrap();
        let err = map(f.into(), data.len()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// Descriptors passed with frames come out in order, whatever the reads' boundaries.
    #[tokio::test]
    async fn descriptors_pass_with_their_frames_in_order() {
        use tokio::io::AsyncReadExt;
        let (a, b) = UnixStream::pair().unwrap();
        let (_ar, mut aw) = a.into_split();
        let (br, _bw) = b.into_split();
        let mut reader = FdReader::new(br);
        for i in 0..20u8 {
            let fd = region_of(&[i; 5000]).unwrap();
            send_with_fd(&mut aw, &[i; 7], &fd).await.unwrap();
            if i % 3 == 0 {
                aw.write_all(&[255; 3]).await.unwrap();
            }
        }
        drop(aw);
        let mut all = Vec::new();
        reader.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 20 * 7 + 7 * 3);
        for i in 0..20u8 {
            let fd = reader.take_fd().expect("a descriptor per frame");
            let mapped = map(fd, 5000).unwrap();
            assert!(mapped.iter().all(|&b| b == i), "descriptor {i} in order");
        }
        assert!(reader.take_fd().is_none());
    }
}
