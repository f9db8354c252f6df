//! Test helpers: a scriptable receiver ([`Probe`]) and event-stream helpers.
//!
//! Used by Tributary's own tests, examples and benchmarks, and available to users who want to
//! test their supervision trees. `Probe` fails, panics, blocks or completes on command, and
//! keeps a [`Journal`] of its lifecycle that survives its restarts.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};

use crate::error::BoxError;
use crate::receiver::{Receiver, ReceiverContext};
use crate::telemetry::SupervisionEvent;

/// What happened to a [`Probe`], across all its incarnations. Shared by clones.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    inner: Arc<JournalInner>,
}

#[derive(Debug, Default)]
struct JournalInner {
    starts: AtomicU64,
    stops: AtomicU64,
    fail_next_starts: AtomicU32,
    log: Mutex<Vec<String>>,
}

impl Journal {
    /// A new, empty journal.
    pub fn new() -> Self {
        Journal::default()
    }

    /// Times the start hook succeeded.
    pub fn starts(&self) -> u64 {
        self.inner.starts.load(Ordering::SeqCst)
    }

    /// Times the stop hook ran.
    pub fn stops(&self) -> u64 {
        self.inner.stops.load(Ordering::SeqCst)
    }

    /// Makes the next `n` start hooks fail with [`StartError`].
    pub fn fail_next_starts(&self, n: u32) {
        self.inner.fail_next_starts.store(n, Ordering::SeqCst);
    }

    /// Lifecycle lines (`"start NAME"`, `"stop NAME"`), in order, across every probe sharing
    /// this journal.
    pub fn log(&self) -> Vec<String> {
        self.inner.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn push(&self, line: String) {
        if let Ok(mut log) = self.inner.log.lock() {
            log.push(line);
        }
    }
}

/// The error a [`Probe`]'s start hook fails with when told to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("probe start hook failed on purpose")]
pub struct StartError;

/// A scriptable receiver for tests. It stores the `u64`s it is sent.
#[derive(Debug, Clone)]
pub struct Probe {
    name: String,
    journal: Journal,
}

impl Probe {
    /// A probe named `name` (used in journal lines) writing to `journal`.
    pub fn new(name: impl Into<String>, journal: Journal) -> Self {
        Probe {
            name: name.into(),
            journal,
        }
    }
}

/// Commands for a [`Probe`].
#[derive(Debug)]
pub enum ProbeMsg {
    /// Count it in the state and store it.
    Store(u64),
    /// Fail with this error.
    Fail(BoxError),
    /// Panic with this message.
    Panic(&'static str),
    /// Wait until the sender is dropped or sends (holds the mailbox while messages queue).
    Block(oneshot::Receiver<()>),
    /// Reply with a view of the current state.
    Get(oneshot::Sender<ProbeView>),
    /// End cleanly.
    Finish,
}

impl ractor::Message for ProbeMsg {}

/// A view of a probe's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeView {
    /// Which start this state came from (1 = first start, 2 = after one restart, ...).
    pub incarnation: u64,
    /// Values stored by this incarnation, in order.
    pub stored: Vec<u64>,
}

/// A probe's state.
#[derive(Debug)]
pub struct ProbeState {
    incarnation: u64,
    stored: Vec<u64>,
}

impl Receiver for Probe {
    type Msg = ProbeMsg;
    type State = ProbeState;
    type Record = u64;

    async fn pre_start(&self, _ctx: &ReceiverContext<Self>) -> Result<ProbeState, BoxError> {
        let fail = self
            .journal
            .inner
            .fail_next_starts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(Box::new(StartError));
        }
        let incarnation = self.journal.inner.starts.fetch_add(1, Ordering::SeqCst) + 1;
        self.journal.push(format!("start {}", self.name));
        Ok(ProbeState {
            incarnation,
            stored: Vec::new(),
        })
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        msg: ProbeMsg,
        state: &mut ProbeState,
    ) -> Result<(), BoxError> {
        match msg {
            ProbeMsg::Store(v) => {
                state.stored.push(v);
                ctx.store(v).await?;
            }
            ProbeMsg::Fail(e) => return Err(e),
            ProbeMsg::Panic(m) => panic!("{m}"),
            ProbeMsg::Block(rx) => {
                let _ = rx.await;
            }
            ProbeMsg::Get(reply) => {
                let _ = reply.send(ProbeView {
                    incarnation: state.incarnation,
                    stored: state.stored.clone(),
                });
            }
            ProbeMsg::Finish => ctx.stop(),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _ctx: &ReceiverContext<Self>,
        _state: &mut ProbeState,
    ) -> Result<(), BoxError> {
        self.journal.inner.stops.fetch_add(1, Ordering::SeqCst);
        self.journal.push(format!("stop {}", self.name));
        Ok(())
    }
}

/// Waits (at most `within`) for the next event matching `pred`, skipping others. `None` on
/// timeout or when the stream ends.
pub async fn next_event<F>(
    events: &mut broadcast::Receiver<SupervisionEvent>,
    within: Duration,
    mut pred: F,
) -> Option<SupervisionEvent>
where
    F: FnMut(&SupervisionEvent) -> bool,
{
    tokio::time::timeout(within, async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return Some(e),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Asks a probe for its state (at most `within`).
pub async fn probe_view(
    probe: &crate::ReceiverRef<ProbeMsg>,
    within: Duration,
) -> Option<ProbeView> {
    let (tx, rx) = oneshot::channel();
    probe.send(ProbeMsg::Get(tx)).ok()?;
    tokio::time::timeout(within, rx).await.ok()?.ok()
}

/// A [`Storage`](crate::wal::Storage) wrapper that fails writes on command, for testing what
/// the pipeline does when the disk fills up or fails. Plug it in with
/// [`StreamingContextBuilder::wrap_storage`](crate::StreamingContextBuilder::wrap_storage);
/// clones share their [`Faults`].
///
/// ```
/// use std::sync::Arc;
/// use tributary::testing::{FaultyStorage, Faults};
/// let faults = Faults::new();
/// let f = faults.clone();
/// let builder = tributary::StreamingContext::builder()
///     .wrap_storage(move |inner| Arc::new(FaultyStorage::new(inner, f.clone())));
/// faults.disk_full(true); // every append now fails with ENOSPC (after a partial write)
/// # drop(builder);
/// ```
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn crate::wal::Storage>,
    faults: Faults,
}

/// The faults a [`FaultyStorage`] injects. Cheap to clone; clones share the settings.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    inner: Arc<Mutex<FaultState>>,
}

/// A step of the logs' life at which [`Faults::crash_at`] ends the process (as a kill would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Just after the first write to a new write-ahead log segment (a roll), past the first.
    SegmentRolled,
    /// Just after a processed write-ahead log segment was deleted.
    SegmentDeleted,
    /// During a compaction: `checkpoint.json` written, `metadata.log` not yet emptied.
    Compacting,
    /// Just after a compaction emptied `metadata.log`.
    Compacted,
}

#[derive(Debug, Default)]
struct FaultState {
    crash: Option<CrashPoint>,
    segments_seen: std::collections::HashSet<String>,
    full: bool,
    fail_syncs: u32,
    only: Option<String>,
    appends_failed: u64,
    syncs_failed: u64,
}

impl Faults {
    /// No faults yet.
    pub fn new() -> Self {
        Faults::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// While `full`, every append fails with ENOSPC after writing the first half of its bytes
    /// (a short write, as a filling disk does).
    pub fn disk_full(&self, full: bool) {
        self.state().full = full;
    }

    /// The next `n` syncs fail with EIO.
    pub fn fail_next_syncs(&self, n: u32) {
        self.state().fail_syncs = n;
    }

    /// Faults apply only to files whose name contains `pattern` (e.g. `"metadata.log"` or
    /// `".wal"`); `None` for every file.
    pub fn only_files(&self, pattern: Option<&str>) {
        self.state().only = pattern.map(str::to_owned);
    }

    /// Ends the process (`abort`, no cleanup, like SIGKILL) when the logs reach `point`.
    pub fn crash_at(&self, point: Option<CrashPoint>) {
        self.state().crash = point;
    }

    fn crash_if(&self, point: CrashPoint) {
        if self.state().crash == Some(point) {
            eprintln!("FaultyStorage: crashing at {point:?}");
            std::process::abort();
        }
    }

    /// Appends failed so far.
    pub fn appends_failed(&self) -> u64 {
        self.state().appends_failed
    }

    /// Syncs failed so far.
    pub fn syncs_failed(&self) -> u64 {
        self.state().syncs_failed
    }
}

impl FaultyStorage {
    /// Wraps `inner`, injecting `faults`.
    pub fn new(inner: Arc<dyn crate::wal::Storage>, faults: Faults) -> Self {
        FaultyStorage { inner, faults }
    }
}

impl crate::wal::Storage for FaultyStorage {
    fn append(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let fail = {
            let mut st = self.faults.state();
            let applies = st.only.as_deref().is_none_or(|p| name.contains(p));
            let fail = st.full && applies && !bytes.is_empty();
            if fail {
                st.appends_failed += 1;
            }
            fail
        };
        if fail {
            self.inner.append(name, &bytes[..bytes.len() / 2])?;
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let rolled = name.ends_with(".wal") && !bytes.is_empty() && {
            let mut st = self.faults.state();
            let first = st.segments_seen.is_empty();
            st.segments_seen.insert(name.to_owned()) && !first
        };
        self.inner.append(name, bytes)?;
        if rolled {
            self.faults.crash_if(CrashPoint::SegmentRolled);
        }
        Ok(())
    }

    fn sync(&self, name: &str) -> std::io::Result<()> {
        let fail = {
            let mut st = self.faults.state();
            let applies = st.only.as_deref().is_none_or(|p| name.contains(p));
            let fail = st.fail_syncs > 0 && applies;
            if fail {
                st.fail_syncs -= 1;
                st.syncs_failed += 1;
            }
            fail
        };
        if fail {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        self.inner.sync(name)
    }

    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }

    fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
        self.inner.read(name)
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.inner.read_at(name, offset, len)
    }

    fn truncate(&self, name: &str, len: u64) -> std::io::Result<()> {
        let compaction = name == "metadata.log" && len == 0;
        if compaction {
            self.faults.crash_if(CrashPoint::Compacting);
        }
        self.inner.truncate(name, len)?;
        if compaction {
            self.faults.crash_if(CrashPoint::Compacted);
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.inner.remove(name)?;
        if name.ends_with(".wal") {
            self.faults.crash_if(CrashPoint::SegmentDeleted);
        }
        Ok(())
    }
}
