//! Backups (docs/backups.md): the format — what a backup writes to an
//! object store and how it is read back and checked, with no I/O — and the
//! targets it is written to.
//!
//! - [`block`]: a volume is backed up in 64 KiB blocks, each named by its
//!   BLAKE3-256 ([`BlockHash`]) and lz4-compressed.
//! - [`pack`]: compressed blocks are packed into large objects, each ending
//!   with an index of its blocks and a checksummed trailer ([`PackBuilder`],
//!   [`PackTrailer`]).
//! - [`page`]: the block map of one GiB of a volume ([`Page`]): per block,
//!   zero or where its data lies.
//! - [`manifest`]: one backup ([`Manifest`]): the volume, its size, the
//!   snapshot, the parent backup, and the page of each GiB.
//! - [`layout`]: the object names under a target's prefix.
//! - [`target`]: where backups are kept (`file://`, `s3://`), through
//!   `object_store`, every object put create-if-absent.
//! - [`reader`]: a backup named by one URL, and reading any range of it
//!   back, every block checked.
//! - [`lease`]: an in-progress backup or restore says so on the target.
//! - [`catalog`]: the volumes and backups on a target, removing them,
//!   retention and garbage collection.
//! - [`recent`]: pages and manifests a backup wrote, kept for the next.
//! - [`transfer`]: writing a backup from a source of blocks and restoring
//!   one into a sink, with deduplication and ranged reads.
//!
//! Every decoder takes bytes that come from an object store, which anyone
//! with access to the bucket may have changed: it checks lengths, counts
//! and checksums and answers [`FormatError`], never a panic
//! (property-tested).

pub mod block;
pub mod catalog;
pub mod layout;
pub mod lease;
pub mod manifest;
pub mod pack;
pub mod page;
pub mod reader;
pub mod recent;
pub mod target;
#[cfg(test)]
mod testing;
pub mod transfer;

pub use block::{BLOCK_SIZE, BlockHash};
pub use manifest::Manifest;
pub use pack::{PackBuilder, PackEntry, PackTrailer};
pub use page::{BlockRef, PAGE_BLOCKS, Page};
pub use reader::{BackupReader, BackupUrl};

/// Bytes that are not what the format says they must be.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: truncated ({len} bytes, {need} needed)")]
    Truncated {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{what}: bad magic or version")]
    BadMagic { what: &'static str },
    #[error("{what}: checksum mismatch")]
    Checksum { what: &'static str },
    #[error("{what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// A mutex's guard, poisoned or not: what the crate's locks guard stays
/// consistent at every unlock, so a panic elsewhere leaves nothing half-done.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `what`'s bytes `at..at + len`, or [`FormatError::Truncated`].
pub(crate) fn slice<'a>(
    bytes: &'a [u8],
    at: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], FormatError> {
    at.checked_add(len)
        .and_then(|end| bytes.get(at..end))
        .ok_or(FormatError::Truncated {
            what,
            len: bytes.len(),
            need: at.saturating_add(len),
        })
}

pub(crate) fn u32_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u32, FormatError> {
    let b = slice(bytes, at, 4, what)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn u64_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u64, FormatError> {
    let b = slice(bytes, at, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_be_bytes(a))
}

pub(crate) fn hash_at(
    bytes: &[u8],
    at: usize,
    what: &'static str,
) -> Result<[u8; 32], FormatError> {
    let b = slice(bytes, at, 32, what)?;
    let mut a = [0u8; 32];
    a.copy_from_slice(b);
    Ok(a)
}
