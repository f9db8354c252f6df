//! Records read in place (`ReadAs`): a receiver's own stream read as `&[u8]` decodes no
//! record, a derived stream (after a narrow operation) decodes each record once, and both
//! see every record exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tributary::{
    BoxError, DStream, DecodeError, ReadAs, Receiver, ReceiverContext, Record, StreamingContext,
};

/// Records decoded so far (by `Line::decode`), over the whole test binary: the scenarios run
/// one after the other in one test.
static DECODED: AtomicU64 = AtomicU64::new(0);

/// A line of bytes whose decoding is counted.
#[derive(Debug, Clone, PartialEq)]
struct Line(Vec<u8>);

impl Record for Line {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&self.0);
    }
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        DECODED.fetch_add(1, Ordering::SeqCst);
        Ok(Line(payload.to_vec()))
    }
}

impl ReadAs<[u8]> for Line {
    const IN_PLACE: bool = true;
    fn read_as(&self) -> &[u8] {
        &self.0
    }
    fn read_in_place(payload: &[u8]) -> Result<&[u8], DecodeError> {
        Ok(payload)
    }
}

const LINES: u64 = 5_000;

/// Line `i` is `i` in decimal, a space and `i % 7` letters `x`.
fn line(i: u64) -> Vec<u8> {
    let mut l = format!("{i} ").into_bytes();
    l.extend(std::iter::repeat_n(b'x', (i % 7) as usize));
    l
}

/// Stores lines 0..LINES, 100 per message.
#[derive(Clone)]
struct Lines {
    stored: Arc<AtomicU64>,
}

impl Receiver for Lines {
    type Msg = ();
    type State = u64;
    type Record = Line;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<u64, BoxError> {
        let _ = ctx.myself().send(());
        Ok(0)
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        _: (),
        next: &mut u64,
    ) -> Result<(), BoxError> {
        let end = (*next + 100).min(LINES);
        ctx.store_many((*next..end).map(|i| Line(line(i)))).await?;
        *next = end;
        self.stored.store(end, Ordering::SeqCst);
        if end < LINES {
            let _ = ctx.myself().send(());
        }
        Ok(())
    }
}

/// Runs `job` over the receiver's stream until every line is stored and processed; returns
/// what `job`'s output summed and how many records were decoded meanwhile.
async fn run(job: fn(&DStream<Line>) -> DStream<(u64, u64)>) -> ((u64, u64), u64) {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .block_interval(Duration::from_millis(20))
        .workers(2)
        .replication(2)
        .executors(2)
        .build()
        .unwrap();
    let stored = Arc::new(AtomicU64::new(0));
    let lines = ctx
        .receiver_stream(
            "lines",
            Lines {
                stored: stored.clone(),
            },
        )
        .unwrap();
    let total = Arc::new(Mutex::new((0u64, 0u64)));
    let t = total.clone();
    job(&lines)
        .for_each_batch(move |b| {
            let mut t = t.lock().unwrap();
            for (records, bytes) in b.records {
                t.0 += records;
                t.1 += bytes;
            }
        })
        .unwrap();
    let before = DECODED.load(Ordering::SeqCst);
    ctx.start().await.unwrap();
    for _ in 0..1_000 {
        if stored.load(Ordering::SeqCst) == LINES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stored.load(Ordering::SeqCst), LINES, "stored in time");
    ctx.stop(true).await.unwrap();
    let total = *total.lock().unwrap();
    (total, DECODED.load(Ordering::SeqCst) - before)
}

fn count_bytes(lines: &DStream<Line>) -> DStream<(u64, u64)> {
    lines.aggregate_ref(
        || (0, 0),
        |(n, bytes), l: &[u8]| {
            *n += 1;
            *bytes += l.len() as u64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receivers_stream_is_read_in_place_and_a_derived_one_decoded_once() {
    let bytes: u64 = (0..LINES).map(|i| line(i).len() as u64).sum();

    // The receiver's own stream, read as `&[u8]`: every record, none decoded.
    let (total, decoded) = run(count_bytes).await;
    assert_eq!(total, (LINES, bytes), "every record once, all its bytes");
    assert_eq!(decoded, 0, "read in place: no record decoded");

    // After a narrow operation the records are decoded (once each), then borrowed.
    let (total, decoded) = run(|lines| count_bytes(&lines.filter(|_| true))).await;
    assert_eq!(total, (LINES, bytes));
    assert_eq!(decoded, LINES, "a derived stream decodes each record once");

    // `reduce_by_key_with` reading `&[u8]` in place, keyed by the line's length.
    let (total, decoded) = run(|lines| {
        lines
            .reduce_by_key_with(
                |l: &[u8], out: &mut dyn FnMut(&u64, (u64, u64))| {
                    out(&(l.len() as u64 % 3), (1, l.len() as u64))
                },
                |a, b| (a.0 + b.0, a.1 + b.1),
            )
            .map(|(_, v)| v)
    })
    .await;
    assert_eq!(total, (LINES, bytes));
    assert_eq!(decoded, 0);

    // Read as the record itself (`&Line`): decoded, as before records could be read in place.
    let (total, decoded) = run(|lines| {
        lines.aggregate_ref(
            || (0, 0),
            |(n, bytes), l: &Line| {
                *n += 1;
                *bytes += l.0.len() as u64;
            },
            |a, b| (a.0 + b.0, a.1 + b.1),
        )
    })
    .await;
    assert_eq!(total, (LINES, bytes));
    assert_eq!(decoded, LINES);

    // After an aggregation (a whole-batch plan): each batch's count read as itself.
    let (total, _) = run(|lines| {
        lines.count().aggregate_ref(
            || (0, 0),
            |(batches, records), n: &u64| {
                *batches += 1;
                *records += n;
            },
            |a, b| (a.0 + b.0, a.1 + b.1),
        )
    })
    .await;
    assert_eq!(total.1, LINES, "every record counted once, batch by batch");
    assert!(total.0 >= 1);
}
