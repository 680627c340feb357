//! The volume controller (`corral engine`): one per volume.
//!
//! It owns the replica set and the consistency protocol, and exposes the
//! volume as a [`corral_block::BlockDevice`] for the frontends.
//!
//! - [`chunk`]: cutting the address space into chunks, the unit of ordering;
//! - [`client`]: one replica daemon seen from the engine — control calls and
//!   a few pipelined, batched data streams, sharded by chunk;
//! - [`replica_set`]: modes (RW/WO/ERR), membership generations, failures;
//! - [`open`]: starting over existing replicas — election and fencing;
//! - [`volume`]: the data path (fan-out writes, failover reads, flush);
//! - [`control`]: the engine's control gRPC service.

pub mod chunk;
pub mod client;
pub mod config;
pub mod control;
pub mod error;
pub mod open;
pub mod replica_set;
pub mod volume;

pub use config::{EngineConfig, WritePolicy};
pub use error::EngineError;
pub use volume::Volume;
