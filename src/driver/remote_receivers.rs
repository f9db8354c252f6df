//! Receivers in worker processes: where each runs, and the driver's ingress for their blocks.
//!
//! ```text
//!  worker process joins (receiver host) ──► placer: unplaced streams started there
//!  worker process lost ───────────────────► placer: its streams re-placed on a survivor
//!                                            (a new epoch; numbering goes on after the last
//!                                            block the driver received)
//!  receiver host ──Block(epoch, block)──► ingress ──(current epoch?)──► push: replicate, log,
//!                ◄──Ok | Err───────────┘                                tracker "added"
//! ```
//!
//! A block of an older placement (its worker was declared lost, fenced, and its stream
//! re-placed) is refused: it is never acknowledged, so its source sends it again. The driver
//! writes the write-ahead log (each block crosses to it anyway, for its replicas to be placed
//! on other processes): `store_reliably` on a worker resolves once the driver has logged and
//! replicated the block, so a receiving worker SIGKILLed right after loses nothing it
//! acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::block::Block;
use crate::block_manager::WorkerId;
use crate::cluster::protocol::{IngressMsg, ReceiverHostMsg, SetRate, StartReceiver, INGRESS};
use crate::driver::rate_controller::RateController;
use crate::error::{RemoteError, SupervisorError};
use crate::wire::Ser;
use crate::wire::Wire;

/// How long a worker has to start a receiver.
const START_DEADLINE_MS: u64 = 10_000;
/// How long a worker has to stop its receivers gracefully (forwarding what they buffered).
const STOP_DEADLINE_MS: u64 = 30_000;
/// How often unplaced streams are tried again while a worker process is there.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Replicates, logs and records one block (the tracker's pipeline), preferring `home`.
pub(crate) type Push =
    Arc<dyn Fn(Block, WorkerId) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A worker process's receiver host, as its process joined.
#[derive(Clone)]
pub(crate) struct Host {
    pub(crate) worker: WorkerId,
    pub(crate) node: u64,
    pub(crate) actor: ActorRef<ReceiverHostMsg>,
}

/// One remote stream: where it runs, in which placement.
struct Remote {
    name: String,
    epoch: u64,
    at: Option<Host>,
    next_seq: u64,
}

#[derive(Default)]
struct Placements {
    streams: HashMap<u32, Remote>,
    hosts: Vec<Host>,
    stopped: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Cmd {
    WorkerLost(WorkerId),
    Stop {
        graceful: bool,
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// The remote receivers of a job. Dropping it does not stop them: call `stop`.
pub(crate) struct RemoteReceivers {
    commands: mpsc::UnboundedSender<Cmd>,
    failures: watch::Receiver<Option<SupervisorError>>,
    ingress: ActorRef<IngressMsg>,
    placer: JoinHandle<()>,
}

impl RemoteReceivers {
    /// Starts the ingress and the placer for `streams` (stream, name, first sequence number);
    /// worker processes' receiver hosts arrive on `hosts`.
    pub(crate) async fn start(
        streams: Vec<(u32, String, u64)>,
        hosts: mpsc::UnboundedReceiver<Host>,
        push: Push,
        rates: Option<RateController>,
    ) -> Result<RemoteReceivers, String> {
        let placements = Arc::new(Mutex::new(Placements {
            streams: streams
                .into_iter()
                .map(|(stream, name, next_seq)| {
                    (
                        stream,
                        Remote {
                            name,
                            epoch: 0,
                            at: None,
                            next_seq,
                        },
                    )
                })
                .collect(),
            ..Placements::default()
        }));
        let (fail_tx, failures) = watch::channel(None);
        let ingress = Ingress {
            placements: placements.clone(),
            push,
            failures: fail_tx,
        };
        let (ingress, _join) = Actor::spawn(None, ingress, ())
            .await
            .map_err(|e| e.to_string())?;
        ractor::pg::join(INGRESS.to_string(), vec![ingress.get_cell()]);
        let (commands, rx) = mpsc::unbounded_channel();
        let placer = tokio::spawn(place(placements, hosts, rx, rates));
        Ok(RemoteReceivers {
            commands,
            failures,
            ingress,
            placer,
        })
    }

    /// Worker `w` is lost: its streams are placed elsewhere.
    pub(crate) fn worker_lost(&self, w: WorkerId) {
        let _ = self.commands.send(Cmd::WorkerLost(w));
    }

    /// A receiver failure that escalated in a worker process (pending until one does).
    pub(crate) fn failures(&self) -> watch::Receiver<Option<SupervisorError>> {
        self.failures.clone()
    }

    /// Stops every remote receiver; graceful: each host forwards what its receivers buffered
    /// first (within a deadline). Nothing is placed after this.
    pub(crate) async fn stop(&self, graceful: bool) {
        let (done, rx) = tokio::sync::oneshot::channel();
        if self.commands.send(Cmd::Stop { graceful, done }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Ends the ingress and the placer (after `stop`).
    pub(crate) fn close(&self) {
        self.ingress.stop(None);
        self.placer.abort();
    }
}

/// The placer: starts unplaced streams on the least loaded receiver host, re-places the
/// streams of a lost worker, retries what could not be placed.
async fn place(
    placements: Arc<Mutex<Placements>>,
    mut hosts: mpsc::UnboundedReceiver<Host>,
    mut commands: mpsc::UnboundedReceiver<Cmd>,
    rates: Option<RateController>,
) {
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hosts_open = true;
    loop {
        tokio::select! {
            host = hosts.recv(), if hosts_open => match host {
                Some(h) => {
                    tracing::info!(worker = h.worker, node = h.node, "a worker process can run receivers");
                    lock(&placements).hosts.push(h);
                }
                None => hosts_open = false,
            },
            cmd = commands.recv() => match cmd {
                Some(Cmd::WorkerLost(w)) => {
                    let mut p = lock(&placements);
                    p.hosts.retain(|h| h.worker != w);
                    for (stream, r) in p.streams.iter_mut() {
                        if r.at.as_ref().is_some_and(|h| h.worker == w) {
                            r.at = None;
                            r.epoch += 1;
                            tracing::warn!(receiver = %r.name, stream, worker = w, "the worker process running this receiver is lost: placing it on another");
                        }
                    }
                }
                Some(Cmd::Stop { graceful, done }) => {
                    stop_all(&placements, graceful).await;
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
            _ = retry.tick() => {}
            _ = async { rates.as_ref()?.changed().await; Some(()) }, if rates.is_some() => {
                if let Some(rates) = &rates {
                    forward_rates(&placements, rates);
                }
            }
        }
        place_unplaced(&placements, rates.as_ref()).await;
    }
}

/// Sends each placed receiver its adaptive rate.
fn forward_rates(placements: &Mutex<Placements>, rates: &RateController) {
    let p = lock(placements);
    for (&stream, r) in &p.streams {
        if let (Some(host), Some(rate)) = (&r.at, rates.rate(stream)) {
            let _ = host
                .actor
                .send_message(ReceiverHostMsg::Rate(Ser::of(SetRate { stream, rate })));
        }
    }
}

/// Starts every unplaced stream on the host running the fewest.
async fn place_unplaced(placements: &Mutex<Placements>, rates: Option<&RateController>) {
    loop {
        let next = {
            let mut p = lock(placements);
            if p.stopped || p.hosts.is_empty() {
                return;
            }
            let Some((&stream, _)) = p.streams.iter().find(|(_, r)| r.at.is_none()) else {
                return;
            };
            let load = |h: &Host, p: &Placements| {
                p.streams
                    .values()
                    .filter(|r| r.at.as_ref().is_some_and(|a| a.worker == h.worker))
                    .count()
            };
            let Some(host) = p.hosts.iter().min_by_key(|h| load(h, &p)).cloned() else {
                return;
            };
            let Some(r) = p.streams.get_mut(&stream) else {
                return;
            };
            r.epoch += 1;
            r.at = Some(host.clone());
            let start = StartReceiver {
                stream,
                epoch: r.epoch,
                first_seq: r.next_seq,
                rate: rates.and_then(|r| r.rate(stream)),
            };
            (host, start, r.name.clone())
        };
        let (host, start, name) = next;
        let outcome = ractor::call_t!(
            host.actor,
            ReceiverHostMsg::Start,
            START_DEADLINE_MS,
            Ser::of(start)
        );
        let error = match outcome {
            Ok(Ser(Some(Ok(())))) => {
                tracing::info!(receiver = %name, stream = start.stream, worker = host.worker, epoch = start.epoch, "receiver started in a worker process");
                continue;
            }
            Ok(Ser(Some(Err(e)))) => e,
            Ok(Ser(None)) => "its answer arrived damaged".into(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(receiver = %name, worker = host.worker, error = %error, "could not start the receiver in a worker process; trying again later");
        let mut p = lock(placements);
        if let Some(r) = p.streams.get_mut(&start.stream) {
            if r.epoch == start.epoch {
                r.at = None;
            }
        }
        // Not this host again until it shows up anew.
        p.hosts.retain(|h| h.worker != host.worker);
        return;
    }
}

/// Stops the receivers on every host that runs some.
async fn stop_all(placements: &Mutex<Placements>, graceful: bool) {
    let hosts: Vec<Host> = {
        let mut p = lock(placements);
        p.stopped = true;
        let mut hosts: Vec<Host> = Vec::new();
        for r in p.streams.values() {
            if let Some(h) = &r.at {
                if !hosts.iter().any(|x| x.worker == h.worker) {
                    hosts.push(h.clone());
                }
            }
        }
        hosts
    };
    let stops = hosts.iter().map(|h| async move {
        let r = ractor::call_t!(h.actor, ReceiverHostMsg::Stop, STOP_DEADLINE_MS, Ser::of(graceful));
        if let Err(e) = r {
            tracing::warn!(worker = h.worker, error = %e, "a worker process did not stop its receivers in time");
        }
    });
    futures::future::join_all(stops).await;
}

/// The driver's ingress: takes remote receivers' blocks into the pipeline.
struct Ingress {
    placements: Arc<Mutex<Placements>>,
    push: Push,
    failures: watch::Sender<Option<SupervisorError>>,
}

impl Actor for Ingress {
    type Msg = IngressMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<IngressMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<IngressMsg>,
        msg: IngressMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            IngressMsg::Block(Wire(Some((epoch, block))), reply) => {
                let id = block.id;
                let home = {
                    let mut p = lock(&self.placements);
                    match p.streams.get_mut(&id.stream) {
                        Some(r) if r.epoch == epoch && r.at.is_some() => {
                            r.next_seq = r.next_seq.max(id.seq + 1);
                            r.at.as_ref().map(|h| h.worker)
                        }
                        _ => None,
                    }
                };
                let Some(home) = home else {
                    tracing::warn!(block = %id, epoch, "a block from an older placement of its receiver: refused");
                    let _ = reply.send(Ser::of(Err(format!(
                        "{id} comes from a placement (epoch {epoch}) the driver has moved on from"
                    ))));
                    return Ok(());
                };
                // Blocks of one receiver come one at a time; those of different receivers
                // are taken in concurrently.
                let push = self.push.clone();
                tokio::spawn(async move {
                    let outcome = push(block, home).await;
                    let _ = reply.send(Ser::of(outcome));
                });
            }
            IngressMsg::Block(Wire(None), reply) => {
                let _ = reply.send(Ser::of(Err("the block arrived damaged".into())));
            }
            IngressMsg::Failed(Ser(Some(f))) => {
                tracing::error!(child = %f.child, error = %f.error, "a receiver failure escalated in a worker process");
                let e = SupervisorError::Escalated {
                    child: format!("worker process/{}", f.child),
                    error: Arc::new(RemoteError(f.error)),
                };
                self.failures.send_if_modified(|slot| {
                    if slot.is_none() {
                        *slot = Some(e);
                        true
                    } else {
                        false
                    }
                });
            }
            IngressMsg::Failed(Ser(None)) => {
                tracing::error!("a worker process reported a receiver failure that did not decode");
            }
        }
        Ok(())
    }
}
