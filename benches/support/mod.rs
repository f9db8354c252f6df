//! Shared by the benchmarks: the pipeline bench's job (the fixed comparison workload's word
//! count over `u128` keys) and the process's peak RSS.
#![allow(dead_code, unreachable_pub)]

use tributary::{BatchInfo, ByteString, DStream, StreamingContext};
use tributary_receivers::synthetic::SyntheticReceiver;

/// A key of the word-count job in one `u128` (hashed and compared as one integer, no
/// allocation per word). A word of up to 16 ASCII bytes is stored as its bytes, little-endian,
/// so bit 127 is clear (longer words are truncated, which the fixed vocabulary never needs);
/// the job's other keys set bit 127.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Key(pub u128);

const TAG: u128 = 1 << 127;

impl Key {
    /// Every record adds 1 here.
    pub const RECORDS: Key = Key(TAG);
    /// Every record adds its sequence number plus its creation time here (so both are parsed
    /// and used).
    pub const SEQ_PLUS_TIME: Key = Key(TAG | 1);

    pub fn word(w: &[u8]) -> Key {
        // Built from two u64 halves byte by byte: copying into a [u8; 16] and reading it back
        // as one u128 makes the CPU stall on store forwarding, and u128 shifts by a variable
        // amount are slow; this is about twice as fast as either.
        let (mut lo, mut hi) = (0u64, 0u64);
        for (i, c) in w.iter().take(8).enumerate() {
            lo |= u64::from(*c) << (8 * i);
        }
        for (i, c) in w.iter().skip(8).take(8).enumerate() {
            hi |= u64::from(*c) << (8 * i);
        }
        Key(((u128::from(hi) << 64) | u128::from(lo)) & !TAG)
    }

    /// Records created in millisecond `ms` (latency runs only).
    pub fn created_ms(ms: u64) -> Key {
        Key(TAG | (1 << 64) | u128::from(ms))
    }

    pub fn is_word(self) -> bool {
        self.0 & TAG == 0
    }

    pub fn created(self) -> Option<u64> {
        (self.0 & (TAG | (1 << 64)) == TAG | (1 << 64)).then_some(self.0 as u64)
    }
}

pub fn digits(s: &[u8]) -> u64 {
    s.iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d.wrapping_sub(b'0')))
}

pub fn peak_rss_mb() -> f64 {
    peak_rss_mb_of("self")
}

/// Resets this process's peak RSS to its current RSS (Linux: `5` into `/proc/self/clear_refs`),
/// so that a later [`peak_rss_mb`] is the peak of what ran after this (e.g. not the
/// yardstick loop's records held in memory before a case). False where it is unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak RSS of process `pid` (`self` for this one), in MB, from `/proc/<pid>/status`.
pub fn peak_rss_mb_of(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The pipeline bench's job on `source`: one pass per block that counts records, parses the
/// sequence number and timestamp, and counts words, as one `reduce_by_key_with` over `u128`
/// keys.
pub fn word_job(
    ctx: &StreamingContext,
    source: SyntheticReceiver,
    track_latency: bool,
) -> DStream<(Key, u64)> {
    word_job_on(
        &ctx.receiver_stream("synthetic", source).unwrap(),
        track_latency,
    )
}

/// The pipeline bench's job on any stream of its records (a receiver's or a direct one).
pub fn word_job_on(records: &DStream<ByteString>, track_latency: bool) -> DStream<(Key, u64)> {
    // Each record read as `&[u8]` in place in its block (no record made per line).
    records.reduce_by_key_with(
        move |b: &[u8], out: &mut dyn FnMut(&Key, u64)| {
            if b.len() < 31 {
                return;
            }
            let (seq, created_us) = (digits(&b[0..13]), digits(&b[14..30]));
            out(&Key::RECORDS, 1u64);
            out(&Key::SEQ_PLUS_TIME, seq.wrapping_add(created_us));
            if track_latency {
                out(&Key::created_ms(created_us / 1000), 1);
            }
            for w in b[31..].split(|c| *c == b' ') {
                out(&Key::word(w), 1);
            }
        },
        u64::wrapping_add,
    )
}

/// The batches after the first two (start-up), their records per second at `interval`, and
/// their largest scheduling delay in ms.
pub fn steady(infos: &[BatchInfo], interval: std::time::Duration) -> (&[BatchInfo], f64, u128) {
    let steady = &infos[2.min(infos.len())..];
    let records: u64 = steady.iter().map(|i| i.records).sum();
    let rate = records as f64 / (steady.len().max(1) as f64 * interval.as_secs_f64());
    let max_sched = steady
        .iter()
        .map(|i| i.scheduling_delay.as_millis())
        .max()
        .unwrap_or(0);
    (steady, rate, max_sched)
}

/// The case this process runs (`BENCH_ONLY`); without one, runs every case of `cases`, each
/// in a process of its own (this executable again: its peak RSS is its own), and returns
/// `None`.
pub fn only_case(cases: &[&str]) -> Option<String> {
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        return Some(only);
    }
    let exe = std::env::current_exe().expect("bench executable");
    for case in cases {
        let status = std::process::Command::new(&exe)
            .env("BENCH_ONLY", case)
            .status()
            .expect("run a bench case");
        assert!(status.success(), "{case} failed: {status}");
    }
    None
}

/// The benches' runtime: two worker threads, as the machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Launches `n` worker processes of this bench binary (`--worker-of ADDR`, then `args`) and
/// waits until they joined `ctx`'s cluster.
pub async fn launch(
    ctx: &StreamingContext,
    n: usize,
    cookie: &str,
    args: &[&str],
) -> tributary::cluster::WorkerLauncher {
    use tributary::cluster::{LaunchConfig, WorkerLauncher};
    let addr = ctx.cluster_addr().expect("a cluster");
    let exe = std::env::current_exe().unwrap();
    let mut all = vec!["--worker-of".to_string(), addr.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let local = ctx.live_workers().await.len();
    let launcher = WorkerLauncher::start(LaunchConfig::new(exe, all, cookie, n));
    wait_live(ctx, local + n, std::time::Duration::from_secs(30)).await;
    launcher
}

/// Waits until `ctx` has `n` live workers (bounded).
pub async fn wait_live(ctx: &StreamingContext, n: usize, within: std::time::Duration) {
    let t = std::time::Instant::now();
    while ctx.live_workers().await.len() != n {
        assert!(
            t.elapsed() < within,
            "{n} workers did not join in {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The argument after `flag` in `args`.
pub fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}
