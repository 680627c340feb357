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
mod index;
mod layer;
mod meta;
#[cfg(test)]
mod powercut;
mod snapshot;
mod store;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use bitmap::DEFAULT_CLEAR_INTERVAL;
pub use entry::zero_block_crc;
pub use error::StoreError;
pub use layer::BLOCK;
pub use snapshot::MAX_SNAPSHOT_NAME;
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

/// A clone's fill progress, kept for the engine (which gives it meaning);
/// records order by (done, filled_below).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRecord {
    pub source_engine: String,
    pub snapshot: String,
    pub auto_snapshot: bool,
    pub source_size: u64,
    pub filled_below: u64,
    pub done: bool,
    /// A restore: the backup it fills from (empty for a clone of an engine).
    #[serde(default)]
    pub backup: String,
    #[serde(default)]
    pub s3_endpoint: String,
}

/// One layer of the chain; the head (last) is the writable one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Stem of the layer's file names (`<name>.img`, `<name>.crc`).
    pub name: String,
    pub read_only: bool,
    /// Never reused within a store (0 for the head of a store made before snapshots).
    #[serde(default)]
    pub id: u32,
    /// The snapshot this layer is (read-only layers only).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// When the layer was frozen as a snapshot, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_unix_ms: u64,
    /// Length in bytes (the volume's size when it was frozen; 0 in records
    /// from before snapshots: the volume's size).
    #[serde(default)]
    pub size: u64,
    /// Deleted by the user; being merged into its child layer.
    #[serde(default)]
    pub deleting: bool,
    /// Merge cursor: blocks below it are already in the child layer.
    #[serde(default)]
    pub merged_blocks: u64,
}

impl LayerInfo {
    pub(crate) fn new(name: String, id: u32, read_only: bool, size: u64) -> Self {
        LayerInfo {
            name,
            read_only,
            id,
            snapshot: None,
            created_unix_ms: 0,
            size,
            deleting: false,
            merged_blocks: 0,
        }
    }
}

/// A snapshot as [`ReplicaStore::snapshots`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The volume's size when it was taken.
    pub size: u64,
    /// Bytes its layer occupies on the host filesystem.
    pub allocated_bytes: u64,
}

/// Space used by one layer, as [`ReplicaStore::layer_usage`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerUsage {
    /// The snapshot's name, or None for the writable head.
    pub snapshot: Option<String>,
    /// Bytes of the volume the layer can hold.
    pub provisioned_bytes: u64,
    /// Bytes its files occupy on the host filesystem.
    pub allocated_bytes: u64,
    /// Being merged away after a delete.
    pub deleting: bool,
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
    /// A clone's fill progress (None: not a clone).
    pub clone: Option<CloneRecord>,
    /// Whether the previous stop was clean (as found at open; true for a new store).
    pub clean_shutdown: bool,
}
