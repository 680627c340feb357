//! Error type of the store.
//!
//! Owns [`StoreError`] and the helpers that turn `std::io` and redb errors into it with a
//! one-line context naming the file and offset involved. `ENOSPC` and `EDQUOT` become
//! [`StoreError::NoSpace`] wherever they come from (data files or metadata).

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in a replica store. Every message is one line and names the
/// file and offset (or key) involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error other than running out of space.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The filesystem holding the replica is full (ENOSPC or EDQUOT).
    #[error("no space left on device: {context}")]
    NoSpace { context: String },
    /// A 4 KiB block's data does not match its stored CRC32C: the copy is corrupt and must be
    /// repaired from another replica.
    #[error(
        "checksum mismatch in the 4 KiB block at byte offset {offset}: stored crc32c {stored:#010x}, computed {computed:#010x}"
    )]
    ChecksumMismatch {
        /// Byte offset of the block (a multiple of 4096).
        offset: u64,
        stored: u32,
        computed: u32,
    },
    /// A write's payload does not match the CRC32C its sender computed: it was corrupted
    /// on the way, and nothing of it was stored.
    #[error(
        "write at {offset} of {len} bytes: payload CRC32C {computed:#010x} does not match the sender's {sent:#010x}"
    )]
    PayloadChecksum {
        offset: u64,
        len: u64,
        computed: u32,
        sent: u32,
    },
    /// The byte range `offset..offset+len` does not fit in a volume of `size` bytes.
    #[error("range out of bounds: offset {offset} + length {len} exceeds volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A request carried an epoch older than the one recorded: it comes from a fenced engine.
    #[error("stale epoch: the replica is at epoch {current}, the request carried {given}")]
    StaleEpoch {
        current: corral_types::Epoch,
        given: corral_types::Epoch,
    },
    /// A membership record older than the one recorded.
    #[error(
        "stale membership generation: the replica is at generation {current}, the update carried {given}"
    )]
    StaleGeneration {
        current: corral_types::Generation,
        given: corral_types::Generation,
    },
    /// A reservation record older, by (epoch, sequence), than the one recorded.
    #[error(
        "stale reservation record: the replica holds ({current_epoch}, {current_sequence}), the update carried ({given_epoch}, {given_sequence})"
    )]
    StaleReservations {
        current_epoch: corral_types::Epoch,
        current_sequence: u64,
        given_epoch: corral_types::Epoch,
        given_sequence: u64,
    },
    /// `create` found a store already in this directory.
    #[error("a replica store already exists in {}", .0.display())]
    AlreadyExists(PathBuf),
    /// `open` found no store in this directory.
    #[error("no replica store in {}", .0.display())]
    NotFound(PathBuf),
    /// A caller-supplied argument is not acceptable (bad geometry, oversized request, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The metadata database failed or holds something we cannot decode.
    #[error("metadata: {0}")]
    Metadata(String),
    /// No snapshot of that name (or it is being deleted).
    #[error("no snapshot named {0:?}")]
    NoSuchSnapshot(String),
    /// The operation must wait for something in progress (a snapshot delete still merging).
    #[error("busy: {0}")]
    Busy(String),
    /// A read asked to be served from the page cache only needs the disk
    /// (internal: `ReplicaStore::read_cached` answers it as `None`).
    #[error("the data is not in the page cache")]
    NotCached,
}

impl StoreError {
    /// True if the error means the filesystem is out of space (the engine reports this to the
    /// initiator as a space-allocation failure rather than a medium error).
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Io { source, .. } => is_no_space_io(source),
            _ => false,
        }
    }

    /// True if the error is a checksum mismatch (the data on this replica is corrupt).
    pub fn is_checksum_mismatch(&self) -> bool {
        matches!(self, StoreError::ChecksumMismatch { .. })
    }
}

/// A cache-only read's outcome: `None` where it missed the page cache.
pub(crate) fn unless_not_cached<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Err(StoreError::NotCached) => Ok(None),
        other => other.map(Some),
    }
}

fn is_no_space_io(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Wraps an I/O error with its context, mapping ENOSPC/EDQUOT to [`StoreError::NoSpace`].
pub(crate) fn io_err(context: impl Into<String>, source: io::Error) -> StoreError {
    let context = context.into();
    if is_no_space_io(&source) {
        StoreError::NoSpace {
            context: format!("{context}: {source}"),
        }
    } else {
        StoreError::Io { context, source }
    }
}

/// Wraps a redb error with its context. redb I/O errors that mean "disk full" become
/// [`StoreError::NoSpace`]; everything else is [`StoreError::Metadata`].
pub(crate) fn redb_err(context: impl AsRef<str>, e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    let context = context.as_ref();
    match e {
        redb::Error::Io(io) if is_no_space_io(&io) => StoreError::NoSpace {
            context: format!("{context}: {io}"),
        },
        other => StoreError::Metadata(format!("{context}: {}", one_line(&other.to_string()))),
    }
}

/// Collapses a multi-line message onto one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
