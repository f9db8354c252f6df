//! Every record stored is processed exactly once when nothing fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary::{ByteString, StreamingContext};
use tributary_receivers::synthetic::{parse, StoreMode, SyntheticReceiver};

async fn run(mode: StoreMode, n: u64) {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .block_interval(Duration::from_millis(20))
        .workers(3)
        .replication(2)
        .executors(2)
        .build()
        .unwrap();
    let source = SyntheticReceiver::new().limit(n).mode(mode).chunk(500);
    let lines = ctx.receiver_stream("synthetic", source.clone()).unwrap();

    let seqs = Arc::new(Mutex::new(Vec::new()));
    let s = seqs.clone();
    lines
        .map(|r| parse(&r).expect("well-formed record").0)
        .for_each_batch(move |b| s.lock().unwrap().extend(b.records))
        .unwrap();
    let words = Arc::new(Mutex::new(0u64));
    let w = words.clone();
    let per_word: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let pw = per_word.clone();
    lines
        .flat_map(|r| r[31..].split(' ').map(str::to_owned).collect::<Vec<_>>())
        .map(|w| (w, 1u64))
        .reduce_by_key(|a, b| a + b)
        .for_each_batch(move |b| {
            *w.lock().unwrap() += b.records.iter().map(|(_, c)| c).sum::<u64>();
            let mut pw = pw.lock().unwrap();
            for (word, c) in b.records {
                *pw.entry(word).or_default() += c;
            }
        })
        .unwrap();
    // The same count with borrowed keys: the same totals, word for word.
    let borrowed: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let bw = borrowed.clone();
    lines
        .reduce_by_key_with(
            |r: &ByteString, out: &mut dyn FnMut(&str, u64)| {
                for w in r[31..].split(' ') {
                    out(w, 1);
                }
            },
            |a, b| a + b,
        )
        .for_each_batch(move |b| {
            let mut bw = bw.lock().unwrap();
            for (word, c) in b.records {
                *bw.entry(word).or_default() += c;
            }
        })
        .unwrap();
    // Read as `&str` in place in the block (the receiver's stream), as `&str` after a
    // narrow operation (decoded, then borrowed), and as `&[u8]` by `aggregate_ref`.
    let in_place: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let derived: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    for (stream, into) in [
        (lines.clone(), in_place.clone()),
        (lines.filter(|_| true), derived.clone()),
    ] {
        stream
            .reduce_by_key_with(
                |r: &str, out: &mut dyn FnMut(&str, u64)| {
                    for w in r[31..].split(' ') {
                        out(w, 1);
                    }
                },
                |a, b| a + b,
            )
            .for_each_batch(move |b| {
                let mut into = into.lock().unwrap();
                for (word, c) in b.records {
                    *into.entry(word).or_default() += c;
                }
            })
            .unwrap();
    }
    let bytes = Arc::new(Mutex::new((0u64, 0u64)));
    let by = bytes.clone();
    lines
        .aggregate_ref(
            || (0u64, 0u64),
            |(records, spaces), r: &[u8]| {
                *records += 1;
                *spaces += r.iter().filter(|c| **c == b' ').count() as u64;
            },
            |a, b| (a.0 + b.0, a.1 + b.1),
        )
        .for_each_batch(move |b| {
            let mut by = by.lock().unwrap();
            for (records, spaces) in b.records {
                by.0 += records;
                by.1 += spaces;
            }
        })
        .unwrap();
    let mut reports = ctx.subscribe_batches();

    ctx.start().await.unwrap();
    // Bounded wait for the receiver to generate everything.
    for _ in 0..600 {
        if source.generated() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        source.generated(),
        n,
        "the receiver generated everything in time"
    );
    ctx.stop(true).await.unwrap();

    let mut got = seqs.lock().unwrap().clone();
    assert_eq!(
        got.len() as u64,
        n,
        "each record exactly once (no loss, no duplicate)"
    );
    got.sort_unstable();
    assert!(
        got.iter().copied().eq(0..n),
        "every sequence number present once"
    );
    assert_eq!(
        *words.lock().unwrap(),
        10 * n,
        "ten words per record, counted once"
    );
    let (per_word, borrowed) = (per_word.lock().unwrap(), borrowed.lock().unwrap());
    assert!(
        per_word.len() > 100,
        "many distinct words: {}",
        per_word.len()
    );
    assert_eq!(
        *per_word, *borrowed,
        "reduce_by_key_with counts as reduce_by_key does"
    );

    assert_eq!(
        *in_place.lock().unwrap(),
        *per_word,
        "read in place as &str"
    );
    assert_eq!(
        *derived.lock().unwrap(),
        *per_word,
        "read as &str after filter"
    );
    assert_eq!(
        *bytes.lock().unwrap(),
        (n, 11 * n),
        "aggregate_ref over &[u8]: every record once, its 11 spaces (2 fields, 10 words)"
    );

    let mut reported = 0;
    let mut lost = 0;
    while let Ok(info) = reports.try_recv() {
        reported += info.records;
        lost += info.lost_blocks;
        assert!(info.failed.is_none(), "{info:?}");
    }
    assert_eq!((reported, lost), (n, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_processed_exactly_once_with_store_many() {
    run(StoreMode::Many, 50_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_processed_exactly_once_with_store() {
    run(StoreMode::Single, 20_000).await;
}
