//! One layer of a replica: a sparse data file (`<name>.img`) and its checksum file
//! (`<name>.crc`, one little-endian CRC32C per 4 KiB block).
//!
//! Owns the raw positional I/O on the file pair, hole punching and `fdatasync`. What an
//! entry of the checksum file means is module `entry`'s; how layers stack is module
//! `chain`'s. A layer knows nothing about locking or the write-intent bitmap: the store
//! orders calls to it.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Result, StoreError, io_err};

/// Checksum granularity in bytes.
pub const BLOCK: u64 = 4096;
/// Bytes per stored checksum.
const CRC_LEN: u64 = 4;
/// The most a single `pwrite` puts into the data file, and the boundary its pieces keep to
/// (decision 62). The kernel sizes a new page-cache folio by the write that creates it:
/// one 256 KiB write makes a 256 KiB folio, and on ext4 every later 4 KiB write into that
/// folio walks all of the folio's 64 block buffers. Random 4 KiB writes into regions first
/// written in large pieces (a rebuild, a clone's fill, a restore, a guest's sequential
/// writes) then cost about twice the CPU. Pieces of 16 KiB keep folios at four blocks, for
/// a few more system calls per large write.
pub(crate) const MAX_FOLIO_WRITE: usize = 16 << 10;

/// The most one direct (`O_DIRECT`) write moves, and the size of each thread's aligned
/// bounce buffer for them (decision 69).
const DIRECT_PIECE: usize = 1 << 20;
/// The memory alignment of a direct write's buffer (its offset and length are whole
/// 4 KiB blocks): enough for any disk's logical block.
const DIRECT_ALIGN: usize = 4096;
/// The largest page-cache folio the kernel makes (a PMD, 2 MiB on x86-64 and arm64 with
/// 4 KiB pages). A direct write invalidates every cached folio it overlaps; a caller keeps
/// other writers off the folio-aligned neighbourhood of its range (see
/// [`Layer::write_data_direct`]).
pub(crate) const LARGEST_FOLIO: u64 = 2 << 20;

thread_local! {
    /// Per blocking thread: the bounce buffer of direct writes (a received payload is
    /// rarely aligned for `O_DIRECT`), kept so its pages are touched once.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How [`Layer::write_data_direct`] wrote its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteVia {
    /// Past the page cache: on the disk (not durable before a sync: the disk's own
    /// cache), nothing of it cached.
    Direct,
    /// Through the page cache, as [`Layer::write_data`] does, because the file or the
    /// filesystem takes no direct writes.
    PageCache,
}

/// Names of a layer's two files inside the replica directory.
pub(crate) fn file_names(layer: &str) -> (String, String) {
    (format!("{layer}.img"), format!("{layer}.crc"))
}

/// Whether a read may wait for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fetch {
    /// From the page cache or, where it misses, the disk.
    MayWait,
    /// From the page cache only (`RWF_NOWAIT`): a read that would wait for
    /// the disk fails with [`StoreError::NotCached`] instead. For a caller on
    /// an async runtime thread, which must not park on the disk.
    CachedOnly,
}

/// A data file and its checksum file.
#[derive(Debug)]
pub(crate) struct Layer {
    data: File,
    crc: File,
    data_path: PathBuf,
    crc_path: PathBuf,
    data_name: String,
    /// The data file opened again with `O_DIRECT`, on the first direct write (`None`:
    /// the filesystem refused it).
    direct: OnceLock<Option<File>>,
    /// Set when a direct write was refused (`EINVAL`): later ones go through the page
    /// cache without trying.
    direct_refused: AtomicBool,
}

impl Layer {
    /// Creates (or truncates) the file pair for a new layer of `size` bytes, sparse, and
    /// makes both files durable.
    pub(crate) fn create(dir: &Path, name: &str, size: u64) -> Result<Self> {
        Self::create_with(dir, name, size, true)
    }

    /// [`Layer::create`] without the fsyncs: for a layer that a later
    /// [`Layer::sync`] and directory sync make durable before any record
    /// names it (an fsync of a new file commits ext4's journal, which writes
    /// back every dirty block it orders: tens of milliseconds under load).
    pub(crate) fn create_unsynced(dir: &Path, name: &str, size: u64) -> Result<Self> {
        Self::create_with(dir, name, size, false)
    }

    fn create_with(dir: &Path, name: &str, size: u64, durable: bool) -> Result<Self> {
        let blocks = size / BLOCK;
        let (data_name, crc_name) = file_names(name);
        let data_path = dir.join(&data_name);
        let crc_path = dir.join(&crc_name);
        let data = create_sized(&data_path, size, durable)?;
        let crc_len = blocks
            .checked_mul(CRC_LEN)
            .ok_or_else(|| StoreError::Invalid(format!("size {size} is too large")))?;
        let crc = create_sized(&crc_path, crc_len, durable)?;
        Ok(Layer {
            data,
            crc,
            data_path,
            crc_path,
            data_name,
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        })
    }

    /// Opens an existing file pair and checks both sizes against the volume size.
    pub(crate) fn open(dir: &Path, name: &str, size: u64, writable: bool) -> Result<Self> {
        let blocks = size / BLOCK;
        let (data_name, crc_name) = file_names(name);
        let data_path = dir.join(&data_name);
        let crc_path = dir.join(&crc_name);
        let data = open_file(&data_path, writable)?;
        let crc = open_file(&crc_path, writable)?;
        check_len(&data, &data_path, size)?;
        check_len(&crc, &crc_path, blocks.saturating_mul(CRC_LEN))?;
        Ok(Layer {
            data,
            crc,
            data_path,
            crc_path,
            data_name,
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        })
    }

    /// Reads `buf.len()` bytes of data at byte `offset`.
    pub(crate) fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_data_with(offset, buf, Fetch::MayWait)
    }

    /// [`Layer::read_data`], from the page cache only if `fetch` says so.
    pub(crate) fn read_data_with(&self, offset: u64, buf: &mut [u8], fetch: Fetch) -> Result<()> {
        if fetch == Fetch::CachedOnly {
            return read_cached(&self.data, buf, offset);
        }
        self.data.read_exact_at(buf, offset).map_err(|e| {
            io_err(
                format!(
                    "reading {} bytes of {} at offset {offset}",
                    buf.len(),
                    self.data_path.display()
                ),
                e,
            )
        })
    }

    /// Writes `buf` at byte `offset` of the data file.
    pub(crate) fn write_data(&self, offset: u64, buf: &[u8]) -> Result<()> {
        #[cfg(test)]
        crate::powercut::wrote(&self.data_path, offset, buf);
        write_in_small_folios(&self.data, buf, offset)
            .map_err(|e| self.write_error(buf.len(), offset, e))
    }

    /// Writes `buf` (whole 4 KiB blocks) at `offset` (block-aligned) of the data file
    /// past the page cache: `O_DIRECT` writes of at most [`DIRECT_PIECE`] through this
    /// thread's aligned bounce buffer. A large write costs the kernel far less this way
    /// than through the page cache (no page to allocate, fill, write back and drop), and
    /// the blocks reach the disk as the call returns; they are durable after the next
    /// sync, as a cached write is.
    ///
    /// The kernel writes back and invalidates the cached folios the range overlaps. A
    /// folio dirtied by another writer between those two steps cannot be invalidated,
    /// and Linux then reports `EIO` to the file's next `fdatasync`: the caller must keep
    /// every other writer of this file off the range rounded out to [`LARGEST_FOLIO`].
    /// Where the filesystem refuses direct I/O, writes through the page cache instead
    /// and says so.
    pub(crate) fn write_data_direct(&self, offset: u64, buf: &[u8]) -> Result<WriteVia> {
        let aligned = offset.is_multiple_of(BLOCK) && (buf.len() as u64).is_multiple_of(BLOCK);
        let direct = match self.direct_file() {
            Some(f) if aligned && !self.direct_refused.load(Ordering::Relaxed) => f,
            _ => return self.write_data(offset, buf).map(|()| WriteVia::PageCache),
        };
        #[cfg(test)]
        crate::powercut::wrote(&self.data_path, offset, buf);
        let mut done = 0usize;
        while done < buf.len() {
            let n = DIRECT_PIECE.min(buf.len() - done);
            let at = offset + done as u64;
            match write_through_bounce(direct, &buf[done..done + n], at) {
                Ok(true) => done += n,
                // Refused (EINVAL: alignment the device wants, or no direct I/O after
                // all) or no aligned buffer: the rest through the page cache.
                Ok(false) => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                    tracing::debug!(file = %self.data_path.display(), "direct writes refused; writing through the page cache");
                    write_in_small_folios(&self.data, &buf[done..], at)
                        .map_err(|e| self.write_error(buf.len() - done, at, e))?;
                    return Ok(WriteVia::PageCache);
                }
                Err(e) => return Err(self.write_error(n, at, e)),
            }
        }
        Ok(WriteVia::Direct)
    }

    /// Test-only: later direct writes go through the page cache, as on a filesystem
    /// that refuses `O_DIRECT`.
    #[cfg(test)]
    pub(crate) fn refuse_direct_writes(&self) {
        self.direct_refused.store(true, Ordering::Relaxed);
    }

    /// The `O_DIRECT` descriptor of the data file, opened on first use.
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&self.data_path)
                    .map_err(|e| {
                        tracing::debug!(file = %self.data_path.display(), error = %e, "no direct writes");
                    })
                    .ok()
            })
            .as_ref()
    }

    fn write_error(&self, len: usize, offset: u64, e: io::Error) -> StoreError {
        io_err(
            format!(
                "writing {len} bytes to {} at offset {offset}",
                self.data_path.display()
            ),
            e,
        )
    }

    /// Reads the stored checksums of `count` blocks starting at block `first`.
    pub(crate) fn read_crcs(&self, first: u64, count: usize) -> Result<Vec<u32>> {
        self.read_crcs_with(first, count, Fetch::MayWait)
    }

    /// [`Layer::read_crcs`], from the page cache only if `fetch` says so.
    pub(crate) fn read_crcs_with(
        &self,
        first: u64,
        count: usize,
        fetch: Fetch,
    ) -> Result<Vec<u32>> {
        let mut raw = vec![0u8; count.saturating_mul(CRC_LEN as usize)];
        let pos = first.saturating_mul(CRC_LEN);
        if fetch == Fetch::CachedOnly {
            read_cached(&self.crc, &mut raw, pos)?;
        } else {
            self.crc.read_exact_at(&mut raw, pos).map_err(|e| {
                io_err(
                    format!(
                        "reading checksums of blocks {first}..{} from {}",
                        first.saturating_add(count as u64),
                        self.crc_path.display()
                    ),
                    e,
                )
            })?;
        }
        Ok(raw
            .chunks_exact(CRC_LEN as usize)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Stores the checksums of `crcs.len()` blocks starting at block `first`.
    pub(crate) fn write_crcs(&self, first: u64, crcs: &[u32]) -> Result<()> {
        let raw: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        let pos = first.saturating_mul(CRC_LEN);
        #[cfg(test)]
        crate::powercut::wrote(&self.crc_path, pos, &raw);
        self.crc.write_all_at(&raw, pos).map_err(|e| {
            io_err(
                format!(
                    "writing checksums of blocks {first}..{} to {}",
                    first.saturating_add(crcs.len() as u64),
                    self.crc_path.display()
                ),
                e,
            )
        })
    }

    /// Stores the same entry for `count` blocks starting at block `first`.
    pub(crate) fn fill_crcs(&self, first: u64, count: u64, entry: u32) -> Result<()> {
        const PIECE: u64 = 64 * 1024; // entries per write: 256 KiB
        let piece = vec![entry; PIECE.min(count) as usize];
        let mut done = 0;
        while done < count {
            let n = PIECE.min(count - done);
            self.write_crcs(first + done, &piece[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Deallocates `len` bytes of data at `offset` (both block-aligned): punches a hole, or
    /// writes zeroes where the filesystem cannot punch holes.
    pub(crate) fn punch(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match punch_hole(&self.data, offset, len) {
            Ok(()) => {
                #[cfg(test)]
                crate::powercut::punched(&self.data_path, offset, len);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) =>
            {
                self.write_zeroes_fallback(offset, len)
            }
            Err(e) => Err(io_err(
                format!(
                    "punching a hole of {len} bytes in {} at offset {offset}",
                    self.data_path.display()
                ),
                e,
            )),
        }
    }

    fn write_zeroes_fallback(&self, offset: u64, len: u64) -> Result<()> {
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            self.write_data(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// The same files through new descriptors: to sync a layer without holding the
    /// chain's lock across the `fdatasync` (a snapshot's switch of heads waits for that
    /// lock).
    pub(crate) fn try_clone(&self) -> Result<Self> {
        let dup = |f: &File, p: &Path| {
            f.try_clone()
                .map_err(|e| io_err(format!("duplicating the descriptor of {}", p.display()), e))
        };
        Ok(Layer {
            data: dup(&self.data, &self.data_path)?,
            crc: dup(&self.crc, &self.crc_path)?,
            data_path: self.data_path.clone(),
            crc_path: self.crc_path.clone(),
            data_name: self.data_name.clone(),
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        })
    }

    /// `fdatasync` of both files: every write that completed before the call is durable
    /// when it returns.
    pub(crate) fn sync(&self) -> Result<()> {
        self.sync_data_file()?;
        self.sync_crc_file()
    }

    /// `fdatasync` of the data file only: the blocks of every write that completed before
    /// the call are durable (their entries, in dirty regions, are recovered from them).
    pub(crate) fn sync_data_file(&self) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| io_err(format!("fdatasync {}", self.data_path.display()), e))?;
        #[cfg(test)]
        crate::powercut::synced(&self.data_path);
        Ok(())
    }

    /// Asks the kernel to drop this layer's pages from the page cache (for
    /// tests of reads that miss it).
    pub(crate) fn drop_page_cache(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        for (f, path) in [(&self.data, &self.data_path), (&self.crc, &self.crc_path)] {
            // SAFETY: fadvise only reads its integer arguments; `f` owns the descriptor.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(io_err(
                    format!("posix_fadvise DONTNEED {}", path.display()),
                    std::io::Error::from_raw_os_error(rc),
                ));
            }
        }
        Ok(())
    }

    /// Asks the kernel to drop the clean cached pages of `offset..offset+len`
    /// of the data file (dirty pages stay: call it after a sync).
    pub(crate) fn drop_cached_data(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: fadvise only reads its integer arguments; `self.data` owns the descriptor.
        let rc = unsafe {
            libc::posix_fadvise(self.data.as_raw_fd(), off, n, libc::POSIX_FADV_DONTNEED)
        };
        if rc != 0 {
            return Err(io_err(
                format!("posix_fadvise DONTNEED {}", self.data_path.display()),
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Asks the kernel to start writing `offset..offset+len` of the data
    /// file back to the disk now, without waiting for it: the next
    /// `fdatasync` then finds it written or under way. Durability is not
    /// changed (only a sync makes data durable); a failure is only advice
    /// not taken.
    pub(crate) fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(());
        };
        // SAFETY: sync_file_range only reads its integer arguments; `self.data` owns the descriptor.
        let rc = unsafe {
            libc::sync_file_range(self.data.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            return Err(io_err(
                format!("sync_file_range {}", self.data_path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// `fdatasync` of the checksum file only.
    pub(crate) fn sync_crc_file(&self) -> Result<()> {
        self.crc
            .sync_data()
            .map_err(|e| io_err(format!("fdatasync {}", self.crc_path.display()), e))?;
        #[cfg(test)]
        crate::powercut::synced(&self.crc_path);
        Ok(())
    }

    /// Runs of blocks `0..blocks` whose entry is not "never written", in
    /// order. Holes in the checksum file (never written) are skipped with
    /// `SEEK_DATA`/`SEEK_HOLE`, so the cost follows what was written.
    pub(crate) fn written_extents(&self, blocks: u64) -> Result<Vec<crate::index::Extent>> {
        const PIECE: u64 = 256 * 1024; // entries per read: 1 MiB of the checksum file
        let end = blocks.saturating_mul(CRC_LEN);
        let mut out: Vec<crate::index::Extent> = Vec::new();
        let mut pos = 0u64;
        while pos < end {
            let Some(data) = seek(&self.crc, pos, libc::SEEK_DATA)
                .map_err(|e| io_err(format!("seeking data in {}", self.crc_path.display()), e))?
            else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = seek(&self.crc, data, libc::SEEK_HOLE)
                .map_err(|e| io_err(format!("seeking a hole in {}", self.crc_path.display()), e))?
                .unwrap_or(end)
                .min(end);
            // Whole entries from the data segment.
            let mut b = data / CRC_LEN;
            let stop = hole.div_ceil(CRC_LEN).min(blocks);
            while b < stop {
                let n = PIECE.min(stop - b);
                for (i, e) in self.read_crcs(b, n as usize)?.into_iter().enumerate() {
                    if e == crate::entry::UNWRITTEN {
                        continue;
                    }
                    let blk = b + i as u64;
                    match out.last_mut() {
                        Some((_, pe)) if *pe == blk => *pe = blk + 1,
                        _ => out.push((blk, blk + 1)),
                    }
                }
                b += n;
            }
            pos = hole.max(pos + 1);
        }
        Ok(out)
    }

    /// Grows both files to hold a volume of `size` bytes (sparse) and makes
    /// the new lengths durable.
    pub(crate) fn grow(&self, size: u64) -> Result<()> {
        let crc_len = (size / BLOCK)
            .checked_mul(CRC_LEN)
            .ok_or_else(|| StoreError::Invalid(format!("size {size} is too large")))?;
        for (f, path, len) in [
            (&self.data, &self.data_path, size),
            (&self.crc, &self.crc_path, crc_len),
        ] {
            f.set_len(len)
                .map_err(|e| io_err(format!("growing {} to {len} bytes", path.display()), e))?;
            f.sync_all()
                .map_err(|e| io_err(format!("fsync {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Deallocates the entries of `count` blocks from `first` (they read as
    /// "never written") where the filesystem can punch holes, else writes them.
    pub(crate) fn punch_crcs(&self, first: u64, count: u64) -> Result<()> {
        match punch_hole(&self.crc, first * CRC_LEN, count * CRC_LEN) {
            Ok(()) => {
                #[cfg(test)]
                crate::powercut::punched(&self.crc_path, first * CRC_LEN, count * CRC_LEN);
                Ok(())
            }
            Err(_) => self.fill_crcs(first, count, crate::entry::UNWRITTEN),
        }
    }

    /// Bytes the two files occupy on the host filesystem.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        [&self.data, &self.crc]
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.blocks().saturating_mul(512))
            .sum()
    }

    /// The data file's name, for messages.
    pub(crate) fn data_name(&self) -> &str {
        &self.data_name
    }
}

/// One direct write of `piece` (at most [`DIRECT_PIECE`]) at `offset` through this
/// thread's bounce buffer. `Ok(false)`: not written, because the kernel refused the
/// direct write (`EINVAL`) or no aligned buffer could be had.
fn write_through_bounce(direct: &File, piece: &[u8], offset: u64) -> io::Result<bool> {
    BOUNCE.with(|cell| {
        let mut bounce = cell.borrow_mut();
        if bounce.len() < DIRECT_PIECE + DIRECT_ALIGN {
            bounce.resize(DIRECT_PIECE + DIRECT_ALIGN, 0);
        }
        let shift = bounce.as_ptr().align_offset(DIRECT_ALIGN);
        if shift >= DIRECT_ALIGN {
            return Ok(false);
        }
        let out = &mut bounce[shift..shift + piece.len()];
        out.copy_from_slice(piece);
        match direct.write_all_at(out, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    })
}

fn create_sized(path: &Path, len: u64, durable: bool) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err(format!("creating {}", path.display()), e))?;
    f.set_len(len)
        .map_err(|e| io_err(format!("sizing {} to {len} bytes", path.display()), e))?;
    if durable {
        f.sync_all()
            .map_err(|e| io_err(format!("fsync {}", path.display()), e))?;
    }
    Ok(f)
}

fn open_file(path: &Path, writable: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| io_err(format!("opening {}", path.display()), e))
}

fn check_len(f: &File, path: &Path, expected: u64) -> Result<()> {
    let len = f
        .metadata()
        .map_err(|e| io_err(format!("stat {}", path.display()), e))?
        .len();
    if len != expected {
        return Err(StoreError::Metadata(format!(
            "{} is {len} bytes, expected {expected} for this volume",
            path.display()
        )));
    }
    Ok(())
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; None when no data follows `from` (ENXIO).
fn seek(f: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is owned by `f`, which
    // outlives the call. It moves the file offset, which positional I/O never uses.
    let rc = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(rc as u64))
}

/// Reads exactly `buf.len()` bytes at `offset` if the page cache holds them
/// all (`preadv2` with `RWF_NOWAIT`). Anything else — a miss (`EAGAIN`), a
/// short read, a kernel or filesystem without `RWF_NOWAIT`, an error — is
/// [`StoreError::NotCached`]: the caller reads again the blocking way, which
/// reports a real error with its context.
fn read_cached(f: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(StoreError::NotCached);
    };
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, valid for writes of its length for the
    // whole call; the descriptor is owned by `f`, which outlives the call.
    let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if usize::try_from(n).ok() == Some(buf.len()) {
        Ok(())
    } else {
        Err(StoreError::NotCached)
    }
}

/// Removes a layer's two files if they exist.
pub(crate) fn remove_files(dir: &Path, layer: &str) -> Result<()> {
    let (d, c) = file_names(layer);
    for name in [d, c] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", path.display()), e)),
        }
    }
    Ok(())
}

fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let l = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `f`,
        // which outlives the call.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `buf` written at `offset` in pieces that never cross a [`MAX_FOLIO_WRITE`] boundary of
/// the file, so that no piece makes the page cache allocate a folio larger than that.
pub(crate) fn write_in_small_folios(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let piece = MAX_FOLIO_WRITE as u64;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let n = ((piece - pos % piece) as usize).min(buf.len() - done);
        file.write_all_at(&buf[done..done + n], pos)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_small_folios_lands_whole_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let buf: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        // Unaligned start, crossing several piece boundaries, ending mid-piece.
        write_in_small_folios(&file, &buf, 5_000).unwrap();
        let mut back = vec![0u8; buf.len()];
        file.read_exact_at(&mut back, 5_000).unwrap();
        assert_eq!(back, buf);
        assert_eq!(file.metadata().unwrap().len(), 105_000);
        // An empty write writes nothing.
        write_in_small_folios(&file, &[], 200_000).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 105_000);
    }
}
