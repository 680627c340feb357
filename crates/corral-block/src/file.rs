//! [`FileDevice`]: a `BlockDevice` over one local file, no replication.
//!
//! Used by `corral serve-file` and as the reference device in tests and
//! benchmarks. Positional reads the page cache can serve, and small writes
//! while they stay fast, run inline on the calling task (see
//! [`crate::inline_io`]); everything else — cache misses, large writes,
//! flushes, hole punching — runs on tokio's blocking pool, so concurrent
//! requests proceed in parallel.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::inline_io::{InlineGate, pread_nowait};
use crate::{BlockDevice, BlockError, BlockResult, check_range};

/// A block device backed by a regular file (or a block device node).
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    block_size: u32,
    /// Whether writes may run inline now.
    inline_writes: InlineGate,
    /// Inline writes take turns: a buffered write holds the file's inode
    /// lock, so two runtime threads writing at once would only make one of
    /// them sleep in the kernel (which closes the gate). Waiting here costs
    /// no thread.
    write_turn: tokio::sync::Mutex<()>,
    /// Reservation state. A plain file has nowhere to keep it beside the
    /// data without surprising its owner, so it lives as long as the device
    /// (like a SCSI target's without "persist through power loss").
    reservations: std::sync::Mutex<Option<Bytes>>,
}

impl FileDevice {
    /// Open `path`, creating it when missing. With `size`, the file is grown
    /// (sparsely) to that size if smaller; without, its current size is used.
    pub fn open(path: &Path, size: Option<u64>, block_size: u32) -> BlockResult<Self> {
        if block_size != 512 && block_size != 4096 {
            return Err(BlockError::Invalid(format!(
                "block size must be 512 or 4096, not {block_size}"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| BlockError::Io(format!("open {}: {e}", path.display())))?;
        let current = file
            .metadata()
            .map_err(|e| BlockError::Io(format!("stat {}: {e}", path.display())))?
            .len();
        let size = match size {
            Some(want) => {
                if want % u64::from(block_size) != 0 {
                    return Err(BlockError::Invalid(format!(
                        "size {want} is not a multiple of the block size {block_size}"
                    )));
                }
                if current < want {
                    file.set_len(want)
                        .map_err(|e| BlockError::Io(format!("grow {}: {e}", path.display())))?;
                }
                want
            }
            None => current - current % u64::from(block_size),
        };
        if size == 0 {
            return Err(BlockError::Invalid(format!(
                "{} is empty; give a size",
                path.display()
            )));
        }
        Ok(FileDevice {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            block_size,
            inline_writes: InlineGate::default(),
            write_turn: tokio::sync::Mutex::new(()),
            reservations: std::sync::Mutex::new(None),
        })
    }

    /// The path this device serves.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> BlockResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| BlockError::Io(format!("I/O task failed: {e}")))?
            .map_err(io_error)
    }
}

fn io_error(e: std::io::Error) -> BlockError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        BlockError::NoSpace(e.to_string())
    } else {
        BlockError::Io(e.to_string())
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let err = std::io::Error::last_os_error();
        // Filesystems without hole punching: fall back to writing zeroes.
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            write_zero_range(file, offset, len)
        } else {
            Err(err)
        }
    }
}

/// Bytes per `pwrite` into the file, and the boundary its pieces keep to: the
/// kernel sizes a new page-cache folio by the write that creates it, and on
/// ext4 each later small write into a large folio walks all its block
/// buffers (decision 62; the replica store writes the same way).
const MAX_FOLIO_WRITE: u64 = 16 << 10;

/// `data` written at `offset` in pieces that never cross a
/// [`MAX_FOLIO_WRITE`] boundary of the file.
fn write_in_small_folios(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let pos = offset + done as u64;
        let n = ((MAX_FOLIO_WRITE - pos % MAX_FOLIO_WRITE) as usize).min(data.len() - done);
        file.write_all_at(&data[done..done + n], pos)?;
        done += n;
    }
    Ok(())
}

fn write_zero_range(file: &File, mut offset: u64, len: u64) -> std::io::Result<()> {
    const STEP: u64 = 1 << 20;
    let zeroes = vec![0u8; STEP.min(len) as usize];
    let end = offset + len;
    while offset < end {
        let n = STEP.min(end - offset) as usize;
        write_in_small_folios(file, &zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    async fn load_reservations(&self) -> BlockResult<Option<Bytes>> {
        Ok(self
            .reservations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }

    async fn save_reservations(&self, state: Bytes) -> BlockResult<()> {
        *self.reservations.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        Ok(())
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.size)?;
        let mut buf = BytesMut::zeroed(len as usize);
        if pread_nowait(&self.file, &mut buf, offset).map_err(io_error)? {
            return Ok(buf.freeze());
        }
        self.blocking(move |f| {
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        check_range(offset, data.len() as u64, self.size)?;
        if !fua && self.inline_writes.allows(data.len()) {
            let _turn = self.write_turn.lock().await;
            return self
                .inline_writes
                .run(|| write_in_small_folios(&self.file, &data, offset))
                .map_err(io_error);
        }
        self.blocking(move |f| {
            write_in_small_folios(f, &data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.blocking(|f| f.sync_data()).await
    }

    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |f| punch_hole(f, offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |f| {
            punch_hole(f, offset, len)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_unmap_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&dir.path().join("disk"), Some(1 << 20), 512).unwrap();
        dev.write(4096, Bytes::from(vec![7u8; 8192]), false)
            .await
            .unwrap();
        assert_eq!(&dev.read(4096, 8192).await.unwrap()[..], &[7u8; 8192][..]);
        dev.unmap(4096, 4096).await.unwrap();
        let back = dev.read(4096, 8192).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 7));
        dev.flush().await.unwrap();
        assert!(matches!(
            dev.read((1 << 20) - 512, 1024).await,
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn rejects_odd_block_sizes_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileDevice::open(&dir.path().join("a"), Some(4096), 1000).is_err());
        assert!(FileDevice::open(&dir.path().join("b"), None, 512).is_err());
        assert!(FileDevice::open(&dir.path().join("c"), Some(1000), 512).is_err());
    }
}
