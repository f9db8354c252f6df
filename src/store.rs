//! The store handle: where a receiver's records go.
//!
//! A receiver calls [`Store::store`] or [`Store::store_many`] (usually through its
//! [`ReceiverContext`](crate::ReceiverContext)). Both are `async` because the data path is
//! bounded: when the pipeline behind the store is full they wait (backpressure) and never drop.
//! If the pipeline has shut down they fail with [`StoreError::Closed`], which a handler returns
//! to its supervisor like any other failure.
//!
//! Today a store is backed by a bounded channel that the caller drains ([`Store::channel`]); the
//! block generator of the streaming pipeline plugs in behind the same API.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::mpsc;

use crate::block::{encode_framed, framed, Record, WriteFrom};
use crate::block_generator::BlockGenerator;
use crate::error::StoreError;

/// A cloneable handle that stores records into the pipeline. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (store, mut records) = tributary::Store::<String>::channel(16);
/// store.store("hello".to_string()).await.unwrap();
/// store.store_many(["a".to_string(), "b".to_string()]).await.unwrap();
/// assert_eq!(records.recv().await.as_deref(), Some("hello"));
/// assert_eq!(records.recv().await.as_deref(), Some("a"));
/// # }
/// ```
#[derive(Debug)]
pub struct Store<T> {
    inner: Inner<T>,
}

#[derive(Debug)]
enum Inner<T> {
    Channel(mpsc::Sender<T>),
    Blocks {
        generator: Arc<BlockGenerator>,
        durability: Arc<Durability>,
        encode: fn(&T, &mut BytesMut),
    },
}

/// Which blocks of one stream are durable (acknowledged: replicated `k` times and, with the
/// write-ahead log, synced). Blocks are acknowledged in sequence order.
#[derive(Debug)]
pub(crate) struct Durability {
    closed: std::sync::atomic::AtomicBool,
    through: tokio::sync::watch::Sender<Option<u64>>,
    failed: std::sync::Mutex<std::collections::BTreeMap<u64, String>>,
}

impl Durability {
    pub(crate) fn new() -> Self {
        Durability {
            closed: std::sync::atomic::AtomicBool::new(false),
            through: tokio::sync::watch::channel(None).0,
            failed: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Block `seq` was handled: durable (`Ok`) or not (`Err(reason)`).
    pub(crate) fn settle(&self, seq: u64, outcome: Result<(), String>) {
        if let Err(reason) = outcome {
            if let Ok(mut f) = self.failed.lock() {
                f.insert(seq, reason);
                // Keep the map small: waiters look at recent blocks only.
                while f.len() > 1024 {
                    f.pop_first();
                }
            }
        }
        self.through
            .send_modify(|t| *t = Some(t.map_or(seq, |x| x.max(seq))));
    }

    /// No more blocks will be settled (the pipeline stopped): waiters return an error.
    pub(crate) fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.through.send_modify(|_| {});
    }

    /// Waits until blocks up to `seq` are settled; errors if any of the blocks from `from`
    /// (which hold the caller's records) failed, or if the pipeline shuts down first.
    pub(crate) async fn wait(&self, from: u64, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.through.subscribe();
        let closed = &self.closed;
        let settled = rx
            .wait_for(|t| {
                t.is_some_and(|t| t >= seq) || closed.load(std::sync::atomic::Ordering::Acquire)
            })
            .await
            .map(|t| t.is_some_and(|t| t >= seq))
            .unwrap_or(false);
        if !settled {
            return Err(StoreError::NotDurable {
                reason: "the pipeline stopped before the records were acknowledged".into(),
            });
        }
        let failed = self
            .failed
            .lock()
            .ok()
            .and_then(|f| f.range(from..=seq).next().map(|(_, r)| r.clone()));
        match failed {
            Some(reason) => Err(StoreError::NotDurable { reason }),
            None => Ok(()),
        }
    }
}

impl<T> Clone for Store<T> {
    fn clone(&self) -> Self {
        Store {
            inner: match &self.inner {
                Inner::Channel(tx) => Inner::Channel(tx.clone()),
                Inner::Blocks {
                    generator,
                    durability,
                    encode,
                } => Inner::Blocks {
                    generator: generator.clone(),
                    durability: durability.clone(),
                    encode: *encode,
                },
            },
        }
    }
}

impl<T: Record> Store<T> {
    /// A store feeding a block generator (the streaming pipeline).
    pub(crate) fn blocks(generator: Arc<BlockGenerator>, durability: Arc<Durability>) -> Store<T> {
        Store {
            inner: Inner::Blocks {
                generator,
                durability,
                encode: encode_framed::<T>,
            },
        }
    }
}

impl<T: Record> Store<T> {
    /// Stores one record given as a `&B` (a `&str` for text records, a `&[u8]` for byte
    /// records: see [`WriteFrom`]), waiting while the pipeline is full. The same as
    /// `store(T::from_ref(record))`, without making the record: its bytes are copied once,
    /// into the block.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let (store, mut records) = tributary::Store::<String>::channel(16);
    /// let buf = "first line\nsecond line";
    /// store.store_many_as(buf.lines()).await.unwrap();
    /// store.store_as("third").await.unwrap();
    /// assert_eq!(records.recv().await.as_deref(), Some("first line"));
    /// # }
    /// ```
    pub async fn store_as<B: ?Sized>(&self, record: &B) -> Result<(), StoreError>
    where
        T: WriteFrom<B>,
    {
        self.store_many_as([record]).await
    }

    /// Stores records given as `&B`s, in order (see [`store_as`](Store::store_as)). On
    /// error, the records from the first unstored one on were not stored (their count is in
    /// the error).
    pub async fn store_many_as<'a, B, I>(&self, records: I) -> Result<(), StoreError>
    where
        B: ?Sized + 'a,
        T: WriteFrom<B>,
        I: IntoIterator<Item = &'a B>,
    {
        match &self.inner {
            Inner::Channel(tx) => {
                let mut records = records.into_iter();
                while let Some(record) = records.next() {
                    if tx.send(T::from_ref(record)).await.is_err() {
                        return Err(StoreError::Closed {
                            unstored: 1 + records.count(),
                        });
                    }
                }
                Ok(())
            }
            Inner::Blocks { generator, .. } => {
                generator
                    .store_iter(records, |r: &&B, out: &mut BytesMut| {
                        framed(out, |out| T::write_from(r, out))
                    })
                    .await
            }
        }
    }
}

impl<T: Send + 'static> Store<T> {
    /// A store backed by a bounded channel of `capacity` records (at least 1), and the channel's
    /// receiving end. When the channel is full, `store` waits.
    pub fn channel(capacity: usize) -> (Store<T>, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Store::from_sender(tx), rx)
    }

    /// A store backed by an existing bounded channel.
    pub fn from_sender(sender: mpsc::Sender<T>) -> Store<T> {
        Store {
            inner: Inner::Channel(sender),
        }
    }

    /// Stores one record, waiting while the pipeline is full.
    pub async fn store(&self, record: T) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Channel(tx) => tx
                .send(record)
                .await
                .map_err(|_| StoreError::Closed { unstored: 1 }),
            Inner::Blocks {
                generator, encode, ..
            } => generator.store_iter([record], encode).await,
        }
    }

    /// Stores records in order, waiting while the pipeline is full. On error, the records from
    /// the first unstored one on were not stored (their count is in the error).
    pub async fn store_many<I>(&self, records: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = T>,
    {
        match &self.inner {
            Inner::Channel(tx) => {
                let mut records = records.into_iter();
                while let Some(record) = records.next() {
                    if tx.send(record).await.is_err() {
                        return Err(StoreError::Closed {
                            unstored: 1 + records.count(),
                        });
                    }
                }
                Ok(())
            }
            Inner::Blocks {
                generator, encode, ..
            } => generator.store_iter(records, encode).await,
        }
    }

    /// Stores `records` and resolves only once the block(s) holding them are durable:
    /// replicated `k` times and, with the write-ahead log on, synced to disk. Only then may a
    /// receiver acknowledge its source. Cuts the current block early (call it with many
    /// records at once, not one by one).
    ///
    /// For a channel-backed store (no pipeline), resolves once the records are in the channel.
    pub async fn store_reliably<I>(&self, records: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = T>,
    {
        match &self.inner {
            Inner::Channel(_) => self.store_many(records).await,
            Inner::Blocks {
                generator,
                durability,
                encode,
            } => {
                let before = generator.cut_now().await?.map_or(0, |s| s + 1);
                generator.store_iter(records, encode).await?;
                match generator.cut_now().await? {
                    Some(last) if last >= before => durability.wait(before, last).await,
                    _ => Ok(()), // nothing was stored
                }
            }
        }
    }

    /// Whether the pipeline behind the store has shut down (for a block pipeline, this is only
    /// known at the next `store`).
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            Inner::Channel(tx) => tx.is_closed(),
            Inner::Blocks { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn store_many_reports_how_many_were_not_stored() {
        let (store, rx) = Store::<u32>::channel(2);
        drop(rx);
        assert_eq!(
            store.store_many([1, 2, 3]).await,
            Err(StoreError::Closed { unstored: 3 })
        );
        assert!(store.is_closed());
    }

    #[tokio::test]
    async fn records_stored_from_borrows_are_the_records_themselves() {
        use crate::block::ByteString;
        // Into blocks: the same bytes as storing the records.
        let blocks_of = |store_borrowed: bool| async move {
            let (g, mut rx) = BlockGenerator::new(0, 1 << 16, 16, None);
            let g = Arc::new(g);
            let store = Store::<ByteString>::blocks(g.clone(), Arc::new(Durability::new()));
            let buf = "héllo\nwörld\n\nlast";
            if store_borrowed {
                store.store_many_as(buf.split('\n')).await.unwrap();
                store.store_as("one more").await.unwrap();
            } else {
                store
                    .store_many(buf.split('\n').map(ByteString::from))
                    .await
                    .unwrap();
                store.store(ByteString::from("one more")).await.unwrap();
            }
            assert!(g.flush().await);
            let block = rx.recv().await.unwrap().into_block().unwrap();
            (block.records, block.data)
        };
        let (borrowed, owned) = (blocks_of(true).await, blocks_of(false).await);
        assert_eq!(borrowed.0, 5);
        assert_eq!(borrowed, owned);
        // Into a channel: the records made from the borrows; bytes too.
        let (store, mut rx) = Store::<Vec<u8>>::channel(4);
        store.store_many_as([&b"ab"[..], b""]).await.unwrap();
        assert_eq!(rx.recv().await, Some(b"ab".to_vec()));
        assert_eq!(rx.recv().await, Some(vec![]));
        // Any `Clone` record from a reference to itself.
        let (numbers, mut got) = Store::<u64>::channel(1);
        numbers.store_as(&7u64).await.unwrap();
        assert_eq!(got.recv().await, Some(7));
        drop(rx);
        assert_eq!(
            store.store_many_as([&b"x"[..], b"y"]).await,
            Err(StoreError::Closed { unstored: 2 })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_waits_instead_of_dropping() {
        let (store, mut rx) = Store::<u32>::channel(1);
        store.store(1).await.unwrap();
        let blocked = tokio::time::timeout(std::time::Duration::from_secs(1), store.store(2)).await;
        assert!(
            blocked.is_err(),
            "store must wait while the pipeline is full"
        );
        assert_eq!(rx.recv().await, Some(1));
        store.store(3).await.unwrap();
        assert_eq!(rx.recv().await, Some(3));
    }
}
