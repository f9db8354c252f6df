//! Run: cargo run --example direct_word_count
//!
//! Word count over a replayable source, exactly once: no receiver, no write-ahead log. The
//! source is a file log (a directory of append-only files, one per partition, one record per
//! line; offsets are byte positions). At every batch boundary the driver decides each
//! partition's offset range and logs it with the batch; the batch's tasks read exactly those
//! ranges. Each batch's word counts go to `OUT/batches/<batch id>` (replaced atomically,
//! with the batch's offset ranges on its first line): output keyed by batch id, so a batch
//! re-run after a crash rewrites the same file with the same contents.
//!
//! With no arguments it writes `--generate` lines of text into `DIR/input` (4 partitions),
//! counts them, and stops once it has caught up. Try a crash: `kill -9` it while it runs,
//! start it again with the same `--dir`: the batches it had logged run again on the same
//! ranges, then it goes on where they ended. Across any number of crashes, the batch files
//! hold every input line's words exactly once.
//!
//! `--kafka HOST:PORT` reads a Kafka-protocol topic instead (`--topic`, default `words`);
//! with `--generate N` and a topic that does not exist yet, it creates the topic and
//! produces N lines into it first.
//!
//! `--input DIR` reads another file log (e.g. one your program appends to with
//! `tributary_receivers::file_log::FileLogWriter`); `--follow` keeps reading it until Ctrl-C
//! or `--seconds`. A file truncated or replaced under a recorded offset, or a partition file
//! that disappears, stops the job with an error naming the file and the offsets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tributary::cluster;
use tributary::{Backpressure, ByteString, DStream, DirectOptions, DirectSource, StreamingContext};
use tributary_receivers::file_log::{FileLog, FileLogWriter};
use tributary_receivers::kafka::KafkaTopic;

#[derive(Parser, Debug)]
struct Args {
    /// Checkpoint directory (the metadata log with every batch's offset ranges).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The file log to read (default: DIR/input, generated first).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Read this Kafka-protocol broker (`host:port`) instead of a file log.
    #[arg(long)]
    kafka: Option<String>,
    /// The topic to read with `--kafka`.
    #[arg(long, default_value = "words")]
    topic: String,
    /// Where batch files go (default: DIR/out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Lines to write into the default input before starting (when it is empty).
    #[arg(long, default_value_t = 200_000)]
    generate: u64,
    /// Partitions of the generated input.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Batch interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    batch_ms: u64,
    /// At most this many records per second per partition (Spark's maxRatePerPartition).
    #[arg(long)]
    max_rate_per_partition: Option<u64>,
    /// Turn the adaptive rate off (with no --max-rate-per-partition a batch reads all there is).
    #[arg(long)]
    no_backpressure: bool,
    /// Keep reading after catching up (until Ctrl-C or --seconds).
    #[arg(long)]
    follow: bool,
    /// Run this many worker processes of this program on loopback (relaunched when they die):
    /// they read ranges and run tasks beside the driver's executors.
    #[arg(long, default_value_t = 0)]
    worker_processes: usize,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<u64>,
    /// Make each batch's output take this long before it writes (a slow database write, say):
    /// a crash then often falls inside a batch's output.
    #[arg(long, default_value_t = 0)]
    hold_output_ms: u64,
}

/// Writes `bytes` to `path` through a temporary file and a rename: readers see the old
/// contents or the new, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Line `i` of the generated input: a few words.
fn line(i: u64) -> String {
    const WORDS: [&str; 8] = [
        "stream", "block", "batch", "offset", "replay", "driver", "worker", "record",
    ];
    format!(
        "{} {} {}",
        WORDS[(i % 8) as usize],
        WORDS[(i / 8 % 8) as usize],
        WORDS[(i / 64 % 8) as usize]
    )
}

/// Lines of a few words each, spread over the partitions (round robin).
fn generate(input: &Path, lines: u64, partitions: u32) -> anyhow::Result<()> {
    let mut writers = (0..partitions.max(1))
        .map(|p| FileLogWriter::open(input, p))
        .collect::<std::io::Result<Vec<_>>>()?;
    for i in 0..lines {
        let n = writers.len() as u64;
        writers[(i % n) as usize].append(line(i).as_bytes())?;
    }
    for w in &mut writers {
        w.sync()?;
    }
    Ok(())
}

/// The same lines, produced into a new topic (an existing one is left alone).
async fn generate_kafka(topic: &KafkaTopic, lines: u64, partitions: u32) -> anyhow::Result<()> {
    if !topic.partitions().await?.is_empty() {
        return Ok(());
    }
    let partitions = partitions.max(1);
    topic.create(partitions).await?;
    for p in 0..partitions {
        let mine: Vec<Vec<u8>> = (0..lines)
            .filter(|i| i % u64::from(partitions) == u64::from(p))
            .map(|i| line(i).into_bytes())
            .collect();
        for chunk in mine.chunks(1_000) {
            topic.produce(p, chunk.to_vec()).await?;
        }
    }
    println!(
        "produced {lines} lines into topic {} ({partitions} partitions)",
        topic.topic()
    );
    Ok(())
}

/// The job's source: a file log or a Kafka topic.
enum Source {
    File(FileLog),
    Kafka(KafkaTopic),
}

/// Where and how batch files are written.
#[derive(Clone)]
struct Output {
    batches: PathBuf,
    conflicts: PathBuf,
    /// Time each batch's write takes (`--hold-output-ms`).
    hold: Duration,
}

/// The job, the same in the driver and in worker processes: the source's lines, their words
/// counted per batch, written to a file per batch id.
fn define_job(
    ctx: &StreamingContext,
    source: Source,
    options: DirectOptions,
    output: &Output,
) -> Result<(), tributary::ContextError> {
    let output = output.clone();
    // The stream's name says what it reads: a checkpoint directory of one source is
    // refused for another (its offsets would mean nothing there).
    let lines: DStream<ByteString> = match source {
        Source::File(f) => ctx.direct_stream_with("file-log", f, options)?,
        Source::Kafka(k) => {
            let name = format!("kafka:{}", k.topic());
            ctx.direct_stream_with(name, k, options)?
        }
    };
    lines
        // Each line's words as (word, 1), summed per word.
        .reduce_by_key_with(
            |line: &str, out: &mut dyn FnMut(&str, u64)| {
                for word in line.split_whitespace() {
                    out(word, 1);
                }
            },
            |a, b| a + b,
        )
        .for_each_batch(move |batch| {
            if batch.offsets.is_empty() {
                return;
            }
            let counts: BTreeMap<&str, u64> = batch
                .records
                .iter()
                .map(|(w, n)| (w.as_str(), *n))
                .collect();
            let mut body = String::from("# offsets");
            for r in &batch.offsets {
                body.push_str(&format!(" {}:{}..{}", r.partition, r.from, r.until));
            }
            body.push('\n');
            for (w, n) in &counts {
                body.push_str(&format!("{w}\t{n}\n"));
            }
            let file = output.batches.join(batch.id.0.to_string());
            if let Ok(existing) = std::fs::read_to_string(&file) {
                if existing != body {
                    // Must never happen: a batch id re-run with other contents.
                    let _ = std::fs::write(output.conflicts.join(batch.id.0.to_string()), &body);
                }
            }
            // A slow write: a crash during it leaves no file, and the batch's re-run
            // after the restart must write it.
            std::thread::sleep(output.hold);
            if let Err(e) = write_atomically(&file, body.as_bytes()) {
                eprintln!("cannot write {}: {e}", file.display());
            }
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
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("tributary-direct-word-count"));
    let input = args.input.clone().unwrap_or_else(|| dir.join("input"));
    let out = args.out.clone().unwrap_or_else(|| dir.join("out"));
    let batch_interval = Duration::from_millis(args.batch_ms.max(1));
    let mut options = DirectOptions::default();
    if let Some(r) = args.max_rate_per_partition {
        options = options.max_rate_per_partition(r);
    }
    let output = Output {
        batches: out.join("batches"),
        conflicts: out.join("conflicts"),
        hold: Duration::from_millis(args.hold_output_ms),
    };
    let open_source = || -> anyhow::Result<Source> {
        Ok(match &args.kafka {
            Some(addr) => Source::Kafka(KafkaTopic::new(addr.clone(), args.topic.clone())),
            None => Source::File(FileLog::open(&input)?),
        })
    };

    // One binary, two roles: started by the driver's launcher (`--worker-processes`), this
    // process is a worker: it defines the same job and reads the ranges placed on it.
    if let Some(worker) = cluster::worker_role()? {
        let ctx = StreamingContext::builder()
            .batch_interval(batch_interval)
            .build()?;
        define_job(&ctx, open_source()?, options, &output)?;
        let exit = ctx.run_as_worker(worker).await?;
        println!("worker: {exit:?}");
        return Ok(());
    }

    // Input to read, when there is none yet.
    if args.generate > 0 && args.input.is_none() {
        match &args.kafka {
            Some(addr) => {
                let topic = KafkaTopic::new(addr.clone(), args.topic.clone());
                generate_kafka(&topic, args.generate, args.partitions).await?;
            }
            None => {
                let empty = std::fs::read_dir(&input).map_or(true, |mut d| d.next().is_none());
                if empty {
                    generate(&input, args.generate, args.partitions)?;
                    println!(
                        "wrote {} lines into {} ({} partitions)",
                        args.generate,
                        input.display(),
                        args.partitions
                    );
                }
            }
        }
    }
    std::fs::create_dir_all(&output.batches)?;
    std::fs::create_dir_all(&output.conflicts)?;
    let source = open_source()?;
    let checkpoint = dir.join("checkpoint");
    let no_backpressure = args.no_backpressure;
    let cookie = cluster::random_cookie()?;
    let workers = args.worker_processes;
    let job_cookie = cookie.clone();
    let ctx = StreamingContext::get_or_create(&checkpoint, move |builder| {
        let mut builder = builder.batch_interval(batch_interval);
        if no_backpressure {
            builder = builder.backpressure(Backpressure::off());
        }
        if workers > 0 {
            // Worker processes on loopback run tasks (and read ranges) beside the driver's.
            let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            builder = builder.cluster(cluster::ClusterConfig::new(listen, job_cookie));
        }
        let ctx = builder.build()?;
        define_job(&ctx, source, options, &output)?;
        Ok(ctx)
    })?;

    let mut reports = ctx.subscribe_batches();
    ctx.start().await?;
    // The worker processes: this program again, relaunched when they die.
    let _launcher = match ctx.cluster_addr() {
        Some(addr) if workers > 0 => {
            let launch = cluster::LaunchConfig::this_program(addr, cookie, workers)?;
            let launcher = cluster::WorkerLauncher::start(launch);
            let mut events = launcher.events();
            tokio::spawn(async move {
                while let Ok(e) = events.recv().await {
                    println!("{e}");
                }
            });
            Some(launcher)
        }
        _ => None,
    };
    if let Some(r) = ctx.recovery_report() {
        if !r.rerun_batches.is_empty() {
            println!(
                "recovered: {} batch(es) re-run on their recorded offset ranges {:?}",
                r.rerun_batches.len(),
                r.rerun_batches.iter().map(|b| b.0).collect::<Vec<_>>()
            );
        }
    }
    let deadline = args
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut idle = 0u32;
    let mut total = 0u64;
    let outcome = loop {
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = reports.recv() => match r {
                Ok(info) => {
                    total += info.records;
                    if info.records > 0 {
                        idle = 0;
                        let ranges: Vec<String> = info
                            .offsets
                            .values()
                            .flatten()
                            .map(|r| format!("{}:{}..{}", r.partition, r.from, r.until))
                            .collect();
                        println!(
                            "batch {}: {} records, offsets {}, {} task(s) in worker processes, processed in {:?}",
                            info.id.0,
                            info.records,
                            ranges.join(" "),
                            info.remote_tasks,
                            info.processing_time
                        );
                    } else {
                        idle += 1;
                    }
                    if let Some(e) = &info.failed {
                        eprintln!("batch {} failed: {e}", info.id.0);
                    }
                    // Caught up: three batch intervals with nothing new.
                    if !args.follow && idle >= 3 {
                        println!("caught up: {total} records in this run");
                        break ctx.stop(true).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break ctx.await_termination().await,
            },
            _ = tokio::signal::ctrl_c() => {
                println!("Ctrl-C: stopping");
                break ctx.stop(true).await;
            }
            _ = until_deadline => break ctx.stop(true).await,
        }
    };
    outcome?;
    println!("batch files in {}", out.join("batches").display());
    Ok(())
}
