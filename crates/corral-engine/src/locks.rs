//! Per-chunk ordering between the writers and the copiers.
//!
//! Client writes hold a chunk's lock shared while they are in flight; a
//! rebuild copy, a repair and a verify hold it exclusively while they
//! compare, read and write that chunk. So a copy can never carry old data
//! over a newer write (Longhorn #4354), and a comparison never sees a write
//! half applied. The table is striped: chunks share a lock when their index
//! is equal modulo the stripe count, which costs a little false sharing and
//! no memory per chunk. Whoever takes several stripes (a write spanning
//! chunks shared, the rebuild copier a group of chunks exclusively) takes
//! them in ascending stripe order, so there is no lock-order cycle.
//!
//! Shared holders do not exclude each other, so a second, short-lived
//! sequencing lock orders how concurrent writes to one chunk are queued on
//! the replicas (see [`ChunkLocks::sequence`]).

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPES: usize = 4096;

/// The striped lock table of one volume.
pub struct ChunkLocks {
    stripes: Box<[RwLock<()>]>,
    order: Box<[std::sync::Mutex<()>]>,
}

impl Default for ChunkLocks {
    fn default() -> Self {
        ChunkLocks {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            order: (0..STRIPES).map(|_| std::sync::Mutex::new(())).collect(),
        }
    }
}

impl ChunkLocks {
    fn stripe(&self, chunk: u64) -> usize {
        (chunk % STRIPES as u64) as usize
    }

    /// Shared locks on every chunk of a request (ascending, deduplicated).
    pub async fn shared(&self, chunks: impl Iterator<Item = u64>) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut stripes: Vec<usize> = chunks.map(|c| self.stripe(c)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s].read().await);
        }
        guards
    }

    /// Held (briefly, never across an await) while a write queues its
    /// requests on every replica, so that two concurrent writes to the same
    /// chunk are queued in the same order on every replica: overlapping
    /// writes then land in the same order everywhere and replicas never
    /// diverge, whichever order the client meant.
    pub fn sequence(&self, chunks: &[u64]) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = chunks.iter().map(|c| self.stripe(*c)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|s| self.order[s].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// The exclusive lock of one chunk.
    pub async fn exclusive(&self, chunk: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[self.stripe(chunk)].write().await
    }

    /// Exclusive locks on several chunks, taken in ascending stripe order
    /// (the order [`ChunkLocks::shared`] uses), each stripe once.
    pub async fn exclusive_many(&self, chunks: &[u64]) -> Vec<RwLockWriteGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(chunks.len());
        for s in self.stripes_of(chunks) {
            guards.push(self.stripes[s].write().await);
        }
        guards
    }

    /// The stripes of `chunks`, ascending and deduplicated.
    fn stripes_of(&self, chunks: &[u64]) -> Vec<usize> {
        let mut stripes: Vec<usize> = chunks.iter().map(|c| self.stripe(*c)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_chunks_lock_in_ascending_stripe_order() {
        let locks = ChunkLocks::default();
        let last = STRIPES as u64 - 1;
        // A group that wraps around the table, and a chunk sharing a stripe.
        assert_eq!(
            locks.stripes_of(&[last, last + 1, last + 2, 1 + STRIPES as u64 * 2]),
            vec![0, 1, last as usize]
        );
    }

    #[tokio::test]
    async fn exclusive_many_excludes_writers_of_each_chunk() {
        let locks = ChunkLocks::default();
        let held = locks.exclusive_many(&[5, 6]).await;
        assert_eq!(held.len(), 2);
        assert!(locks.stripes[6].try_read().is_err());
        assert!(locks.stripes[7].try_read().is_ok());
        drop(held);
        assert!(locks.stripes[6].try_read().is_ok());
    }
}
