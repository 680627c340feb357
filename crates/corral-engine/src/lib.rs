//! The volume controller (`corral engine`): one per volume.
//!
//! It owns the replica set and the consistency protocol, and exposes the
//! volume as a [`corral_block::BlockDevice`] for the frontends. [`engine`]
//! runs it as a library ([`Engine::start`]); the rest, from the bottom up
//! (each module uses only those above it in this list's layers — no
//! circles):
//!
//! - leaves: [`config`], [`error`], [`chunk`], [`locks`], and the pure
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
//! - [`rebuild`]: the copier that brings a WO replica up to date;
//! - [`supervisor`]: pings, stale-replica expiry, bringing replicas back;
//! - [`control`]: the engine's control gRPC service; [`metrics`]: Prometheus.

pub mod chunk;
pub mod client;
pub mod config;
pub mod control;
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

pub use config::{EngineConfig, WritePolicy};
pub use engine::{Engine, EngineHandle, EngineOptions, EngineStatus, Frontends, ServingFrontends};
pub use error::{EngineError, OpenWait};
pub use volume::Volume;
