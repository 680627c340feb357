//! Test helpers shared by the crate's tests: a sparse volume in memory
//! (a source and a sink of blocks) and a `file://` target.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::block::BLOCK_SIZE;
use crate::target::{S3Settings, Target};
use crate::transfer::{BackupSpec, BlockSink, BlockSource};

pub const GIB: u64 = 1 << 30;

/// A sparse volume in memory: the blocks that are not zero.
#[derive(Default)]
pub struct MemoryVolume(pub Mutex<HashMap<u64, Vec<u8>>>);

impl MemoryVolume {
    /// Block `index` becomes pseudo-random bytes from `seed` (they
    /// do not compress, so packs fill).
    pub fn set(&self, index: u64, seed: u8) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
        let data: Vec<u8> = (0..BLOCK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        self.0.lock().unwrap().insert(index, data);
    }
    pub fn snapshot(&self) -> HashMap<u64, Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
}

impl BlockSource for MemoryVolume {
    async fn read_block(&self, index: u64) -> Result<bytes::Bytes, String> {
        Ok(bytes::Bytes::from(
            self.0
                .lock()
                .unwrap()
                .get(&index)
                .cloned()
                .unwrap_or_else(|| vec![0u8; BLOCK_SIZE]),
        ))
    }
}

impl BlockSink for MemoryVolume {
    async fn write_block(&self, index: u64, data: Vec<u8>) -> Result<(), String> {
        self.0.lock().unwrap().insert(index, data);
        Ok(())
    }
}

/// A backup of volume "db" named `name`, with small packs.
pub fn spec(name: &str, size: u64) -> BackupSpec {
    BackupSpec {
        volume: "db".into(),
        name: name.into(),
        snapshot: format!("snap-{name}"),
        size,
        created_unix_ms: 1,
        pack_bytes: 300 << 10,
    }
}

pub fn file_target(dir: &std::path::Path) -> Target {
    Target::open(&format!("file://{}", dir.display()), &S3Settings::default()).unwrap()
}
