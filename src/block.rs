//! Blocks: the unit of storage, replication and scheduling. Data only, no I/O.
//!
//! A block is the records one receiver stored during one block interval (or until a size cap),
//! encoded **once** into an immutable [`Bytes`] buffer. Replicas in this process share that
//! buffer (a reference count, no copy); the same bytes can go to a write-ahead log or another
//! process unchanged.
//!
//! ```text
//! block data = record*            record = len: u32 little-endian | payload: len bytes
//! ```
//!
//! Records are encoded by their [`Record`] implementation.

use std::fmt;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
pub use bytestring::ByteString;

/// Identifies a block: the receiver's stream id and a per-receiver sequence number that never
/// wraps.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BlockId {
    /// Stream (receiver) id, assigned in the order streams are added to the context.
    pub stream: u32,
    /// Sequence number of the block within its stream, from 0.
    pub seq: u64,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block-{}-{}", self.stream, self.seq)
    }
}

/// An immutable block of encoded records. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Block {
    /// The block's id.
    pub id: BlockId,
    /// When the block was cut.
    pub created: SystemTime,
    /// Number of records in `data`.
    pub records: u32,
    /// The encoded records.
    pub data: Bytes,
}

impl Block {
    /// Size of the encoded records, in bytes.
    pub fn len_bytes(&self) -> usize {
        self.data.len()
    }

    /// The raw payload of each record, in order.
    pub fn payloads(&self) -> Payloads<'_> {
        Payloads { rest: &self.data }
    }

    /// Decodes every record (zero-copy for types that share the block's bytes, such as
    /// [`Bytes`] and [`ByteString`]).
    pub fn decode<T: Record>(&self) -> Result<Vec<T>, DecodeError> {
        let mut out = Vec::with_capacity(self.records as usize);
        for payload in self.payloads() {
            out.push(T::decode_shared(&self.data, payload?)?);
        }
        Ok(out)
    }
}

/// Iterator over the payloads of a block's records.
#[derive(Debug)]
pub struct Payloads<'a> {
    rest: &'a [u8],
}

impl<'a> Payloads<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Payloads { rest: data }
    }
}

impl<'a> Iterator for Payloads<'a> {
    type Item = Result<&'a [u8], DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((len, rest)) = self.rest.split_first_chunk::<4>() else {
            self.rest = &[];
            return Some(Err(DecodeError::Truncated));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            self.rest = &[];
            return Some(Err(DecodeError::Truncated));
        }
        let (payload, rest) = rest.split_at(len);
        self.rest = rest;
        Some(Ok(payload))
    }
}

/// A record could not be decoded from a block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The block ends in the middle of a record.
    #[error("block is truncated in the middle of a record")]
    Truncated,
    /// The payload is not valid for the record type.
    #[error("invalid record payload: {0}")]
    Invalid(String),
}

/// A type that can be stored in blocks. Encoding must be deterministic; `decode` must accept
/// exactly what `encode` wrote and must not panic on other input.
///
/// ```
/// use bytes::{BufMut, BytesMut};
/// use tributary::{DecodeError, Record};
///
/// /// A reading: sensor id and value, 12 bytes.
/// #[derive(Debug, PartialEq)]
/// struct Reading { sensor: u32, value: f64 }
///
/// impl Record for Reading {
///     fn encode(&self, out: &mut BytesMut) {
///         out.put_u32_le(self.sensor);
///         out.put_f64_le(self.value);
///     }
///     fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
///         let (id, value) = payload
///             .split_first_chunk::<4>()
///             .filter(|(_, v)| v.len() == 8)
///             .ok_or_else(|| DecodeError::Invalid(format!("{} bytes, want 12", payload.len())))?;
///         let value = f64::from_le_bytes(value.try_into().expect("8 bytes"));
///         Ok(Reading { sensor: u32::from_le_bytes(*id), value })
///     }
/// }
///
/// let mut buf = BytesMut::new();
/// Reading { sensor: 7, value: 0.5 }.encode(&mut buf);
/// assert_eq!(Reading::decode(&buf), Ok(Reading { sensor: 7, value: 0.5 }));
/// assert!(Reading::decode(&buf[..5]).is_err());
/// ```
pub trait Record: Send + Sized + 'static {
    /// Appends the encoded record to `out`.
    fn encode(&self, out: &mut BytesMut);
    /// Decodes a record from its payload.
    fn decode(payload: &[u8]) -> Result<Self, DecodeError>;
    /// Decodes a record from `payload`, which lies inside `block` (the bytes of the block
    /// being read). Types that can share those bytes instead of copying them override this
    /// (as [`Bytes`] and [`ByteString`] do: a slice of the block, no allocation); the default
    /// calls [`decode`](Record::decode).
    ///
    /// A record that shares its block keeps the block's buffer alive as long as it lives.
    fn decode_shared(block: &Bytes, payload: &[u8]) -> Result<Self, DecodeError> {
        let _ = block;
        Self::decode(payload)
    }
}

impl Record for String {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self.as_bytes());
    }
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        std::str::from_utf8(payload)
            .map(str::to_owned)
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

impl Record for Vec<u8> {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self);
    }
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        Ok(payload.to_vec())
    }
}

impl Record for Bytes {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self);
    }
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        Ok(Bytes::copy_from_slice(payload))
    }
    fn decode_shared(block: &Bytes, payload: &[u8]) -> Result<Self, DecodeError> {
        Ok(shared_slice(block, payload))
    }
}

/// Immutable UTF-8 text backed by [`Bytes`] (re-exported from the `bytestring` crate): the
/// cheapest text record. Decoding it from a block validates the UTF-8 and shares the block's
/// bytes, with no allocation or copy per record, where a `String` is allocated and copied.
/// It derefs to `str`, and `ByteString::from(string)` takes a `String` without copying.
impl Record for ByteString {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self.as_bytes());
    }
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        ByteString::try_from(payload).map_err(|e| DecodeError::Invalid(e.to_string()))
    }
    fn decode_shared(block: &Bytes, payload: &[u8]) -> Result<Self, DecodeError> {
        ByteString::try_from(shared_slice(block, payload))
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

/// `payload` as a slice of `block` sharing its buffer, or a copy if it is not inside `block`.
fn shared_slice(block: &Bytes, payload: &[u8]) -> Bytes {
    let (start, end) = (
        block.as_ptr() as usize,
        block.as_ptr() as usize + block.len(),
    );
    let at = payload.as_ptr() as usize;
    if at >= start && at + payload.len() <= end {
        block.slice_ref(payload)
    } else {
        Bytes::copy_from_slice(payload)
    }
}

impl Record for u64 {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u64_le(*self);
    }
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let bytes: [u8; 8] = payload.try_into().map_err(|_| {
            DecodeError::Invalid(format!("u64 needs 8 bytes, got {}", payload.len()))
        })?;
        Ok(u64::from_le_bytes(bytes))
    }
}

/// A record that can be read as a `&B`: the record itself (`B = T`, for every type), or, for
/// the built-in text and byte records, its text or bytes **in place in the block** (no decoding
/// into an owned record, no reference count per record). The borrowing operations
/// ([`DStream::reduce_by_key_with`](crate::DStream::reduce_by_key_with),
/// [`DStream::aggregate_ref`](crate::DStream::aggregate_ref)) take the `B` their closure names:
///
/// | record `T` | read as |
/// | --- | --- |
/// | [`ByteString`], `String` | `str` (UTF-8 checked), `[u8]`, itself |
/// | [`Bytes`], `Vec<u8>` | `[u8]`, itself |
/// | any other type | itself |
///
/// Reading a stream of text records as `&str` is the fastest way to read it (measured on the
/// word count bench: see README Performance).
pub trait ReadAs<B: ?Sized> {
    /// Whether [`read_in_place`](ReadAs::read_in_place) reads a record straight from its
    /// payload. When false, records are decoded and then [`read_as`](ReadAs::read_as).
    const IN_PLACE: bool = false;
    /// The record as a `&B`.
    fn read_as(&self) -> &B;
    /// The record whose encoded payload is `payload`, read as a `&B` without decoding it.
    /// Called only when [`IN_PLACE`](ReadAs::IN_PLACE) is true; the default refuses.
    fn read_in_place(payload: &[u8]) -> Result<&B, DecodeError> {
        let _ = payload;
        Err(DecodeError::Invalid(
            "this record cannot be read in place".into(),
        ))
    }
    /// Calls `f` with every record of `block`, in order, each read in place (called only
    /// when [`IN_PLACE`](ReadAs::IN_PLACE) is true). The default reads each payload with
    /// [`read_in_place`](ReadAs::read_in_place); text checks the block's UTF-8 at once.
    fn for_each_in_place<F: FnMut(&B)>(block: &Block, mut f: F) -> Result<(), DecodeError> {
        for payload in block.payloads() {
            f(Self::read_in_place(payload?)?);
        }
        Ok(())
    }
}

impl<T> ReadAs<T> for T {
    #[inline]
    fn read_as(&self) -> &T {
        self
    }
}

#[inline]
fn utf8(payload: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(payload).map_err(|e| DecodeError::Invalid(e.to_string()))
}

/// Every record of `block` as a `&str`, checking the UTF-8 of the whole block at once where
/// it can (one pass instead of one call per record). When the whole block is valid UTF-8, a
/// record is the slice of it between its offsets if both are character boundaries (always
/// so when its length prefix is ASCII, i.e. records under 128 bytes); any other record, and
/// every record of a block that is not valid UTF-8 as a whole (a length prefix of 128 or
/// more usually is not), is checked on its own. So a record is given as text exactly when it
/// is valid UTF-8 by itself, whichever way it was checked.
fn for_each_str<F: FnMut(&str)>(block: &Block, mut f: F) -> Result<(), DecodeError> {
    let data: &[u8] = &block.data;
    let Ok(whole) = std::str::from_utf8(data) else {
        for payload in block.payloads() {
            f(utf8(payload?)?);
        }
        return Ok(());
    };
    let base = data.as_ptr() as usize;
    for payload in Payloads::new(data) {
        let payload = payload?;
        let at = payload.as_ptr() as usize - base;
        match whole.get(at..at + payload.len()) {
            Some(text) => f(text),
            None => f(utf8(payload)?),
        }
    }
    Ok(())
}

macro_rules! read_in_place {
    ($t:ty => str) => {
        impl ReadAs<str> for $t {
            const IN_PLACE: bool = true;
            #[inline]
            fn read_as(&self) -> &str {
                self
            }
            #[inline]
            fn read_in_place(payload: &[u8]) -> Result<&str, DecodeError> {
                utf8(payload)
            }
            fn for_each_in_place<F: FnMut(&str)>(block: &Block, f: F) -> Result<(), DecodeError> {
                for_each_str(block, f)
            }
        }
    };
    ($t:ty => bytes) => {
        impl ReadAs<[u8]> for $t {
            const IN_PLACE: bool = true;
            #[inline]
            fn read_as(&self) -> &[u8] {
                self.as_ref()
            }
            #[inline]
            fn read_in_place(payload: &[u8]) -> Result<&[u8], DecodeError> {
                Ok(payload)
            }
        }
    };
}

read_in_place!(ByteString => str);
read_in_place!(String => str);
read_in_place!(ByteString => bytes);
read_in_place!(String => bytes);
read_in_place!(Bytes => bytes);
read_in_place!(Vec<u8> => bytes);

/// A record that can be stored from a borrowed `&B`, without making the record first: text
/// records ([`ByteString`], `String`) from a `&str`, byte records ([`Bytes`], `Vec<u8>`) from a
/// `&[u8]`, and any `Clone` record from a reference to itself. What
/// [`Store::store_as`](crate::Store::store_as) and
/// [`Store::store_many_as`](crate::Store::store_many_as) take: a receiver that reads many
/// lines into one buffer stores each line as a `&str` slice of it, copied once, into its block.
pub trait WriteFrom<B: ?Sized>: Record {
    /// Appends the encoding of the record `value` stands for to `out`: exactly what
    /// [`Record::encode`] writes for [`from_ref(value)`](WriteFrom::from_ref).
    fn write_from(value: &B, out: &mut BytesMut);
    /// The record `value` stands for (for a store that hands records on rather than encoding
    /// them, such as [`Store::channel`](crate::Store::channel)).
    fn from_ref(value: &B) -> Self;
}

impl<T: Record + Clone> WriteFrom<T> for T {
    fn write_from(value: &T, out: &mut BytesMut) {
        value.encode(out);
    }
    fn from_ref(value: &T) -> T {
        value.clone()
    }
}

impl WriteFrom<str> for ByteString {
    #[inline]
    fn write_from(value: &str, out: &mut BytesMut) {
        out.put_slice(value.as_bytes());
    }
    fn from_ref(value: &str) -> Self {
        ByteString::from(value)
    }
}

impl WriteFrom<str> for String {
    #[inline]
    fn write_from(value: &str, out: &mut BytesMut) {
        out.put_slice(value.as_bytes());
    }
    fn from_ref(value: &str) -> Self {
        value.to_owned()
    }
}

impl WriteFrom<[u8]> for Bytes {
    #[inline]
    fn write_from(value: &[u8], out: &mut BytesMut) {
        out.put_slice(value);
    }
    fn from_ref(value: &[u8]) -> Self {
        Bytes::copy_from_slice(value)
    }
}

impl WriteFrom<[u8]> for Vec<u8> {
    #[inline]
    fn write_from(value: &[u8], out: &mut BytesMut) {
        out.put_slice(value);
    }
    fn from_ref(value: &[u8]) -> Self {
        value.to_vec()
    }
}

/// Appends one framed record to a block buffer.
pub(crate) fn encode_framed<T: Record>(record: &T, out: &mut BytesMut) {
    framed(out, |out| record.encode(out));
}

/// Appends one framed record, written by `write`, to a block buffer.
#[inline]
pub(crate) fn framed(out: &mut BytesMut, write: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.put_u32_le(0);
    write(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// A batch's id: its batch time, in milliseconds since the Unix epoch. Batch ids increase with
/// time and never repeat within a context, so output keyed by batch id can be idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_of<T: Record>(records: &[T]) -> Block {
        let mut buf = BytesMut::new();
        for r in records {
            encode_framed(r, &mut buf);
        }
        Block {
            id: BlockId { stream: 0, seq: 0 },
            created: SystemTime::now(),
            records: records.len() as u32,
            data: buf.freeze(),
        }
    }

    #[test]
    fn records_round_trip_through_a_block() {
        let lines = vec!["a".to_string(), String::new(), "héllo wörld".to_string()];
        assert_eq!(block_of(&lines).decode::<String>().unwrap(), lines);
        let nums = vec![0u64, 1, u64::MAX];
        assert_eq!(block_of(&nums).decode::<u64>().unwrap(), nums);
    }

    #[test]
    fn byte_strings_and_bytes_share_the_block() {
        let lines = vec![
            ByteString::from("héllo"),
            ByteString::from_static(""),
            "x".into(),
        ];
        let block = block_of(&lines);
        let got = block.decode::<ByteString>().unwrap();
        assert_eq!(got, lines);
        let inside = |p: *const u8| {
            let start = block.data.as_ptr() as usize;
            (start..start + block.data.len()).contains(&(p as usize))
        };
        assert!(
            inside(got[0].as_ptr()),
            "decoded text is a slice of the block"
        );
        let raw = block.decode::<Bytes>().unwrap();
        assert!(inside(raw[2].as_ptr()));
        assert_eq!(&raw[0][..], "héllo".as_bytes());
        // Out of the block (a plain decode) it is copied.
        assert_eq!(ByteString::decode(b"abc").unwrap(), "abc");
        let bad = block_of(&[vec![0xffu8]]);
        assert!(matches!(
            bad.decode::<ByteString>(),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn a_truncated_block_is_an_error_not_a_panic() {
        let block = block_of(&["abcdef".to_string(), "ghi".to_string()]);
        for cut in 0..block.data.len() {
            let mut b = block.clone();
            b.data = block.data.slice(..cut);
            let _ = b.decode::<String>(); // never panics
        }
        let mut b = block.clone();
        b.data = block.data.slice(..12);
        assert_eq!(b.decode::<String>(), Err(DecodeError::Truncated));
    }

    #[test]
    fn text_and_bytes_are_read_in_place_and_others_as_themselves() {
        fn in_place<T: ReadAs<B>, B: ?Sized>() -> bool {
            T::IN_PLACE
        }
        assert!(in_place::<ByteString, str>() && in_place::<String, str>());
        assert!(in_place::<ByteString, [u8]>() && in_place::<Bytes, [u8]>());
        assert!(in_place::<Vec<u8>, [u8]>());
        assert!(!in_place::<ByteString, ByteString>() && !in_place::<u64, u64>());

        let block = block_of(&["héllo wörld".to_string()]);
        let payload = block.payloads().next().unwrap().unwrap();
        let text = <ByteString as ReadAs<str>>::read_in_place(payload).unwrap();
        assert_eq!(text, "héllo wörld");
        assert_eq!(
            text.as_ptr(),
            payload.as_ptr(),
            "a borrow of the block, no copy"
        );
        assert_eq!(<Bytes as ReadAs<[u8]>>::read_in_place(payload), Ok(payload));
        assert!(matches!(
            <String as ReadAs<str>>::read_in_place(&[0xff, b'a']),
            Err(DecodeError::Invalid(_))
        ));
        assert!(<u64 as ReadAs<u64>>::read_in_place(&[0; 8]).is_err());
        // A whole block read as text: checked at once, or record by record where it must be.
        let read_all = |block: &Block| {
            let mut got = Vec::new();
            <String as ReadAs<str>>::for_each_in_place(block, |s| got.push(s.to_owned()))
                .map(|()| got)
        };
        let short = vec!["héllo".to_string(), String::new(), "wörld".to_string()];
        assert_eq!(read_all(&block_of(&short)), Ok(short.clone()));
        // Records of 128 bytes or more: their length prefixes are not ASCII.
        let long = vec!["é".repeat(100), "x".repeat(300), "a".into()];
        assert_eq!(read_all(&block_of(&long)), Ok(long.clone()));
        // The whole block valid UTF-8 while a record on its own is not: a record ending in a
        // lead byte (0xC3) whose continuation (0xA9) is the next record's length (169).
        let mut tricky = b"ab".to_vec();
        tricky.push(0xC3);
        let block = block_of(&[tricky, vec![b'z'; 169]]);
        assert!(std::str::from_utf8(&block.data).is_ok(), "valid as a whole");
        assert!(matches!(read_all(&block), Err(DecodeError::Invalid(_))));
        let bad = block_of(&[b"ok".to_vec(), vec![0xff]]);
        assert!(matches!(read_all(&bad), Err(DecodeError::Invalid(_))));

        let owned = ByteString::from("abc");
        assert_eq!(ReadAs::<str>::read_as(&owned), "abc");
        assert_eq!(ReadAs::<[u8]>::read_as(&owned), b"abc");
        assert_eq!(ReadAs::<u64>::read_as(&7u64), &7);
    }

    #[test]
    fn invalid_utf8_is_reported() {
        let block = block_of(&[vec![0xffu8, 0xfe]]);
        assert!(matches!(
            block.decode::<String>(),
            Err(DecodeError::Invalid(_))
        ));
    }
}
