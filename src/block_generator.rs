//! The block generator: turns a receiver's stored records into blocks.
//!
//! ```text
//!  store(r) ──encode──► buffer ──cut (every block interval, or at max_block_bytes)──► queue ──► pusher
//!                                                                       (bounded: full ⇒ store waits)
//! ```
//!
//! With a [`BatchClock`], the block in progress is also cut at every batch boundary, and a mark
//! follows it in the queue ("everything up to boundary k is queued"): each block is stamped
//! with the boundary that closes its batch, so no block straddles two batches.
//!
//! Invariants: records are encoded exactly once, in the order they were stored; blocks of one
//! receiver are cut and queued in sequence order (one lock covers encode, cut and enqueue);
//! stamps never decrease along the sequence;
//! nothing is dropped: when the queue is full, `store` waits (backpressure), and when the
//! pipeline has shut down, `store` fails with [`StoreError::Closed`]. An optional rate limit
//! paces `store` to at most N records per second.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use crate::batch_clock::BatchClock;
use crate::block::{Block, BlockId};
use crate::buffer_pool::BufferPool;
use crate::driver::rate_controller::RateCell;
use crate::error::StoreError;

/// Buffered records of one receiver, and the queue of cut blocks.
#[derive(Debug)]
pub(crate) struct BlockGenerator {
    stream: u32,
    max_block_bytes: usize,
    pool: Arc<BufferPool>,
    /// The block being filled: held while records are encoded into it, never across an await.
    fill: std::sync::Mutex<Fill>,
    /// Cutting and queueing, in sequence order: held across the queue's send (which waits
    /// while the queue is full), so blocks are numbered and queued in one order.
    queue: Mutex<Queue>,
}

/// A token bucket: `rate` tokens per second, holding at most one second's worth (the burst
/// allowed after a pause), full at start. Refilled from the clock only when it runs dry, so a
/// store reads the clock once per burst rather than once per record. Its rate is the lower of
/// a fixed one and the adaptive one (the rate controller's cell, read when it changes); with
/// neither it lets everything through.
#[derive(Debug)]
struct Bucket {
    fixed: Option<f64>,
    adaptive: Option<Arc<RateCell>>,
    seen: u64,
    /// Tokens per second; infinite: unlimited.
    rate: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(fixed: Option<f64>, adaptive: Option<Arc<RateCell>>) -> Bucket {
        let mut b = Bucket {
            fixed,
            adaptive,
            seen: 0,
            rate: f64::INFINITY,
            tokens: 0.0,
            refilled: Instant::now(),
        };
        b.rate = b.effective();
        b.tokens = b.rate.max(1.0);
        b.seen = b.adaptive.as_ref().map_or(0, |c| c.version());
        b
    }

    fn effective(&self) -> f64 {
        let adaptive = self.adaptive.as_ref().and_then(|c| c.get());
        let rate = match (self.fixed, adaptive) {
            (Some(a), Some(b)) => a.min(b),
            (Some(r), None) | (None, Some(r)) => r,
            (None, None) => f64::INFINITY,
        };
        rate.max(f64::MIN_POSITIVE)
    }

    /// Takes a token, or says how long to wait before asking again.
    fn take(&mut self) -> Result<(), Duration> {
        if let Some(cell) = &self.adaptive {
            let v = cell.version();
            if v != self.seen {
                self.seen = v;
                let was = self.rate;
                self.rate = self.effective();
                if was.is_infinite() {
                    // From unlimited to a rate: no burst (the job is behind already).
                    self.tokens = 0.0;
                    self.refilled = Instant::now();
                } else {
                    self.tokens = self.tokens.min(self.rate.max(1.0));
                }
            }
        }
        if self.rate.is_infinite() {
            return Ok(());
        }
        if self.tokens < 1.0 {
            let now = Instant::now();
            let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + earned).min(self.rate.max(1.0));
            self.refilled = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // At most 100 ms at a time: a changed adaptive rate is seen within that (and a
            // very low rate cannot make a wait too long to represent).
            Err(Duration::from_secs_f64(
                ((1.0 - self.tokens) / self.rate).min(0.1),
            ))
        }
    }
}

/// Room left in a block buffer past `max_block_bytes`: the record that crosses the cap goes in
/// whole, so a buffer of this much more never has to grow for records up to this size.
const BUFFER_SLACK: usize = 64 << 10;

/// What a generator queues, in order.
#[derive(Debug)]
pub(crate) enum Cut {
    /// A block, and the id of the batch boundary that closes its batch (0: the next batch,
    /// whichever it is; blocks cut before the first boundary, or with no batch clock).
    Block(Block, u64),
    /// Every block of the batches up to this boundary id is queued before this mark.
    Mark(u64),
}

impl Cut {
    /// The block, if this is one.
    #[cfg(test)]
    pub(crate) fn into_block(self) -> Option<Block> {
        match self {
            Cut::Block(b, _) => Some(b),
            Cut::Mark(_) => None,
        }
    }
}

/// Why `store_iter` stopped encoding before the last record.
enum Next {
    /// The block is full: cut it.
    Cut,
    /// The rate limit says wait this long.
    Wait(Duration),
}

/// The block being filled, and the rate limit of the records going into it.
#[derive(Debug)]
struct Fill {
    buf: BytesMut,
    records: u32,
    limit: Option<Bucket>,
    /// The queue has closed: nothing more goes in.
    closed: bool,
}

/// The numbering and stamping of cut blocks, and the queue they go into.
#[derive(Debug)]
struct Queue {
    next_seq: u64,
    /// The stamp of the blocks cut now: the boundary id that closes the current batch.
    batch: u64,
    tx: Option<mpsc::Sender<Cut>>,
}

impl BlockGenerator {
    /// A generator for `stream` and the receiving end of its block queue.
    #[cfg(test)]
    pub(crate) fn new(
        stream: u32,
        max_block_bytes: usize,
        queue_blocks: usize,
        rate: Option<f64>,
    ) -> (BlockGenerator, mpsc::Receiver<Cut>) {
        let pool = BufferPool::new(1 << 20);
        Self::starting_at(stream, 0, max_block_bytes, queue_blocks, rate, None, pool)
    }

    /// Like `new`, numbering blocks from `first_seq` (after a recovery).
    pub(crate) fn starting_at(
        stream: u32,
        first_seq: u64,
        max_block_bytes: usize,
        queue_blocks: usize,
        rate: Option<f64>,
        adaptive: Option<Arc<RateCell>>,
        pool: Arc<BufferPool>,
    ) -> (BlockGenerator, mpsc::Receiver<Cut>) {
        let (tx, rx) = mpsc::channel(queue_blocks.max(1));
        let max_block_bytes = max_block_bytes.max(64);
        let gen = BlockGenerator {
            stream,
            max_block_bytes,
            fill: std::sync::Mutex::new(Fill {
                buf: pool.take(max_block_bytes + BUFFER_SLACK),
                records: 0,
                limit: {
                    let fixed = rate.filter(|r| *r > 0.0);
                    (fixed.is_some() || adaptive.is_some()).then(|| Bucket::new(fixed, adaptive))
                },
                closed: false,
            }),
            queue: Mutex::new(Queue {
                next_seq: first_seq,
                batch: 0,
                tx: Some(tx),
            }),
            pool,
        };
        (gen, rx)
    }

    fn fill(&self) -> std::sync::MutexGuard<'_, Fill> {
        self.fill.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes each record with `encode` (framing included) and queues full blocks. Waits while
    /// the queue is full or the rate limit requires it.
    ///
    /// The records go into the block under a plain mutex, taken once per run of records that
    /// neither fills the block nor waits for the rate: a `store` per record costs an
    /// uncontended lock, not an async one (tokio's mutex releases through its semaphore's
    /// waiter list, a second lock: ~8 % of the README word count's CPU time).
    pub(crate) async fn store_iter<I, F>(&self, records: I, mut encode: F) -> Result<(), StoreError>
    where
        I: IntoIterator,
        F: FnMut(&I::Item, &mut BytesMut),
    {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            // Encode records until the block is full or the rate says wait.
            let next = {
                let mut f = self.fill();
                if f.closed {
                    return Err(StoreError::Closed {
                        unstored: records.count(),
                    });
                }
                loop {
                    // A token is taken only for a record that is there.
                    if records.peek().is_none() {
                        break None;
                    }
                    if let Some(Err(wait)) = f.limit.as_mut().map(Bucket::take) {
                        break Some(Next::Wait(wait));
                    }
                    let Some(record) = records.next() else {
                        break None;
                    };
                    encode(&record, &mut f.buf);
                    f.records += 1;
                    if f.buf.len() >= self.max_block_bytes {
                        break Some(Next::Cut);
                    }
                }
            };
            match next {
                None => break,
                Some(Next::Cut) => {
                    let mut q = self.queue.lock().await;
                    if let Err(lost) = self.cut_and_send(&mut q).await {
                        return Err(StoreError::Closed {
                            unstored: lost + records.count(),
                        });
                    }
                }
                Some(Next::Wait(wait)) => tokio::time::sleep(wait).await,
            }
        }
        Ok(())
    }

    /// Cuts whatever is buffered into a block and queues it (the block-interval timer, and
    /// shutdown). Returns `false` if the pipeline has shut down.
    pub(crate) async fn flush(&self) -> bool {
        let mut q = self.queue.lock().await;
        q.tx.is_some() && self.cut_and_send(&mut q).await.is_ok()
    }

    /// The batch boundary `this` has come: cuts what is buffered (the last block of that
    /// batch), queues a mark after it, and stamps later blocks with `next`. Returns `false` if
    /// the pipeline has shut down.
    pub(crate) async fn cut_at_boundary(&self, this: u64, next: u64) -> bool {
        let mut q = self.queue.lock().await;
        if q.tx.is_none() || self.cut_and_send(&mut q).await.is_err() {
            return false;
        }
        // Stamps never go back (a boundary handled late still closes only its own batch).
        let mark = q.batch.max(this);
        q.batch = q.batch.max(next);
        let Some(tx) = q.tx.as_ref() else {
            return false;
        };
        tx.send(Cut::Mark(mark)).await.is_ok()
    }

    /// Cuts what is buffered now and returns the sequence number of the last block cut so far
    /// (which holds every record stored before this call), or `None` if none was ever cut.
    pub(crate) async fn cut_now(&self) -> Result<Option<u64>, StoreError> {
        let mut q = self.queue.lock().await;
        if q.tx.is_none() {
            return Err(StoreError::Closed { unstored: 0 });
        }
        if let Err(lost) = self.cut_and_send(&mut q).await {
            return Err(StoreError::Closed { unstored: lost });
        }
        Ok(q.next_seq.checked_sub(1))
    }

    /// Flushes, then closes the queue: the pusher ends once it has pushed every block. Later
    /// stores fail with [`StoreError::Closed`].
    pub(crate) async fn close(&self) {
        let mut q = self.queue.lock().await;
        // Nothing goes into the block after its last cut.
        self.fill().closed = true;
        if q.tx.is_some() {
            let _ = self.cut_and_send(&mut q).await;
        }
        q.tx = None;
    }

    /// Cuts the block being filled (if it holds records) and queues it, numbered and stamped
    /// from `q`. On error, returns how many records were lost from it (they were not stored).
    async fn cut_and_send(&self, q: &mut Queue) -> Result<(), usize> {
        let (full, records) = {
            let mut f = self.fill();
            if f.records == 0 {
                return Ok(());
            }
            let fresh = self.pool.take(self.max_block_bytes + BUFFER_SLACK);
            (
                std::mem::replace(&mut f.buf, fresh),
                std::mem::take(&mut f.records),
            )
        };
        let data = self.pool.seal(full);
        let block = Block {
            id: BlockId {
                stream: self.stream,
                seq: q.next_seq,
            },
            created: SystemTime::now(),
            records,
            data,
        };
        q.next_seq += 1;
        let Some(tx) = q.tx.as_ref() else {
            self.fill().closed = true;
            return Err(records as usize);
        };
        if tx.send(Cut::Block(block, q.batch)).await.is_err() {
            q.tx = None;
            self.fill().closed = true;
            return Err(records as usize);
        }
        Ok(())
    }
}

/// Cuts a block every block interval until the generator closes; with a batch clock, also at
/// every batch boundary (the next block interval then starts from the boundary).
pub(crate) async fn flush_every(
    generator: Arc<BlockGenerator>,
    interval: Duration,
    clock: Option<BatchClock>,
) {
    let Some(clock) = clock else {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !generator.flush().await {
                break;
            }
        }
        return;
    };
    let mut k: u32 = 1;
    let mut last = Instant::now();
    loop {
        let boundary = clock.deadline(k);
        let next_block = last + interval;
        if boundary <= next_block {
            tokio::time::sleep_until(boundary).await;
            if !generator
                .cut_at_boundary(clock.id(k).0, clock.id(k + 1).0)
                .await
            {
                break;
            }
            last = boundary;
            k += 1;
        } else {
            tokio::time::sleep_until(next_block).await;
            if !generator.flush().await {
                break;
            }
            last = next_block;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::encode_framed;

    async fn store_str(g: &BlockGenerator, s: &str) -> Result<(), StoreError> {
        g.store_iter([s.to_string()], encode_framed).await
    }

    #[tokio::test]
    async fn cuts_at_the_size_cap_and_on_flush_in_sequence_order() {
        let (g, mut rx) = BlockGenerator::new(3, 64, 16, None);
        for i in 0..20 {
            store_str(&g, &format!("record-{i:02}")).await.unwrap(); // 4 + 9 bytes each
        }
        assert!(g.flush().await);
        let mut blocks = Vec::new();
        while let Ok(b) = rx.try_recv() {
            blocks.extend(b.into_block());
        }
        let seqs: Vec<u64> = blocks.iter().map(|b| b.id.seq).collect();
        assert_eq!(seqs, (0..blocks.len() as u64).collect::<Vec<_>>());
        let all: Vec<String> = blocks
            .iter()
            .flat_map(|b| b.decode::<String>().unwrap())
            .collect();
        assert_eq!(
            all,
            (0..20)
                .map(|i| format!("record-{i:02}"))
                .collect::<Vec<_>>()
        );
        assert!(blocks.iter().all(|b| b.id.stream == 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_store_wait_and_nothing_is_dropped() {
        let (g, mut rx) = BlockGenerator::new(0, 64, 1, None);
        let g = std::sync::Arc::new(g);
        let writer = {
            let g = g.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    store_str(&g, &format!("{i:060}")).await.unwrap(); // one block each
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !writer.is_finished(),
            "store must wait while the queue is full"
        );
        let mut got = 0;
        while got < 100 {
            let b = rx.recv().await.unwrap().into_block().unwrap();
            got += b.records;
        }
        writer.await.unwrap();
        assert_eq!(got, 100);
    }

    #[tokio::test]
    async fn a_boundary_cuts_the_last_block_of_its_batch_then_marks_it() {
        let (g, mut rx) = BlockGenerator::new(0, 1 << 20, 16, None);
        store_str(&g, "before").await.unwrap();
        assert!(g.cut_at_boundary(1_000, 1_500).await);
        store_str(&g, "after").await.unwrap();
        assert!(g.flush().await);
        // Nothing buffered at the next boundary: the mark alone.
        assert!(g.cut_at_boundary(1_500, 2_000).await);
        // A boundary handled late never stamps backwards.
        assert!(g.cut_at_boundary(1_000, 1_500).await);
        let mut got = Vec::new();
        while let Ok(c) = rx.try_recv() {
            got.push(match c {
                Cut::Block(b, stamp) => format!("{}@{stamp}", b.decode::<String>().unwrap()[0]),
                Cut::Mark(m) => format!("mark {m}"),
            });
        }
        assert_eq!(
            got,
            [
                "before@0",
                "mark 1000",
                "after@1500",
                "mark 1500",
                "mark 2000"
            ]
        );
    }

    #[tokio::test]
    async fn store_after_close_fails_with_closed() {
        let (g, mut rx) = BlockGenerator::new(0, 1024, 4, None);
        store_str(&g, "kept").await.unwrap();
        g.close().await;
        assert_eq!(
            rx.recv()
                .await
                .unwrap()
                .into_block()
                .unwrap()
                .decode::<String>()
                .unwrap(),
            ["kept"]
        );
        assert!(rx.recv().await.is_none());
        assert_eq!(
            store_str(&g, "late").await,
            Err(StoreError::Closed { unstored: 1 })
        );
    }

    /// Time (paused clock) to store `n` one-record items.
    async fn time_to_store(g: &BlockGenerator, n: usize) -> Duration {
        let t0 = Instant::now();
        for _ in 0..n {
            store_str(g, "x").await.unwrap();
        }
        t0.elapsed()
    }

    fn about_two_seconds(took: Duration) -> bool {
        took >= Duration::from_millis(1990) && took <= Duration::from_millis(2100)
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_stores() {
        let (g, _rx) = BlockGenerator::new(0, 1 << 20, 4, Some(100.0));
        // 100 of burst, then 200 more at 100/s.
        let took = time_to_store(&g, 300).await;
        assert!(about_two_seconds(took), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_earns_at_most_one_second_of_burst() {
        let (g, _rx) = BlockGenerator::new(0, 1 << 20, 4, Some(100.0));
        time_to_store(&g, 100).await; // the initial burst
        tokio::time::sleep(Duration::from_secs(10)).await; // idle: the bucket refills, capped
        let took = time_to_store(&g, 300).await;
        assert!(
            about_two_seconds(took),
            "ten idle seconds must not allow a ten-second burst: {took:?}"
        );
    }
}
