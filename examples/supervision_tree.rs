//! Run: cargo run --example supervision_tree
//!
//! A two-level supervision tree of sensor receivers with the classic Akka decider, written as
//! Rust error types:
//!
//! ```text
//! root      UnitMismatch -> Restart, anything else -> Escalate
//! ├── sensors   ArithmeticError -> Resume, NullPointerError -> Restart,
//! │   │         IllegalArgumentError -> Stop, anything else -> Escalate
//! │   ├── thermo (receiver)
//! │   └── gps    (receiver)
//! └── audit (receiver, under root's strategy)
//! ```
//!
//! Each failure is injected by sending a receiver a bad line; the supervision events are
//! printed as they happen, then a summary. Step 4 shows a parent deciding about an escalated
//! failure (root restarts the `sensors` subtree); the last step escalates a failure all the
//! way up, which ends the tree with that error, as designed: the example then exits with 0.
//! Set `RUST_LOG=info` to see the `tracing` lines as well.

use std::time::Duration;

use anyhow::Context as _;
use tributary::{
    BoxError, Directive, Receiver, ReceiverContext, ReceiverRef, ReceiverSpec, Store, Strategy,
    Supervisor, SupervisorError, SupervisorSpec,
};

#[derive(Debug, thiserror::Error)]
#[error("arithmetic error: {0}")]
struct ArithmeticError(String);

#[derive(Debug, thiserror::Error)]
#[error("null pointer: the device sent no value")]
struct NullPointerError;

#[derive(Debug, thiserror::Error)]
#[error("illegal argument: {0}")]
struct IllegalArgumentError(String);

#[derive(Debug, thiserror::Error)]
#[error("unit mismatch: {0}")]
struct UnitMismatch(String);

#[derive(Debug, thiserror::Error)]
#[error("firmware fault: {0}")]
struct FirmwareFault(String);

/// A receiver that parses `name=value` readings and stores `(sensor, value)`.
struct SensorReceiver {
    sensor: &'static str,
}

/// Per-incarnation state: readings parsed and the running sum (lost on Restart, kept on Resume).
#[derive(Debug, Default)]
struct SensorState {
    readings: u64,
    sum: f64,
}

impl Receiver for SensorReceiver {
    type Msg = String;
    type State = SensorState;
    type Record = (String, f64);

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<SensorState, BoxError> {
        println!(
            "  [{}] start hook: connecting to {}",
            ctx.path(),
            self.sensor
        );
        Ok(SensorState::default())
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        line: String,
        state: &mut SensorState,
    ) -> Result<(), BoxError> {
        let value = line.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
        let reading = match value {
            "" | "null" => return Err(Box::new(NullPointerError)),
            v if v.ends_with("/0") => {
                return Err(Box::new(ArithmeticError(format!("{v}: division by zero"))))
            }
            v if v.ends_with('F') => return Err(Box::new(UnitMismatch(v.to_string()))),
            v if v.starts_with("FAULT") => return Err(Box::new(FirmwareFault(v.to_string()))),
            v => v
                .parse::<f64>()
                .map_err(|_| IllegalArgumentError(format!("not a number: {v:?}")))?,
        };
        state.readings += 1;
        state.sum += reading;
        ctx.store((self.sensor.to_string(), reading)).await?;
        Ok(())
    }

    async fn post_stop(
        &self,
        ctx: &ReceiverContext<Self>,
        state: &mut SensorState,
    ) -> Result<(), BoxError> {
        println!(
            "  [{}] stop hook: {} readings in this incarnation (sum {:.1})",
            ctx.path(),
            state.readings,
            state.sum
        );
        Ok(())
    }
}

fn seed_strategy() -> Strategy {
    Strategy::one_for_one(10, Duration::from_secs(60))
        .on::<ArithmeticError>(Directive::Resume)
        .on::<NullPointerError>(Directive::Restart)
        .on::<IllegalArgumentError>(Directive::Stop)
        .otherwise(Directive::Escalate)
}

async fn step(title: &str, rx: &ReceiverRef<String>, line: &str) {
    println!("\n== {title}\n   send {line:?} to {}", rx.path());
    if rx.send(line.to_string()).is_err() {
        println!("  (receiver has stopped; not delivered)");
    }
    // Let the decision happen before the next step, so the output reads in order.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();

    let root_strategy = Strategy::one_for_one(10, Duration::from_secs(60))
        .on::<UnitMismatch>(Directive::Restart)
        .otherwise(Directive::Escalate);
    let root = Supervisor::start("root", root_strategy).await?;
    let mut events = root.subscribe();
    let printer = tokio::spawn(async move {
        let mut count = 0u32;
        while let Ok(e) = events.recv().await {
            count += 1;
            println!("  event: {e}");
        }
        count
    });

    let (store, mut records) = Store::channel(1024);
    let collector = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some((_sensor, _value)) = records.recv().await {
            n += 1;
        }
        n
    });

    let sensors = root
        .spawn_supervisor(SupervisorSpec::new("sensors", seed_strategy()))
        .await?;
    let thermo = sensors
        .spawn_receiver(ReceiverSpec::new(
            "thermo",
            SensorReceiver { sensor: "thermo" },
            store.clone(),
        ))
        .await?;
    let gps = sensors
        .spawn_receiver(ReceiverSpec::new(
            "gps",
            SensorReceiver { sensor: "gps" },
            store.clone(),
        ))
        .await?;
    let audit = root
        .spawn_receiver(ReceiverSpec::new(
            "audit",
            SensorReceiver { sensor: "audit" },
            store.clone(),
        ))
        .await?;
    drop(store);

    for v in ["t=21.5", "t=22.0"] {
        thermo.send(v.to_string())?;
    }
    gps.send("lat=48.85".to_string())?;
    audit.send("a=1".to_string())?;

    step(
        "1. ArithmeticError -> Resume: state kept, bad line dropped",
        &thermo,
        "t=5/0",
    )
    .await;
    step(
        "2. NullPointerError -> Restart: state rebuilt, mailbox kept",
        &thermo,
        "t=null",
    )
    .await;
    step(
        "3. IllegalArgumentError -> Stop: gps stops for good",
        &gps,
        "lat=north",
    )
    .await;
    step(
        "4. UnitMismatch: no case in `sensors` -> Escalate; root's case -> Restart the subtree",
        &thermo,
        "t=72F",
    )
    .await;
    thermo.send("t=23.0".to_string())?; // the same reference still works after all that

    println!("\n== summary");
    for sup in [&root, &sensors] {
        for c in sup.children().await? {
            println!(
                "  {:<22} {:<10} status={:?} restarts={}",
                c.path,
                format!("{:?}", c.kind),
                c.status,
                c.restarts_total
            );
        }
    }

    step(
        "5. FirmwareFault: escalates from sensors to root, which ends the tree",
        &thermo,
        "t=FAULT-17",
    )
    .await;
    let outcome = root.wait().await;
    match &outcome {
        Err(SupervisorError::Escalated { child, error }) => {
            println!("\n== the tree ended: {child} escalated to the root: {error}");
        }
        other => println!("\n== the tree ended: {other:?}"),
    }
    // The handles keep the event stream open; drop them so the printer sees its end.
    drop((root, sensors));
    let stored = collector.await.context("collector")?;
    let events = tokio::time::timeout(Duration::from_secs(5), printer)
        .await
        .context("event printer did not finish")??;
    println!("== totals: {stored} records stored, {events} supervision events");
    match outcome {
        Err(e) if e.downcast_ref::<FirmwareFault>().is_some() => Ok(()),
        other => anyhow::bail!("unexpected outcome: {other:?}"),
    }
}
