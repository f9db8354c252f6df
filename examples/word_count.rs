//! Run: cargo run --example word_count
//!
//! The main example: counts words per batch. On its embedded default it reads the synthetic
//! receiver (100-byte records, ten words each, at 50,000 records/s); `--socket HOST:PORT`
//! reads newline-delimited text from a TCP server instead (try `nc -lk 9999` in another
//! terminal, then `cargo run --example word_count -- --socket 127.0.0.1:9999 --duration 0`).
//!
//! `--worker-processes N` runs the same job with N worker processes of this binary on
//! loopback (it launches them itself, relaunching one that dies): every block's replicas go to
//! distinct processes (`--workers 0` keeps none in the driver), and the tasks (split, count per
//! block) run in the worker processes where the blocks are; the driver merges the counts.
//! `--receivers-in-workers` also runs the receiver in a worker process.
//!
//! Prints a line per batch (records, top words, delays), stops after `--duration` seconds
//! (default 5; 0 = until Ctrl-C) or on Ctrl-C, gracefully: receivers stop, buffered records
//! are cut into blocks and the remaining batches run. Then it prints the totals (the bytes of
//! text are summed by a second output, `aggregate_ref` over each line read as `&[u8]`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tributary::{cluster, Backpressure, BatchId, DStream, ReadAs, StreamingContext};
use tributary_receivers::socket::{recommended_strategy, SocketTextReceiver};
use tributary_receivers::synthetic::{parse, SyntheticReceiver};

#[derive(Parser, Debug)]
#[command(about = "Per-batch word count over a synthetic source or a TCP socket")]
struct Args {
    /// Read newline-delimited text from this TCP server instead of the synthetic source.
    #[arg(long, value_name = "HOST:PORT")]
    socket: Option<String>,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Batch interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    batch_ms: u64,
    /// Synthetic records per second (0: as fast as possible).
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// The adaptive ingestion rate's ceiling, records per second per receiver (it follows
    /// what the job processes, below this).
    #[arg(long, value_name = "RECORDS_PER_S")]
    max_rate: Option<f64>,
    /// Turn the adaptive ingestion rate (backpressure) off: receivers store as fast as they
    /// can, and the block budget makes them wait when the job falls behind.
    #[arg(long)]
    no_backpressure: bool,
    /// The share of the job's measured speed the adaptive rate aims at (0 < share <= 1;
    /// default 0.9, 1.0 is Spark's).
    #[arg(long, value_name = "SHARE")]
    utilization: Option<f64>,
    /// Process each block only when its batch runs (by default a block's per-block work,
    /// here splitting and counting its words, starts as soon as it is acknowledged).
    #[arg(long)]
    no_early_tasks: bool,
    /// In-process workers holding blocks.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Replicas per block.
    #[arg(long, default_value_t = 2)]
    replication: usize,
    /// Also run this many worker processes (this binary, in the worker role, on loopback):
    /// block replicas go to distinct processes; a worker process that dies is relaunched.
    #[arg(long, default_value_t = 0)]
    worker_processes: usize,
    /// Run as a worker process of the driver at this address (the cookie comes in
    /// TRIBUTARY_COOKIE). `--worker-processes` starts these itself.
    #[arg(long, value_name = "HOST:PORT")]
    worker_of: Option<String>,
    /// Run the receiver in a worker process (with `--worker-processes` or
    /// `--cluster-listen`): its blocks cross to the driver, which replicates them; it is
    /// started on another worker process if its own is lost.
    #[arg(long)]
    receivers_in_workers: bool,
    /// Mutual TLS between driver and workers: this process's certificate chain (PEM), with
    /// `--tls-key` and `--tls-ca`. Workers verify the driver's certificate for `--tls-name`.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// This process's private key (PEM), with `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The cluster's CA certificate (PEM), with `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name in the driver's certificate (workers check it).
    #[arg(long, default_value = "tributary-driver")]
    tls_name: String,
    /// Accept worker processes started elsewhere (`--worker-of`) on this address; the
    /// cookie comes in TRIBUTARY_COOKIE.
    #[arg(long, value_name = "HOST:PORT")]
    cluster_listen: Option<std::net::SocketAddr>,
}

fn top_words(counts: &[(String, u64)], n: usize) -> String {
    let mut v: Vec<&(String, u64)> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.iter()
        .take(n)
        .map(|(w, c)| format!("{w}={c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

type Tops = Arc<Mutex<HashMap<BatchId, String>>>;
type Totals = Arc<Mutex<HashMap<String, u64>>>;
/// Bytes of text read, over all batches.
type InputBytes = Arc<AtomicU64>;

/// Adds the bytes of every line of `lines` to `into`: `aggregate_ref` reads each line as
/// `&[u8]` in place in its block (per block in the tasks, summed per batch on the driver).
fn count_bytes<T>(lines: &DStream<T>, into: InputBytes) -> Result<(), tributary::ContextError>
where
    T: ReadAs<[u8]> + Send + 'static,
{
    lines
        .aggregate_ref(
            || 0u64,
            |n, line: &[u8]| *n += line.len() as u64,
            |a, b| a + b,
        )
        .for_each_batch(move |batch| {
            into.fetch_add(batch.records.iter().sum(), Ordering::Relaxed);
        })
}

/// The job, defined the same way in the driver and in worker processes (one binary, two
/// roles): a worker runs its tasks (the split into words and the per-block counts) over the
/// blocks placed on it; the driver merges the counts and runs `for_each_batch`.
fn define_job(
    ctx: &StreamingContext,
    args: &Args,
    tops: Tops,
    totals: Totals,
    bytes: InputBytes,
) -> anyhow::Result<()> {
    // Words are counted where they are: `reduce_by_key_with` reads each line as a `&str` in
    // place in its block, looks each word up as the `&str` it is, and makes it a `String`
    // only the first time a block's task sees it.
    let counts = match &args.socket {
        Some(addr) => {
            let lines = ctx.receiver_stream("socket", SocketTextReceiver::new(addr.clone()))?;
            count_bytes(&lines, bytes)?;
            lines.reduce_by_key_with(
                |line: &str, out: &mut dyn FnMut(&str, u64)| {
                    for w in line.split_whitespace() {
                        if w.chars().any(char::is_uppercase) {
                            out(&w.to_lowercase(), 1);
                        } else {
                            out(w, 1);
                        }
                    }
                },
                |a, b| a + b,
            )
        }
        None => {
            let mut source = SyntheticReceiver::new();
            if args.rate > 0.0 {
                source = source.rate(args.rate);
            }
            let lines = ctx.receiver_stream("synthetic", source)?;
            count_bytes(&lines, bytes)?;
            lines.reduce_by_key_with(
                |record: &str, out: &mut dyn FnMut(&str, u64)| {
                    if let Some((_seq, _created, words)) = parse(record) {
                        for w in words {
                            out(w, 1);
                        }
                    }
                },
                |a, b| a + b,
            )
        }
    };

    let (t, tot) = (tops, totals);
    counts.for_each_batch(move |batch| {
        let mut tot = tot.lock().unwrap();
        for (w, c) in &batch.records {
            *tot.entry(w.clone()).or_default() += c;
        }
        t.lock()
            .unwrap()
            .insert(batch.id, top_words(&batch.records, 3));
    })?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    // One binary, two roles: a worker when started as one (by the launcher below, which sets
    // TRIBUTARY_WORKER_OF, or by hand with --worker-of).
    let role = match args.worker_of.clone() {
        Some(driver) => {
            let cookie = std::env::var("TRIBUTARY_COOKIE")
                .map_err(|_| anyhow::anyhow!("--worker-of needs the cookie in TRIBUTARY_COOKIE"))?;
            Some(cluster::WorkerConfig::new(driver, cookie))
        }
        None => cluster::worker_role()?,
    };
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(c), Some(k), Some(ca)) => Some(cluster::ClusterTls::from_pem_files(c, k, ca)?),
        _ => None,
    };
    let role = match (role, &tls) {
        (Some(w), Some(t)) => Some(w.tls(t.clone(), args.tls_name.clone())),
        (role, _) => role,
    };
    if let Some(worker) = role {
        // The worker defines the same job (so that it can run its tasks and its receiver),
        // with the same settings, then serves it.
        let ctx = StreamingContext::builder()
            .block_interval(Duration::from_millis(args.batch_ms.min(200)))
            .receiver_strategy(recommended_strategy)
            .build()?;
        define_job(&ctx, &args, Arc::default(), Arc::default(), Arc::default())?;
        let exit = ctx.run_as_worker(worker).await?;
        println!("worker: {exit:?}");
        return Ok(());
    }
    if !(args.duration >= 0.0 && args.duration.is_finite()) {
        anyhow::bail!("--duration must be a number of seconds >= 0");
    }

    let mut builder = StreamingContext::builder()
        .batch_interval(Duration::from_millis(args.batch_ms))
        .block_interval(Duration::from_millis(args.batch_ms.min(200)))
        .workers(args.workers)
        .replication(args.replication)
        .backpressure(if args.no_backpressure {
            Backpressure::off()
        } else {
            let mut b = Backpressure::default();
            if let Some(max) = args.max_rate {
                b = b.max_rate(max);
            }
            if let Some(share) = args.utilization {
                b = b.utilization(share);
            }
            b
        })
        .early_tasks(!args.no_early_tasks)
        // Bad lines are skipped (Resume); a lost connection reconnects (Restart, with backoff).
        .receiver_strategy(recommended_strategy);
    let cookie = match std::env::var("TRIBUTARY_COOKIE") {
        Ok(c) => c,
        Err(_) if args.cluster_listen.is_some() => {
            anyhow::bail!("--cluster-listen needs the cookie in TRIBUTARY_COOKIE")
        }
        Err(_) => cluster::random_cookie()?,
    };
    if args.worker_processes > 0 || args.cluster_listen.is_some() {
        let listen = args
            .cluster_listen
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut cluster_cfg = cluster::ClusterConfig::new(listen, cookie.clone());
        if let Some(t) = &tls {
            cluster_cfg = cluster_cfg.tls(t.clone());
        }
        builder = builder.cluster(cluster_cfg);
        if args.receivers_in_workers {
            builder = builder.receiver_placement(tributary::ReceiverPlacement::WorkerProcesses);
        }
    } else if args.receivers_in_workers {
        anyhow::bail!("--receivers-in-workers needs --worker-processes N or --cluster-listen");
    }
    let ctx = builder.build()?;
    match &args.socket {
        Some(addr) => println!("reading lines from {addr}"),
        None if args.rate > 0.0 => println!("synthetic source at {} records/s", args.rate),
        None => println!("synthetic source at max records/s"),
    }

    let tops: Tops = Arc::default();
    let totals: Totals = Arc::default();
    let bytes: InputBytes = Arc::default();
    define_job(&ctx, &args, tops.clone(), totals.clone(), bytes.clone())?;

    let mut reports = ctx.subscribe_batches();
    let printer = tokio::spawn(async move {
        let (mut batches, mut records) = (0u64, 0u64);
        while let Ok(info) = reports.recv().await {
            batches += 1;
            records += info.records;
            let top = tops.lock().unwrap().remove(&info.id).unwrap_or_default();
            println!(
                "{}: {:>8} records | top: {:<40} | scheduling {:>4} ms, processing {:>4} ms, total {:>5} ms{}{}",
                info.id,
                info.records,
                top,
                info.scheduling_delay.as_millis(),
                info.processing_time.as_millis(),
                info.total_delay.as_millis(),
                if info.remote_tasks > 0 {
                    format!(" | {} tasks in worker processes", info.remote_tasks)
                } else {
                    String::new()
                },
                info.failed.map(|e| format!(" | FAILED: {e}")).unwrap_or_default()
            );
        }
        (batches, records)
    });

    ctx.start().await?;
    let launcher = match ctx.cluster_addr() {
        Some(addr) if args.worker_processes == 0 => {
            println!("accepting worker processes on {addr}");
            None
        }
        Some(addr) => {
            let launch = cluster::LaunchConfig::this_program(addr, cookie, args.worker_processes)?;
            let launcher = cluster::WorkerLauncher::start(launch);
            let mut events = launcher.events();
            tokio::spawn(async move {
                while let Ok(e) = events.recv().await {
                    println!("{e}");
                }
            });
            println!("{} worker processes joining {addr}", args.worker_processes);
            tokio::time::sleep(Duration::from_millis(300)).await;
            println!("worker pids: {:?}", launcher.pids());
            Some(launcher)
        }
        None => None,
    };
    let stop_reason = tokio::select! {
        _ = async {
            if args.duration > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(args.duration)).await
            } else {
                std::future::pending::<()>().await
            }
        } => "duration elapsed",
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        r = ctx.await_termination() => {
            r?;
            "the context stopped"
        }
    };
    println!("{stop_reason}: stopping gracefully...");
    ctx.stop(true).await?;
    drop(ctx);
    if let Some(l) = launcher {
        l.shutdown().await;
    }
    let (batches, records) = tokio::time::timeout(Duration::from_secs(5), printer).await??;

    let totals = totals.lock().unwrap();
    let all: Vec<(String, u64)> = totals.iter().map(|(w, c)| (w.clone(), *c)).collect();
    println!(
        "totals: {batches} batches, {records} records, {} bytes of text, {} words ({} distinct); top: {}",
        bytes.load(Ordering::Relaxed),
        all.iter().map(|(_, c)| c).sum::<u64>(),
        all.len(),
        top_words(&all, 5)
    );
    Ok(())
}
