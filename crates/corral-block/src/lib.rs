//! The seam between frontends and backends.
//!
//! Frontends (NBD, iSCSI) translate their wire protocol into calls on a
//! [`BlockDevice`]; backends (the engine's replicated volume, a plain file)
//! implement it. Nothing here knows about replication or about any protocol.
//!
//! Offsets and lengths are in bytes. A device accepts any byte range inside
//! `[0, size)`; frontends enforce their own alignment rules before calling.

use std::future::Future;

use bytes::Bytes;

pub mod accept;
pub mod file;
pub mod inline_io;
pub mod send_queue;

pub use file::FileDevice;

/// Why a block operation failed, in terms a frontend can map onto its own
/// error codes (NBD errno values, SCSI sense data).
#[derive(Clone, Debug, thiserror::Error)]
pub enum BlockError {
    /// The byte range does not fit inside the device.
    #[error("range [{offset}, {offset}+{len}) is outside the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The request is malformed in a way other than its range.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backing storage is full.
    #[error("no space left on the backing storage: {0}")]
    NoSpace(String),
    /// Stored data failed its checksum and no good copy could be found.
    #[error("data integrity error: {0}")]
    Integrity(String),
    /// The device cannot serve the request now (no healthy replica, fenced, shutting down).
    #[error("device unavailable: {0}")]
    Unavailable(String),
    /// Any other I/O failure, with context.
    #[error("I/O error: {0}")]
    Io(String),
}

impl BlockError {
    /// The closest POSIX errno, used by frontends whose protocol carries one.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } | BlockError::Invalid(_) => libc::EINVAL,
            BlockError::NoSpace(_) => libc::ENOSPC,
            BlockError::Integrity(_) | BlockError::Unavailable(_) | BlockError::Io(_) => libc::EIO,
        }
    }
}

/// Result of a block operation.
pub type BlockResult<T> = Result<T, BlockError>;

/// A virtual disk: what every frontend serves.
///
/// Implementations must be safe to call concurrently; the ordering of
/// concurrent overlapping writes is unspecified (as for any disk), but every
/// write that returned `Ok` must be visible to every later read, and must
/// survive a crash once a later `flush` (or the write itself with `fua`)
/// returned `Ok`.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes (a multiple of `block_size`).
    fn size(&self) -> u64;

    /// Preferred logical block size in bytes (512 or 4096).
    fn block_size(&self) -> u32;

    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = BlockResult<Bytes>> + Send;

    /// Write `data` at `offset`; with `fua`, the data is on stable storage when this returns.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = BlockResult<()>> + Send;

    /// Make every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = BlockResult<()>> + Send;

    /// Discard a range; it reads back as zeroes afterwards.
    fn unmap(&self, offset: u64, len: u64) -> impl Future<Output = BlockResult<()>> + Send;

    /// Write zeroes over a range (the device may deallocate it).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = BlockResult<()>> + Send;

    /// The reservation state a frontend last saved with
    /// [`BlockDevice::save_reservations`] (None: never). Opaque to the device.
    fn load_reservations(&self) -> impl Future<Output = BlockResult<Option<Bytes>>> + Send;

    /// Save a frontend's reservation state (SCSI persistent reservations) so
    /// that it outlives the frontend: a replicated volume records it on its
    /// replicas, where the next engine finds it. Returns once it is durable;
    /// on error nothing may be assumed saved.
    fn save_reservations(&self, state: Bytes) -> impl Future<Output = BlockResult<()>> + Send;
}

/// Check that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_reject_overflow_and_tail() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(1, 4096, 4096).is_err());
        assert!(check_range(u64::MAX, 2, 4096).is_err());
    }
}
