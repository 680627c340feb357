//! [`ReplicaStore`]: one replica's directory, tying the layer files, the metadata database
//! and the write-intent bitmap together.
//!
//! Owns argument validation, range arithmetic, the striped block locks that make a write's
//! data and checksum update atomic with respect to reads of the same blocks, read-modify-
//! write of partial blocks, unmap, flush, and recovery at open after an unclean stop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use crate::bitmap::WriteIntent;
use crate::chain::{ChainLayer, LayerChain, Source};
use crate::entry::{self, DISCARDED};
use crate::error::{Result, StoreError};
use crate::index::ExtentIndex;
use crate::layer::{BLOCK, Fetch, LARGEST_FOLIO, Layer, WriteVia};
use crate::meta::{self, MetaDb, Record};
use crate::{CloneRecord, Epoch, LayerInfo, Membership, ReservationRecord, VolumeMeta};

const BLOCK_USIZE: usize = BLOCK as usize;

/// Smallest write-intent region: 1 MiB.
pub const MIN_REGION_SIZE: u64 = 1 << 20;
/// Smallest and largest chunk size accepted by [`ReplicaStore::create`].
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest `len` of a single [`ReplicaStore::read`] (the engine splits I/O into chunks of at
/// most 64 MiB; a bigger request is a bug on the caller's side, not worth an allocation).
pub const MAX_IO_LEN: u64 = 64 << 20;
/// Largest range of a single [`ReplicaStore::block_checksums`] call: 64 GiB (16 Mi checksums).
pub const MAX_CHECKSUM_RANGE: u64 = 64 << 30;

/// Number of lock stripes. A stripe covers every 256th chunk.
const STRIPES: usize = 256;

/// A fill marks dirty the whole aligned window of this many bytes around its range, not
/// only the regions it touches: a clone or restore fills a volume in order, and marking
/// 1 MiB regions one at a time cost a durable metadata commit per MiB on every replica
/// (decision 71). Regions marked ahead and never written are cleared like any other.
const FILL_MARK_WINDOW: u64 = 64 << 20;
/// Name of the writable head layer created by `create`.
const HEAD: &str = "head";

/// What a volume is created with.
#[derive(Clone, Debug)]
pub struct CreateParams {
    pub volume: String,
    /// Volume size in bytes: a non-zero multiple of 4096 and of `block_size`.
    pub size: u64,
    /// Logical block size the frontends expose: 512 or 4096.
    pub block_size: u32,
    /// The engine's chunk size: a power of two from 4 KiB to 64 MiB.
    pub chunk_size: u32,
    /// Identity of this replica instance (distinguishes a rebuilt replica from its
    /// predecessor at the same address).
    pub instance_id: String,
}

/// A replica's on-disk store. All methods take `&self` and may be called concurrently from
/// many threads.
///
/// Dropping a store without [`ReplicaStore::close`] is an unclean stop: the next
/// [`ReplicaStore::open`] recovers the dirty regions.
#[derive(Debug)]
pub struct ReplicaStore {
    pub(crate) dir: PathBuf,
    pub(crate) db: MetaDb,
    /// Volume size in bytes; grows with [`ReplicaStore::grow`].
    size: AtomicU64,
    block_size: u32,
    chunk_size: u32,
    chunk_shift: u32,
    volume: String,
    instance_id: String,
    clean_shutdown: bool,
    /// Epoch and membership; the mutex also orders their commits.
    mutable: Mutex<Mutable>,
    /// The layers and their index. Every I/O holds it shared (after its
    /// stripes); changes of the chain hold it exclusively, which drains I/O.
    pub(crate) chain: RwLock<LayerChain>,
    /// Orders changes of the chain (snapshot, delete, merge steps, revert, grow).
    pub(crate) admin: Mutex<()>,
    /// Held by a snapshot from switching heads in memory until the new chain
    /// is committed (flushes wait for it); holds that commit if it failed, for
    /// the next flush or change of the chain to retry.
    pub(crate) layer_commit: Mutex<Option<crate::snapshot::PendingLayerCommit>>,
    pub(crate) stripes: Box<[RwLock<()>]>,
    intent: WriteIntent,
    /// Data syncs asked for so far, and the last ticket a completed sync covered.
    syncs_asked: AtomicU64,
    synced: Mutex<u64>,
    /// `fdatasync`s of a data file made by [`ReplicaStore::sync_data_grouped`].
    data_syncs: AtomicU64,
    recovered: Vec<u64>,
    /// Data-file ranges that fills wrote since the last flush: dropped from
    /// the page cache once a flush has made them durable (decision 65).
    filled: Mutex<FilledRanges>,
}

/// The byte ranges of one layer's data file that fills wrote, coalesced
/// when they meet. A fill streams a clone's or a restore's source through
/// once: nobody asked to read it, and keeping it cached only makes the
/// kernel find fresh pages for the rest of the fill.
#[derive(Debug, Default)]
struct FilledRanges {
    /// Data file name of the layer written, and its ranges in order written.
    by_layer: Vec<(String, Vec<(u64, u64)>)>,
}

/// More ranges than this in one layer are merged into one span (dropping
/// the cache of a few pages a fill did not write costs nothing but a
/// later read from the disk).
const MAX_FILLED_RANGES: usize = 1024;

impl FilledRanges {
    fn add(&mut self, layer: &str, offset: u64, len: u64) {
        let ranges = match self.by_layer.iter_mut().find(|(name, _)| name == layer) {
            Some((_, r)) => r,
            None => {
                self.by_layer.push((layer.to_string(), Vec::new()));
                let Some((_, r)) = self.by_layer.last_mut() else {
                    return;
                };
                r
            }
        };
        match ranges.last_mut() {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => ranges.push((offset, len)),
        }
        if ranges.len() > MAX_FILLED_RANGES {
            let start = ranges.iter().map(|r| r.0).min().unwrap_or(offset);
            let end = ranges
                .iter()
                .map(|r| r.0 + r.1)
                .max()
                .unwrap_or(offset + len);
            ranges.clear();
            ranges.push((start, end - start));
        }
    }
}

#[derive(Debug)]
struct Mutable {
    epoch: Epoch,
    membership: Membership,
    reservations: Option<ReservationRecord>,
    clone: Option<CloneRecord>,
}

/// Which halves of a write actually reach the disk: `Both` in production; tests simulate a
/// write torn by a crash with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Halves {
    Both,
    #[cfg(test)]
    DataOnly,
    #[cfg(test)]
    CrcOnly,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Region size for a chunk size: the chunk size, but at least [`MIN_REGION_SIZE`].
pub(crate) fn default_region_size(chunk_size: u32) -> u64 {
    u64::from(chunk_size).max(MIN_REGION_SIZE)
}

fn validate(p: &CreateParams) -> Result<()> {
    if p.block_size != 512 && p.block_size != 4096 {
        return Err(StoreError::Invalid(format!(
            "block size {} is not 512 or 4096",
            p.block_size
        )));
    }
    if p.size == 0
        || !p.size.is_multiple_of(BLOCK)
        || !p.size.is_multiple_of(u64::from(p.block_size))
    {
        return Err(StoreError::Invalid(format!(
            "volume size {} is not a non-zero multiple of 4096 and of the block size {}",
            p.size, p.block_size
        )));
    }
    if !p.chunk_size.is_power_of_two()
        || p.chunk_size < MIN_CHUNK_SIZE
        || p.chunk_size > MAX_CHUNK_SIZE
    {
        return Err(StoreError::Invalid(format!(
            "chunk size {} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}",
            p.chunk_size
        )));
    }
    if p.volume.is_empty() {
        return Err(StoreError::Invalid("volume name is empty".into()));
    }
    Ok(())
}

impl ReplicaStore {
    /// Creates a new store in `dir` (created if missing). Fails with
    /// [`StoreError::AlreadyExists`] if `dir` already holds one.
    pub fn create(dir: &Path, p: CreateParams) -> Result<Self> {
        let region = default_region_size(p.chunk_size);
        Self::create_with_region_size(dir, p, region)
    }

    pub(crate) fn create_with_region_size(
        dir: &Path,
        p: CreateParams,
        region_size: u64,
    ) -> Result<Self> {
        validate(&p)?;
        if !region_size.is_power_of_two() || region_size < BLOCK {
            return Err(StoreError::Invalid(format!(
                "region size {region_size} is not a power of two of at least 4096"
            )));
        }
        if Self::exists(dir) {
            return Err(StoreError::AlreadyExists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::error::io_err(format!("creating {}", dir.display()), e))?;
        Layer::create(dir, HEAD, p.size)?;
        let size = p.size;
        let rec = Record {
            volume: p.volume,
            size: p.size,
            block_size: p.block_size,
            chunk_size: p.chunk_size,
            region_size,
            instance_id: p.instance_id,
            epoch: Epoch(0),
            membership: Membership::default(),
            layers: vec![LayerInfo::new(HEAD.into(), 0, false, size)],
            clean: true,
            reservations: None,
            clone: None,
        };
        // meta.redb appears (atomically) last: until it does, `exists` is false and a retry
        // of `create` starts over.
        let db = MetaDb::create(dir, &rec)?;
        drop(db);
        Self::open(dir)
    }

    /// True if `dir` holds a store (its `meta.redb` exists).
    pub fn exists(dir: &Path) -> bool {
        dir.join(meta::META_FILE).is_file()
    }

    /// Opens the store in `dir`. After an unclean stop (no [`ReplicaStore::close`]), the
    /// checksums of every block in a dirty region are recomputed from the data on disk; the
    /// regions stay marked dirty (see [`ReplicaStore::recovered_regions`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if !Self::exists(dir) {
            return Err(StoreError::NotFound(dir.to_path_buf()));
        }
        let (mut db, rec, dirty) = MetaDb::open(dir)?;
        check_record(dir, &rec)?;
        if rec.layers.last().is_none_or(|l| l.read_only) {
            return Err(StoreError::Metadata(format!(
                "{}: the layer chain has no writable head",
                dir.join(meta::META_FILE).display()
            )));
        }
        if rec.layers.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err(StoreError::Metadata(format!(
                "{}: layer ids do not grow along the chain",
                dir.join(meta::META_FILE).display()
            )));
        }
        remove_orphan_layers(dir, &rec.layers)?;
        let extents = db.load_extents()?;
        let mut chained = Vec::with_capacity(rec.layers.len());
        let nlayers = rec.layers.len();
        for (pos, info) in rec.layers.iter().enumerate() {
            let is_head = pos + 1 == nlayers;
            // The head always spans the volume; a snapshot, the volume as it was.
            let size = if is_head || info.size == 0 {
                rec.size
            } else {
                info.size
            };
            let layer = Layer::open(dir, &info.name, size, true)?;
            chained.push(ChainLayer {
                info: info.clone(),
                layer,
                blocks: size / BLOCK,
            });
        }
        let index = fold_index(&rec.layers, &extents);
        let chain = LayerChain::new(chained, index)
            .ok_or_else(|| StoreError::Metadata(format!("{}: no head layer", dir.display())))?;
        let region_shift = rec.region_size.trailing_zeros();
        let nregions = rec.size.div_ceil(rec.region_size);
        let mut recovered: Vec<u64> = dirty.iter().copied().filter(|&r| r < nregions).collect();
        recovered.sort_unstable();
        if recovered.len() != dirty.len() {
            tracing::warn!(
                dir = %dir.display(),
                "ignoring {} dirty region indices beyond the end of the volume",
                dirty.len() - recovered.len()
            );
        }
        if !recovered.is_empty() || !rec.clean {
            tracing::info!(
                dir = %dir.display(),
                clean = rec.clean,
                regions = recovered.len(),
                "recovering checksums of dirty regions"
            );
        }
        {
            let head = &chain.head().layer;
            let has_parent = |b: u64| {
                nlayers > 1
                    && chain
                        .index
                        .segments(b, b + 1)
                        .first()
                        .is_some_and(|&(_, _, o)| o.is_some())
            };
            for &r in &recovered {
                recover_region(head, &has_parent, r, rec.region_size, rec.size)?;
            }
            if !recovered.is_empty() {
                head.sync()?;
            }
            if db.format() < meta::FORMAT_VERSION {
                upgrade_from_v1(dir, head, rec.size)?;
                db.set_current_format()?;
            }
        }
        // From here until `close`, a stop is unclean.
        db.set_clean(false)?;
        let chunk_shift = rec.chunk_size.trailing_zeros();
        let stripes = (0..STRIPES).map(|_| RwLock::new(())).collect();
        Ok(ReplicaStore {
            dir: dir.to_path_buf(),
            db,
            size: AtomicU64::new(rec.size),
            block_size: rec.block_size,
            chunk_size: rec.chunk_size,
            chunk_shift,
            volume: rec.volume,
            instance_id: rec.instance_id,
            clean_shutdown: rec.clean,
            mutable: Mutex::new(Mutable {
                epoch: rec.epoch,
                membership: rec.membership,
                reservations: rec.reservations,
                clone: rec.clone,
            }),
            chain: RwLock::new(chain),
            admin: Mutex::new(()),
            layer_commit: Mutex::new(None),
            stripes,
            intent: WriteIntent::new(region_shift, &recovered),
            syncs_asked: AtomicU64::new(0),
            synced: Mutex::new(0),
            data_syncs: AtomicU64::new(0),
            filled: Mutex::new(FilledRanges::default()),
            recovered,
        })
    }

    /// The directory of this store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The chain, shared (every I/O, after taking its stripes).
    pub(crate) fn chain(&self) -> RwLockReadGuard<'_, LayerChain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The chain, exclusive (changes of the chain, under `admin`).
    pub(crate) fn chain_mut(&self) -> RwLockWriteGuard<'_, LayerChain> {
        self.chain.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Grows the volume to `new_size` bytes (a multiple of 4096 and of the
    /// block size). Smaller: [`StoreError::Invalid`]; equal: nothing; larger:
    /// the head's files are extended (sparse) and the new size recorded
    /// durably before this returns. Snapshot layers keep their size: past
    /// their end they hold nothing. Waits for in-flight I/O.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let _admin = lock(&self.admin);
        self.check_layer_commit()?;
        let cur = self.size();
        if new_size < cur {
            return Err(StoreError::Invalid(format!(
                "cannot shrink the volume from {cur} to {new_size} bytes"
            )));
        }
        if new_size == cur {
            return Ok(());
        }
        if !new_size.is_multiple_of(BLOCK) || !new_size.is_multiple_of(u64::from(self.block_size)) {
            return Err(StoreError::Invalid(format!(
                "size {new_size} is not a multiple of 4096 and of the block size {}",
                self.block_size
            )));
        }
        if new_size / BLOCK > u64::from(u32::MAX) * 1024 {
            return Err(StoreError::Invalid(format!("size {new_size} is too large")));
        }
        let mut chain = self.chain_mut();
        let head_pos = chain.layers().len() - 1;
        chain.head().layer.grow(new_size)?;
        let mut infos: Vec<LayerInfo> = chain.layers().iter().map(|l| l.info.clone()).collect();
        infos[head_pos].size = new_size;
        self.db.commit_chain(&infos, &[], &[], Some(new_size))?;
        let head = &mut chain.layers_mut()[head_pos];
        head.info.size = new_size;
        head.blocks = new_size / BLOCK;
        self.size.store(new_size, Ordering::Release);
        tracing::info!(dir = %self.dir.display(), from = cur, to = new_size, "volume grown");
        Ok(())
    }

    /// The newest epoch recorded (by any engine's open).
    pub fn epoch(&self) -> Epoch {
        lock(&self.mutable).epoch
    }

    /// Everything the store records about its volume.
    pub fn meta(&self) -> VolumeMeta {
        let m = lock(&self.mutable);
        VolumeMeta {
            volume: self.volume.clone(),
            size: self.size(),
            block_size: self.block_size,
            chunk_size: self.chunk_size,
            instance_id: self.instance_id.clone(),
            epoch: m.epoch,
            membership: m.membership.clone(),
            layers: self
                .chain()
                .layers()
                .iter()
                .map(|l| l.info.clone())
                .collect(),
            reservations: m.reservations.clone(),
            clone: m.clone.clone(),
            clean_shutdown: self.clean_shutdown,
        }
    }

    /// Durably records `epoch`. Lower than the current one: [`StoreError::StaleEpoch`];
    /// equal: accepted (no-op).
    pub fn set_epoch(&self, epoch: Epoch) -> Result<()> {
        let mut m = lock(&self.mutable);
        if epoch < m.epoch {
            return Err(StoreError::StaleEpoch {
                current: m.epoch,
                given: epoch,
            });
        }
        if epoch > m.epoch {
            self.db.set_epoch(epoch)?;
            m.epoch = epoch;
        }
        Ok(())
    }

    /// Durably records a reservation record. One older by (epoch, sequence)
    /// than the recorded one: [`StoreError::StaleReservations`]; the same
    /// or newer: stored.
    pub fn set_reservations(&self, new: ReservationRecord) -> Result<()> {
        let mut m = lock(&self.mutable);
        if let Some(cur) = &m.reservations
            && (new.epoch, new.sequence) < (cur.epoch, cur.sequence)
        {
            return Err(StoreError::StaleReservations {
                current_epoch: cur.epoch,
                current_sequence: cur.sequence,
                given_epoch: new.epoch,
                given_sequence: new.sequence,
            });
        }
        if m.reservations.as_ref() != Some(&new) {
            self.db.set_reservations(&new)?;
            m.reservations = Some(new);
        }
        Ok(())
    }

    /// Durably records a clone's fill progress; one behind the recorded one
    /// by (done, filled_below) changes nothing (an engine never moves it back).
    pub fn set_clone(&self, new: CloneRecord) -> Result<()> {
        let mut m = lock(&self.mutable);
        if let Some(cur) = &m.clone
            && (new.done, new.filled_below) < (cur.done, cur.filled_below)
        {
            return Ok(());
        }
        if m.clone.as_ref() != Some(&new) {
            self.db.set_clone(&new)?;
            m.clone = Some(new);
        }
        Ok(())
    }

    /// Durably records a membership. A generation lower than the current one:
    /// [`StoreError::StaleGeneration`]; equal or higher: stored.
    pub fn set_membership(&self, new: Membership) -> Result<()> {
        let mut m = lock(&self.mutable);
        if (new.epoch, new.generation) < (m.membership.epoch, m.membership.generation) {
            return Err(StoreError::StaleGeneration {
                current: m.membership.generation,
                given: new.generation,
            });
        }
        if new != m.membership {
            self.db.set_membership(&new)?;
            m.membership = new;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(end),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// Indices of the lock stripes covering blocks `first..end` (non-empty), ascending.
    pub(crate) fn stripe_set(&self, first: u64, end: u64) -> Vec<usize> {
        let blocks_per_chunk_shift = self.chunk_shift - BLOCK.trailing_zeros();
        let c0 = first >> blocks_per_chunk_shift;
        let c1 = (end - 1) >> blocks_per_chunk_shift;
        if c1 - c0 + 1 >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut v: Vec<usize> = (c0..=c1).map(|c| (c % STRIPES as u64) as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub(crate) fn lock_shared(&self, first: u64, end: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        self.stripe_set(first, end)
            .into_iter()
            .map(|i| self.stripes[i].read().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    pub(crate) fn lock_exclusive(&self, first: u64, end: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        self.stripe_set(first, end)
            .into_iter()
            .map(|i| self.stripes[i].write().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Reads whole blocks `first..first + buf.len() / 4096` of the volume into `buf`,
    /// verifying each block's checksum. Caller holds the stripes and the chain.
    fn read_blocks(
        &self,
        chain: &LayerChain,
        first: u64,
        buf: &mut [u8],
        fetch: Fetch,
    ) -> Result<()> {
        let total = buf.len() / BLOCK_USIZE;
        self.read_runs(chain.runs(first, total, fetch)?, first, buf, fetch)
    }

    /// Copies `runs` (from `first`) into `buf`, verifying each block's checksum.
    pub(crate) fn read_runs(
        &self,
        runs: Vec<crate::chain::Run<'_>>,
        first: u64,
        buf: &mut [u8],
        fetch: Fetch,
    ) -> Result<()> {
        for run in runs {
            let lo = ((run.first - first) as usize) * BLOCK_USIZE;
            let hi = lo + (run.len as usize) * BLOCK_USIZE;
            let piece = &mut buf[lo..hi];
            let (layer, entries) = match run.source {
                Source::Layer(layer, entries) => (layer, entries),
                Source::Zeroes => {
                    piece.fill(0);
                    continue;
                }
            };
            layer.read_data_with(run.first * BLOCK, piece, fetch)?;
            for (i, (data, &stored)) in piece.chunks_exact(BLOCK_USIZE).zip(&entries).enumerate() {
                if let Err(computed) = entry::verify(data, stored) {
                    let offset = (run.first + i as u64) * BLOCK;
                    tracing::warn!(
                        dir = %self.dir.display(),
                        file = layer.data_name(),
                        offset,
                        stored,
                        computed,
                        "checksum mismatch"
                    );
                    return Err(StoreError::ChecksumMismatch {
                        offset,
                        stored,
                        computed,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`. Every 4 KiB block touched is checksum-verified;
    /// a corrupt block fails the whole read with [`StoreError::ChecksumMismatch`].
    pub fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_with(offset, len, Fetch::MayWait)
    }

    /// [`ReplicaStore::read`] if the page cache holds everything it needs
    /// (data and checksums); `Ok(None)` when some of it would have to come
    /// from the disk. For a caller on an async runtime thread, which then
    /// reads again with [`ReplicaStore::read`] elsewhere: a miss costs it one
    /// try, never a wait.
    pub fn read_cached(&self, offset: u64, len: u64) -> Result<Option<Bytes>> {
        crate::error::unless_not_cached(self.read_with(offset, len, Fetch::CachedOnly))
    }

    fn read_with(&self, offset: u64, len: u64, fetch: Fetch) -> Result<Bytes> {
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len > MAX_IO_LEN {
            return Err(StoreError::Invalid(format!(
                "read of {len} bytes at offset {offset} exceeds the {MAX_IO_LEN}-byte limit"
            )));
        }
        let first = offset / BLOCK;
        let end_block = end.div_ceil(BLOCK);
        let mut buf = vec![0u8; ((end_block - first) * BLOCK) as usize];
        {
            let _g = self.lock_shared(first, end_block);
            self.read_blocks(&self.chain(), first, &mut buf, fetch)?;
        }
        let lo = (offset - first * BLOCK) as usize;
        Ok(Bytes::from(buf).slice(lo..lo + len as usize))
    }

    /// Writes `data` at `offset`. Partial blocks at the edges are read (and verified),
    /// modified and written back whole. Not durable until [`ReplicaStore::flush`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(offset, data, None, Halves::Both)
    }

    /// A write as it arrives from an engine, with the CRC32C `sent` its sender computed
    /// over `data`: nothing is stored unless the payload matches it
    /// ([`StoreError::PayloadChecksum`]). A write of whole aligned blocks reads the
    /// payload once, for both the check and the blocks' entries. With `fua`, as
    /// [`ReplicaStore::write_fua`].
    pub fn write_sent(&self, offset: u64, data: &[u8], sent: u32, fua: bool) -> Result<()> {
        self.write_impl(offset, data, Some(sent), Halves::Both)?;
        if fua {
            self.make_fua_durable(data.len())?;
        }
        Ok(())
    }

    /// A clone's fill: writes the 4 KiB blocks of `data` at `offset` whose
    /// block no layer of this replica has ever written or discarded, and
    /// leaves every other block as it is, so a fill that arrives after the
    /// clone's own write (or that is repeated after a restart) changes nothing
    /// the clone wrote. Blocks of zeroes are not written (a never-written
    /// block reads as zeroes), so a sparse source makes a sparse clone. Returns
    /// how many blocks it wrote. `offset` and the length must be 4096-byte
    /// aligned. Not durable until a flush.
    pub fn fill(&self, offset: u64, data: &[u8]) -> Result<u64> {
        self.fill_impl(offset, data, None)
    }

    /// A fill as it arrives from an engine, with the CRC32C `sent` its
    /// sender computed over `data`: nothing is filled unless the payload
    /// matches it ([`StoreError::PayloadChecksum`]). Otherwise as
    /// [`ReplicaStore::fill`].
    pub fn fill_sent(&self, offset: u64, data: &[u8], sent: u32) -> Result<u64> {
        self.fill_impl(offset, data, Some(sent))
    }

    fn fill_impl(&self, offset: u64, data: &[u8], sent: Option<u32>) -> Result<u64> {
        let len = data.len() as u64;
        let end = self.check_range(offset, len)?;
        if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
            return Err(StoreError::Invalid(format!(
                "fill at offset {offset} of {len} bytes is not 4096-byte aligned"
            )));
        }
        if len > MAX_IO_LEN {
            return Err(StoreError::Invalid(format!(
                "fill of {len} bytes at offset {offset} exceeds the {MAX_IO_LEN}-byte limit"
            )));
        }
        let (crcs, computed) = entry::block_entries_and_crc(data);
        if let Some(sent) = sent
            && computed != sent
        {
            return Err(StoreError::PayloadChecksum {
                offset,
                len,
                computed,
                sent,
            });
        }
        if len == 0 {
            return Ok(0);
        }
        let first = offset / BLOCK;
        let end_block = end / BLOCK;
        let count = (end_block - first) as usize;
        let mark_from = offset - offset % FILL_MARK_WINDOW;
        let mark_to = end
            .checked_next_multiple_of(FILL_MARK_WINDOW)
            .unwrap_or(end)
            .min(self.size())
            .max(end);
        let _ticket = self.intent.begin_write(&self.db, mark_from, mark_to)?;
        // The fill writes past the page cache (decision 69): no other writer may dirty
        // a cached folio its range overlaps, so it holds every block such a folio can
        // cover.
        let folio_blocks = LARGEST_FOLIO / BLOCK;
        let lock_first = first - first % folio_blocks;
        let lock_end = end_block
            .next_multiple_of(folio_blocks)
            .min(self.size().div_ceil(BLOCK))
            .max(end_block);
        let _g = self.lock_exclusive(lock_first, lock_end);
        let chain = self.chain();
        let mut open = chain.never_written(first, count)?;
        // A block of zeroes need not be written: one never written reads
        // as zeroes already (a clone has nothing under its own layers).
        for (o, block) in open.iter_mut().zip(data.chunks_exact(BLOCK_USIZE)) {
            *o = *o && block.iter().any(|&b| b != 0);
        }
        let mut written = 0u64;
        let mut i = 0;
        while i < count {
            if !open[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < count && open[i] {
                i += 1;
            }
            let bytes = start * BLOCK_USIZE..i * BLOCK_USIZE;
            let (at, len) = ((first + start as u64) * BLOCK, (i - start) as u64 * BLOCK);
            let head = &chain.head().layer;
            let via = head.write_data_direct(at, &data[bytes])?;
            head.write_crcs(first + start as u64, &crcs[start..i])?;
            if via == WriteVia::PageCache {
                // Cached: drop the pages once a flush has made them durable (decision
                // 65), and start their writeback now (decision 68).
                lock(&self.filled).add(head.data_name(), at, len);
                if let Err(e) = head.start_writeback(at, len) {
                    tracing::debug!(dir = %self.dir.display(), error = %e, "could not start writing filled blocks back");
                }
            }
            written += (i - start) as u64;
        }
        Ok(written)
    }

    /// Test-only: fills of the head layer go through the page cache, as on a
    /// filesystem that refuses direct I/O.
    #[cfg(test)]
    pub(crate) fn refuse_direct_writes(&self) {
        self.chain().head().layer.refuse_direct_writes();
    }

    /// True when a (non-FUA) write of `len` bytes at `offset` needs no
    /// metadata commit now: the range is valid and every write-intent region
    /// it touches is already marked dirty. Such a write is page-cache work
    /// only, which lets a caller run it without a thread hand-off.
    pub fn write_is_light(&self, offset: u64, len: u64) -> bool {
        match self.check_range(offset, len) {
            Ok(end) => len == 0 || self.intent.covers(offset, end),
            Err(_) => true,
        }
    }

    /// Writes `data` at `offset` and makes it durable before returning (FUA): one
    /// `fdatasync` of the data file. Its region is dirty until a flush clears it, which
    /// syncs the checksums first; after a power cut the entries of dirty regions are
    /// recovered from the data.
    pub fn write_fua(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(offset, data, None, Halves::Both)?;
        self.make_fua_durable(data.len())
    }

    /// What makes a FUA write of `len` bytes that has just been written durable.
    fn make_fua_durable(&self, len: usize) -> Result<()> {
        if len > 0 {
            self.make_writes_durable()?;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable, as a FUA
    /// write is: one `fdatasync` of the data file, shared with the syncs
    /// under way (group commit). Unlike [`ReplicaStore::flush`] it clears
    /// no dirty regions. What a batch of FUA writes calls once after
    /// writing them all.
    pub fn make_writes_durable(&self) -> Result<()> {
        self.sync_data_grouped()?;
        // Durable once the chain naming the head it went to is (a
        // snapshot may have switched heads before or after it).
        self.check_layer_commit()
    }

    /// `fdatasync` of the head's data file, shared (group commit): a caller that finds a
    /// sync begun after it asked has already ended successfully returns at once; otherwise
    /// it syncs for every caller that has asked so far.
    fn sync_data_grouped(&self) -> Result<()> {
        let ticket = self.syncs_asked.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= ticket {
            return Ok(());
        }
        let covers = self.syncs_asked.load(Ordering::SeqCst);
        // Not under the chain's lock: a snapshot switching heads meanwhile
        // is waited for by the caller (`check_layer_commit`).
        let head = self.chain().head().layer.try_clone()?;
        head.sync_data_file()?;
        self.data_syncs.fetch_add(1, Ordering::Relaxed);
        *synced = covers;
        Ok(())
    }

    /// `fdatasync`s of the data file that flushes and FUA writes have made
    /// so far (shared syncs counted once).
    pub fn data_syncs(&self) -> u64 {
        self.data_syncs.load(Ordering::Relaxed)
    }

    fn write_impl(
        &self,
        offset: u64,
        data: &[u8],
        sent: Option<u32>,
        halves: Halves,
    ) -> Result<()> {
        let len = data.len() as u64;
        // A payload that does not match is refused before anything else is
        // looked at. A payload of whole blocks is read once for the check and
        // its blocks' entries.
        let whole_blocks = (offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK))
            .then(|| entry::block_entries_and_crc(data));
        if let Some(sent) = sent {
            let computed = match &whole_blocks {
                Some((_, crc)) => *crc,
                None => crc32c::crc32c(data),
            };
            if computed != sent {
                return Err(StoreError::PayloadChecksum {
                    offset,
                    len,
                    computed,
                    sent,
                });
            }
        }
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK;
        let end_block = end.div_ceil(BLOCK);
        let aligned_start = first * BLOCK;
        let aligned_end = end_block * BLOCK;
        let crcs_of = |buf: &[u8]| -> Vec<u32> {
            buf.chunks_exact(BLOCK_USIZE)
                .map(|b| entry::written(entry::block_crc(b)))
                .collect()
        };
        // A write of whole blocks: its entries were computed above, before
        // taking any lock.
        if let Some((crcs, _)) = whole_blocks {
            let _ticket = self.intent.begin_write(&self.db, offset, end)?;
            let _g = self.lock_exclusive(first, end_block);
            return self.store_blocks(&self.chain(), first, data, &crcs, halves);
        }
        let mut buf = vec![0u8; (aligned_end - aligned_start) as usize];
        let lo = (offset - aligned_start) as usize;
        buf[lo..lo + data.len()].copy_from_slice(data);
        let mut crcs = crcs_of(&buf);
        let mut edges = vec![first];
        if end_block - 1 != first {
            edges.push(end_block - 1);
        }
        let _ticket = self.intent.begin_write(&self.db, offset, end)?;
        let _g = self.lock_exclusive(first, end_block);
        let chain = self.chain();
        for b in edges {
            let base = b * BLOCK;
            // The part of block `b` this write covers, relative to the block.
            let c0 = (offset.max(base) - base) as usize;
            let c1 = (end.min(base + BLOCK) - base) as usize;
            if c0 == 0 && c1 == BLOCK_USIZE {
                continue;
            }
            let mut old = [0u8; BLOCK_USIZE];
            self.read_blocks(&chain, b, &mut old, Fetch::MayWait)?;
            let i = (b - first) as usize;
            let block = &mut buf[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE];
            block[..c0].copy_from_slice(&old[..c0]);
            block[c1..].copy_from_slice(&old[c1..]);
            crcs[i] = entry::written(entry::block_crc(block));
        }
        self.store_blocks(&chain, first, &buf, &crcs, halves)
    }

    /// Writes whole blocks and their entries to the head. Caller holds the stripes and the
    /// chain.
    fn store_blocks(
        &self,
        chain: &LayerChain,
        first: u64,
        data: &[u8],
        entries: &[u32],
        halves: Halves,
    ) -> Result<()> {
        let head = &chain.head().layer;
        if halves.data() {
            head.write_data(first * BLOCK, data)?;
        }
        if halves.crc() {
            head.write_crcs(first, entries)?;
        }
        Ok(())
    }

    /// Deallocates `offset..offset+len`: it reads back as zeroes. Whole blocks are punched
    /// out of the data file and recorded unwritten; partial blocks at the edges are zeroed by
    /// read-modify-write.
    pub fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK;
        let end_block = end.div_ceil(BLOCK);
        let _ticket = self.intent.begin_write(&self.db, offset, end)?;
        let _g = self.lock_exclusive(first, end_block);
        let chain = self.chain();

        // Partial blocks: (block, zero from, zero to) in byte offsets.
        let mut partial: Vec<(u64, u64, u64)> = Vec::new();
        if !offset.is_multiple_of(BLOCK) {
            let b = offset / BLOCK;
            partial.push((b, offset, end.min((b + 1) * BLOCK)));
        }
        if end % BLOCK != 0 {
            let b = end / BLOCK;
            if partial.first().is_none_or(|&(pb, _, _)| pb != b) {
                partial.push((b, offset.max(b * BLOCK), end));
            }
        }
        for (b, lo, hi) in partial {
            let mut block = [0u8; BLOCK_USIZE];
            self.read_blocks(&chain, b, &mut block, Fetch::MayWait)?;
            let base = b * BLOCK;
            block[(lo - base) as usize..(hi - base) as usize].fill(0);
            let e = entry::written(entry::block_crc(&block));
            self.store_blocks(&chain, b, &block, &[e], Halves::Both)?;
        }

        let whole_first = offset.div_ceil(BLOCK);
        let whole_end = end / BLOCK;
        if whole_first < whole_end {
            let n = whole_end - whole_first;
            let head = &chain.head().layer;
            head.punch(whole_first * BLOCK, n * BLOCK)?;
            head.fill_crcs(whole_first, n, DISCARDED)?;
        }
        Ok(())
    }

    /// Same as [`ReplicaStore::unmap`]: zeroed ranges are deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.unmap(offset, len)
    }

    /// Makes every write that completed before this call durable, without touching the
    /// write-intent bitmap. For the replica daemon's own background flushes: a dirty bit
    /// also tells a newly elected engine which regions may differ between replicas (a write
    /// in flight when the old engine went away may have reached only some of them), and only
    /// the engine's flushes, which follow its acknowledged writes on every replica, may
    /// clear it.
    pub fn sync(&self) -> Result<()> {
        let head = self.chain().head().layer.try_clone()?;
        head.sync()?;
        // A snapshot that switched heads before or after the sync: its
        // frozen layer and new head are durable once it is recorded.
        self.check_layer_commit()
    }

    /// Makes every write that completed before this call durable — one `fdatasync` of the
    /// data file — then, now and then, clears the dirty bits of regions idle long enough
    /// (module `bitmap`). Checksum entries need no sync here: every write since they were
    /// last synced lies in a dirty region, whose entries [`ReplicaStore::open`] recovers
    /// from the data after an unclean stop. A region is cleared only once its entries are
    /// synced too.
    pub fn flush(&self) -> Result<()> {
        let seq = self.intent.begin_flush();
        // Fills that completed before this sync are durable after it.
        let filled = std::mem::take(&mut *lock(&self.filled));
        self.sync_data_grouped()?;
        self.release_filled(filled);
        // Writes that went to a head a snapshot has just frozen, or to the
        // new head it made, are durable once that snapshot's commit is. The
        // guard stays held while regions are cleared below, so that no
        // snapshot freezes, unsynced, the entries of a region being cleared.
        let mut pending = lock(&self.layer_commit);
        self.commit_pending(&mut pending)?;
        if let Some(below) = self.intent.clear_threshold(seq, std::time::Instant::now()) {
            let head = self.chain().head().layer.try_clone()?;
            head.sync_crc_file()?;
            if let Err(e) = self.intent.clear_idle(&self.db, below) {
                // The data is durable; the regions merely stay dirty a while longer.
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not clear dirty regions after flush");
            }
        }
        Ok(())
    }

    /// Drops the synced ranges that fills wrote from the page cache. Only
    /// advice to the kernel: a failure changes nothing stored and is logged.
    fn release_filled(&self, filled: FilledRanges) {
        if filled.by_layer.is_empty() {
            return;
        }
        let chain = self.chain();
        for (name, ranges) in filled.by_layer {
            // A layer deleted meanwhile has no pages left to drop.
            let Some(l) = chain.layers().iter().find(|l| l.layer.data_name() == name) else {
                continue;
            };
            for (offset, len) in ranges {
                if let Err(e) = l.layer.drop_cached_data(offset, len) {
                    tracing::debug!(dir = %self.dir.display(), error = %e, "could not drop filled pages from the page cache");
                }
            }
        }
    }

    /// How often the flushes of a volume under writes clear write-intent regions (zero:
    /// at every flush, those not written since the previous one, at the cost of a
    /// checksum sync and a metadata commit per flush). Default
    /// [`crate::DEFAULT_CLEAR_INTERVAL`].
    pub fn set_clear_interval(&self, interval: std::time::Duration) {
        self.intent.set_clear_interval(interval);
    }

    /// One CRC32C per 4 KiB block of the block-aligned range `offset..offset+len`, as
    /// stored (the data is not read), with never-written blocks reported as the crc32c of
    /// 4096 zero bytes, so that replicas holding the same contents report the same values.
    pub fn block_checksums(&self, offset: u64, len: u64) -> Result<Vec<u32>> {
        let end = self.check_range(offset, len)?;
        if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
            return Err(StoreError::Invalid(format!(
                "checksum range offset {offset} length {len} is not 4096-byte aligned"
            )));
        }
        if len > MAX_CHECKSUM_RANGE {
            return Err(StoreError::Invalid(format!(
                "checksum range of {len} bytes exceeds the {MAX_CHECKSUM_RANGE}-byte limit"
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK;
        let end_block = end / BLOCK;
        let mut out = Vec::with_capacity((end_block - first) as usize);
        let _g = self.lock_shared(first, end_block);
        let chain = self.chain();
        let mut block = first;
        while block < end_block {
            let n = (end_block - block).min(1 << 18);
            out.extend(chain.reported(block, n as usize)?);
            block += n;
        }
        Ok(out)
    }

    /// Byte offsets of the write-intent regions currently recorded dirty, ascending.
    pub fn dirty_regions(&self) -> Vec<u64> {
        let shift = self.region_size().trailing_zeros();
        self.intent
            .dirty_regions()
            .into_iter()
            .map(|r| r << shift)
            .collect()
    }

    /// Byte offsets of the regions that were dirty when this store was opened (empty after a
    /// clean shutdown). Their checksums were recomputed at open; the data in them may differ
    /// from other replicas (writes in flight at the crash), so the engine resyncs them. They
    /// stay recorded dirty until the second flush after open that finds them unwritten.
    pub fn recovered_regions(&self) -> Vec<u64> {
        let shift = self.region_size().trailing_zeros();
        self.recovered.iter().map(|r| r << shift).collect()
    }

    /// Size in bytes of a write-intent region.
    pub fn region_size(&self) -> u64 {
        self.intent.region_size()
    }

    /// Clean shutdown: flush, clear the dirty bitmap, record the store clean.
    pub fn close(self) -> Result<()> {
        self.flush()?;
        // A clean store's entries are trusted at open: they must be durable.
        self.chain().head().layer.sync_crc_file()?;
        let ReplicaStore { db, dir, .. } = self;
        db.close_clean()?;
        tracing::debug!(dir = %dir.display(), "replica store closed cleanly");
        Ok(())
    }

    /// Drops the pages of every layer from the page cache, as memory
    /// pressure would: the next reads of them go to the disk. For tests of
    /// the cache-only read path, here and in the crates above.
    #[doc(hidden)]
    pub fn drop_page_cache(&self) -> Result<()> {
        for l in self.chain().layers() {
            l.layer.drop_page_cache()?;
        }
        Ok(())
    }

    /// Drops the store without the clean-shutdown path, as a crash would (the page cache is
    /// kept, as after `kill -9`). For tests of recovery, here and in the crates above.
    #[doc(hidden)]
    pub fn crash(self) {
        drop(self);
    }
}

impl Halves {
    fn data(self) -> bool {
        match self {
            Halves::Both => true,
            #[cfg(test)]
            Halves::DataOnly => true,
            #[cfg(test)]
            Halves::CrcOnly => false,
        }
    }

    fn crc(self) -> bool {
        match self {
            Halves::Both => true,
            #[cfg(test)]
            Halves::DataOnly => false,
            #[cfg(test)]
            Halves::CrcOnly => true,
        }
    }
}

#[cfg(test)]
impl ReplicaStore {
    /// A write torn by a crash: the data reaches the data file, the checksum does not.
    pub(crate) fn torn_write_data_only(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(offset, data, None, Halves::DataOnly)
    }

    /// A write torn by a crash: the checksum reaches the checksum file, the data does not.
    pub(crate) fn torn_write_crc_only(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(offset, data, None, Halves::CrcOnly)
    }
}

fn check_record(dir: &Path, rec: &Record) -> Result<()> {
    let bad = |what: String| {
        Err(StoreError::Metadata(format!(
            "{}: {what}",
            dir.join(meta::META_FILE).display()
        )))
    };
    if rec.size == 0 || !rec.size.is_multiple_of(BLOCK) {
        return bad(format!(
            "recorded size {} is not a multiple of 4096",
            rec.size
        ));
    }
    if !rec.chunk_size.is_power_of_two()
        || rec.chunk_size < MIN_CHUNK_SIZE
        || rec.chunk_size > MAX_CHUNK_SIZE
    {
        return bad(format!("recorded chunk size {} is invalid", rec.chunk_size));
    }
    if !rec.region_size.is_power_of_two() || rec.region_size < BLOCK {
        return bad(format!(
            "recorded region size {} is invalid",
            rec.region_size
        ));
    }
    Ok(())
}

/// Brings a format-1 head layer to format 2. Format 1 stored a written block's CRC32C as
/// is, so a block whose CRC32C is 1 has the entry that now means "discarded": rewrite those
/// entries escaped (module `entry`). Entries of 0 meant "never written or discarded", which
/// read alike in a chain of one layer; they stay "never written". The rewrite is durable
/// before the caller records the new format version, and idempotent if a crash comes first.
fn upgrade_from_v1(dir: &Path, head: &Layer, size: u64) -> Result<()> {
    const PIECE: u64 = 256 * 1024; // entries per pass: 1 MiB of the checksum file
    let blocks = size / BLOCK;
    let mut rewritten = 0u64;
    let mut first = 0u64;
    while first < blocks {
        let n = PIECE.min(blocks - first);
        let mut entries = head.read_crcs(first, n as usize)?;
        let mut changed = false;
        for e in entries.iter_mut().filter(|e| **e == DISCARDED) {
            *e = entry::written(DISCARDED);
            changed = true;
            rewritten += 1;
        }
        if changed {
            head.write_crcs(first, &entries)?;
        }
        first += n;
    }
    head.sync()?;
    tracing::info!(
        dir = %dir.display(),
        rewritten,
        "upgraded the store from format 1 to format 2"
    );
    Ok(())
}

/// Recomputes and stores the checksum of every block of region `r` from the data on disk.
///
/// In a head with parents, a block whose entry says written but whose data reads as zeroes
/// (the entry reached the disk, the data did not) goes back to "never written" if a parent
/// holds the block, so it reads as before the torn write rather than as zeroes.
fn recover_region(
    head: &Layer,
    has_parent: &dyn Fn(u64) -> bool,
    r: u64,
    region_size: u64,
    size: u64,
) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let start = r * region_size;
    let end = start.saturating_add(region_size).min(size);
    let mut buf = vec![0u8; PIECE.min(end - start) as usize];
    let mut pos = start;
    let mut fixed = 0usize;
    while pos < end {
        let n = PIECE.min(end - pos);
        let piece = &mut buf[..n as usize];
        head.read_data(pos, piece)?;
        let first = pos / BLOCK;
        let stored = head.read_crcs(first, (n / BLOCK) as usize)?;
        let new: Vec<u32> = piece
            .chunks_exact(BLOCK_USIZE)
            .zip(&stored)
            .enumerate()
            .map(|(i, (b, &s))| match entry::recovered(b, s) {
                DISCARDED if s != DISCARDED && has_parent(first + i as u64) => entry::UNWRITTEN,
                e => e,
            })
            .collect();
        if new != stored {
            fixed += new.iter().zip(&stored).filter(|(a, b)| a != b).count();
            head.write_crcs(first, &new)?;
        }
        pos += n;
    }
    if fixed > 0 {
        tracing::info!(region = r, blocks = fixed, "recovery rewrote checksums");
    }
    Ok(())
}

/// The extent index of a chain: every read-only layer's extent list folded
/// oldest first (a newer layer's blocks replace an older one's). The part of a
/// layer being deleted that is already merged (below its cursor) belongs to its
/// child if the child is read-only; a head child holds those blocks itself.
pub(crate) fn fold_index(
    layers: &[LayerInfo],
    extents: &std::collections::HashMap<crate::index::LayerId, Vec<crate::index::Extent>>,
) -> ExtentIndex {
    let mut index = ExtentIndex::default();
    let n = layers.len();
    for (pos, info) in layers.iter().enumerate() {
        if pos + 1 == n {
            break;
        }
        let Some(list) = extents.get(&info.id) else {
            continue;
        };
        let child = &layers[pos + 1];
        for &(s, e) in list {
            if info.deleting && s < info.merged_blocks {
                let cut = e.min(info.merged_blocks);
                if pos + 2 < n {
                    index.assign(s, cut, child.id);
                }
                if cut < e {
                    index.assign(cut, e, info.id);
                }
            } else {
                index.assign(s, e, info.id);
            }
        }
    }
    index
}

/// Removes layer files that no layer of the chain names: left by a crash
/// between creating a layer's files and recording it, or between dropping a
/// layer from the chain and removing its files.
fn remove_orphan_layers(dir: &Path, layers: &[LayerInfo]) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| crate::error::io_err(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| crate::error::io_err(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name
            .strip_suffix(".img")
            .or_else(|| name.strip_suffix(".crc"))
        else {
            continue;
        };
        let ours = stem == HEAD
            || (stem.len() > 1
                && stem.starts_with('l')
                && stem[1..].bytes().all(|b| b.is_ascii_digit()));
        if ours && !layers.iter().any(|l| l.name == stem) {
            tracing::info!(dir = %dir.display(), file = name, "removing a layer file no chain names");
            crate::layer::remove_files(dir, stem)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod filled_ranges {
    use super::{FilledRanges, MAX_FILLED_RANGES};

    #[test]
    fn ranges_that_meet_are_one_and_too_many_become_one_span() {
        let mut f = FilledRanges::default();
        f.add("head.img", 0, 4096);
        f.add("head.img", 4096, 8192);
        f.add("old.img", 4096, 4096);
        f.add("head.img", 65536, 4096);
        assert_eq!(
            f.by_layer,
            [
                ("head.img".to_string(), vec![(0, 12288), (65536, 4096)]),
                ("old.img".to_string(), vec![(4096, 4096)]),
            ]
        );
        let mut f = FilledRanges::default();
        for i in 0..=MAX_FILLED_RANGES as u64 {
            f.add("head.img", (i + 1) * 2 * 4096, 4096);
        }
        assert_eq!(
            f.by_layer,
            [(
                "head.img".to_string(),
                vec![(2 * 4096, MAX_FILLED_RANGES as u64 * 2 * 4096 + 4096)]
            )]
        );
    }
}
