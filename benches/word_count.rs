//! Run: cargo bench --bench word_count
//!
//! The job as users write it: text records, `flat_map` to owned words, `(word, 1)`,
//! `reduce_by_key`, `for_each_batch` (as README showed it until `reduce_by_key_with`). Fed by the synthetic
//! receiver as fast as it goes, one `store` per record (the Spark peer's workload: 100-byte
//! records, a 13-digit sequence number, a creation time, ten words of a 256-word vocabulary),
//! 1 s batches, 200 ms blocks, 2 workers, 2 executors, k = 2, the default block budget.
//!
//! One JSON object per line:
//! * `plain_loop`: first, a single-threaded loop with no framework over records already in
//!   memory (parse the two numbers, count the ten words in a `HashMap<&str, u64>`): its
//!   records/s per core is this machine's yardstick;
//! * `natural_word_count_k2` (backpressure on, the default) and
//!   `natural_word_count_k2_backpressure_off`: records completed per second over the measured
//!   window (after the warm-up), `ratio_to_loop` = that ÷ (cores × the loop's per-core rate),
//!   batch sizes (min / median / max), the largest scheduling delay, latency from a record's
//!   creation to its batch's output (p50 / p99, every 1,024th record), CPU-seconds per million
//!   records, peak RSS (from after the loop: `peak_rss_after_loop`), and records lost and duplicated (each sequence number is tracked by a
//!   second output on the same stream: both must be 0);
//! * `readme_word_count_k2`: the job as README shows it now, `reduce_by_key_with` reading
//!   each line as a `&str` in place in its block, over borrowed `&str` words (a key is made a
//!   `String` only the first time a block's task sees it);
//! * `line_records_word_count_k2`: the same reading each line as a `&ByteString` record (one
//!   record and its reference count per line: README's way before lines were read in place);
//! * `readme_word_count_k2_2_processes`: the same job with two worker processes of this
//!   binary (launched in the worker role) holding every replica (k = 2: one in each) and
//!   running the tasks where they are, beside the driver's executors; its CPU figure sums
//!   the driver and the worker processes, `peak_rss_mb` is the driver's and
//!   `workers_peak_rss_mb` the worker processes' (summed);
//! * `tuned_word_count_k2`: the hand-tuned job of `benches/pipeline.rs` (`u128` keys built
//!   from the words' bytes, `store_many` in chunks of 2,000) with the same tracker, measured
//!   the same way, so that the README job's figure can be set beside it (goal: within 1.5×)
//!   and both against the same yardstick;
//! * `sliced_word_count_k2`: the same with each word a `ByteString` slice of the block
//!   (`flat_map_with` emitting `(line.slice_ref(w), 1)`): no allocation per word.
//!
//! * `latency_50k_500ms` (and `…_early_tasks_off`): README's job fed at 50 k records/s,
//!   500 ms batches, 200 ms blocks (the setting of the Spark and Flink latency figures);
//!   `latency_1m`: at 1 M records/s with `BENCH_LATENCY_INTERVAL_MS` (default 10) batches and
//!   blocks. `BENCH_BACKPRESSURE=off` turns the adaptive rate off in these cases.
//!
//! `BENCH_MEM_MB` sets the block memory budget (default: the framework's).
//! `BENCH_SECONDS` (default 60) is the measured window, `BENCH_WARMUP` (default 20) the
//! warm-up before it; `BENCH_ONLY=<case>` runs one case (each case runs in a process of its own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tributary::cluster::ClusterConfig;
use tributary::{Backpressure, BatchInfo, ByteString, StreamingContext};
use tributary_receivers::synthetic::{parse, word, StoreMode, SyntheticReceiver};

mod support;
use support::{only_case, peak_rss_mb};

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// CPU seconds a process used (user + system), from `/proc/<pid>/stat` (`self` for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Records in the synthetic format, in memory.
fn records(n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(7);
    let vocabulary: Vec<String> = (0..=255u8).map(word).collect();
    (0..n)
        .map(|i| {
            let mut r = format!("{i:013} {:016}", 1_732_482_000_123_456u64 + i as u64);
            for _ in 0..10 {
                r.push(' ');
                r.push_str(&vocabulary[rng.u8(..) as usize]);
            }
            r
        })
        .collect()
}

/// The yardstick: records/s of a plain single-threaded loop.
fn plain_loop() -> f64 {
    let recs = records(1_000_000);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let mut counts: HashMap<&str, u64> = HashMap::new();
        let mut sum = 0u64;
        for r in &recs {
            let (seq, created, words) = parse(r).expect("a synthetic record");
            sum = sum.wrapping_add(seq ^ created);
            for w in words {
                *counts.entry(w).or_insert(0) += 1;
            }
        }
        std::hint::black_box((sum, &counts));
        best = best.max(recs.len() as f64 / started.elapsed().as_secs_f64());
    }
    best
}

/// Sequence numbers seen (as runs) and latency samples, per block and per batch.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
struct Seen {
    runs: Vec<(u64, u64)>,
    created_us: Vec<u64>,
}

impl Seen {
    fn add(&mut self, seq: u64, created: u64) {
        match self.runs.last_mut() {
            Some((_, end)) if *end == seq => *end += 1,
            _ => self.runs.push((seq, seq + 1)),
        }
        if seq.is_multiple_of(1024) {
            self.created_us.push(created);
        }
    }
}

struct Outcome {
    infos: Vec<BatchInfo>,
    runs: Vec<(u64, u64)>,
    latency_ms: Vec<u64>,
    /// CPU seconds of this process and its worker processes while measured.
    cpu: f64,
    /// Peak RSS of the worker processes, summed (MB; 0 without them).
    workers_peak_rss_mb: f64,
    measured_from: Instant,
}

/// How the job makes its words (keys).
#[derive(Clone, Copy)]
enum Job {
    /// `flat_map` to owned `String`s, then `(word, 1)`: README's way until now.
    Owned,
    /// `flat_map_with` emitting `(ByteString, 1)`: each word a slice of the block.
    Sliced,
    /// `reduce_by_key_with` reading each line as `&str` in place in its block, over borrowed
    /// `&str` words: README's way now.
    Borrowed,
    /// The same reading each line as a `&ByteString` record (README's way until lines could
    /// be read in place): one record, with its reference count, per line.
    LineRecords,
    /// The hand-tuned job of the pipeline bench: `reduce_by_key` over `u128` keys built from
    /// the words' bytes, fed with `store_many` (chunks of 2,000 records).
    Tuned,
}

impl Job {
    /// How the worker role is told the job (`--job NAME`).
    fn name(self) -> &'static str {
        match self {
            Job::Owned => "owned",
            Job::Sliced => "sliced",
            Job::Borrowed => "borrowed",
            Job::LineRecords => "line-records",
            Job::Tuned => "tuned",
        }
    }

    fn from_name(name: &str) -> Option<Job> {
        [
            Job::Owned,
            Job::Sliced,
            Job::Borrowed,
            Job::LineRecords,
            Job::Tuned,
        ]
        .into_iter()
        .find(|j| j.name() == name)
    }
}

fn top3<K: Ord>(records: Vec<(K, u64)>) -> Vec<(K, u64)> {
    let mut best = records;
    best.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    best.truncate(3);
    best
}

/// How a case runs: intervals, the source's rate (`None`: as fast as it goes), the knobs.
#[derive(Clone, Copy)]
struct Shape {
    batch: Duration,
    block: Duration,
    rate: Option<f64>,
    backpressure: Backpressure,
    early_tasks: bool,
}

impl Shape {
    /// 1 s batches, 200 ms blocks, free-running, the defaults.
    fn free(backpressure: Backpressure) -> Shape {
        Shape {
            batch: Duration::from_secs(1),
            block: Duration::from_millis(200),
            rate: None,
            backpressure,
            early_tasks: true,
        }
    }
}

/// The job and its tracker, the same in the driver and in worker processes: returns the
/// tracker's sequence-number runs and latency samples.
#[allow(clippy::type_complexity)]
fn define_job(
    ctx: &StreamingContext,
    job: Job,
    source: SyntheticReceiver,
) -> (Arc<Mutex<Vec<(u64, u64)>>>, Arc<Mutex<Vec<u64>>>) {
    let lines = ctx.receiver_stream("synthetic", source).unwrap();
    // The job (the first two fields are the sequence number and time).
    match job {
        Job::Owned => {
            let top: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
            lines
                .flat_map(|l: ByteString| {
                    l.split_whitespace()
                        .skip(2)
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .map(|w| (w, 1u64))
                .reduce_by_key(|a, b| a + b)
                .for_each_batch(move |batch| *top.lock().unwrap() = top3(batch.records))
                .unwrap();
        }
        Job::Borrowed => {
            let top: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
            lines
                .reduce_by_key_with(
                    |l: &str, out: &mut dyn FnMut(&str, u64)| {
                        for w in l.split_whitespace().skip(2) {
                            out(w, 1);
                        }
                    },
                    |a, b| a + b,
                )
                .for_each_batch(move |batch| *top.lock().unwrap() = top3(batch.records))
                .unwrap();
        }
        Job::LineRecords => {
            let top: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
            lines
                .reduce_by_key_with(
                    |l: &ByteString, out: &mut dyn FnMut(&str, u64)| {
                        for w in l.split_whitespace().skip(2) {
                            out(w, 1);
                        }
                    },
                    |a, b| a + b,
                )
                .for_each_batch(move |batch| *top.lock().unwrap() = top3(batch.records))
                .unwrap();
        }
        Job::Sliced => {
            let top: Arc<Mutex<Vec<(ByteString, u64)>>> = Arc::default();
            lines
                .flat_map_with(|l: ByteString, out| {
                    for w in l.split_whitespace().skip(2) {
                        out((l.slice_ref(w), 1u64));
                    }
                })
                .reduce_by_key(|a, b| a + b)
                .for_each_batch(move |batch| *top.lock().unwrap() = top3(batch.records))
                .unwrap();
        }
        Job::Tuned => {
            let keys: Arc<Mutex<usize>> = Arc::default();
            support::word_job_on(&lines, false)
                .for_each_batch(move |batch| *keys.lock().unwrap() = batch.records.len())
                .unwrap();
        }
    }
    // The tracker: every sequence number, and a creation time now and then.
    let runs: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let latency: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (r, lat) = (runs.clone(), latency.clone());
    lines
        .aggregate_ref(
            Seen::default,
            |s: &mut Seen, l: &str| {
                if let Some((seq, created, _)) = parse(l) {
                    s.add(seq, created);
                }
            },
            |mut a: Seen, b: Seen| {
                a.runs.extend(b.runs);
                a.created_us.extend(b.created_us);
                a
            },
        )
        .for_each_batch(move |batch| {
            let done = now_us();
            for s in batch.records {
                r.lock().unwrap().extend(s.runs);
                lat.lock()
                    .unwrap()
                    .extend(s.created_us.iter().map(|c| done.saturating_sub(*c) / 1000));
            }
        })
        .unwrap();
    (runs, latency)
}

/// The source of a shape: as fast as it goes, or at its rate; one `store` per record, but
/// `store_many` for the tuned job.
fn source(shape: &Shape, job: Job) -> SyntheticReceiver {
    let mut source = match job {
        Job::Tuned => SyntheticReceiver::new().mode(StoreMode::Many).chunk(2000),
        _ => SyntheticReceiver::new().mode(StoreMode::Single).chunk(500),
    };
    if let Some(rate) = shape.rate {
        // Chunks of 1 ms of records: the rate is steady at this grain.
        source = source
            .rate(rate)
            .chunk(((rate / 1000.0) as usize).clamp(1, 500));
    }
    source
}

/// The cookie of the bench's worker processes.
const COOKIE: &str = "word-count-bench";

async fn natural(job: Job, shape: Shape, warmup: f64, seconds: f64, processes: usize) -> Outcome {
    let mut builder = StreamingContext::builder()
        .batch_interval(shape.batch)
        .block_interval(shape.block)
        .workers(2)
        .replication(2)
        .executors(2)
        .backpressure(shape.backpressure)
        .early_tasks(shape.early_tasks);
    if let Some(mb) = std::env::var("BENCH_MEM_MB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        builder = builder.memory_limit(mb << 20);
    }
    if processes > 0 {
        // Every replica in the worker processes (k = 2: one in each), tasks where they are.
        builder = builder
            .workers(0)
            .cluster(ClusterConfig::new(([127, 0, 0, 1], 0).into(), COOKIE));
    }
    let ctx = builder.build().unwrap();
    let (runs, latency) = define_job(&ctx, job, source(&shape, job));
    let mut reports = ctx.subscribe_batches();
    ctx.start().await.unwrap();
    let _launcher = if processes > 0 {
        Some(support::launch(&ctx, processes, COOKIE, &["--job", job.name()]).await)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let measured_from = Instant::now();
    // This process and its worker processes (a relaunched worker would start from 0: none is
    // killed here).
    let pids = |l: &Option<tributary::cluster::WorkerLauncher>| {
        let mut p = vec!["self".to_string()];
        if let Some(l) = l {
            p.extend(l.pids().into_iter().flatten().map(|id| id.to_string()));
        }
        p
    };
    let cpu_of = |pids: &[String]| pids.iter().map(|p| cpu_seconds(p)).sum::<f64>();
    let measured = pids(&_launcher);
    let cpu0 = cpu_of(&measured);
    let skip_latency = latency.lock().unwrap().len();
    let mut infos = Vec::new();
    // Drop the warm-up's reports.
    while reports.try_recv().is_ok() {}
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    loop {
        match tokio::time::timeout_at(until, reports.recv()).await {
            Ok(Ok(info)) => infos.push(info),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            _ => break,
        }
    }
    let cpu = cpu_of(&measured) - cpu0;
    let workers_peak_rss_mb = measured[1..]
        .iter()
        .map(|p| support::peak_rss_mb_of(p))
        .sum();
    ctx.stop(true).await.unwrap();
    let latency_ms = latency.lock().unwrap().split_off(skip_latency);
    let runs = std::mem::take(&mut *runs.lock().unwrap());
    Outcome {
        infos,
        runs,
        latency_ms,
        cpu,
        workers_peak_rss_mb,
        measured_from,
    }
}

/// (lost, duplicated) sequence numbers: every number below the highest seen must be seen once.
fn lost_and_duplicated(mut runs: Vec<(u64, u64)>) -> (u64, u64) {
    runs.sort_unstable();
    let (mut next, mut lost, mut dup) = (0u64, 0u64, 0u64);
    for (start, end) in runs {
        if start > next {
            lost += start - next;
            next = end;
        } else {
            dup += end.min(next) - start;
            next = next.max(end);
        }
    }
    (lost, dup)
}

fn pick(sorted: &[u64], q: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0)
}

async fn case(name: &str, job: Job, shape: Shape) {
    case_in(name, job, shape, 0).await
}

/// A case with `processes` worker processes (0: in one process).
async fn case_in(name: &str, job: Job, shape: Shape, processes: usize) {
    let loop_rate = plain_loop();
    // The peak RSS reported is the job's, not the loop's million records held in memory.
    let peak_reset = support::reset_peak_rss();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let (warmup, seconds) = (
        env_f64("BENCH_WARMUP", 20.0),
        env_f64("BENCH_SECONDS", 60.0),
    );
    let o = natural(job, shape, warmup, seconds, processes).await;
    let wall = o
        .measured_from
        .elapsed()
        .as_secs_f64()
        .min(seconds)
        .max(1e-9);
    let records: u64 = o.infos.iter().map(|i| i.records).sum();
    let rate = records as f64 / wall;
    let mut sizes: Vec<u64> = o.infos.iter().map(|i| i.records).collect();
    sizes.sort_unstable();
    let mut lat = o.latency_ms;
    lat.sort_unstable();
    let (lost, duplicated) = lost_and_duplicated(o.runs);
    println!(
        "{}",
        json!({
            "name": name,
            "records_per_s": rate.round(),
            "ratio_to_loop": ((rate / (cores * loop_rate)) * 1000.0).round() / 1000.0,
            "loop_records_per_s_per_core": loop_rate.round(),
            "batches": o.infos.len(),
            "batch_records_min": sizes.first().copied().unwrap_or(0),
            "batch_records_median": pick(&sizes, 0.5),
            "batch_records_max": sizes.last().copied().unwrap_or(0),
            "max_scheduling_delay_ms": o.infos.iter().map(|i| i.scheduling_delay.as_millis()).max().unwrap_or(0),
            "max_processing_ms": o.infos.iter().map(|i| i.processing_time.as_millis()).max().unwrap_or(0),
            "latency_p50_ms": pick(&lat, 0.5),
            "latency_p99_ms": pick(&lat, 0.99),
            "cpu_s_per_m_records": if records > 0 { (o.cpu / (records as f64 / 1e6) * 100.0).round() / 100.0 } else { 0.0 },
            "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
            "peak_rss_after_loop": peak_reset,
            "workers_peak_rss_mb": (o.workers_peak_rss_mb * 10.0).round() / 10.0,
            "lost": lost,
            "duplicated": duplicated,
            "lost_blocks": o.infos.iter().map(|i| i.lost_blocks).sum::<usize>(),
            "batch_interval_ms": shape.batch.as_millis(),
            "block_interval_ms": shape.block.as_millis(),
            "source_rate": shape.rate,
            "early_tasks": shape.early_tasks,
            "worker_processes": processes,
            "warmup_s": warmup,
            "seconds": seconds,
        })
    );
}

const CASES: [&str; 11] = [
    "plain_loop",
    "readme_word_count_k2",
    "tuned_word_count_k2",
    "readme_word_count_k2_2_processes",
    "natural_word_count_k2",
    "natural_word_count_k2_backpressure_off",
    "sliced_word_count_k2",
    "line_records_word_count_k2",
    "latency_50k_500ms",
    "latency_50k_500ms_early_tasks_off",
    "latency_1m",
];

/// The latency cases: README's job at a fixed rate (50 k records/s, 500 ms batches, 200 ms
/// blocks: the Spark and Flink figures' setting), and at 1 M records/s with short batches
/// (`BENCH_LATENCY_INTERVAL_MS`, default 10, blocks the same).
fn latency_shape(fast: bool, early_tasks: bool) -> Shape {
    let (batch, block, rate) = if fast {
        let ms = env_f64("BENCH_LATENCY_INTERVAL_MS", 10.0).max(1.0) as u64;
        (Duration::from_millis(ms), Duration::from_millis(ms), 1e6)
    } else {
        (
            Duration::from_millis(500),
            Duration::from_millis(200),
            50_000.0,
        )
    };
    let backpressure = match std::env::var("BENCH_BACKPRESSURE").as_deref() {
        Ok("off") => Backpressure::off(),
        _ => Backpressure::default(),
    };
    Shape {
        batch,
        block,
        rate: Some(rate),
        backpressure,
        early_tasks,
    }
}

fn main() {
    let rt = support::runtime();
    // The worker role: the launcher starts this binary with the driver's address and the job.
    let args: Vec<String> = std::env::args().collect();
    if let Some(driver) = support::arg_after(&args, "--worker-of") {
        let job = support::arg_after(&args, "--job")
            .and_then(Job::from_name)
            .expect("--job owned|sliced|borrowed|tuned");
        let cookie = std::env::var("TRIBUTARY_COOKIE").expect("cookie");
        let cfg = tributary::cluster::WorkerConfig::new(driver, cookie);
        // One binary, two roles: the worker defines the same job and runs its tasks.
        let ctx = StreamingContext::builder().build().unwrap();
        define_job(&ctx, job, SyntheticReceiver::new());
        let _ = rt.block_on(ctx.run_as_worker(cfg));
        return;
    }
    let Some(only) = only_case(&CASES) else {
        return;
    };
    rt.block_on(async {
        match only.as_str() {
            "plain_loop" => {
                let rate = plain_loop();
                println!(
                    "{}",
                    json!({"name": "plain_loop", "records_per_s_per_core": rate.round(), "records": 1_000_000})
                );
            }
            "natural_word_count_k2" => {
                case(&only, Job::Owned, Shape::free(Backpressure::default())).await
            }
            "natural_word_count_k2_backpressure_off" => {
                case(&only, Job::Owned, Shape::free(Backpressure::off())).await
            }
            "readme_word_count_k2" => {
                case(&only, Job::Borrowed, Shape::free(Backpressure::default())).await
            }
            "tuned_word_count_k2" => {
                case(&only, Job::Tuned, Shape::free(Backpressure::default())).await
            }
            "readme_word_count_k2_2_processes" => {
                let shape = Shape::free(Backpressure::default());
                case_in(&only, Job::Borrowed, shape, 2).await
            }
            "sliced_word_count_k2" => {
                case(&only, Job::Sliced, Shape::free(Backpressure::default())).await
            }
            "line_records_word_count_k2" => {
                case(&only, Job::LineRecords, Shape::free(Backpressure::default())).await
            }
            "latency_50k_500ms" => case(&only, Job::Borrowed, latency_shape(false, true)).await,
            "latency_50k_500ms_early_tasks_off" => {
                case(&only, Job::Borrowed, latency_shape(false, false)).await
            }
            "latency_1m" => case(&only, Job::Borrowed, latency_shape(true, true)).await,
            other => panic!("unknown case {other}; cases: {CASES:?}"),
        }
    });
}
