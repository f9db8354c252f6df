//! The rate controller: an adaptive ingestion rate (Spark Streaming's backpressure), so that
//! each batch holds about one batch interval of work and the block budget is a safety net,
//! not the regulator.
//!
//! ```text
//!  batch done ──(per stream: records, processing time, scheduling delay)──► PID estimator
//!     ──► the stream's new rate ──► RateCell ──► its receiver's store paces to it
//!                                               (the block generator's token bucket)
//! ```
//!
//! The estimator is Spark's `PIDRateEstimator`, with its gains: the error is the gap between
//! the last rate and the rate the job processed at (records ÷ processing time); the integral
//! term is the backlog (scheduling delay × processing rate ÷ batch interval), which drains
//! queued batches; no derivative term. A batch with no records of a stream, or no processing
//! time, teaches nothing and changes nothing.
//!
//! Two differences from Spark, both measured in `tests/pipeline_backpressure.rs` and
//! `tests/cluster_executors.rs`: receivers start at a modest initial rate (1,000 records/s by
//! default, Spark's `initialRate` with a default) instead of unlimited, and the first measured
//! batch already sets the rate (Spark only records it). Unlimited at first, a free-running
//! source fills the first batch with seconds of work, and every batch cut while it runs is as
//! large: with a job at 50,000 records/s the scheduling delay was still growing after two
//! minutes (115 s). From a small first batch the rate reaches the job's speed in two or three
//! batches (the processing rate of a small batch is already near the job's). A ramp from the
//! initial rate (doubling every block interval, then every batch interval, until the first
//! measurement) was tried and dropped: with a slow job (1,000 records/s, 200 ms batches) the
//! first batches it let in took seconds each, and the delay was still 2.4 s after 5 s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::ConfigError;

/// Settings of the adaptive ingestion rate ([`StreamingContextBuilder::backpressure`](
/// crate::StreamingContextBuilder::backpressure)). On by default: each receiver's `store`
/// is paced to the rate its stream was last processed at (Spark's backpressure), bounded by
/// [`min_rate`](Self::min_rate), [`max_rate`](Self::max_rate) and a fixed
/// [`rate_limit`](crate::StreamingContextBuilder::rate_limit). A paced `store` waits; a
/// receiver reading a socket then reads more slowly, and TCP slows the sender.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backpressure {
    pub(crate) enabled: bool,
    pub(crate) initial: f64,
    pub(crate) min: f64,
    pub(crate) max: Option<f64>,
    pub(crate) utilization: f64,
}

impl Default for Backpressure {
    fn default() -> Self {
        Backpressure {
            enabled: true,
            initial: 1_000.0,
            min: 100.0,
            max: None,
            utilization: 0.9,
        }
    }
}

impl Backpressure {
    /// No adaptive rate: receivers store as fast as they can, within a fixed
    /// [`rate_limit`](crate::StreamingContextBuilder::rate_limit) if set, and the block budget
    /// (`memory_limit`) makes `store` wait when the job falls behind.
    pub fn off() -> Self {
        Backpressure {
            enabled: false,
            ..Backpressure::default()
        }
    }

    /// The rate of each receiver until the first batch with its records was measured
    /// (default 1,000 records/s; the rate then follows the job, within two or three
    /// batches). Raise it for a source that must start fast with a long batch interval.
    pub fn initial_rate(mut self, records_per_second: f64) -> Self {
        self.initial = records_per_second;
        self
    }

    /// The rate never goes below this, per receiver (default 100 records/s, as Spark's).
    pub fn min_rate(mut self, records_per_second: f64) -> Self {
        self.min = records_per_second;
        self
    }

    /// The rate never goes above this, per receiver (default: unbounded).
    pub fn max_rate(mut self, records_per_second: f64) -> Self {
        self.max = Some(records_per_second);
        self
    }

    /// The share of the job's measured speed the rate aims at (default 0.9; 1.0 is Spark's,
    /// which settles with every batch taking its whole interval). Below 1, the executors
    /// keep up with the blocks as they arrive and a batch's output follows its boundary
    /// closely; a job slowed for a moment drains its backlog instead of carrying it on.
    pub fn utilization(mut self, share: f64) -> Self {
        self.utilization = share;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.utilization > 0.0 && self.utilization <= 1.0) {
            return Err(ConfigError::new(
                "backpressure.utilization",
                "must be above 0 and at most 1 (the share of the job's speed to aim at)",
            ));
        }
        let positive = |r: f64| r.is_finite() && r > 0.0;
        if !positive(self.min) {
            return Err(ConfigError::new(
                "backpressure.min_rate",
                "must be a positive number of records per second",
            ));
        }
        if let Some(max) = self.max {
            if !positive(max) || max < self.min {
                return Err(ConfigError::new(
                    "backpressure.max_rate",
                    format!(
                        "must be a positive number of records per second, at least min_rate ({})",
                        self.min
                    ),
                ));
            }
        }
        if !positive(self.initial) {
            return Err(ConfigError::new(
                "backpressure.initial_rate",
                "must be a positive number of records per second",
            ));
        }
        Ok(())
    }
}

/// A receiver's current adaptive rate, shared by the controller (which sets it) and the
/// receiver's block generator (which paces `store` to it). Reading it is one atomic load.
#[derive(Debug)]
pub(crate) struct RateCell {
    bits: AtomicU64,
    version: AtomicU64,
}

impl RateCell {
    /// A cell at `rate` records per second (`None`: unlimited).
    pub(crate) fn new(rate: Option<f64>) -> RateCell {
        RateCell {
            bits: AtomicU64::new(rate.unwrap_or(f64::INFINITY).to_bits()),
            version: AtomicU64::new(0),
        }
    }

    /// Sets the rate (records per second).
    pub(crate) fn set(&self, rate: f64) {
        self.set_opt(Some(rate));
    }

    /// Sets the rate; `None`: unlimited.
    pub(crate) fn set_opt(&self, rate: Option<f64>) {
        self.bits
            .store(rate.unwrap_or(f64::INFINITY).to_bits(), Ordering::Relaxed);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The rate; `None` while unlimited.
    pub(crate) fn get(&self) -> Option<f64> {
        let r = f64::from_bits(self.bits.load(Ordering::Relaxed));
        r.is_finite().then_some(r)
    }

    /// Changes each time the rate is set.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// Spark's `PIDRateEstimator` (gains 1.0, 0.2, 0.0).
#[derive(Debug)]
struct Pid {
    batch_interval: f64,
    min: f64,
    /// The share of the processing rate aimed at.
    utilization: f64,
    first: bool,
    latest_time: f64,
    latest_rate: f64,
    latest_error: f64,
}

const PROPORTIONAL: f64 = 1.0;
const INTEGRAL: f64 = 0.2;
const DERIVATIVE: f64 = 0.0;

impl Pid {
    fn new(batch_interval: Duration, min: f64, utilization: f64) -> Pid {
        Pid {
            batch_interval: batch_interval.as_secs_f64(),
            min,
            utilization,
            first: true,
            latest_time: f64::NEG_INFINITY,
            latest_rate: -1.0,
            latest_error: -1.0,
        }
    }

    /// A new rate from a batch done at `time` (s) that processed `records` of the stream in
    /// `processing` (s) after waiting `scheduling` (s); `None` when it teaches nothing. The
    /// first measured batch sets the rate too (its processing rate, less its backlog).
    fn compute(
        &mut self,
        time: f64,
        records: u64,
        processing: f64,
        scheduling: f64,
    ) -> Option<f64> {
        if time <= self.latest_time || records == 0 || processing <= 0.0 {
            return None;
        }
        let processing_rate = self.utilization * records as f64 / processing;
        if self.first {
            // As if the last rate had been the processing rate: no error yet, only the backlog.
            self.latest_rate = processing_rate;
            self.latest_error = 0.0;
            self.latest_time = time - self.batch_interval;
            self.first = false;
        }
        let since = time - self.latest_time;
        let error = self.latest_rate - processing_rate;
        let backlog = scheduling * processing_rate / self.batch_interval;
        let d_error = (error - self.latest_error) / since;
        let rate =
            (self.latest_rate - PROPORTIONAL * error - INTEGRAL * backlog - DERIVATIVE * d_error)
                .max(self.min);
        self.latest_time = time;
        self.latest_rate = rate;
        self.latest_error = error;
        Some(rate)
    }
}

/// The receivers' rate cells, by stream id. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rates(Arc<Mutex<HashMap<u32, Arc<RateCell>>>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The adaptive rates of a context's streams: the batch runner feeds it, the receivers'
/// generators read their cells. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct RateController {
    cfg: Backpressure,
    batch_interval: Duration,
    rates: Rates,
    pids: Arc<Mutex<HashMap<u32, Pid>>>,
    /// Woken when a rate changes (the placer of receivers in worker processes forwards it).
    changed: Arc<tokio::sync::Notify>,
}

impl RateController {
    /// A controller, or `None` when backpressure is off.
    pub(crate) fn new(cfg: Backpressure, batch_interval: Duration) -> Option<RateController> {
        cfg.enabled.then(|| RateController {
            cfg,
            batch_interval,
            rates: Rates::default(),
            pids: Arc::default(),
            changed: Arc::default(),
        })
    }

    /// The cell of `stream`'s receiver (made at the initial rate, within the bounds).
    pub(crate) fn cell(&self, stream: u32) -> Arc<RateCell> {
        let initial = self.clamp(self.cfg.initial);
        lock(&self.rates.0)
            .entry(stream)
            .or_insert_with(|| Arc::new(RateCell::new(Some(initial))))
            .clone()
    }

    fn clamp(&self, rate: f64) -> f64 {
        let rate = rate.max(self.cfg.min);
        self.cfg.max.map_or(rate, |max| rate.min(max))
    }

    /// A batch done at `done`: for each stream with records in it, a new rate.
    pub(crate) fn batch_done(
        &self,
        done: SystemTime,
        records: impl IntoIterator<Item = (u32, u64)>,
        processing: Duration,
        scheduling: Duration,
    ) {
        let time = done
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut pids = lock(&self.pids);
        for (stream, n) in records {
            let (interval, min, share) = (self.batch_interval, self.cfg.min, self.cfg.utilization);
            let pid = pids
                .entry(stream)
                .or_insert_with(|| Pid::new(interval, min, share));
            let Some(rate) =
                pid.compute(time, n, processing.as_secs_f64(), scheduling.as_secs_f64())
            else {
                continue;
            };
            let rate = self.clamp(rate);
            self.cell(stream).set(rate);
            metrics::gauge!(crate::telemetry::RECEIVER_RATE, "stream" => stream.to_string())
                .set(rate);
            tracing::debug!(stream, rate, "adaptive ingestion rate");
            self.changed.notify_one();
        }
    }

    /// Resolves once a rate changed since the last call resolved.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The current rate of `stream` (`None`: unlimited).
    pub(crate) fn rate(&self, stream: u32) -> Option<f64> {
        self.cell(stream).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose job processes `capacity` records per second, fed at whatever rate the
    /// controller allows (the source itself is faster), one batch per interval: returns the
    /// rates and the scheduling delays, batch after batch.
    fn simulate(
        capacity: impl Fn(usize) -> f64,
        batches: usize,
        cfg: Backpressure,
    ) -> (Vec<f64>, Vec<f64>) {
        let interval = 1.0;
        let source = 10_000_000.0;
        let ctl = RateController::new(cfg, Duration::from_secs(1)).unwrap();
        let cell = ctl.cell(0);
        let mut busy_until = 0.0f64; // when the executor is free
        let (mut rates, mut delays) = (Vec::new(), Vec::new());
        for b in 0..batches {
            let rate = cell.get().unwrap_or(source).min(source);
            let records = (rate * interval) as u64;
            let time = (b + 1) as f64 * interval; // the batch's time
            let start = busy_until.max(time);
            let processing = records as f64 / capacity(b);
            busy_until = start + processing;
            let done = UNIX_EPOCH + Duration::from_secs_f64(busy_until);
            ctl.batch_done(
                done,
                [(0, records)],
                Duration::from_secs_f64(processing),
                Duration::from_secs_f64(start - time),
            );
            rates.push(rate);
            delays.push(start - time);
        }
        (rates, delays)
    }

    #[test]
    fn a_job_at_half_the_source_speed_settles_near_what_it_processes_and_drains_its_delay() {
        // The job needs 2 s per second of the free-running source.
        let (rates, delays) = simulate(|_| 5_000_000.0, 30, Backpressure::default());
        let last = &rates[20..];
        for r in last {
            assert!((4_000_000.0..=5_100_000.0).contains(r), "rates {rates:?}");
        }
        assert!(
            delays[20..].iter().all(|d| *d < 1.0),
            "the scheduling delay stays below a batch interval: {delays:?}"
        );
    }

    #[test]
    fn the_rate_rises_again_when_the_job_speeds_up_and_never_exceeds_the_max() {
        let cfg = Backpressure::default().max_rate(3_000_000.0);
        let (rates, _) = simulate(|b| if b < 15 { 1_000_000.0 } else { 4_000_000.0 }, 40, cfg);
        assert!(rates[12..15].iter().all(|r| *r <= 1_100_000.0), "{rates:?}");
        assert_eq!(rates[0], 1_000.0, "starts at the initial rate: {rates:?}");
        assert!(
            rates[30..].iter().all(|r| *r > 2_500_000.0),
            "rose again: {rates:?}"
        );
        assert!(
            rates[1..].iter().all(|r| *r <= 3_000_000.0),
            "capped: {rates:?}"
        );
    }

    #[test]
    fn empty_batches_change_nothing_and_the_minimum_holds() {
        let mut pid = Pid::new(Duration::from_secs(1), 100.0, 1.0);
        assert_eq!(
            pid.compute(1.0, 1000, 0.1, 0.0),
            Some(10_000.0),
            "the first batch sets its processing rate"
        );
        assert_eq!(pid.compute(2.0, 0, 0.1, 0.0), None, "no records");
        assert_eq!(pid.compute(2.0, 10, 0.0, 0.0), None, "no processing time");
        // A huge backlog drives the estimate below zero: the minimum holds.
        assert_eq!(pid.compute(3.0, 1000, 1.0, 1_000.0), Some(100.0));
    }

    #[test]
    fn bad_settings_are_refused_naming_them() {
        assert!(Backpressure::default().validate().is_ok());
        let e = Backpressure::default()
            .min_rate(0.0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("min_rate"), "{e}");
        let e = Backpressure::default()
            .min_rate(10.0)
            .max_rate(5.0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("max_rate"), "{e}");
        let e = Backpressure::default()
            .initial_rate(f64::NAN)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("initial_rate"), "{e}");
        for share in [0.0, 1.5, f64::NAN] {
            let e = Backpressure::default()
                .utilization(share)
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains("utilization"), "{e}");
        }
    }

    #[test]
    fn the_rate_aims_at_the_configured_share_of_the_job_speed() {
        for (share, lo, hi) in [
            (0.9, 4_400_000.0, 4_600_000.0),
            (1.0, 4_900_000.0, 5_050_000.0),
        ] {
            let cfg = Backpressure::default().utilization(share);
            let (rates, delays) = simulate(|_| 5_000_000.0, 40, cfg);
            let mean = rates[30..].iter().sum::<f64>() / 10.0;
            assert!((lo..=hi).contains(&mean), "share {share}: {rates:?}");
            assert!(delays[30..].iter().all(|d| *d < 0.1), "{delays:?}");
        }
    }
}
