//! Run: cargo run --example actor_publisher
//!
//! Spark Streaming's actor-receiver example on Tributary: a *publisher* actor (the "feeder")
//! pushes random words to every subscriber; a [`SubscriberReceiver`] under a supervisor
//! subscribes in its start hook and stores what it is pushed; a consumer counts the words.
//! At the end the feeder stops first, then the tree (the receiver's stop hook unsubscribes), so
//! every pushed word is counted: the two totals printed match.
//!
//! Stops after `--seconds N` (default 2) or on Ctrl-C, and prints the word counts.

use std::collections::BTreeMap;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tributary::{Directive, ReceiverSpec, Store, Strategy, Supervisor};
use tributary_receivers::publisher::{PublisherMsg, SubscriberReceiver, Subscribers};

const WORDS: [&str; 8] = [
    "river", "delta", "spring", "brook", "creek", "fjord", "lake", "rill",
];

/// The feeder's messages: subscriptions, plus its own timer tick.
enum FeederMsg {
    Subscription(PublisherMsg<String>),
    Tick,
}

// Tributary runs `ractor` with its `cluster` feature: an actor's message type says it is one.
impl ractor::Message for FeederMsg {}

impl From<PublisherMsg<String>> for FeederMsg {
    fn from(m: PublisherMsg<String>) -> Self {
        FeederMsg::Subscription(m)
    }
}

/// Pushes a burst of random words to its subscribers every 10 ms.
struct Feeder;

struct FeederState {
    subscribers: Subscribers<String>,
    pushed: u64,
}

impl Actor for Feeder {
    type Msg = FeederMsg;
    type State = FeederState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<FeederMsg>,
        _: (),
    ) -> Result<FeederState, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(10), || FeederMsg::Tick);
        Ok(FeederState {
            subscribers: Subscribers::default(),
            pushed: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<FeederMsg>,
        msg: FeederMsg,
        state: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FeederMsg::Subscription(m) => state.subscribers.apply(m),
            FeederMsg::Tick => {
                for _ in 0..100 {
                    let word = WORDS[fastrand::usize(..WORDS.len())].to_string();
                    if state.subscribers.push(&word) > 0 {
                        state.pushed += 1;
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<FeederMsg>,
        state: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        println!("feeder: pushed {} words", state.pushed);
        Ok(())
    }
}

fn seconds_from_args() -> anyhow::Result<u64> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(2),
        (Some("--seconds"), Some(n)) => n
            .parse()
            .map_err(|_| anyhow::anyhow!("--seconds takes a whole number, got {n:?}")),
        (Some(other), _) => {
            anyhow::bail!("unknown argument {other:?}; usage: actor_publisher [--seconds N]")
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let seconds = seconds_from_args()?;

    let (feeder, feeder_task) = Actor::spawn(None, Feeder, ()).await?;
    let strategy = Strategy::one_for_one(10, Duration::from_secs(60))
        .on::<tributary_receivers::publisher::PublisherGone>(Directive::Stop)
        .otherwise(Directive::Escalate);
    let root = Supervisor::start("root", strategy).await?;
    let (store, mut records) = Store::channel(4096);
    let receiver = root
        .spawn_receiver(ReceiverSpec::new(
            "words",
            SubscriberReceiver::new(feeder.clone()),
            store,
        ))
        .await?;
    println!(
        "receiver {} subscribed to the feeder; running {seconds} s (Ctrl-C stops)",
        receiver.path()
    );

    let counter = tokio::spawn(async move {
        let mut counts = BTreeMap::<String, u64>::new();
        while let Some(word) = records.recv().await {
            *counts.entry(word).or_default() += 1;
        }
        counts
    });

    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        _ = tokio::signal::ctrl_c() => println!("Ctrl-C: stopping"),
    }
    // Stop the source first, then the receivers: everything pushed has been stored.
    feeder.stop(None);
    feeder_task.await?;
    root.shutdown().await?;
    drop(receiver);
    let counts = counter.await?;
    let total: u64 = counts.values().sum();
    println!("stored {total} words:");
    for (word, n) in counts {
        println!("  {word:<8} {n}");
    }
    Ok(())
}
