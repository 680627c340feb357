//! Per-chunk ordering between the writers and the copiers.
//!
//! Client writes hold a chunk's lock shared while they are in flight; a
//! rebuild copy, a repair and a verify hold it exclusively while they
//! compare, read and write that chunk. So a copy can never carry old data
//! over a newer write (Longhorn #4354), and a comparison never sees a write
//! half applied. The table is striped: chunks share a lock when their index
//! is equal modulo the stripe count, which costs a little false sharing and
//! no memory per chunk. Exclusive holders take one stripe at a time, so
//! there is no lock-order cycle.
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
}
