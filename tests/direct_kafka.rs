//! Direct streams on a Kafka-protocol topic, against a real broker (tansu) that each test
//! starts on a free loopback port. Without the `tansu` binary (on PATH, or at
//! `TRIBUTARY_TANSU`) a test prints why and passes; under CI (`TRIBUTARY_CI` set) it fails.

mod kafka_support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::{Backpressure, ByteString, ContextError, OffsetRange, StreamingContext};
use tributary_receivers::kafka::KafkaTopic;

use kafka_support::{broker_binary, free_port, start_broker};

/// Appends `n` records `p<partition>-<i>` to each partition, in producer batches of 50.
async fn produce(topic: &KafkaTopic, partitions: u32, from: u64, n: u64) {
    for p in 0..partitions {
        let mut i = from;
        while i < from + n {
            let end = (i + 50).min(from + n);
            let values = (i..end).map(|j| format!("p{p}-{j}").into_bytes()).collect();
            topic.produce(p, values).await.unwrap();
            i = end;
        }
    }
}

type Seen = Arc<Mutex<Vec<(Vec<OffsetRange>, Vec<String>)>>>;

fn job(topic: KafkaTopic, interval_ms: u64) -> (StreamingContext, Seen) {
    job_with(topic, interval_ms, 8 << 20)
}

/// [`job`] with blocks of at most `max_block` bytes.
fn job_with(topic: KafkaTopic, interval_ms: u64, max_block: usize) -> (StreamingContext, Seen) {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(interval_ms))
        .backpressure(Backpressure::off())
        .max_block_bytes(max_block)
        .build()
        .unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    ctx.direct_stream("kafka", topic)
        .unwrap()
        .map(|l: ByteString| l.to_string())
        .for_each_batch(move |b| s.lock().unwrap().push((b.offsets.clone(), b.records)))
        .unwrap();
    (ctx, seen)
}

fn records(seen: &Seen) -> usize {
    seen.lock().unwrap().iter().map(|(_, r)| r.len()).sum()
}

async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) for `ctx` to end with a direct source's error, and returns its text.
async fn source_error(ctx: &StreamingContext, why: &str) -> String {
    let end = tokio::time::timeout(Duration::from_secs(30), ctx.await_termination())
        .await
        .expect("the context ends");
    let e = end.expect_err(why);
    assert!(matches!(e, ContextError::DirectSource { .. }), "{e:?}");
    e.to_string()
}

fn assert_exactly_once(seen: &Seen, partitions: u32, n: u64) {
    let seen = seen.lock().unwrap();
    let mut count: HashMap<&str, u32> = HashMap::new();
    for (_, recs) in seen.iter() {
        for r in recs {
            *count.entry(r.as_str()).or_default() += 1;
        }
    }
    for p in 0..partitions {
        for i in 0..n {
            let k = format!("p{p}-{i}");
            assert_eq!(count.get(k.as_str()), Some(&1), "{k}");
        }
    }
    assert_eq!(count.len() as u64, u64::from(partitions) * n);
    let mut next: HashMap<u32, u64> = HashMap::new();
    for (offsets, _) in seen.iter() {
        for r in offsets {
            let at = next.entry(r.partition).or_insert(0);
            assert_eq!(r.from, *at, "contiguous ranges");
            *at = r.until;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_is_read_once_by_offset_while_it_grows() {
    let Some(bin) = broker_binary("a_topic_is_read_once_by_offset_while_it_grows") else {
        return;
    };
    let broker = start_broker(&bin, free_port());
    let topic = KafkaTopic::new(&broker.addr, "events");
    topic.create(2).await.unwrap();
    produce(&topic, 2, 0, 300).await;
    let (ctx, seen) = job(topic.clone(), 50);
    ctx.start().await.unwrap();
    // More while it runs.
    for k in 1..5u64 {
        produce(&topic, 2, k * 300, 300).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_until("every record", 30, || records(&seen) >= 3_000).await;
    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seen, 2, 1_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_start_or_frozen_mid_stream_is_waited_for() {
    let Some(bin) = broker_binary("a_broker_down_at_start_or_frozen_mid_stream_is_waited_for")
    else {
        return;
    };
    let port = free_port();
    let topic =
        KafkaTopic::new(format!("127.0.0.1:{port}"), "late").patience(Duration::from_millis(300));
    let (ctx, seen) = job(topic.clone(), 50);
    // Nothing listens yet: the context starts, and its batches wait for the source.
    ctx.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let broker = start_broker(&bin, port);
    topic.create(1).await.unwrap();
    produce(&topic, 1, 0, 400).await;
    wait_until("the records produced after the broker came up", 30, || {
        records(&seen) >= 400
    })
    .await;
    // Frozen (SIGSTOP: the connection stays open, nothing answers), then resumed.
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    produce(&topic, 1, 400, 400).await;
    wait_until("the records produced after the freeze", 30, || {
        records(&seen) >= 800
    })
    .await;
    ctx.stop(true).await.unwrap();
    assert_exactly_once(&seen, 1, 800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_recorded_offsets_stops_the_stream_naming_them() {
    let Some(bin) =
        broker_binary("a_broker_that_lost_recorded_offsets_stops_the_stream_naming_them")
    else {
        return;
    };
    let port = free_port();
    let broker = start_broker(&bin, port);
    let topic = KafkaTopic::new(&broker.addr, "gone").patience(Duration::from_millis(300));
    topic.create(1).await.unwrap();
    produce(&topic, 1, 0, 200).await;
    let (ctx, seen) = job(topic.clone(), 50);
    ctx.start().await.unwrap();
    wait_until("the first records", 30, || records(&seen) >= 200).await;
    // The broker restarts empty (in-memory storage): the recorded offsets point at nothing.
    drop(broker);
    let _broker = start_broker(&bin, port);
    let fresh = KafkaTopic::new(format!("127.0.0.1:{port}"), "gone");
    fresh.create(1).await.unwrap();
    produce(&fresh, 1, 0, 10).await;
    let text = source_error(&ctx, "offsets the broker no longer holds end the stream").await;
    assert!(
        text.contains("topic gone partition 0") && text.contains("200"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_a_block_is_refused_naming_its_offset() {
    let Some(bin) = broker_binary("a_record_larger_than_a_block_is_refused_naming_its_offset")
    else {
        return;
    };
    let broker = start_broker(&bin, free_port());
    let topic = KafkaTopic::new(&broker.addr, "big");
    topic.create(1).await.unwrap();
    produce(&topic, 1, 0, 20).await;
    let (ctx, seen) = job_with(topic.clone(), 50, 1_024);
    ctx.start().await.unwrap();
    wait_until("the small records", 30, || records(&seen) >= 20).await;
    // Offset 20: 2,000 bytes, more than a 1,024-byte block holds; then a small one after it.
    topic
        .produce(0, vec![vec![b'x'; 2_000], b"after".to_vec()])
        .await
        .unwrap();
    let text = source_error(&ctx, "a record that fits no block ends the stream").await;
    assert!(
        text.contains("topic big partition 0") && text.contains("20") && text.contains("2000"),
        "{text}"
    );
    // Neither it nor what follows was handed to the job as if read.
    assert_eq!(records(&seen), 20);
}
