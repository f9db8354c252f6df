//! Run: cargo bench --bench supervision
//!
//! Supervision overheads, one JSON object per line (units in the field names):
//!
//! * `restart_latency`: from a receiver's handler returning `Err` to the restarted receiver
//!   handling its next (already queued) message; the stop and start hooks, the decision, the
//!   budget check and the events are all included. Restart limit lifted.
//! * `resume_latency`: the same for a Resume.
//! * `throughput`: messages/s handled by a supervised receiver vs a bare `ractor` actor doing
//!   the same work per message (an FNV-1a hash over a 100-byte record), and their ratio. The
//!   mailbox is filled while the actor is held, then the time to drain it is measured, so the
//!   figure is the actor's own per-message cost (dequeue, dispatch, supervision wrapper, work),
//!   not the producer's.
//!
//! `BENCH_SCALE` (default 1.0) multiplies the iteration counts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use tokio::sync::oneshot;
use tributary::{
    BoxError, Directive, Receiver, ReceiverContext, ReceiverSpec, RestartLimit, Store, Strategy,
    Supervisor,
};

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
struct Injected;

#[derive(Debug, thiserror::Error)]
#[error("resumable failure")]
struct Resumable;

enum Msg {
    Fail,
    FailResumable,
    Measure,
    Work(u64),
    Hold(oneshot::Receiver<()>),
    Done(oneshot::Sender<u64>),
}

// The bare `ractor` actor in the comparison uses it directly (ractor's `cluster` feature is on).
impl ractor::Message for Msg {}

/// Records when a failure happened (outside the state, which a restart discards) and how long
/// it took until the next message was handled.
struct LatencyProbe {
    failed_at: Mutex<Option<Instant>>,
    samples: Arc<Mutex<Vec<u64>>>,
}

fn fnv(record: &[u8; 100], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in record {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const RECORD: [u8; 100] = [b'x'; 100];

impl Receiver for LatencyProbe {
    type Msg = Msg;
    type State = u64;
    type Record = u64;

    async fn pre_start(&self, _ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        Ok(0)
    }

    async fn handle(
        &self,
        _ctx: &ReceiverContext<Self>,
        msg: Msg,
        acc: &mut u64,
    ) -> Result<(), BoxError> {
        match msg {
            Msg::Fail => {
                *self.failed_at.lock().unwrap() = Some(Instant::now());
                return Err(Box::new(Injected));
            }
            Msg::FailResumable => {
                *self.failed_at.lock().unwrap() = Some(Instant::now());
                return Err(Box::new(Resumable));
            }
            Msg::Measure => {
                if let Some(t) = self.failed_at.lock().unwrap().take() {
                    self.samples
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_nanos() as u64);
                }
            }
            Msg::Work(seq) => *acc = acc.wrapping_add(fnv(&RECORD, seq)),
            Msg::Hold(rx) => {
                let _ = rx.await;
            }
            Msg::Done(reply) => {
                let _ = reply.send(*acc);
            }
        }
        Ok(())
    }
}

struct Bare;

impl Actor for Bare {
    type Msg = Msg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Msg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _: ActorRef<Msg>,
        msg: Msg,
        acc: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Work(seq) => *acc = acc.wrapping_add(fnv(&RECORD, seq)),
            Msg::Hold(rx) => {
                let _ = rx.await;
            }
            Msg::Done(reply) => {
                let _ = reply.send(*acc);
            }
            _ => {}
        }
        Ok(())
    }
}

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn percentiles(name: &str, mut ns: Vec<u64>, extra: serde_json::Value) {
    ns.sort_unstable();
    let pick = |q: f64| ns[((ns.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    let mut line = json!({
        "name": name,
        "samples": ns.len(),
        "p50_us": pick(0.50),
        "p99_us": pick(0.99),
        "p999_us": pick(0.999),
        "max_us": *ns.last().unwrap() as f64 / 1000.0,
        "mean_us": ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0,
    });
    if let (Some(obj), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    println!("{line}");
}

async fn failure_latency(name: &str, fail: fn() -> Msg, count: usize) {
    let strategy = Strategy::one_for_one(10, Duration::from_secs(60))
        .limit(RestartLimit::Unlimited)
        .on::<Injected>(Directive::Restart)
        .on::<Resumable>(Directive::Resume);
    let root = Supervisor::start("bench", strategy).await.unwrap();
    let samples = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let (store, _records) = Store::channel(16);
    let probe = root
        .spawn_receiver(ReceiverSpec::new(
            "probe",
            LatencyProbe {
                failed_at: Mutex::new(None),
                samples: samples.clone(),
            },
            store,
        ))
        .await
        .unwrap();
    // Warm up, then measure in chunks with the next message already queued.
    let chunk = 1000;
    let mut done = 0;
    let warmup = 2000;
    while done < count + warmup {
        for _ in 0..chunk {
            probe.send(fail()).ok().unwrap();
            probe.send(Msg::Measure).ok().unwrap();
        }
        let (tx, rx) = oneshot::channel();
        probe.send(Msg::Done(tx)).ok().unwrap();
        rx.await.unwrap();
        done += chunk;
        if done == warmup {
            samples.lock().unwrap().clear();
        }
    }
    let restarts = root.children().await.unwrap()[0].restarts_total;
    root.shutdown().await.unwrap();
    let ns = std::mem::take(&mut *samples.lock().unwrap());
    percentiles(name, ns, json!({ "restarts_total": restarts }));
}

async fn run_supervised(n: u64) -> f64 {
    let root = Supervisor::start("tp", Strategy::default()).await.unwrap();
    let (store, _records) = Store::channel(16);
    let probe = root
        .spawn_receiver(ReceiverSpec::new(
            "probe",
            LatencyProbe {
                failed_at: Mutex::new(None),
                samples: Arc::default(),
            },
            store,
        ))
        .await
        .unwrap();
    // Preload the mailbox while the receiver is held, then time the processing alone.
    let (release, hold) = oneshot::channel();
    probe.send(Msg::Hold(hold)).ok().unwrap();
    for i in 0..n {
        probe.send(Msg::Work(i)).ok().unwrap();
    }
    let (tx, rx) = oneshot::channel();
    probe.send(Msg::Done(tx)).ok().unwrap();
    let t = Instant::now();
    release.send(()).unwrap();
    std::hint::black_box(rx.await.unwrap());
    let rate = n as f64 / t.elapsed().as_secs_f64();
    root.shutdown().await.unwrap();
    rate
}

async fn run_bare(n: u64) -> f64 {
    let (actor, handle) = Actor::spawn(None, Bare, ()).await.unwrap();
    let (release, hold) = oneshot::channel();
    actor.send_message(Msg::Hold(hold)).ok().unwrap();
    for i in 0..n {
        actor.send_message(Msg::Work(i)).ok().unwrap();
    }
    let (tx, rx) = oneshot::channel();
    actor.send_message(Msg::Done(tx)).ok().unwrap();
    let t = Instant::now();
    release.send(()).unwrap();
    std::hint::black_box(rx.await.unwrap());
    let rate = n as f64 / t.elapsed().as_secs_f64();
    actor.stop(None);
    handle.await.unwrap();
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    // Cargo passes `--bench`; ignore arguments.
    let s = scale();
    // Profiling aid: BENCH_ONLY=bare or BENCH_ONLY=supervised runs just that throughput loop.
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        let n = ((1_000_000.0 * s) as u64).max(10_000);
        for _ in 0..5 {
            let rate = if only == "bare" {
                run_bare(n).await
            } else {
                run_supervised(n).await
            };
            println!(
                "{}",
                json!({ "name": format!("throughput_{only}"), "msgs_per_s": rate.round() })
            );
        }
        return;
    }
    let restarts = ((20_000.0 * s) as usize).max(1000);
    failure_latency("restart_latency", || Msg::Fail, restarts).await;
    failure_latency("resume_latency", || Msg::FailResumable, restarts).await;

    let n = ((1_000_000.0 * s) as u64).max(10_000);
    let rounds = 7;
    let (mut sup, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        bare.push(run_bare(n).await);
        sup.push(run_supervised(n).await);
    }
    let (sup_m, bare_m) = (median(sup), median(bare));
    println!(
        "{}",
        json!({
            "name": "throughput",
            "messages_per_round": n,
            "rounds": rounds,
            "supervised_msgs_per_s": sup_m.round(),
            "bare_msgs_per_s": bare_m.round(),
            "ratio": (sup_m / bare_m * 1000.0).round() / 1000.0,
        })
    );
}
