//! Restorer: puts the blocks recovery found in the write-ahead log back on the workers, one
//! batch at a time, within the memory budget.
//!
//! ```text
//!  Recovery ──► blocks to restore: id, records, bytes, location in the log (no data)
//!  start ─────► reserves min(their bytes, budget) of the block budget before any receiver runs
//!  Runner ────► before each batch: reads that batch's recovered blocks from the log
//!               (blocking pool, checksums verified again) and puts them on k workers
//!  done ──────► once every recovered block was restored and freed, the reservation returns
//!               to the budget (receivers use it)
//! ```
//!
//! Memory stays within the budget: recovered blocks are paced by their own reservation, taken
//! from the budget at start, so the receivers' new blocks never hold the memory that a
//! recovered batch needs (which would deadlock: the new blocks' batches run after it). A
//! single batch larger than the budget is read alone, as a block larger than the budget is.
//! The ReceiverTracker keeps each new batch's recovered blocks within the budget.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batch::BatchBlocks;
use crate::block::BlockId;
use crate::driver::block_manager_master::{kib, BlockManagerMaster};
use crate::wal::{Location, Logged, Storage, WalError};

/// The recovered blocks not yet put back on the workers, and the memory reserved for them.
#[derive(Default)]
pub(crate) struct Restorer {
    storage: Option<Arc<dyn Storage>>,
    waiting: HashMap<BlockId, (Location, u64)>,
    /// Paces restores: its permits are the budget reserved for recovered blocks.
    pace: Option<(Arc<Semaphore>, u32)>,
    /// The reservation taken from the block budget.
    held: Option<OwnedSemaphorePermit>,
    workers: usize,
}

impl std::fmt::Debug for Restorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restorer")
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl Restorer {
    /// Blocks to restore from `storage` (the write-ahead log directory).
    pub(crate) fn new(storage: Option<Arc<dyn Storage>>, blocks: Vec<Logged>) -> Restorer {
        Restorer {
            storage,
            waiting: blocks
                .into_iter()
                .map(|b| (b.id, (b.location, b.bytes)))
                .collect(),
            ..Restorer::default()
        }
    }

    /// Bytes of each block still to restore.
    pub(crate) fn sizes(&self) -> HashMap<BlockId, u64> {
        self.waiting.iter().map(|(id, (_, b))| (*id, *b)).collect()
    }

    /// Takes the memory for the recovered blocks from the budget (before receivers start, so
    /// it is free) and spreads them over `workers`.
    pub(crate) async fn reserve(
        &mut self,
        blocks: &BlockManagerMaster,
        workers: usize,
    ) -> Result<(), crate::block_manager::BlockError> {
        self.workers = workers.max(1);
        if self.waiting.is_empty() {
            return Ok(());
        }
        let total: u64 = self.waiting.values().map(|(_, b)| *b).sum();
        let held = blocks
            .reserve(usize::try_from(total).unwrap_or(usize::MAX))
            .await?;
        let n = held.num_permits() as u32;
        self.pace = Some((Arc::new(Semaphore::new(n as usize)), n));
        self.held = Some(held);
        Ok(())
    }

    /// Puts `batch`'s recovered blocks on the workers, reading them from the log; waits while
    /// the previous batch's recovered blocks still hold the reserved memory.
    pub(crate) async fn restore(
        &mut self,
        batch: &BatchBlocks,
        blocks: &BlockManagerMaster,
    ) -> Result<(), WalError> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let want: Vec<(BlockId, Location, u64)> = batch
            .all_ids()
            .into_iter()
            .filter_map(|id| self.waiting.remove(&id).map(|(l, b)| (id, l, b)))
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        let (Some(storage), Some((pace, pace_kib))) = (self.storage.clone(), self.pace.clone())
        else {
            return Ok(());
        };
        let bytes: u64 = want.iter().map(|(_, _, b)| *b).sum();
        let need = kib(usize::try_from(bytes).unwrap_or(usize::MAX)).min(pace_kib);
        let permit = pace
            .clone()
            .acquire_many_owned(need)
            .await
            .map_err(|_| WalError::Closed)?;
        let n = want.len();
        tracing::info!(
            blocks = n,
            bytes,
            "restoring recovered blocks from the write-ahead log"
        );
        let read = tokio::task::spawn_blocking(move || {
            want.into_iter()
                .map(|(_, loc, _)| crate::wal::load(storage.as_ref(), &loc).map(|b| (b, loc)))
                .collect::<Result<Vec<_>, WalError>>()
        })
        .await
        .map_err(|_| WalError::Closed)??;
        let mut permit = Some(permit);
        for (i, (block, location)) in read.into_iter().enumerate() {
            let home = block.id.stream as usize % self.workers;
            // Each block carries its share of the reservation (returned when it is freed);
            // the last one the rest.
            let share = if i + 1 == n {
                permit.take()
            } else {
                let k = kib(block.data.len());
                permit
                    .as_mut()
                    .and_then(|p| p.split(k.min(p.num_permits() as u32) as usize))
            };
            let id = block.id;
            match blocks.put(block, home, share).await {
                Ok(_) => blocks.logged(id, location),
                Err(e) => tracing::error!(error = %e, "could not restore a recovered block"),
            }
        }
        if self.waiting.is_empty() {
            // Every recovered block is placed: once they are all freed, the reservation goes
            // back to the budget.
            if let Some(held) = self.held.take() {
                tokio::spawn(async move {
                    let _all = pace.acquire_many_owned(pace_kib).await;
                    drop(held);
                });
            }
        }
        Ok(())
    }
}
