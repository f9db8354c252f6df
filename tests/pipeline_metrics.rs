//! The pipeline's counters, read through a `metrics` recorder installed for this test binary
//! (its only test, so the process-wide recorder sees this job alone): a worker lost with
//! k = 1 shows up in the loss counters exactly as in the batch reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tributary::telemetry::{
    BATCHES_TOTAL, BLOCKS_LOST_TOTAL, RECORDS_LOST_TOTAL, WORKERS_LOST_TOTAL,
};

mod pipeline_support;

use pipeline_support::{drain, generate_then_hold};

/// Counters by name (labels summed); gauges and histograms ignored.
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl Recorder for &'static Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = self
            .0
            .lock()
            .unwrap()
            .entry(key.name().to_string())
            .or_default()
            .clone();
        Counter::from_arc(c)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_with_k1_is_counted_exactly_in_the_metrics() {
    let counters: &'static Counters = Box::leak(Box::default());
    metrics::set_global_recorder(counters).expect("the only recorder of this test binary");

    let n = 30_000;
    let (ctx, seqs, mut reports) = generate_then_hold(2, 1, n).await;
    let on_worker_0 = ctx
        .block_locations()
        .await
        .iter()
        .filter(|(_, at)| at == &vec![0])
        .count();
    assert!(on_worker_0 > 0);

    assert!(ctx.kill_worker(0).await);
    ctx.stop(true).await.unwrap();

    let infos = drain(&mut reports);
    let lost_blocks: usize = infos.iter().map(|i| i.lost_blocks).sum();
    let lost_records: u64 = infos.iter().map(|i| i.lost_records).sum();
    assert_eq!(lost_blocks, on_worker_0);
    assert_eq!(
        seqs.lock().unwrap().len() as u64 + lost_records,
        n,
        "lost = exactly what was not processed"
    );
    assert_eq!(counters.get(BLOCKS_LOST_TOTAL), lost_blocks as u64);
    assert_eq!(counters.get(RECORDS_LOST_TOTAL), lost_records);
    assert_eq!(counters.get(WORKERS_LOST_TOTAL), 1);
    assert_eq!(counters.get(BATCHES_TOTAL), infos.len() as u64);
}
