//! A socket text receiver: connects to `host:port` and stores newline-delimited lines.
//!
//! ```text
//!  TCP ──► reader task ──Lines(one buffer of lines, generation)──► receiver.handle ──UTF-8 check──► store_many_as
//!             │ over-long line / EOF / I/O error
//!             └──Failed(error, generation)──► handle returns the typed error ──► decider
//! ```
//!
//! The reader reads ahead of `store` by at most [`READ_AHEAD`] messages (each of up to 1,000
//! lines): each message carries a credit, returned once its lines are stored. When `store`
//! waits (the pipeline is full, or the adaptive rate paces it), the reader stops reading and
//! TCP slows the sender; nothing queues without bound.
//!
//! Errors go to the supervisor's decider as [`SocketError`] variants; the streaming context's
//! default (Restart with backoff) reconnects. Lines the reader already read are in the
//! receiver's mailbox and survive a restart, so nothing read is lost; a failure reported by a
//! reader of an earlier connection is ignored (its connection is already gone).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tributary::{BoxError, Receiver, ReceiverContext, ReceiverRef};

/// Errors of the socket receiver (each goes to the decider).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketError {
    /// Connecting failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// The I/O error.
        reason: String,
    },
    /// The peer closed the connection.
    #[error("connection to {addr} closed by the peer")]
    Closed {
        /// The address.
        addr: String,
    },
    /// Reading failed.
    #[error("reading from {addr} failed: {reason}")]
    Io {
        /// The address.
        addr: String,
        /// The I/O error.
        reason: String,
    },
    /// A line exceeded the maximum length; it was skipped up to its newline.
    #[error("line {line} is longer than {max} bytes; skipped")]
    LineTooLong {
        /// 1-based line number on this connection.
        line: u64,
        /// The configured maximum.
        max: usize,
    },
    /// A line is not valid UTF-8; it was skipped (every valid line around it was stored).
    #[error("line {line} is not valid UTF-8; skipped")]
    InvalidUtf8 {
        /// 1-based line number on this connection (the first invalid one of a read).
        line: u64,
    },
}

impl SocketError {
    /// Whether this is about one bad line (too long, not UTF-8) rather than the connection:
    /// such a line was skipped and the connection is fine, so Resume is the usual directive.
    pub fn is_bad_line(&self) -> bool {
        matches!(
            self,
            SocketError::LineTooLong { .. } | SocketError::InvalidUtf8 { .. }
        )
    }
}

/// The strategy this receiver is meant to run under: a bad line (too long, not UTF-8) is
/// skipped (Resume), any other [`SocketError`] reconnects (Restart, with the spec's backoff),
/// anything else escalates, as does exceeding 10 restarts per minute.
pub fn recommended_strategy() -> tributary::Strategy {
    use tributary::{Directive, Strategy};
    Strategy::one_for_one(10, std::time::Duration::from_secs(60))
        .on_when(
            "bad line",
            |e| {
                e.downcast_ref::<SocketError>()
                    .is_some_and(SocketError::is_bad_line)
            },
            Directive::Resume,
        )
        .on::<SocketError>(Directive::Restart)
        .otherwise(Directive::Escalate)
        .on_limit_exceeded(Directive::Escalate)
}

/// Stores every line read from a TCP connection.
#[derive(Debug, Clone)]
pub struct SocketTextReceiver {
    addr: String,
    max_line: usize,
    connect_timeout: Duration,
}

impl SocketTextReceiver {
    /// A receiver reading from `addr` (`host:port`). Lines up to 64 KiB.
    pub fn new(addr: impl Into<String>) -> Self {
        SocketTextReceiver {
            addr: addr.into(),
            max_line: 64 << 10,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Longest accepted line, in bytes, without its newline (default 64 KiB).
    pub fn max_line_len(mut self, bytes: usize) -> Self {
        self.max_line = bytes.max(1);
        self
    }

    /// How long a connection attempt may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// Messages of lines the reader may have read and not yet seen stored, per connection.
pub const READ_AHEAD: usize = 16;

/// A message's place in the reader's read-ahead window, given back when it is dropped (once
/// its lines are stored, or given up).
pub struct Credit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl std::fmt::Debug for Credit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credit")
    }
}

/// Raw lines (without their newlines) read from a socket, one after the other in one buffer:
/// the reader allocates nothing per line, and the receiver stores each line as a `&str` slice
/// of it (`store_many_as`), so a line's bytes are copied once more, into its block.
#[derive(Debug, Default)]
pub struct LineBatch {
    data: Vec<u8>,
    /// Where each line ends in `data`.
    ends: Vec<usize>,
}

impl LineBatch {
    /// The number of lines.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there is no line.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The lines, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(a, b)| &self.data[a..*b])
    }

    /// Where the line being read starts.
    fn open_line(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }
}

/// Messages from the reader task.
#[derive(Debug)]
pub enum SocketMsg {
    /// Raw lines (without newline) and the line number of the first one.
    Lines {
        /// Which connection read them.
        generation: u64,
        /// 1-based number of the first line.
        first_line: u64,
        /// The lines.
        lines: LineBatch,
        /// Its place in the read-ahead window (see [`READ_AHEAD`]).
        credit: Credit,
    },
    /// The reader hit an error.
    Failed {
        /// Which connection.
        generation: u64,
        /// The error.
        error: SocketError,
    },
}

/// State: the reader task of the current connection.
#[derive(Debug)]
pub struct SocketState {
    generation: u64,
    reader: JoinHandle<()>,
    lines: u64,
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

async fn read_lines<R: AsyncRead + Unpin>(
    stream: R,
    addr: String,
    max: usize,
    generation: u64,
    me: ReceiverRef<SocketMsg>,
) {
    let credits = Arc::new(Semaphore::new(READ_AHEAD));
    let me = Sender {
        me,
        credits,
        generation,
    };
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut line_no = 0u64;
    let mut batch = LineBatch::default();
    let mut first = 1u64;
    loop {
        // The line is read into the batch's buffer, after the lines before it.
        let start = batch.open_line();
        let mut too_long = false;
        // Read one line, never buffering more than `max` bytes of it.
        let eof = loop {
            let buf = match reader.fill_buf().await {
                Ok(b) => b,
                Err(e) => {
                    let _ = me.flush(first, &mut batch).await;
                    let _ = me.me.send(SocketMsg::Failed {
                        generation,
                        error: SocketError::Io {
                            addr,
                            reason: e.to_string(),
                        },
                    });
                    return;
                }
            };
            if buf.is_empty() {
                break true;
            }
            let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..i], Some(i)),
                None => (buf, None),
            };
            if !too_long && batch.data.len() - start + chunk.len() > max {
                too_long = true;
                batch.data.truncate(start);
            }
            if !too_long {
                batch.data.extend_from_slice(chunk);
            }
            let used = found.map_or(chunk.len(), |i| i + 1);
            reader.consume(used);
            if found.is_some() {
                break false;
            }
        };
        if eof && batch.data.len() == start && !too_long {
            let _ = me.flush(first, &mut batch).await;
            let _ = me.me.send(SocketMsg::Failed {
                generation,
                error: SocketError::Closed { addr },
            });
            return;
        }
        line_no += 1;
        if batch.data.len() > start && batch.data.last() == Some(&b'\r') {
            batch.data.pop();
        }
        if too_long {
            if me.flush(first, &mut batch).await.is_err() {
                return;
            }
            first = line_no + 1;
            if me
                .me
                .send(SocketMsg::Failed {
                    generation,
                    error: SocketError::LineTooLong { line: line_no, max },
                })
                .is_err()
            {
                return;
            }
        } else {
            batch.ends.push(batch.data.len());
        }
        // Hand over what is buffered when the socket has nothing more right now, or every 1000.
        if batch.len() >= 1000 || reader.buffer().is_empty() {
            if me.flush(first, &mut batch).await.is_err() {
                return;
            }
            first = line_no + 1;
        }
        if eof {
            let _ = me.me.send(SocketMsg::Failed {
                generation,
                error: SocketError::Closed { addr },
            });
            return;
        }
    }
}

/// The reader's way to the receiver: lines go with a credit of the read-ahead window.
struct Sender {
    me: ReceiverRef<SocketMsg>,
    credits: Arc<Semaphore>,
    generation: u64,
}

impl Sender {
    /// Sends the buffered lines once the window has room (waits for it: the socket is not
    /// read meanwhile).
    async fn flush(&self, first_line: u64, batch: &mut LineBatch) -> Result<(), ()> {
        if batch.is_empty() {
            return Ok(());
        }
        let credit = self.credits.clone().acquire_owned().await.map_err(|_| ())?;
        self.me
            .send(SocketMsg::Lines {
                generation: self.generation,
                first_line,
                lines: std::mem::take(batch),
                credit: Credit(credit),
            })
            .map_err(|_| ())
    }
}

impl Receiver for SocketTextReceiver {
    type Msg = SocketMsg;
    type State = SocketState;
    type Record = String;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<SocketState, BoxError> {
        let connect =
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr)).await;
        let stream = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Box::new(SocketError::Connect {
                    addr: self.addr.clone(),
                    reason: e.to_string(),
                }))
            }
            Err(_) => {
                return Err(Box::new(SocketError::Connect {
                    addr: self.addr.clone(),
                    reason: format!("timed out after {:?}", self.connect_timeout),
                }))
            }
        };
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(receiver = ctx.path(), addr = %self.addr, generation, "connected");
        let reader = tokio::spawn(read_lines(
            stream,
            self.addr.clone(),
            self.max_line,
            generation,
            ctx.myself().clone(),
        ));
        Ok(SocketState {
            generation,
            reader,
            lines: 0,
        })
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        msg: SocketMsg,
        st: &mut SocketState,
    ) -> Result<(), BoxError> {
        match msg {
            SocketMsg::Lines {
                first_line,
                lines,
                credit,
                ..
            } => {
                // Lines of any connection are stored: they were read, and must not be lost.
                let mut good: Vec<&str> = Vec::with_capacity(lines.len());
                let mut first_bad = None;
                for (i, raw) in lines.iter().enumerate() {
                    match std::str::from_utf8(raw) {
                        Ok(s) => good.push(s),
                        Err(_) => {
                            first_bad.get_or_insert(first_line + i as u64);
                        }
                    }
                }
                st.lines += good.len() as u64;
                // Every valid line is stored (each a slice of the batch's buffer), also those
                // after an invalid one; then the invalid line is reported.
                ctx.store_many_as(good).await?;
                drop(credit); // stored: the reader may read one more message ahead
                if let Some(line) = first_bad {
                    return Err(Box::new(SocketError::InvalidUtf8 { line }));
                }
                Ok(())
            }
            SocketMsg::Failed { generation, error } if generation == st.generation => {
                Err(Box::new(error))
            }
            SocketMsg::Failed { generation, error } => {
                tracing::debug!(receiver = ctx.path(), generation, %error, "ignoring a failure of an earlier connection");
                Ok(())
            }
        }
    }

    async fn post_stop(
        &self,
        ctx: &ReceiverContext<Self>,
        st: &mut SocketState,
    ) -> Result<(), BoxError> {
        st.reader.abort();
        tracing::info!(receiver = ctx.path(), lines = st.lines, "disconnected");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_batch_yields_its_lines_in_order_empty_ones_too() {
        let mut b = LineBatch::default();
        assert!(b.is_empty() && b.iter().next().is_none());
        for line in [&b"alpha"[..], b"", b"gamma"] {
            assert_eq!(b.open_line(), b.data.len());
            b.data.extend_from_slice(line);
            b.ends.push(b.data.len());
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.iter().collect::<Vec<_>>(), [&b"alpha"[..], b"", b"gamma"]);
    }
}
