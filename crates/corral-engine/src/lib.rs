//! The volume controller (`corral engine`): one per volume.
//!
//! It owns the replica set and the consistency protocol, and exposes the
//! volume as a [`corral_block::BlockDevice`] for the frontends. [`engine`]
//! runs it as a library ([`Engine::start`]); the rest, from the bottom up
//! (each module uses only those above it in this list's layers — no
//! circles):
//!
//! - leaves: [`config`], [`error`], [`chunk`], [`locks`], [`drain`], and the pure
//!   core [`members`];
//! - [`chunk`]: cutting the address space into chunks, the unit of ordering;
//! - [`progress`]: a rebuild's progress as the status calls see it;
//! - [`client`]: one replica daemon seen from the engine — control calls and
//!   a few pipelined, batched data streams, sharded by chunk;
//! - [`members`]: the pure state machine of the members — modes (RW/WO/ERR),
//!   membership generations, what each may have missed, catch-up plans;
//! - [`replica_set`]: its async shell — connections, recording memberships;
//! - [`open`]: starting over existing replicas — the election (pure, unit
//!   tested rule by rule), fencing, resync;
//! - [`volume`]: the data path (fan-out writes, failover and repair on
//!   read, flush, verify); [`locks`]: per-chunk ordering with copiers;
//!   [`write_through`]: when a write goes FUA and a flush needs no round;
//!   [`drain`]: which writes a flush round waits for;
//! - [`rebuild`]: the copier that brings a WO replica up to date;
//!   [`chain_sync`]: the snapshots a returning replica missed, replayed
//!   before it joins;
//! - [`supervisor`]: pings, stale-replica expiry, bringing replicas back;
//! - [`control`]: the engine's control gRPC service; [`metrics`]: Prometheus;
//! - [`backup`]: backing a snapshot up to a target (issue 12, in progress).

pub mod backup;
pub mod chain_sync;
pub mod chunk;
pub mod client;
pub mod clone;
pub mod config;
pub mod control;
pub mod drain;
pub mod engine;
pub mod error;
pub mod locks;
pub mod members;
pub mod metrics;
pub mod open;
pub mod progress;
pub mod rebuild;
pub mod replica_set;
pub mod supervisor;
pub mod volume;
pub mod write_through;

pub use config::{CloneSource, EngineConfig, RestoreSource, WritePolicy};

/// This engine process's identity when it opens replicas: random, never 0.
/// A replica open at an epoch refuses that epoch to any other engine, so
/// two engines that pick the same epoch at once cannot both serve with it
/// (`OpenReplicaRequest.engine_id`).
pub fn engine_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // std's RandomState is seeded from the OS per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish().max(1)
    })
}
pub use engine::{Engine, EngineHandle, EngineOptions, EngineStatus, Frontends, ServingFrontends};
pub use error::{EngineError, OpenWait};
pub use volume::Volume;
