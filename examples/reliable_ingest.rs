//! Run: cargo run --example reliable_ingest -- --dir /tmp/trib-ckpt --out /tmp/trib-out
//!
//! A reliable receiver with the write-ahead log on. The source is a sequence of numbered
//! records whose *acknowledged offset* is kept in `OUT/source.offset`: the receiver acks the
//! source (advances the offset) only after `store_reliably` resolved, i.e. once the block
//! holding the records is fsynced in the write-ahead log and replicated. Each batch writes its
//! records to `OUT/batches/<batch id>` (replacing the file atomically: output keyed by batch id
//! is idempotent).
//!
//! Try a crash: start it, `kill -9` it a few seconds later, start it again with the same
//! arguments. At start it prints what it recovered (batches re-run with the same ids, blocks
//! read back from the log). Every acknowledged record ends up in some batch file.
//!
//! `--no-wal` runs without the log: then blocks only in memory at the crash are lost, and that
//! loss is printed at restart and, per batch, appended to `OUT/lost.log` (never silent).
//! After every batch, `OUT/ledger.txt` says where every acknowledged record stands (stored =
//! completed + pending + lost, kept across restarts).
//!
//! A damaged log (a flipped byte, a cut older segment) makes the start refuse, naming the
//! segment and offset; `--quarantine-damaged` goes on instead: the damaged segment is copied
//! to `DIR/wal/quarantine/`, cut at the damage, and what it held is printed as lost.
//! Stops gracefully on Ctrl-C or after `--seconds`.
//!
//! Workers in other processes: `--cluster-listen 127.0.0.1:0 --cookie S` makes the driver
//! accept worker processes (the address is printed and written to `OUT/cluster.addr`); start
//! each with `reliable_ingest --worker --driver ADDR --cookie S`. Replicas of a block go to
//! distinct processes; `--local-workers 0` keeps none in the driver.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tributary::cluster::{ClusterConfig, WorkerConfig};
use tributary::testing::{CrashPoint, Faults, FaultyStorage};
use tributary::wal::{WalConfig, WalRecovery};
use tributary::{BoxError, Receiver, ReceiverContext, StreamingContext};

#[derive(Parser, Debug)]
struct Args {
    /// Checkpoint directory (metadata log, checkpoints, write-ahead log).
    #[arg(long, required_unless_present = "worker")]
    dir: Option<PathBuf>,
    /// Output directory (source offset, batch files, loss log).
    #[arg(long, required_unless_present = "worker")]
    out: Option<PathBuf>,
    /// Accept worker processes on this address (e.g. 127.0.0.1:0); the address chosen is
    /// written to `OUT/cluster.addr`, the live worker count to `OUT/live_workers`, the blocks
    /// with fewer than k replicas to `OUT/under_replicated`.
    #[arg(long)]
    cluster_listen: Option<std::net::SocketAddr>,
    /// Run as a worker process of the driver at `--driver`: host block replicas for it.
    #[arg(long)]
    worker: bool,
    /// The driver to join (with `--worker`).
    #[arg(long, requires = "worker")]
    driver: Option<String>,
    /// The cluster's shared secret (needed with `--cluster-listen` and `--worker`; else
    /// read from TRIBUTARY_COOKIE).
    #[arg(long)]
    cookie: Option<String>,
    /// In-process workers of the driver (0 only with `--cluster-listen`: every replica in
    /// worker processes).
    #[arg(long, default_value_t = 2)]
    local_workers: usize,
    /// Replicas of each block (k).
    #[arg(long, default_value_t = 2)]
    replication: usize,
    /// Run without the write-ahead log.
    #[arg(long)]
    no_wal: bool,
    /// Process each block only when its batch runs (by default a block's per-block work
    /// starts as soon as it is acknowledged).
    #[arg(long)]
    no_early_tasks: bool,
    /// On a damaged write-ahead log, quarantine the damaged segments and go on (reporting
    /// what was lost) instead of refusing to start.
    #[arg(long)]
    quarantine_damaged: bool,
    /// Write-ahead log segment size in KiB (segments roll past it).
    #[arg(long, default_value_t = 64 * 1024)]
    wal_segment_kib: u64,
    /// Inject I/O faults (for chaos tests), seeded: now and then the disk is "full" for a
    /// moment under the write-ahead log or the metadata log (ENOSPC after a short write).
    #[arg(long)]
    chaos_io: Option<u64>,
    /// End the process (abort, like a kill) at a step of the logs' life: `segment-rolled`,
    /// `segment-deleted`, `compacting` or `compacted` (for crash tests).
    #[arg(long)]
    crash_at: Option<String>,
    /// Compact the metadata log every this many batches.
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u32,
    /// Stop gracefully after this many seconds (0: until Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    /// Records per second from the source.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Hold the output this long after writing each non-empty batch file (a crash test kills
    /// the process there: the output applied, its completion not yet logged).
    #[arg(long, default_value_t = 0)]
    hold_output_ms: u64,
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A source with offsets: numbered records from the acknowledged offset on.
struct NumberSource {
    offset_file: PathBuf,
    acked: Arc<AtomicU64>,
    per_message: u64,
    pause: Duration,
}

#[derive(Debug)]
struct Next;

impl Receiver for NumberSource {
    type Msg = Next;
    type State = u64; // next number to read from the source
    type Record = String;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        // Resume from the last acknowledged offset: the source redelivers what was not acked.
        let _ = ctx.myself().send(Next);
        Ok(self.acked.load(Ordering::SeqCst))
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        _: Next,
        next: &mut u64,
    ) -> Result<(), BoxError> {
        let records: Vec<String> = (*next..*next + self.per_message)
            .map(|n| n.to_string())
            .collect();
        ctx.store_reliably(records).await?;
        // Durable: now (and only now) acknowledge the source.
        *next += self.per_message;
        write_atomically(&self.offset_file, next.to_string().as_bytes())?;
        self.acked.store(*next, Ordering::SeqCst);
        tokio::time::sleep(self.pause).await;
        let _ = ctx.myself().send(Next);
        Ok(())
    }
}

fn append_line(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
        let _ = f.sync_all();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut args = Args::parse();
    if args.cookie.is_none() {
        args.cookie = std::env::var("TRIBUTARY_COOKIE").ok();
    }
    if args.worker {
        let (Some(driver), Some(cookie)) = (args.driver.clone(), args.cookie.clone()) else {
            anyhow::bail!("--worker needs --driver ADDR and --cookie (or TRIBUTARY_COOKIE)");
        };
        let exit = tributary::cluster::run_worker(WorkerConfig::new(driver, cookie)).await?;
        println!("worker: {exit:?}");
        return Ok(());
    }
    let (Some(dir), Some(out)) = (args.dir.clone(), args.out.clone()) else {
        anyhow::bail!("--dir and --out are required");
    };
    let cluster = match (args.cluster_listen, args.cookie.clone()) {
        (Some(listen), Some(cookie)) => Some(ClusterConfig::new(listen, cookie)),
        (Some(_), None) => anyhow::bail!("--cluster-listen needs --cookie (or TRIBUTARY_COOKIE)"),
        _ => None,
    };
    let local_workers = args.local_workers;
    let replication = args.replication;
    let batches_dir = out.join("batches");
    let conflicts_dir = out.join("conflicts");
    std::fs::create_dir_all(&batches_dir)?;
    std::fs::create_dir_all(&conflicts_dir)?;
    let offset_file = out.join("source.offset");
    let acked_at_start: u64 = std::fs::read_to_string(&offset_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let acked = Arc::new(AtomicU64::new(acked_at_start));

    let per_message = 200;
    let source = NumberSource {
        offset_file: offset_file.clone(),
        acked: acked.clone(),
        per_message,
        pause: Duration::from_secs_f64(per_message as f64 / args.rate.max(1) as f64),
    };
    let no_wal = args.no_wal;
    let segment_kib = args.wal_segment_kib;
    let recovery = if args.quarantine_damaged {
        WalRecovery::QuarantineDamaged
    } else {
        WalRecovery::Strict
    };
    let hold_output = Duration::from_millis(args.hold_output_ms);
    let out_dir = out.clone();
    let faults = Faults::new();
    let chaos_faults = faults.clone();
    let checkpoint_every = args.checkpoint_every;
    let crash_at = match args.crash_at.as_deref() {
        None => None,
        Some("segment-rolled") => Some(CrashPoint::SegmentRolled),
        Some("segment-deleted") => Some(CrashPoint::SegmentDeleted),
        Some("compacting") => Some(CrashPoint::Compacting),
        Some("compacted") => Some(CrashPoint::Compacted),
        Some(other) => anyhow::bail!(
            "--crash-at {other}: expected segment-rolled, segment-deleted, compacting or compacted"
        ),
    };
    faults.crash_at(crash_at);
    let ctx = StreamingContext::get_or_create(&dir, move |builder| {
        let mut builder = builder
            .batch_interval(Duration::from_millis(200))
            .block_interval(Duration::from_millis(50))
            .workers(local_workers)
            .replication(replication)
            .early_tasks(!args.no_early_tasks);
        if let Some(c) = cluster {
            builder = builder.cluster(c);
        }
        builder = builder.checkpoint_interval(checkpoint_every);
        if args.chaos_io.is_some() || crash_at.is_some() {
            builder = builder
                .wrap_storage(move |inner| Arc::new(FaultyStorage::new(inner, faults.clone())));
        }
        if !no_wal {
            builder = builder.write_ahead_log(WalConfig {
                recovery,
                segment_bytes: segment_kib.max(1) << 10,
                ..WalConfig::default()
            });
        }
        let ctx = builder.build()?;
        let out = out_dir.clone();
        ctx.receiver_stream("numbers", source)?
            .for_each_batch(move |batch| {
                let mut seqs: Vec<u64> = batch
                    .records
                    .iter()
                    .filter_map(|r| r.parse().ok())
                    .collect();
                seqs.sort_unstable();
                let body = seqs
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                let file = out.join("batches").join(batch.id.0.to_string());
                if let Ok(existing) = std::fs::read_to_string(&file) {
                    if existing != body {
                        // Must never happen: a batch id re-run with different contents.
                        let _ = std::fs::write(
                            out.join("conflicts").join(batch.id.0.to_string()),
                            &body,
                        );
                    }
                }
                if let Err(e) = write_atomically(&file, body.as_bytes()) {
                    eprintln!("cannot write {}: {e}", file.display());
                }
                if !seqs.is_empty() {
                    std::thread::sleep(hold_output);
                }
            })?;
        Ok(ctx)
    })?;

    let mut reports = ctx.subscribe_batches();
    let lost_log2 = out.join("lost.log");
    let ledger_file = out.join("ledger.txt");
    tokio::spawn(async move {
        while let Ok(info) = reports.recv().await {
            // Where every acknowledged record stands: stored = completed + pending + lost.
            let t = info.ledger.total();
            let line = format!(
                "stored {} completed {} pending {} lost {} balances {}\n",
                t.stored,
                t.completed,
                t.pending,
                t.lost_total(),
                info.ledger.balances()
            );
            let _ = write_atomically(&ledger_file, line.as_bytes());
            if info.lost_records > 0 {
                append_line(
                    &lost_log2,
                    &format!("batch {} lost {} records", info.id.0, info.lost_records),
                );
            }
        }
    });

    if let Some(seed) = args.chaos_io {
        tokio::spawn(inject_faults(seed, chaos_faults));
    }
    ctx.start().await?;
    match ctx.recovery_report() {
        Some(r) => {
            println!(
                "recovered: {} batch(es) re-run {:?}, {} block(s) / {} record(s) from the write-ahead log, {} truncated segment(s)",
                r.rerun_batches.len(),
                r.rerun_batches.iter().map(|b| b.0).collect::<Vec<_>>(),
                r.recovered_blocks,
                r.recovered_records,
                r.truncated_segments.len()
            );
            if r.lost_blocks > 0 {
                // Each of these blocks is also reported, once, by the batch it belongs to
                // (in `lost.log`), when that batch runs.
                let cause = if r.quarantined_segments.is_empty() {
                    "no write-ahead log".to_string()
                } else {
                    format!(
                        "damaged write-ahead log segments quarantined: {:?}",
                        r.quarantined_segments
                    )
                };
                println!(
                    "LOST at restart: {} block(s), {} record(s) ({cause})",
                    r.lost_blocks, r.lost_records
                );
            }
        }
        None => println!("new job in {}", dir.display()),
    }
    if let Some(addr) = ctx.cluster_addr() {
        println!("accepting workers on {addr}");
        write_atomically(&out.join("cluster.addr"), addr.to_string().as_bytes())?;
        let ctx2 = ctx.clone();
        let live_file = out.join("live_workers");
        let under_file = out.join("under_replicated");
        tokio::spawn(async move {
            loop {
                let n = ctx2.live_workers().await.len();
                let _ = write_atomically(&live_file, n.to_string().as_bytes());
                // Blocks with fewer than k replicas right now (re-replication pending).
                let under = ctx2
                    .block_locations()
                    .await
                    .iter()
                    .filter(|(_, at)| at.len() < replication)
                    .count();
                let _ = write_atomically(&under_file, under.to_string().as_bytes());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    println!("source resumes at offset {acked_at_start}");

    tokio::select! {
        _ = async {
            if args.seconds > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await
            } else {
                std::future::pending::<()>().await
            }
        } => {}
        _ = tokio::signal::ctrl_c() => println!("Ctrl-C"),
        r = ctx.await_termination() => r?,
    }
    ctx.stop(true).await?;
    println!(
        "stopped; source acknowledged through offset {}",
        acked.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Now and then (seeded), a full disk for 50-300 ms under one of the logs.
async fn inject_faults(seed: u64, faults: Faults) {
    let mut rng = fastrand::Rng::with_seed(seed);
    loop {
        tokio::time::sleep(Duration::from_millis(100 + rng.u64(0..400))).await;
        let file = if rng.bool() { ".wal" } else { "metadata.log" };
        faults.only_files(Some(file));
        faults.disk_full(true);
        tokio::time::sleep(Duration::from_millis(50 + rng.u64(0..250))).await;
        faults.disk_full(false);
    }
}
