//! A synthetic receiver: generates fixed-format 100-byte text records, for examples, tests
//! and benchmarks.
//!
//! ```text
//! 0000000000042 1732482000123456 brisko lumafe ... (ten six-letter words)
//! └ sequence (13 digits) └ creation time, epoch µs (16)  └ from a fixed 256-word vocabulary
//! ```
//!
//! Sequence numbers continue across restarts (they live in the receiver's configuration, like
//! a source offset), so a restarted receiver neither repeats nor skips a number.
//!
//! Records are [`ByteString`]s: each chunk is written into one buffer and every record is a
//! slice of it, so generating a record allocates nothing (it derefs to `str`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::time::Instant;
use tributary::{BoxError, ByteString, Receiver, ReceiverContext};

/// Length of every record, in bytes.
pub const RECORD_LEN: usize = 100;

const PREFIX: [&str; 16] = [
    "bra", "cle", "dro", "fli", "gra", "hul", "jin", "kep", "lor", "mav", "nix", "plu", "qua",
    "ros", "sti", "tuv",
];
const SUFFIX: [&str; 16] = [
    "ban", "ced", "dil", "fom", "gup", "hek", "jat", "kos", "lem", "nar", "pid", "rux", "sol",
    "tam", "vey", "wiz",
];

/// The `i`-th word (0..256) of the fixed vocabulary.
pub fn word(i: u8) -> String {
    String::from_utf8_lossy(&VOCABULARY[i as usize]).into_owned()
}

/// The 256 words, prefix `i >> 4` then suffix `i & 15`, built at compile time.
const VOCABULARY: [[u8; 6]; 256] = {
    let mut v = [[0u8; 6]; 256];
    let mut i = 0;
    while i < 256 {
        let (p, q) = (PREFIX[i >> 4].as_bytes(), SUFFIX[i & 15].as_bytes());
        let mut j = 0;
        while j < 3 {
            v[i][j] = p[j];
            v[i][j + 3] = q[j];
            j += 1;
        }
        i += 1;
    }
    v
};

/// How the receiver stores what it generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// One `store_many_as` call per chunk (each record a `&str` slice of it).
    Many,
    /// One `store_as` call per record (a `&str` slice of the chunk): one store per record,
    /// the workload of the Spark peer.
    Single,
}

/// Configuration of a [`SyntheticReceiver`].
#[derive(Debug, Clone)]
pub struct SyntheticReceiver {
    rate: Option<f64>,
    chunk: usize,
    limit: Option<u64>,
    mode: StoreMode,
    next_seq: Arc<AtomicU64>,
}

impl Default for SyntheticReceiver {
    fn default() -> Self {
        SyntheticReceiver {
            rate: None,
            chunk: 1000,
            limit: None,
            mode: StoreMode::Many,
            next_seq: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl SyntheticReceiver {
    /// As fast as the pipeline takes them, in chunks of 1000, with `store_many`, forever.
    pub fn new() -> Self {
        Self::default()
    }
    /// At most `records_per_second`.
    pub fn rate(mut self, records_per_second: f64) -> Self {
        self.rate = Some(records_per_second);
        self
    }
    /// Records generated per handler call (default 1000).
    pub fn chunk(mut self, records: usize) -> Self {
        self.chunk = records.max(1);
        self
    }
    /// Stop (cleanly) after this many records in total.
    pub fn limit(mut self, records: u64) -> Self {
        self.limit = Some(records);
        self
    }
    /// `store_many` per chunk (default) or `store` per record.
    pub fn mode(mut self, mode: StoreMode) -> Self {
        self.mode = mode;
        self
    }
    /// Records generated so far (the next sequence number).
    pub fn generated(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }
}

/// Parses a synthetic record: `(sequence, creation time in epoch µs, words)`.
pub fn parse(record: &str) -> Option<(u64, u64, std::str::SplitAsciiWhitespace<'_>)> {
    let seq = record.get(0..13)?.parse().ok()?;
    let created = record.get(14..30)?.parse().ok()?;
    Some((seq, created, record.get(31..)?.split_ascii_whitespace()))
}

/// Writes `n` as exactly `width` zero-padded decimal digits (the high digits are dropped if
/// `n` has more).
fn push_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for i in (start..start + width).rev() {
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
fn make_record(seq: u64, now_us: u64, rng: &mut fastrand_lite::Rng) -> String {
    let mut s = BytesMut::with_capacity(RECORD_LEN);
    record_with_head(&header(seq, now_us), rng, &mut s);
    String::from_utf8(s.to_vec()).unwrap_or_default()
}

/// Appends a record: its first 31 bytes (sequence, space, timestamp, space) and ten random
/// words. Only ASCII digits, spaces and letters are written.
fn record_with_head(head: &[u8; 31], rng: &mut fastrand_lite::Rng, out: &mut BytesMut) {
    let mut record = [b' '; RECORD_LEN];
    record[..31].copy_from_slice(head);
    for k in 0..10 {
        let at = 31 + 7 * k;
        record[at..at + 6].copy_from_slice(&VOCABULARY[rng.u8() as usize]);
    }
    out.extend_from_slice(&record);
}

/// Adds one to a run of ASCII decimal digits in place (wrapping to zeros past all nines).
fn increment_digits(digits: &mut [u8]) {
    for d in digits.iter_mut().rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            return;
        }
    }
}

/// The first 31 bytes of a record: sequence, space, creation time, space.
fn header(seq: u64, now_us: u64) -> [u8; 31] {
    let mut v = Vec::with_capacity(31);
    push_digits(&mut v, seq, 13);
    v.push(b' ');
    push_digits(&mut v, now_us, 16);
    v.push(b' ');
    let mut head = [b' '; 31];
    head.copy_from_slice(&v);
    head
}

/// `n` records from sequence number `first`, all with creation time `now_us`, written one
/// after the other into `buf` (cleared first): the header is formatted once and its sequence
/// digits incremented in place. Split the chunk with [`records_of`].
fn make_records(
    first: u64,
    n: u64,
    now_us: u64,
    rng: &mut fastrand_lite::Rng,
    mut buf: BytesMut,
) -> ByteString {
    let mut head = header(first, now_us);
    buf.clear();
    buf.reserve(n as usize * RECORD_LEN);
    for _ in 0..n {
        record_with_head(&head, rng, &mut buf);
        increment_digits(&mut head[..13]);
    }
    // Only ASCII was written, so this cannot fail.
    ByteString::try_from(buf.freeze()).unwrap_or_default()
}

/// The records of a chunk, each a `&str` slice of it: stored with `store_as` /
/// `store_many_as`, each is copied once, into its block, with no record (and no reference
/// count on the chunk) made per line.
fn records_of(chunk: &str) -> impl Iterator<Item = &str> + '_ {
    (0..chunk.len() / RECORD_LEN).map(move |i| &chunk[i * RECORD_LEN..(i + 1) * RECORD_LEN])
}

/// A tiny xorshift generator (deterministic per receiver; no dependency needed for this).
mod fastrand_lite {
    pub(super) struct Rng(pub(super) u64);
    impl Rng {
        pub(super) fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }
        pub(super) fn u8(&mut self) -> u8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 24) as u8
        }
    }
}

/// The receiver's state: when this incarnation started and how much it generated.
#[derive(Debug)]
pub struct SyntheticState {
    started: Instant,
    generated: u64,
    rng_state: u64,
    /// The last chunk's buffer, for reuse (no allocation and no page faults per chunk).
    spare: BytesMut,
}

/// Messages: the receiver sends itself `Generate` to keep going.
#[derive(Debug)]
pub enum SyntheticMsg {
    /// Generate the next chunk.
    Generate,
}

impl Receiver for SyntheticReceiver {
    type Msg = SyntheticMsg;
    type State = SyntheticState;
    type Record = ByteString;

    async fn pre_start(&self, ctx: &ReceiverContext<Self>) -> Result<SyntheticState, BoxError> {
        let _ = ctx.myself().send(SyntheticMsg::Generate);
        Ok(SyntheticState {
            started: Instant::now(),
            generated: 0,
            rng_state: self
                .next_seq
                .load(Ordering::SeqCst)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ 0xdead_beef,
            spare: BytesMut::new(),
        })
    }

    async fn handle(
        &self,
        ctx: &ReceiverContext<Self>,
        _msg: SyntheticMsg,
        st: &mut SyntheticState,
    ) -> Result<(), BoxError> {
        let mut n = self.chunk as u64;
        if let Some(limit) = self.limit {
            let done = self.next_seq.load(Ordering::SeqCst);
            if done >= limit {
                ctx.stop();
                return Ok(());
            }
            n = n.min(limit - done);
        }
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64((st.generated + n) as f64 / rate);
            let elapsed = st.started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let first = self.next_seq.load(Ordering::SeqCst);
        let mut rng = fastrand_lite::Rng::new(st.rng_state);
        let spare = std::mem::take(&mut st.spare);
        let chunk = make_records(first, n, now_us, &mut rng, spare);
        st.rng_state = rng.0;
        match self.mode {
            StoreMode::Many => ctx.store_many_as(records_of(&chunk)).await?,
            StoreMode::Single => {
                for r in records_of(&chunk) {
                    ctx.store_as(r).await?;
                }
            }
        }
        // The pipeline copied the records into its blocks (or made records of them): the
        // chunk's buffer is free again.
        if let Ok(buf) = chunk.into_bytes().try_into_mut() {
            st.spare = buf;
        }
        // Counted only once stored: a failure above repeats nothing and skips nothing.
        self.next_seq.store(first + n, Ordering::SeqCst);
        st.generated += n;
        let _ = ctx.myself().send(SyntheticMsg::Generate);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_generation_matches_one_by_one_generation() {
        let (mut a, mut b) = (fastrand_lite::Rng::new(9), fastrand_lite::Rng::new(9));
        let chunk = make_records(99_998, 5, 1_732_482_000_123_456, &mut a, BytesMut::new());
        let batch: Vec<&str> = records_of(&chunk).collect();
        assert_eq!(batch.len(), 5);
        for (i, r) in batch.iter().enumerate() {
            assert_eq!(
                r,
                &make_record(99_998 + i as u64, 1_732_482_000_123_456, &mut b)
            );
        }
        assert!(batch[2].starts_with("0000000100000 "), "{}", batch[2]);
    }

    #[test]
    fn records_are_exactly_100_bytes_and_parse_back() {
        let mut rng = fastrand_lite::Rng::new(7);
        for seq in [0u64, 1, 42, 9_999_999_999_999] {
            let r = make_record(seq, 1_732_482_000_123_456, &mut rng);
            assert_eq!(r.len(), RECORD_LEN, "{r}");
            let (s, t, words) = parse(&r).unwrap();
            assert_eq!((s, t), (seq, 1_732_482_000_123_456));
            let words: Vec<_> = words.collect();
            assert_eq!(words.len(), 10);
            assert!(words.iter().all(|w| w.len() == 6));
        }
        let vocab: std::collections::HashSet<String> = (0..=255).map(word).collect();
        assert_eq!(vocab.len(), 256);
    }
}
