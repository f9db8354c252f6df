//! The receiver host of a worker process: runs the job's receivers the driver places here,
//! under a supervisor of this process (the job's receiver strategy applies here, as it would
//! in the driver), each with its own block generator. Every cut block is forwarded to the
//! driver's ingress, one at a time per receiver (a credit of one block: a slow link or a slow
//! driver makes `store` wait, nothing queues up), and the receiver's `store_reliably`
//! resolves with the driver's answer: once the block is replicated and, with the write-ahead
//! log on, logged by the driver.
//!
//! ```text
//!  receiver ──store──► block generator ──cut──► forwarder ──Block(epoch, block)──► driver
//!   (supervised here)                              ◄──────────── Ok | Err ───────────┘
//!                                                  settles the block's durability
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::block_generator::{flush_every, BlockGenerator, Cut};
use crate::buffer_pool::BufferPool;
use crate::cluster::protocol::{
    ingress, IngressMsg, ReceiverFailure, ReceiverHostMsg, StartReceiver,
};
use crate::driver::rate_controller::RateCell;
use crate::driver::receiver_tracker::PendingReceiver;
use crate::store::Durability;
use crate::supervisor::{Strategy, Supervisor, SupervisorHandle};
use crate::wire::Ser;
use crate::wire::Wire;

/// How long a forwarded block may wait for the driver's answer (the driver itself waits for
/// memory and for live workers before it can answer).
const FORWARD_DEADLINE_MS: u64 = 120_000;

/// What a worker process needs of the job to run its receivers: the receivers themselves
/// (defined by the same code as in the driver) and the settings of their pipeline.
pub(crate) struct ReceiverJob {
    pub(crate) receivers: Vec<PendingReceiver>,
    pub(crate) strategy: Box<dyn Fn() -> Strategy + Send>,
    pub(crate) max_block_bytes: usize,
    pub(crate) block_queue: usize,
    pub(crate) rate_limit: Option<f64>,
    pub(crate) memory_bytes: usize,
    pub(crate) block_interval: Duration,
    /// The job's direct streams (this process's executor reads their ranges).
    pub(crate) direct: crate::direct::DirectStreams,
}

/// A worker process's receiver host (an actor, in the
/// [`RECEIVER_HOSTS`](crate::cluster::protocol::RECEIVER_HOSTS) group).
pub(crate) struct ReceiverHost;

/// One receiver running here.
struct Running {
    generator: Arc<BlockGenerator>,
    durability: Arc<Durability>,
    forwarder: JoinHandle<()>,
    flusher: JoinHandle<()>,
}

pub(crate) struct HostState {
    job: ReceiverJob,
    pending: HashMap<u32, PendingReceiver>,
    supervisor: Option<SupervisorHandle>,
    pool: Arc<BufferPool>,
    running: Vec<Running>,
    /// The adaptive rates of the receivers here, set by the driver.
    rates: HashMap<u32, Arc<RateCell>>,
}

impl Actor for ReceiverHost {
    type Msg = ReceiverHostMsg;
    type State = HostState;
    type Arguments = ReceiverJob;

    async fn pre_start(
        &self,
        _: ActorRef<ReceiverHostMsg>,
        mut job: ReceiverJob,
    ) -> Result<HostState, ActorProcessingErr> {
        let pending = std::mem::take(&mut job.receivers)
            .into_iter()
            .map(|p| (p.stream, p))
            .collect();
        Ok(HostState {
            pool: BufferPool::new(job.memory_bytes),
            job,
            pending,
            supervisor: None,
            running: Vec::new(),
            rates: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ReceiverHostMsg>,
        msg: ReceiverHostMsg,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReceiverHostMsg::Start(Ser(start), reply) => {
                let outcome = match start {
                    Some(s) => state.start(s).await,
                    None => Err("a start request arrived damaged".into()),
                };
                if let Err(e) = &outcome {
                    tracing::error!(error = %e, "could not start a receiver placed here");
                }
                let _ = reply.send(Ser::of(outcome));
            }
            ReceiverHostMsg::Stop(Ser(graceful), reply) => {
                state.stop(graceful.unwrap_or(false)).await;
                let _ = reply.send(Ser::of(true));
            }
            ReceiverHostMsg::Rate(Ser(set)) => match set {
                Some(set) if set.rate.is_finite() && set.rate > 0.0 => {
                    if let Some(cell) = state.rates.get(&set.stream) {
                        cell.set(set.rate);
                    }
                }
                _ => tracing::warn!("a rate update arrived damaged; ignored"),
            },
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<ReceiverHostMsg>,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        state.stop(false).await;
        Ok(())
    }
}

impl HostState {
    async fn start(&mut self, s: StartReceiver) -> Result<(), String> {
        let Some(p) = self.pending.remove(&s.stream) else {
            return Err(format!(
                "stream {} is not in this worker's job, or already runs here",
                s.stream
            ));
        };
        let Some(to) = ingress() else {
            self.pending.insert(s.stream, p);
            return Err("the driver's ingress is not known here (yet)".into());
        };
        let supervisor = match &self.supervisor {
            Some(sup) => sup.clone(),
            None => {
                let sup = Supervisor::start("receivers", (self.job.strategy)())
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(report_escalation(sup.clone(), to.clone(), s.epoch));
                self.supervisor = Some(sup.clone());
                sup
            }
        };
        let (generator, queue) = BlockGenerator::starting_at(
            s.stream,
            s.first_seq,
            self.job.max_block_bytes,
            self.job.block_queue,
            self.job.rate_limit,
            Some(
                self.rates
                    .entry(s.stream)
                    .and_modify(|c| c.set_opt(s.rate))
                    .or_insert_with(|| Arc::new(RateCell::new(s.rate)))
                    .clone(),
            ),
            self.pool.clone(),
        );
        let generator = Arc::new(generator);
        let durability = Arc::new(Durability::new());
        let forwarder = tokio::spawn(forward(queue, to, s.epoch, durability.clone()));
        let flusher = tokio::spawn(flush_every(
            generator.clone(),
            self.job.block_interval,
            None,
        ));
        self.running.push(Running {
            generator: generator.clone(),
            durability: durability.clone(),
            forwarder,
            flusher,
        });
        tracing::info!(receiver = %p.name, stream = s.stream, epoch = s.epoch, first_seq = s.first_seq, "starting a receiver placed here by the driver");
        (p.start)(supervisor, generator, durability)
            .await
            .map_err(|e| e.to_string())
    }

    /// Stops the receivers; graceful: what they buffered is cut and forwarded first.
    async fn stop(&mut self, graceful: bool) {
        if !graceful {
            for r in &self.running {
                r.forwarder.abort();
                r.durability.close();
            }
        }
        if let Some(sup) = self.supervisor.take() {
            let _ = sup.shutdown().await;
        }
        for r in self.running.drain(..) {
            r.generator.close().await;
            r.flusher.abort();
            let _ = r.forwarder.await;
            r.durability.close();
        }
    }
}

/// Forwards each cut block to the driver, in order, one at a time, and settles its
/// durability with the driver's answer.
async fn forward(
    mut queue: mpsc::Receiver<Cut>,
    to: ActorRef<IngressMsg>,
    epoch: u64,
    durability: Arc<Durability>,
) {
    while let Some(cut) = queue.recv().await {
        // Receivers here have no batch clock: their blocks go into the driver's next batch.
        let Cut::Block(block, _) = cut else { continue };
        let seq = block.id.seq;
        let outcome = match ractor::call_t!(
            to,
            IngressMsg::Block,
            FORWARD_DEADLINE_MS,
            Wire::of((epoch, block))
        ) {
            Ok(Ser(Some(r))) => r,
            Ok(Ser(None)) => Err("the driver's answer arrived damaged".into()),
            Err(e) => Err(format!("the driver did not answer: {e}")),
        };
        if let Err(e) = &outcome {
            tracing::warn!(block = seq, error = %e, "a forwarded block was not acknowledged");
        }
        durability.settle(seq, outcome);
    }
}

/// A failure that escalated past this process's receivers' supervisor ends the job: the
/// driver is told.
async fn report_escalation(sup: SupervisorHandle, to: ActorRef<IngressMsg>, epoch: u64) {
    if let Err(e) = sup.wait().await {
        let (child, error) = match &e {
            crate::error::SupervisorError::Escalated { child, error } => {
                (child.clone(), error.to_string())
            }
            other => ("receivers".to_string(), other.to_string()),
        };
        tracing::error!(%child, %error, "a receiver failure escalated in this worker process; telling the driver");
        let _ = to.send_message(IngressMsg::Failed(Ser::of(ReceiverFailure {
            epoch,
            child,
            error,
        })));
    }
}
