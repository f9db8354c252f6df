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

/// Identifies a block: the receiver's stream id and a per-receiver sequence number that never
/// wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

    /// Decodes every record.
    pub fn decode<T: Record>(&self) -> Result<Vec<T>, DecodeError> {
        let mut out = Vec::with_capacity(self.records as usize);
        for payload in self.payloads() {
            out.push(T::decode(payload?)?);
        }
        Ok(out)
    }
}

/// Iterator over the payloads of a block's records.
#[derive(Debug)]
pub struct Payloads<'a> {
    rest: &'a [u8],
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
pub trait Record: Send + Sized + 'static {
    /// Appends the encoded record to `out`.
    fn encode(&self, out: &mut BytesMut);
    /// Decodes a record from its payload.
    fn decode(payload: &[u8]) -> Result<Self, DecodeError>;
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

/// Appends one framed record to a block buffer.
pub(crate) fn encode_framed<T: Record>(record: &T, out: &mut BytesMut) {
    let at = out.len();
    out.put_u32_le(0);
    record.encode(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
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
    fn invalid_utf8_is_reported() {
        let block = block_of(&[vec![0xffu8, 0xfe]]);
        assert!(matches!(
            block.decode::<String>(),
            Err(DecodeError::Invalid(_))
        ));
    }
}
