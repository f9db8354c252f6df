//! How values cross to another process: Tributary's own encoding of blocks (no copy of a
//! block's bytes beyond the one into the message), `postcard` for small `serde` values, and
//! the bridges between typed reply ports and `ractor`'s binary ones.
//!
//! Decoding never panics: a value that does not decode is `None` (a peer of another version,
//! or damage), which the receiving side treats as an error.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use ractor::message::SerializedMessage;
use ractor::{BytesConvertable, RpcReplyPort};

use crate::block::{Block, BlockId};

/// A value as it crosses to another process: `None` if the bytes did not decode (a peer of
/// another version, or damage), which the receiving side treats as an error rather than
/// panicking (`ractor`'s decoding cannot fail).
#[derive(Debug, Clone)]
pub(crate) struct Wire<T>(pub(crate) Option<T>);

impl<T> Wire<T> {
    pub(crate) fn of(v: T) -> Wire<T> {
        Wire(Some(v))
    }
}

pub(crate) fn put_id(id: BlockId, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.stream.to_le_bytes());
    out.extend_from_slice(&id.seq.to_le_bytes());
}

pub(crate) fn get_id(b: &[u8]) -> Option<BlockId> {
    Some(BlockId {
        stream: u32::from_le_bytes(b.get(0..4)?.try_into().ok()?),
        seq: u64::from_le_bytes(b.get(4..12)?.try_into().ok()?),
    })
}

/// Bytes before a block's data: id (12), creation time (8), records (4).
pub(crate) const HEADER: usize = 24;

/// The bytes before a block's data in its encoding: id, creation time, records.
pub(crate) fn block_header(block: &Block) -> [u8; HEADER] {
    let created = block
        .created
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let mut out = [0u8; HEADER];
    out[0..4].copy_from_slice(&block.id.stream.to_le_bytes());
    out[4..12].copy_from_slice(&block.id.seq.to_le_bytes());
    out[12..20].copy_from_slice(&created.to_le_bytes());
    out[20..24].copy_from_slice(&block.records.to_le_bytes());
    out
}

fn put_block(block: &Block, out: &mut Vec<u8>) {
    out.extend_from_slice(&block_header(block));
    out.extend_from_slice(&block.data);
}

/// A block from its encoding; its data is a slice of `bytes` (no copy).
pub(crate) fn block_from(bytes: Bytes) -> Option<Block> {
    let id = get_id(&bytes)?;
    let created = u64::from_le_bytes(bytes.get(12..20)?.try_into().ok()?);
    let records = u32::from_le_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some(Block {
        id,
        created: UNIX_EPOCH + Duration::from_micros(created),
        records,
        data: bytes.slice(HEADER..),
    })
}

fn get_block(bytes: Vec<u8>) -> Option<Block> {
    block_from(Bytes::from(bytes))
}

impl BytesConvertable for Wire<Block> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(b) = &self.0 {
            out.reserve(HEADER + b.data.len());
            put_block(b, &mut out);
        }
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Wire(get_block(bytes))
    }
}

/// A block with a number before it (a receiver placement's epoch, as it forwards a block).
impl BytesConvertable for Wire<(u64, Block)> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some((n, b)) = &self.0 {
            out.reserve(HEADER + 8 + b.data.len());
            put_block(b, &mut out);
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }
    fn from_bytes(mut bytes: Vec<u8>) -> Self {
        // The number is last: taking it off moves no byte of the block.
        let Some(at) = bytes.len().checked_sub(8) else {
            return Wire(None);
        };
        let n = u64::from_le_bytes(bytes[at..].try_into().unwrap_or_default());
        bytes.truncate(at);
        Wire(get_block(bytes).map(|b| (n, b)))
    }
}

impl BytesConvertable for Wire<Option<Block>> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.0 {
            Some(Some(b)) => {
                out.reserve(HEADER + 1 + b.data.len());
                put_block(&b, &mut out);
                out.push(1);
            }
            _ => out.push(0),
        }
        out
    }
    fn from_bytes(mut bytes: Vec<u8>) -> Self {
        // The tag is last: taking it off moves no byte of the block.
        match bytes.pop() {
            Some(0) if bytes.is_empty() => Wire(Some(None)),
            Some(1) => Wire(get_block(bytes).map(Some)),
            _ => Wire(None),
        }
    }
}

impl BytesConvertable for Wire<BlockId> {
    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12);
        if let Some(id) = self.0 {
            put_id(id, &mut out);
        }
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Wire(get_id(&bytes).filter(|_| bytes.len() == 12))
    }
}

impl BytesConvertable for Wire<Vec<BlockId>> {
    fn into_bytes(self) -> Vec<u8> {
        let ids = self.0.unwrap_or_default();
        let mut out = Vec::with_capacity(12 * ids.len());
        for id in ids {
            put_id(id, &mut out);
        }
        out
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        if !bytes.len().is_multiple_of(12) {
            return Wire(None);
        }
        Wire(bytes.chunks_exact(12).map(get_id).collect())
    }
}

/// A `serde` value as it crosses processes (`postcard`): `None` if the bytes did not decode
/// (a peer of another version, or damage), which the receiver treats as an error.
#[derive(Debug, Clone)]
pub(crate) struct Ser<T>(pub(crate) Option<T>);

impl<T> Ser<T> {
    pub(crate) fn of(v: T) -> Ser<T> {
        Ser(Some(v))
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> BytesConvertable
    for Ser<T>
{
    fn into_bytes(self) -> Vec<u8> {
        self.0
            .and_then(|v| postcard::to_stdvec(&v).ok())
            .unwrap_or_default()
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Ser(postcard::from_bytes(&bytes).ok())
    }
}

/// A typed reply port as a binary one (the sending side of a call to a remote actor): the
/// answer's bytes are decoded into the typed port when they come back.
pub(crate) fn port_out<T: BytesConvertable + Send + 'static>(
    port: RpcReplyPort<T>,
) -> RpcReplyPort<Vec<u8>> {
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let timeout = port.get_timeout();
    tokio::spawn(async move {
        let bytes = match timeout {
            Some(t) => tokio::time::timeout(t, rx).await.ok().and_then(Result::ok),
            None => rx.await.ok(),
        };
        if let Some(bytes) = bytes {
            let _ = port.send(T::from_bytes(bytes));
        }
    });
    match timeout {
        Some(t) => RpcReplyPort::from((tx, t)),
        None => RpcReplyPort::from(tx),
    }
}

/// A binary reply port as a typed one (the receiving side): the typed answer is encoded
/// into the binary port.
pub(crate) fn port_in<T: BytesConvertable + Send + 'static>(
    port: RpcReplyPort<Vec<u8>>,
) -> RpcReplyPort<T> {
    let (tx, rx) = tokio::sync::oneshot::channel::<T>();
    let timeout = port.get_timeout();
    tokio::spawn(async move {
        let answer = match timeout {
            Some(t) => tokio::time::timeout(t, rx).await.ok().and_then(Result::ok),
            None => rx.await.ok(),
        };
        if let Some(answer) = answer {
            let _ = port.send(answer.into_bytes());
        }
    });
    match timeout {
        Some(t) => RpcReplyPort::from((tx, t)),
        None => RpcReplyPort::from(tx),
    }
}

/// A call to a remote actor whose one argument is `args`, as is (no second copy into a
/// packed argument list, as `ractor_cluster`'s derive makes).
pub(crate) fn call(
    variant: &str,
    args: Vec<u8>,
    reply: RpcReplyPort<Vec<u8>>,
) -> SerializedMessage {
    SerializedMessage::Call {
        variant: variant.to_string(),
        args,
        reply,
        metadata: None,
    }
}

/// A one-way message to a remote actor whose one argument is `args`, as is.
pub(crate) fn cast(variant: &str, args: Vec<u8>) -> SerializedMessage {
    SerializedMessage::Cast {
        variant: variant.to_string(),
        args,
        metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_manager::WorkerMsg;
    use std::time::SystemTime;

    fn block() -> Block {
        Block {
            id: BlockId { stream: 2, seq: 9 },
            created: SystemTime::now(),
            records: 3,
            data: Bytes::from_static(b"some encoded records"),
        }
    }

    #[test]
    fn blocks_survive_the_wire_and_damage_is_none() {
        let b = block();
        let back = Wire::<(u64, Block)>::from_bytes(Wire::of((7, b.clone())).into_bytes());
        let (n, got) = back.0.expect("decodes");
        assert_eq!(
            (n, got.id, got.records, got.data),
            (7, b.id, b.records, b.data.clone())
        );
        let back = Wire::<Option<Block>>::from_bytes(Wire::of(Some(b.clone())).into_bytes());
        assert_eq!(back.0.flatten().map(|x| x.data), Some(b.data.clone()));
        let none = Wire::<Option<Block>>::from_bytes(Wire::of(None).into_bytes());
        assert!(matches!(none.0, Some(None)));
        assert!(Wire::<(u64, Block)>::from_bytes(vec![1, 2, 3]).0.is_none());
        assert!(Wire::<Option<Block>>::from_bytes(vec![9]).0.is_none());
        assert!(Wire::<Block>::from_bytes(vec![0; 10]).0.is_none());
    }

    #[tokio::test]
    async fn a_block_store_message_and_its_reply_cross_as_bytes() {
        use ractor::Message;
        let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
        let sent = WorkerMsg::Put(Wire::of(block()), tx.into())
            .serialize()
            .unwrap();
        let WorkerMsg::Put(Wire(Some(got)), reply) = WorkerMsg::deserialize(sent).unwrap() else {
            panic!("not a Put with a block");
        };
        assert_eq!(got.data, block().data);
        reply.send(true).unwrap();
        assert!(
            rx.await.unwrap(),
            "the answer came back through both bridges"
        );
        let bad = call("Nope", Vec::new(), tokio::sync::oneshot::channel().0.into());
        assert!(WorkerMsg::deserialize(bad).is_err());
    }
}
