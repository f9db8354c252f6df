//! Recycled block buffers.
//!
//! Every block is encoded into one large buffer (up to `max_block_bytes`, 8 MiB by default).
//! Allocating a fresh buffer per block makes the allocator hand back memory the kernel must
//! fault in and zero page by page, and growing it by doubling copies the block several times;
//! at millions of records per second that was a tenth of the pipeline's CPU time. Instead, the
//! buffer of a freed block (the last [`Bytes`] sharing it dropped) goes back to this pool and
//! the block generator reuses it, pages already mapped.
//!
//! The pool is bounded in bytes (capacity of the buffers it keeps): a buffer returned to a
//! full pool is freed. Buffers in use are bounded by the block manager's memory budget, so the
//! pipeline's block memory stays within about twice the budget.

use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};

/// A bounded pool of empty block buffers, shared by the block generators of one context.
#[derive(Debug)]
pub(crate) struct BufferPool {
    free: Mutex<Free>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Free {
    buffers: Vec<BytesMut>,
    bytes: usize,
}

impl BufferPool {
    /// A pool keeping at most `max_bytes` of idle buffer capacity.
    pub(crate) fn new(max_bytes: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Free::default()),
            max_bytes,
        })
    }

    /// An empty buffer with room for at least `capacity` bytes: a recycled one when the pool
    /// has one, else a new one.
    pub(crate) fn take(&self, capacity: usize) -> BytesMut {
        let recycled = self.free.lock().ok().and_then(|mut f| {
            let buf = f.buffers.pop()?;
            f.bytes -= buf.capacity();
            Some(buf)
        });
        let mut buf = recycled.unwrap_or_default();
        buf.reserve(capacity);
        buf
    }

    /// Freezes a buffer filled by [`take`](Self::take) into shared, immutable bytes; when the
    /// last clone of them is dropped, the buffer comes back to this pool.
    pub(crate) fn seal(self: &Arc<Self>, buf: BytesMut) -> Bytes {
        Bytes::from_owner(Recycle {
            data: buf,
            pool: Arc::downgrade(self),
        })
    }

    fn give(&self, mut buf: BytesMut) {
        buf.clear();
        if let Ok(mut f) = self.free.lock() {
            if f.bytes + buf.capacity() <= self.max_bytes {
                f.bytes += buf.capacity();
                f.buffers.push(buf);
            }
        }
    }

    /// Idle bytes held (for tests).
    #[cfg(test)]
    pub(crate) fn idle_bytes(&self) -> usize {
        self.free.lock().map(|f| f.bytes).unwrap_or(0)
    }
}

/// The owner behind a sealed block's [`Bytes`]: returns its buffer to the pool when dropped.
struct Recycle {
    data: BytesMut,
    pool: Weak<BufferPool>,
}

impl AsRef<[u8]> for Recycle {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Recycle {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give(std::mem::take(&mut self.data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn a_freed_block_buffer_is_reused_without_reallocation() {
        let pool = BufferPool::new(1 << 20);
        let mut buf = pool.take(4096);
        buf.put_slice(b"hello");
        let ptr = buf.as_ptr();
        let block = pool.seal(buf);
        let replica = block.clone();
        assert_eq!(&block[..], b"hello");
        drop(block);
        assert_eq!(pool.idle_bytes(), 0, "a replica still shares the buffer");
        drop(replica);
        assert!(pool.idle_bytes() >= 4096);
        let again = pool.take(16);
        assert_eq!(again.as_ptr(), ptr, "the same allocation comes back");
        assert!(again.is_empty());
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_its_byte_bound() {
        let pool = BufferPool::new(10_000);
        let blocks: Vec<Bytes> = (0..4)
            .map(|_| {
                let mut b = pool.take(4096);
                b.put_slice(&[1; 100]);
                pool.seal(b)
            })
            .collect();
        drop(blocks);
        let idle = pool.idle_bytes();
        assert!((4096..=10_000).contains(&idle), "{idle}");
    }

    #[test]
    fn slices_of_a_sealed_buffer_keep_it_alive() {
        let pool = BufferPool::new(1 << 20);
        let mut b = pool.take(64);
        b.put_slice(b"abcdef");
        let sealed = pool.seal(b);
        let tail = sealed.slice(3..);
        drop(sealed);
        assert_eq!(&tail[..], b"def");
        assert_eq!(pool.idle_bytes(), 0);
        drop(tail);
        assert!(pool.idle_bytes() >= 64);
    }
}
