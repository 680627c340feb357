//! Tests of the store: unit tests of the public API ([`unit`]), a concurrency stress test
//! ([`concurrency`]), the model-based property test ([`model`]), the power-loss model
//! ([`power_loss`]) and the upgrade from format 1 ([`upgrade`]).

mod concurrency;
mod model;
mod power_loss;
mod snapshots;
mod unit;
mod upgrade;

use std::path::Path;

use proptest::test_runner::TestCaseError;

use crate::{CreateParams, ReplicaStore, StoreError};

/// A store error as a property test's failure, with what was being done.
pub(crate) fn no_mismatch<T>(r: Result<T, StoreError>, what: &str) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
}

pub(crate) fn params(size: u64, chunk_size: u32) -> CreateParams {
    CreateParams {
        volume: "vol-test".into(),
        size,
        block_size: 512,
        chunk_size,
        instance_id: "inst-1".into(),
    }
}

/// A store with a small region size, to exercise several write-intent regions.
pub(crate) fn small_store(dir: &Path, size: u64, chunk: u32, region: u64) -> ReplicaStore {
    ReplicaStore::create_with_region_size(dir, params(size, chunk), region).unwrap()
}

/// Deterministic test pattern; `seed == 0` gives zeroes.
pub(crate) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    if seed == 0 {
        return vec![0; len];
    }
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) ^ ((i >> 8) as u8))
        .collect()
}
