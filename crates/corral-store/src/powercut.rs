//! Test-only: a simulated power cut for the replica's files.
//!
//! Once a directory is [`watch`]ed (its files as they are then count as on stable
//! storage), every write, hole punch and length change to a file in it — by the layer's
//! positional I/O and by `meta.redb` through [`JournaledBackend`] — is journaled, and
//! every `fdatasync` of a file moves what was journaled for it onto its stable image.
//! [`cut`] then says what each file holds after a power cut — its stable image plus a
//! prefix of the writes since, in order, the last of them possibly torn at a 512-byte
//! sector — and [`restore`] writes that back once the store is gone. (A real disk may also reorder unsynced writes; a prefix is the common case
//! and enough to tear data from its checksum.)

use std::collections::HashMap;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// What redb's backend I/O calls return on this platform.
type BackendIoError = std::io::Error;

const SECTOR: usize = 512;

#[derive(Debug)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileLog {
    stable: Vec<u8>,
    unsynced: Vec<Change>,
}

#[derive(Default)]
struct Journal {
    dirs: Vec<PathBuf>,
    files: HashMap<PathBuf, FileLog>,
}

static JOURNAL: LazyLock<Mutex<Journal>> = LazyLock::new(Default::default);

fn journal() -> MutexGuard<'static, Journal> {
    JOURNAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn apply(image: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Change::Punch { offset, len } => {
            let start = (*offset as usize).min(image.len());
            let end = (*offset + *len).min(image.len() as u64) as usize;
            image[start..end].fill(0);
        }
        Change::SetLen(len) => image.resize(*len as usize, 0),
    }
}

/// Start journaling the files of `dir`: what they hold now counts as stable.
pub(crate) fn watch(dir: &Path) {
    let mut j = journal();
    let entries = std::fs::read_dir(dir).expect("watched directory");
    for e in entries {
        let path = e.expect("directory entry").path();
        if path.is_file() {
            let stable = std::fs::read(&path).expect("read a watched file");
            j.files.insert(
                path,
                FileLog {
                    stable,
                    unsynced: Vec::new(),
                },
            );
        }
    }
    j.dirs.push(dir.to_path_buf());
}

/// Stop journaling `dir`.
pub(crate) fn unwatch(dir: &Path) {
    let mut j = journal();
    j.dirs.retain(|d| d != dir);
    j.files.retain(|p, _| !p.starts_with(dir));
}

fn record(path: &Path, change: Change) {
    let mut j = journal();
    if !j.dirs.iter().any(|d| path.starts_with(d)) {
        return;
    }
    j.files
        .entry(path.to_path_buf())
        .or_default()
        .unsynced
        .push(change);
}

pub(crate) fn wrote(path: &Path, offset: u64, data: &[u8]) {
    record(
        path,
        Change::Write {
            offset,
            data: data.to_vec(),
        },
    );
}

pub(crate) fn punched(path: &Path, offset: u64, len: u64) {
    record(path, Change::Punch { offset, len });
}

pub(crate) fn resized(path: &Path, len: u64) {
    record(path, Change::SetLen(len));
}

pub(crate) fn synced(path: &Path) {
    let mut j = journal();
    if let Some(log) = j.files.get_mut(path) {
        let changes = std::mem::take(&mut log.unsynced);
        for c in &changes {
            apply(&mut log.stable, c);
        }
    }
}

/// Whether `path` lies in a watched directory.
pub(crate) fn watched(path: &Path) -> bool {
    journal().dirs.iter().any(|d| path.starts_with(d))
}

/// A power cut in `dir`: what each file holds afterwards — its stable image plus a
/// prefix of the writes since, chosen by `pick(n)` (a number in `0..=n`), the write after
/// the prefix landing torn when `pick` says so. Take it while the store is still open
/// (nothing it does while being dropped may count), then drop the store and [`restore`].
pub(crate) fn cut(dir: &Path, mut pick: impl FnMut(usize) -> usize) -> Vec<(PathBuf, Vec<u8>)> {
    let j = journal();
    let mut paths: Vec<&PathBuf> = j.files.keys().filter(|p| p.starts_with(dir)).collect();
    paths.sort();
    let mut images = Vec::new();
    for path in paths {
        let log = &j.files[path];
        let mut image = log.stable.clone();
        let kept = pick(log.unsynced.len());
        for c in &log.unsynced[..kept] {
            apply(&mut image, c);
        }
        if let Some(Change::Write { offset, data }) = log.unsynced.get(kept) {
            let sectors = data.len().div_ceil(SECTOR);
            let torn = pick(sectors).min(sectors) * SECTOR;
            if torn > 0 {
                let data = data[..torn.min(data.len())].to_vec();
                apply(
                    &mut image,
                    &Change::Write {
                        offset: *offset,
                        data,
                    },
                );
            }
        }
        images.push((path.clone(), image));
    }
    images
}

/// After a power cut: the files hold what [`cut`] left, and that is stable.
pub(crate) fn restore(images: Vec<(PathBuf, Vec<u8>)>) {
    let mut j = journal();
    for (path, image) in images {
        std::fs::write(&path, &image).expect("rewrite a file after the cut");
        j.files.insert(
            path,
            FileLog {
                stable: image,
                unsynced: Vec::new(),
            },
        );
    }
}

/// `meta.redb`'s storage in a watched directory: redb's own file backend, journaled.
#[derive(Debug)]
pub(crate) struct JournaledBackend {
    inner: FileBackend,
    path: PathBuf,
}

impl JournaledBackend {
    pub(crate) fn new(file: File, path: &Path) -> Result<Self, redb::DatabaseError> {
        Ok(JournaledBackend {
            inner: FileBackend::new(file)?,
            path: path.to_path_buf(),
        })
    }
}

impl StorageBackend for JournaledBackend {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        self.inner.set_len(len)?;
        resized(&self.path, len);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.inner.sync_data()?;
        synced(&self.path);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        self.inner.write(offset, data)?;
        wrote(&self.path, offset, data);
        Ok(())
    }

    fn close(&self) -> Result<(), BackendIoError> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
