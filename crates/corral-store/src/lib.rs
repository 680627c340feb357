//! corral-store: a replica's on-disk store.
//!
//! One directory per replica, holding:
//!
//! - `meta.redb`: a redb database with the volume's identity and geometry, the fencing
//!   epoch, the membership record, the layer chain, the clean-shutdown flag and the
//!   write-intent (dirty-region) bitmap (module `meta`);
//! - `head.img`: the writable head layer, a sparse file of the volume's size;
//! - `head.crc`: one little-endian entry per 4 KiB block of `head.img`: "never written",
//!   "discarded", or the CRC32C of the written block (module `entry`); the layers stack
//!   into a chain, newest first, when a block is read (module `chain`).
//!
//! The API is synchronous and thread-safe: every method takes `&self`, the store is
//! `Send + Sync`, and the replica daemon calls it from tokio's blocking pool. Writes go to
//! the page cache with `pwrite` and become durable on [`ReplicaStore::flush`] (or with
//! [`ReplicaStore::write_fua`]); the dirty bitmap (module `bitmap`) bounds the work after an
//! unclean stop. See `docs/on-disk-format.md` for the format and the recovery rules.

mod bitmap;
mod chain;
mod entry;
mod error;
mod layer;
mod meta;
#[cfg(test)]
mod powercut;
mod store;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use bitmap::DEFAULT_CLEAR_INTERVAL;
pub use entry::zero_block_crc;
pub use error::StoreError;
pub use layer::BLOCK;
pub use store::{
    CreateParams, MAX_CHECKSUM_RANGE, MAX_CHUNK_SIZE, MAX_IO_LEN, MIN_CHUNK_SIZE, MIN_REGION_SIZE,
    ReplicaStore,
};

pub use corral_types::{Epoch, Generation, ReplicaMode};

/// One replica in a membership record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub address: String,
    pub instance_id: String,
    pub mode: ReplicaMode,
}

/// The volume's replica set as last recorded by an engine, with its generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub generation: Generation,
    /// Epoch of the engine that wrote this record. Records are ordered by
    /// (epoch, generation): a newer engine's records supersede an older one's.
    #[serde(default)]
    pub epoch: Epoch,
    pub members: Vec<Member>,
}

/// A frontend's state that must outlive the engine (SCSI persistent
/// reservations), recorded like the membership. The store keeps `state`
/// opaque; records order by (epoch, sequence).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// Epoch of the engine that wrote it.
    pub epoch: Epoch,
    /// Bumped by every save, continued by the next engine.
    pub sequence: u64,
    pub state: Vec<u8>,
}

/// One layer of the chain; the head (last) is the writable one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub read_only: bool,
}

/// What [`ReplicaStore::meta`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    pub instance_id: String,
    pub epoch: Epoch,
    pub membership: Membership,
    pub layers: Vec<LayerInfo>,
    /// The last reservation record saved (None: never).
    pub reservations: Option<ReservationRecord>,
    /// Whether the previous stop was clean (as found at open; true for a new store).
    pub clean_shutdown: bool,
}
