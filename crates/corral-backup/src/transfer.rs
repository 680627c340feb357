//! Writing a backup to a target and reading one back, over any source and
//! sink of 64 KiB blocks (the engine's snapshot reads and replicated
//! writes, once those are wired; tests use memory).
//!
//! A backup reads only the blocks it is told may have changed since its
//! parent (or, for a full backup, may hold data): the others keep the
//! parent's entries, and a GiB with none keeps the parent's page. Blocks
//! of zeroes are not stored; a block whose hash the pages it touches
//! already know, or that this backup already stored, is not stored again.
//! Packs are put as they fill, pages as they are done, the manifest last.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};

use crate::block::{self, BLOCK_SIZE};
use crate::lease::HeldLease;
use crate::manifest::{FORMAT, Manifest};
use crate::reader::{fetch_span, off_runtime, read_page, spans};
use crate::recent::RecentObjects;
use crate::target::{ObjectInfo, Put, Target, TargetError};
use crate::{
    BlockHash, BlockRef, FormatError, PAGE_BLOCKS, PackBuilder, PackTrailer, Page, layout,
};

/// Default bytes of compressed blocks per pack.
pub const PACK_BYTES: usize = 64 << 20;

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("reading block {index} of the volume: {why}")]
    Source { index: u64, why: String },
    #[error("writing block {index} of the volume: {why}")]
    Sink { index: u64, why: String },
    #[error("backup {backup} of volume {volume} already exists")]
    Exists { volume: String, backup: String },
    #[error("block {index}: {why}")]
    Invalid { index: u64, why: String },
}

/// Where a backup's blocks come from.
pub trait BlockSource: Sync {
    /// The 64 KiB block `index` of what is backed up; the last block of a
    /// volume whose size is not a multiple of 64 KiB comes zero-padded.
    fn read_block(&self, index: u64) -> impl Future<Output = Result<Bytes, String>> + Send;

    /// `count` consecutive blocks from `first`, back to back (a source
    /// that can read them in one call says so by overriding this).
    fn read_blocks(
        &self,
        first: u64,
        count: u64,
    ) -> impl Future<Output = Result<Bytes, String>> + Send {
        async move {
            let mut out = Vec::with_capacity(count as usize * BLOCK_SIZE);
            for i in 0..count {
                out.extend_from_slice(&self.read_block(first + i).await?);
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Where a restore's blocks go (a new volume: blocks never written stay
/// zero).
pub trait BlockSink: Sync {
    /// Block `index`, 64 KiB (the caller cuts the last one to the volume).
    fn write_block(
        &self,
        index: u64,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// What to back up.
#[derive(Clone, Debug)]
pub struct BackupSpec {
    pub volume: String,
    pub name: String,
    pub snapshot: String,
    pub size: u64,
    pub created_unix_ms: u64,
    /// Bytes of compressed blocks per pack ([`PACK_BYTES`] unless a test
    /// wants smaller).
    pub pack_bytes: usize,
}

/// What a backup did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupReport {
    pub blocks_read: u64,
    pub blocks_stored: u64,
    pub blocks_deduplicated: u64,
    pub zero_blocks: u64,
    /// Bytes put: packs, pages and the manifest.
    pub bytes_put: u64,
    pub packs_put: u64,
    pub pages_put: u64,
    pub manifest: Option<Manifest>,
}

/// The pack being filled: its name (chosen when started, so that pages can
/// name it before it is put) and its blocks.
struct OpenPack {
    id: BlockHash,
    builder: PackBuilder,
}

fn pack_name(spec: &BackupSpec, n: u64) -> BlockHash {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    BlockHash::of(
        format!(
            "{}/{}/{nanos}/{n}/{}",
            spec.volume,
            spec.name,
            std::process::id()
        )
        .as_bytes(),
    )
}

/// Blocks read, hashed and compressed ahead of the one being packed...
const READ_AHEAD: usize = 64;
/// ... in runs of up to this many neighbouring blocks, one read each.
const READ_RUN: u64 = 16;

/// `blocks` (sorted, distinct) as runs of consecutive indexes, each at
/// most `max` long: (first, count).
fn runs_of(blocks: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, count)) if *first + *count == b && *count < max => *count += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}
/// Packs uploading at once.
const UPLOADS: usize = 3;
/// A backup with less to store than [`UPLOADS`] full packs cuts its packs
/// smaller, down to this, so that they upload at once and while blocks are
/// still read instead of as one object at the end (decision 66).
const MIN_SPLIT_PACK: usize = 4 << 20;
/// The parent's pages fetched ahead of the page being written.
const PAGES_AHEAD: usize = 2;

/// Something a backup put: a pack or a page.
enum Uploaded {
    Pack(u64),
    Page { bytes: u64, created: bool },
}

type Upload<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Uploaded, TransferError>> + Send + 'a>>;

/// A block read and made ready to store, off the runtime's threads.
enum Prepared {
    Zero,
    Data {
        hash: BlockHash,
        /// As the pack stores it: lz4, or a view of the block as read.
        stored: Bytes,
    },
}

fn prepare(data: Bytes) -> Prepared {
    if block::is_zero(&data) {
        Prepared::Zero
    } else {
        let hash = BlockHash::of(&data);
        let stored = match block::compress(&data) {
            Some(lz4) => Bytes::from(lz4),
            None => data,
        };
        Prepared::Data { hash, stored }
    }
}

/// Progress of a backup, for whoever shows it (the engine's `volume info`).
#[derive(Debug, Default)]
pub struct BackupProgress {
    pub blocks_total: AtomicU64,
    pub blocks_done: AtomicU64,
    pub bytes_put: AtomicU64,
}

/// The blocks stored in `packs` (left by an interrupted backup of the same
/// volume, see [`crate::lease`]): a backup that runs again finds them here
/// instead of uploading them again. A pack that cannot be read (gone,
/// damaged) is skipped.
pub async fn blocks_in_packs(
    target: &Target,
    volume: &str,
    packs: &[BlockHash],
) -> HashMap<BlockHash, BlockRef> {
    let mut out = HashMap::new();
    for id in packs {
        let name = layout::pack(volume, id);
        let Ok(len) = target.size(&name).await else {
            continue;
        };
        let Some(tail_start) = len.checked_sub(PackTrailer::LEN as u64) else {
            continue;
        };
        let Ok(tail) = target.get_range(&name, tail_start..len).await else {
            continue;
        };
        let Ok(trailer) = PackTrailer::parse(&tail, len) else {
            continue;
        };
        let (from, len) = trailer.footer_range();
        let Ok(footer) = target.get_range(&name, from..from + len).await else {
            continue;
        };
        let Ok(entries) = trailer.parse_footer(&footer) else {
            continue;
        };
        for e in entries {
            out.insert(
                e.hash,
                BlockRef {
                    pack: *id,
                    offset: e.offset,
                    len: e.len,
                    hash: e.hash,
                },
            );
        }
    }
    out
}

/// What a backup run may use beside its source: all optional.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackupAids<'a> {
    /// Blocks already stored in packs no manifest names yet (from
    /// [`blocks_in_packs`]: an interrupted backup's), used before
    /// uploading.
    pub reusable: Option<&'a HashMap<BlockHash, BlockRef>>,
    /// Told of each pack put, so that a run after this one is interrupted
    /// can reuse them.
    pub lease: Option<&'a HeldLease>,
    pub progress: Option<&'a BackupProgress>,
    /// Pages and manifests kept from earlier backups: the parent's pages
    /// are taken from here before the target, and this backup's are kept.
    pub recent: Option<&'a RecentObjects>,
}

/// Backs up `spec` to `target`. `changed`: the blocks that may differ from
/// `parent` (every block that may hold data, without one), in any order.
pub async fn write_backup<S: BlockSource>(
    target: &Target,
    spec: &BackupSpec,
    parent: Option<&Manifest>,
    changed: &[u64],
    source: &S,
) -> Result<BackupReport, TransferError> {
    write_backup_with(target, spec, parent, changed, source, BackupAids::default()).await
}

/// [`write_backup`] with `aids`. Blocks are read [`READ_AHEAD`] at a time
/// and [`UPLOADS`] packs upload at once; the manifest is put once every
/// pack and page it names is there.
pub async fn write_backup_with<S: BlockSource>(
    target: &Target,
    spec: &BackupSpec,
    parent: Option<&Manifest>,
    changed: &[u64],
    source: &S,
    aids: BackupAids<'_>,
) -> Result<BackupReport, TransferError> {
    let BackupAids {
        reusable,
        lease,
        progress,
        recent,
    } = aids;
    let no_reuse = HashMap::new();
    let reusable = reusable.unwrap_or(&no_reuse);
    layout::check_name("volume", &spec.volume)?;
    layout::check_name("backup", &spec.name)?;
    let pages = Manifest::pages_for(spec.size);
    let total_blocks = spec.size.div_ceil(BLOCK_SIZE as u64);
    if let Some(p) = parent
        && (p.volume != spec.volume || p.size > spec.size)
    {
        return Err(FormatError::Invalid {
            what: "parent backup",
            why: format!(
                "{} of volume {} ({} bytes) cannot be the parent of a backup of {} ({} bytes)",
                p.name, p.volume, p.size, spec.volume, spec.size
            ),
        }
        .into());
    }
    // A name already taken: said before anything is put (two writers at
    // once both get here; the manifest's create-if-absent decides).
    let manifest_name = layout::manifest(&spec.volume, &spec.name);
    match target.size(&manifest_name).await {
        Ok(_) => {
            return Err(TransferError::Exists {
                volume: spec.volume.clone(),
                backup: spec.name.clone(),
            });
        }
        Err(TargetError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut by_page: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for &b in changed {
        if b >= total_blocks {
            return Err(TransferError::Invalid {
                index: b,
                why: format!("past the volume's {total_blocks} blocks"),
            });
        }
        by_page.entry(b as usize / PAGE_BLOCKS).or_default().push(b);
    }
    let changed_blocks: usize = by_page.values().map(Vec::len).sum();
    if let Some(p) = progress {
        p.blocks_total
            .store(changed_blocks as u64, Ordering::Relaxed);
    }
    let pack_bytes = spec.pack_bytes.min(
        (changed_blocks * BLOCK_SIZE)
            .div_ceil(UPLOADS)
            .max(MIN_SPLIT_PACK),
    );
    // The parent's pages that this backup changes, in order: fetched
    // [`PAGES_AHEAD`] at a time while blocks are read.
    let mut parent_ids = Vec::new();
    if let Some(p) = parent {
        for &index in by_page.keys() {
            if index < p.pages.len()
                && let Some(id) = p.page(index)?
            {
                parent_ids.push((index, id));
            }
        }
    }
    let mut parent_pages = futures::stream::iter(parent_ids)
        .map(|(index, id)| async move {
            let name = layout::page(&spec.volume, &id);
            let object = match recent.and_then(|r| r.page(target, &name)) {
                Some(kept) => kept,
                None => target.get(&name).await?,
            };
            Ok::<_, TransferError>((index, Page::decode(&object, &id)?))
        })
        .buffered(PAGES_AHEAD);
    let mut fetched: std::collections::VecDeque<(usize, Page)> = Default::default();
    let mut report = BackupReport::default();
    let mut manifest = Manifest {
        format: FORMAT.into(),
        volume: spec.volume.clone(),
        name: spec.name.clone(),
        size: spec.size,
        block_size: BLOCK_SIZE as u32,
        snapshot: spec.snapshot.clone(),
        created_unix_ms: spec.created_unix_ms,
        parent: parent.map(|p| p.name.clone()),
        pages: vec![None; pages],
    };
    // Blocks this backup stored, by hash (deduplication across its pages).
    let mut stored: HashMap<BlockHash, BlockRef> = HashMap::new();
    // Packs of an interrupted backup this one names: checked at the end.
    let mut reused: BTreeSet<BlockHash> = BTreeSet::new();
    let mut packs = 0u64;
    let mut open = OpenPack {
        id: pack_name(spec, packs),
        builder: PackBuilder::new(),
    };
    let mut uploads: FuturesUnordered<Upload<'_>> = FuturesUnordered::new();
    for index in 0..pages {
        let from_parent = match parent {
            Some(p) if index < p.pages.len() => p.page(index)?,
            _ => None,
        };
        let Some(blocks) = by_page.get_mut(&index) else {
            manifest.pages[index] = from_parent.map(|h| h.to_hex());
            continue;
        };
        blocks.sort_unstable();
        blocks.dedup();
        let in_page = manifest.blocks_in_page(index);
        let mut page = match from_parent {
            Some(_) => {
                let next = match fetched.pop_front() {
                    Some(p) => Some(p),
                    None => parent_pages.next().await.transpose()?,
                };
                let Some((_, mut p)) = next.filter(|(at, _)| *at == index) else {
                    return Err(FormatError::Invalid {
                        what: "parent backup",
                        why: format!("page {index} was not fetched in order"),
                    }
                    .into());
                };
                // The volume may have grown since the parent.
                p.blocks.resize(in_page, None);
                p
            }
            None => Page::zeroes(in_page),
        };
        let known: HashMap<BlockHash, BlockRef> =
            page.blocks.iter().flatten().map(|r| (r.hash, *r)).collect();
        // Runs of neighbouring blocks are read with one call each.
        let runs = runs_of(blocks, READ_RUN);
        let mut ready = futures::stream::iter(runs)
            .map(|(first, count)| async move {
                let data = source
                    .read_blocks(first, count)
                    .await
                    .map_err(|why| TransferError::Source { index: first, why })?;
                if data.len() != count as usize * BLOCK_SIZE {
                    return Err(TransferError::Source {
                        index: first,
                        why: format!(
                            "{} bytes for {count} blocks, {} expected",
                            data.len(),
                            count as usize * BLOCK_SIZE
                        ),
                    });
                }
                let prepared = off_runtime(move || {
                    (0..count as usize)
                        .map(|i| prepare(data.slice(i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE)))
                        .collect::<Vec<_>>()
                })
                .await;
                Ok(futures::stream::iter(prepared.into_iter().enumerate().map(
                    move |(i, p)| Ok::<_, TransferError>((first + i as u64, p)),
                )))
            })
            .buffered(READ_AHEAD / READ_RUN as usize)
            .try_flatten();
        loop {
            // Uploads go on while blocks are read: whichever is ready first.
            let next = tokio::select! {
                Some(done) = uploads.next(), if !uploads.is_empty() => {
                    report.add(done?);
                    continue;
                }
                Some(page) = parent_pages.next(), if fetched.len() < PAGES_AHEAD => {
                    fetched.push_back(page?);
                    continue;
                }
                next = ready.next() => next,
            };
            let Some(next) = next else { break };
            let (b, prepared) = next?;
            report.blocks_read += 1;
            if let Some(p) = progress {
                p.blocks_done.fetch_add(1, Ordering::Relaxed);
            }
            let slot = b as usize % PAGE_BLOCKS;
            let (hash, block_bytes) = match prepared {
                Prepared::Zero => {
                    page.blocks[slot] = None;
                    report.zero_blocks += 1;
                    continue;
                }
                Prepared::Data { hash, stored } => (hash, stored),
            };
            if let Some(r) = stored.get(&hash).or_else(|| known.get(&hash)) {
                page.blocks[slot] = Some(*r);
                report.blocks_deduplicated += 1;
                continue;
            }
            if let Some(r) = reusable.get(&hash) {
                page.blocks[slot] = Some(*r);
                stored.insert(hash, *r);
                reused.insert(r.pack);
                report.blocks_deduplicated += 1;
                continue;
            }
            let entry = open.builder.add(hash, block_bytes);
            let r = BlockRef {
                pack: open.id,
                offset: entry.offset,
                len: entry.len,
                hash,
            };
            stored.insert(hash, r);
            page.blocks[slot] = Some(r);
            report.blocks_stored += 1;
            if open.builder.data_len() >= pack_bytes {
                packs += 1;
                let full = std::mem::replace(
                    &mut open,
                    OpenPack {
                        id: pack_name(spec, packs),
                        builder: PackBuilder::new(),
                    },
                );
                uploads.push(Box::pin(put_pack(target, spec, full, lease, progress)));
                report.wait_for_uploads(&mut uploads, UPLOADS - 1).await?;
            }
        }
        drop(ready);
        if page.blocks.iter().all(Option::is_none) {
            manifest.pages[index] = None;
            continue;
        }
        // Put while the next page's blocks are read; the manifest waits
        // for every put.
        let (id, object) = page.encode();
        manifest.pages[index] = Some(id.to_hex());
        uploads.push(Box::pin(async move {
            let bytes = object.len() as u64;
            let name = layout::page(&spec.volume, &id);
            let object = Bytes::from(object);
            let put = target.put_new(&name, object.clone()).await?;
            if let Some(r) = recent {
                r.keep_page(target, &name, object);
            }
            Ok(Uploaded::Page {
                bytes,
                created: put == Put::Created,
            })
        }));
        report.wait_for_uploads(&mut uploads, UPLOADS - 1).await?;
    }
    if !open.builder.is_empty() {
        uploads.push(Box::pin(put_pack(target, spec, open, lease, progress)));
    }
    report.wait_for_uploads(&mut uploads, 0).await?;
    drop(uploads);
    // The reused packs must still be there (a collection that was already
    // deleting when this backup started could have taken one).
    for id in &reused {
        target.size(&layout::pack(&spec.volume, id)).await?;
    }
    // Last: only now does the backup exist.
    let bytes = Bytes::from(manifest.encode());
    report.bytes_put += bytes.len() as u64;
    if target.put_new(&manifest_name, bytes.clone()).await? == Put::Existed {
        return Err(TransferError::Exists {
            volume: spec.volume.clone(),
            backup: spec.name.clone(),
        });
    }
    // Kept as the target lists it, for the next backup's search for its
    // parent (the backup stands if this fails).
    if let Some(r) = recent
        && let Ok(listed) = target.info(&manifest_name).await
    {
        r.keep_manifest(target, &listed, bytes);
    }
    report.manifest = Some(manifest);
    Ok(report)
}

impl BackupReport {
    /// Waits until at most `left` of `uploads` are still running, counting
    /// each one done; the first that failed fails the backup.
    async fn wait_for_uploads(
        &mut self,
        uploads: &mut FuturesUnordered<Upload<'_>>,
        left: usize,
    ) -> Result<(), TransferError> {
        while uploads.len() > left {
            match uploads.next().await {
                Some(done) => self.add(done?),
                None => break,
            }
        }
        Ok(())
    }

    fn add(&mut self, put: Uploaded) {
        match put {
            Uploaded::Pack(bytes) => {
                self.bytes_put += bytes;
                self.packs_put += 1;
            }
            Uploaded::Page { bytes, created } => {
                self.bytes_put += bytes;
                self.pages_put += u64::from(created);
            }
        }
    }
}

/// Puts a full pack; returns its size. The lease learns of it after.
async fn put_pack(
    target: &Target,
    spec: &BackupSpec,
    pack: OpenPack,
    lease: Option<&HeldLease>,
    progress: Option<&BackupProgress>,
) -> Result<Uploaded, TransferError> {
    let (parts, _) = pack.builder.finish();
    let len = parts.iter().map(|p| p.len() as u64).sum();
    target
        .put_new_parts(&layout::pack(&spec.volume, &pack.id), parts)
        .await?;
    if let Some(p) = progress {
        p.bytes_put.fetch_add(len, Ordering::Relaxed);
    }
    if let Some(l) = lease {
        l.record_pack(pack.id).await;
    }
    Ok(Uploaded::Pack(len))
}

/// A backup's manifest as listed under the volume's `backups/` (the
/// listing's object), read and checked: from `recent` when it holds the
/// object as listed, else from the target (and kept there).
pub async fn read_listed_manifest(
    target: &Target,
    volume: &str,
    backup: &str,
    listed: &ObjectInfo,
    recent: Option<&RecentObjects>,
) -> Result<Manifest, TransferError> {
    layout::check_name("volume", volume)?;
    layout::check_name("backup", backup)?;
    let bytes = match recent.and_then(|r| r.manifest(target, listed)) {
        Some(kept) => kept,
        None => {
            let bytes = target.get(&layout::manifest(volume, backup)).await?;
            if let Some(r) = recent {
                r.keep_manifest(target, listed, bytes.clone());
            }
            bytes
        }
    };
    check_manifest(&bytes, volume, backup)
}

fn check_manifest(bytes: &[u8], volume: &str, backup: &str) -> Result<Manifest, TransferError> {
    let m = Manifest::decode(bytes)?;
    if m.volume != volume || m.name != backup {
        return Err(FormatError::Invalid {
            what: "manifest",
            why: format!("names {}/{}, found as {volume}/{backup}", m.volume, m.name),
        }
        .into());
    }
    Ok(m)
}

/// A backup's manifest, read and checked.
pub async fn read_manifest(
    target: &Target,
    volume: &str,
    backup: &str,
) -> Result<Manifest, TransferError> {
    layout::check_name("volume", volume)?;
    layout::check_name("backup", backup)?;
    let bytes = target.get(&layout::manifest(volume, backup)).await?;
    check_manifest(&bytes, volume, backup)
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub blocks_written: u64,
    pub zero_blocks: u64,
    pub bytes_read: u64,
    pub requests: u64,
}

/// Writes backup `manifest` into `sink`, every block checked against its
/// hash; blocks of zeroes are not written.
pub async fn restore<S: BlockSink>(
    target: &Target,
    manifest: &Manifest,
    sink: &S,
) -> Result<RestoreReport, TransferError> {
    let mut report = RestoreReport::default();
    for index in 0..manifest.pages.len() {
        let Some((page, page_bytes)) = read_page(target, manifest, index).await? else {
            report.zero_blocks += manifest.blocks_in_page(index) as u64;
            continue;
        };
        report.bytes_read += page_bytes;
        report.requests += 1;
        // Per pack, in offset order, neighbours read together.
        let first = (index * PAGE_BLOCKS) as u64;
        let mut wanted: Vec<(u64, BlockRef)> = Vec::new();
        for (slot, b) in page.blocks.iter().enumerate() {
            match b {
                Some(r) => wanted.push((first + slot as u64, *r)),
                None => report.zero_blocks += 1,
            }
        }
        wanted.sort_by_key(|(_, r)| (r.pack, r.offset));
        for run in spans(&wanted) {
            let span = fetch_span(target, &manifest.volume, &wanted[run]).await?;
            report.requests += 1;
            report.bytes_read += span.bytes_read;
            for (block_index, data) in span.blocks {
                sink.write_block(block_index, data.to_vec())
                    .await
                    .map_err(|why| TransferError::Sink {
                        index: block_index,
                        why,
                    })?;
                report.blocks_written += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{GIB, MemoryVolume as Volume, file_target as target, spec};

    /// Backup `name` of volume "db" restores exactly `image`.
    async fn assert_restores(t: &Target, name: &str, image: &Volume) {
        let m = read_manifest(t, "db", name).await.unwrap();
        let out = Volume::default();
        restore(t, &m, &out).await.unwrap();
        assert!(out.snapshot() == image.snapshot(), "backup {name}");
    }

    #[tokio::test]
    async fn a_full_then_an_incremental_backup_restore_bit_exact_and_store_only_the_change() {
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let size = 2 * GIB + 128 * 1024; // three pages, the last of two blocks
        let vol = Volume::default();
        for (i, b) in [0u64, 1, 2, 5, 100, 16_384 * 2, 16_384 * 2 + 1]
            .iter()
            .enumerate()
        {
            vol.set(*b, i as u8 + 1);
        }
        vol.set(7, 1); // the same bytes as block 0
        let mut written: Vec<u64> = vol.snapshot().keys().copied().collect();
        written.push(9); // listed, but zero
        let full = write_backup(&t, &spec("b1", size), None, &written, &vol)
            .await
            .unwrap();
        let m1 = full.manifest.clone().unwrap();
        assert_eq!(full.blocks_read, 9);
        assert_eq!(full.zero_blocks, 1);
        assert_eq!(full.blocks_deduplicated, 1, "block 7 is block 0 again");
        assert_eq!(full.blocks_stored, 7);
        assert!(full.packs_put >= 2, "small packs: {full:?}");
        assert_eq!(m1.pages[1], None, "the middle GiB holds nothing");
        let image1 = vol.snapshot();

        // One block changes, one is discarded (zero now).
        vol.set(16_384 * 2 + 1, 99);
        vol.0.lock().unwrap().remove(&5);
        let inc = write_backup(&t, &spec("b2", size), Some(&m1), &[16_384 * 2 + 1, 5], &vol)
            .await
            .unwrap();
        let m2 = inc.manifest.clone().unwrap();
        assert_eq!(
            (inc.blocks_read, inc.blocks_stored, inc.zero_blocks),
            (2, 1, 1)
        );
        assert_eq!(inc.packs_put, 1);
        assert_eq!(inc.pages_put, 2, "the two GiBs it touched");
        assert_eq!(m2.parent.as_deref(), Some("b1"));
        assert!(
            inc.bytes_put < full.bytes_put / 4,
            "an incremental puts about its change: {} vs {}",
            inc.bytes_put,
            full.bytes_put
        );

        for (m, image) in [(&m1, &image1), (&m2, &vol.snapshot())] {
            let m = read_manifest(&t, "db", &m.name).await.unwrap();
            let restored = Volume::default();
            let r = restore(&t, &m, &restored).await.unwrap();
            assert_eq!(&restored.snapshot(), image, "backup {}", m.name);
            assert_eq!(r.blocks_written, image.len() as u64);
        }
    }

    /// An incremental backup takes its parent's manifest and pages from
    /// those the parent kept when it wrote them: with the parent's page
    /// gone from the target it still succeeds (and without them it cannot),
    /// and it restores bit-exact.
    #[tokio::test]
    async fn an_incremental_starts_from_the_pages_its_parent_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let vol = Volume::default();
        for b in 0..4 {
            vol.set(b, b as u8 + 1);
        }
        let recent = RecentObjects::default();
        let aids = BackupAids {
            recent: Some(&recent),
            ..Default::default()
        };
        let full = write_backup_with(&t, &spec("b1", GIB), None, &[0, 1, 2, 3], &vol, aids)
            .await
            .unwrap();
        let m1 = full.manifest.unwrap();
        let listed = t.list_objects("volumes/db/backups/").await.unwrap();
        let found = read_listed_manifest(&t, "db", "b1", &listed[0], Some(&recent))
            .await
            .unwrap();
        assert_eq!(found, m1);
        let page = layout::page("db", &m1.page(0).unwrap().unwrap());
        t.delete(&page).await.unwrap();
        vol.set(2, 99);
        assert!(
            write_backup(&t, &spec("no-cache", GIB), Some(&m1), &[2], &vol)
                .await
                .is_err(),
            "the parent's page is gone from the target"
        );
        let inc = write_backup_with(&t, &spec("b2", GIB), Some(&m1), &[2], &vol, aids)
            .await
            .unwrap();
        assert_eq!(inc.blocks_read, 1);
        assert_restores(&t, "b2", &vol).await;
    }

    /// 12 MiB to store with the default 64 MiB packs: cut into three packs
    /// of about 4 MiB (put at once, while blocks are still read), and the
    /// backup restores bit-exact.
    #[tokio::test]
    async fn a_small_backup_is_cut_into_packs_that_upload_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let vol = Volume::default();
        let blocks: Vec<u64> = (0..192).collect();
        for &b in &blocks {
            vol.set(b, b as u8);
        }
        let spec = BackupSpec {
            pack_bytes: PACK_BYTES,
            ..spec("small", GIB)
        };
        let r = write_backup(&t, &spec, None, &blocks, &vol).await.unwrap();
        assert_eq!((r.blocks_stored, r.packs_put), (192, 3), "{r:?}");
        assert_restores(&t, "small", &vol).await;
    }

    #[tokio::test]
    async fn a_backup_run_again_reuses_the_packs_an_interrupted_one_put() {
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let vol = Volume::default();
        for b in 0..12 {
            vol.set(b, b as u8);
        }
        let all: Vec<u64> = (0..12).collect();
        // An earlier run put its packs, then died before its manifest.
        let first = write_backup(&t, &spec("lost", GIB), None, &all, &vol)
            .await
            .unwrap();
        t.delete(&layout::manifest("db", "lost")).await.unwrap();
        let packs: Vec<BlockHash> = t
            .list("volumes/db/packs/")
            .await
            .unwrap()
            .iter()
            .map(|p| BlockHash::from_hex(p.rsplit('/').next().unwrap()).unwrap())
            .collect();
        assert_eq!(packs.len() as u64, first.packs_put);
        let mut bogus = packs.clone();
        bogus.push(BlockHash::of(b"no such pack"));
        let reusable = blocks_in_packs(&t, "db", &bogus).await;
        assert_eq!(
            reusable.len(),
            12,
            "every block of the packs, the missing one skipped"
        );

        vol.set(3, 99); // one block differs now
        let aids = BackupAids {
            reusable: Some(&reusable),
            ..Default::default()
        };
        let again = write_backup_with(&t, &spec("again", GIB), None, &all, &vol, aids)
            .await
            .unwrap();
        assert_eq!((again.blocks_deduplicated, again.blocks_stored), (11, 1));
        assert_eq!(again.packs_put, 1);
        assert_restores(&t, "again", &vol).await;

        // A reused pack gone before the manifest: no manifest is put.
        let gone = packs[0];
        t.delete(&layout::pack("db", &gone)).await.unwrap();
        let err = write_backup_with(&t, &spec("third", GIB), None, &all, &vol, aids)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::Target(TargetError::NotFound { .. })),
            "{err}"
        );
        assert!(read_manifest(&t, "db", "third").await.is_err());
    }

    #[test]
    fn neighbouring_blocks_are_read_in_runs() {
        assert_eq!(runs_of(&[], 8), []);
        assert_eq!(runs_of(&[5], 8), [(5, 1)]);
        assert_eq!(runs_of(&[0, 1, 2, 4, 5, 9], 8), [(0, 3), (4, 2), (9, 1)]);
        let long: Vec<u64> = (10..30).collect();
        assert_eq!(runs_of(&long, 8), [(10, 8), (18, 8), (26, 4)]);
    }

    #[tokio::test]
    async fn two_writers_of_one_backup_name_cannot_both_win() {
        // Two clusters sharing a target, both backing up "db" as "nightly"
        // with different contents: one manifest, and it restores as its
        // writer's volume.
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let (a, b) = (Volume::default(), Volume::default());
        for i in 0..8 {
            a.set(i, 1);
            b.set(i, 2);
        }
        let all: Vec<u64> = (0..8).collect();
        let s = spec("nightly", GIB);
        let (ra, rb) = tokio::join!(
            write_backup(&t, &s, None, &all, &a),
            write_backup(&t, &s, None, &all, &b)
        );
        let won: Vec<&Volume> = [(&ra, &a), (&rb, &b)]
            .into_iter()
            .filter(|(r, _)| r.is_ok())
            .map(|(_, v)| v)
            .collect();
        assert_eq!(won.len(), 1, "{ra:?} {rb:?}");
        let lost = if ra.is_ok() { &rb } else { &ra };
        assert!(
            matches!(lost, Err(TransferError::Exists { .. })),
            "{lost:?}"
        );
        assert_restores(&t, "nightly", won[0]).await;
    }

    #[tokio::test]
    async fn a_reader_returns_any_range_as_backed_up_and_none_for_zeroes() {
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let size = GIB + 3 * BLOCK_SIZE as u64; // a second page of three blocks
        let vol = Volume::default();
        for b in [0u64, 1, 3, 16_384, 16_386] {
            vol.set(b, b as u8 ^ 0x5a);
        }
        let written: Vec<u64> = vol.snapshot().keys().copied().collect();
        write_backup(&t, &spec("r", size), None, &written, &vol)
            .await
            .unwrap();
        let reader = crate::BackupReader::open(t.clone(), "db", "r")
            .await
            .unwrap();
        assert_eq!(reader.size(), size);
        let image = vol.snapshot();
        let expect = |offset: u64, len: u64| -> Vec<u8> {
            (offset..offset + len)
                .map(|at| {
                    let b = at / BLOCK_SIZE as u64;
                    image
                        .get(&b)
                        .map_or(0, |d| d[(at % BLOCK_SIZE as u64) as usize])
                })
                .collect()
        };
        let bs = BLOCK_SIZE as u64;
        for (offset, len) in [
            (0, 4 * bs),
            (bs / 2, bs), // blocks 0 and 1, side by side in one pack
            (1000, 70_000),
            (2 * bs + 17, bs),
            (GIB - 10, 20),
            (GIB, 3 * bs),
            (size - 5, 5),
        ] {
            let got = reader.read(offset, len).await.unwrap().unwrap();
            assert_eq!(
                got.as_ref(),
                expect(offset, len).as_slice(),
                "{offset}+{len}"
            );
        }
        assert_eq!(
            reader.read(2 * bs, bs).await.unwrap(),
            None,
            "block 2 is zero"
        );
        assert_eq!(reader.read(10 * bs, 100 * bs).await.unwrap(), None);
        assert!(reader.read(size - 5, 6).await.is_err(), "past the end");
        assert!(reader.read(u64::MAX, 2).await.is_err());
        assert!(matches!(
            crate::BackupReader::open(t, "db", "absent").await,
            Err(TransferError::Target(TargetError::NotFound { .. }))
        ));
    }

    #[tokio::test]
    async fn a_changed_pack_fails_the_restore_and_a_name_is_taken_once() {
        let tmp = tempfile::tempdir().unwrap();
        let t = target(tmp.path());
        let vol = Volume::default();
        vol.set(3, 7);
        let s = spec("once", GIB);
        let m = write_backup(&t, &s, None, &[3], &vol)
            .await
            .unwrap()
            .manifest
            .unwrap();
        assert!(matches!(
            write_backup(&t, &s, None, &[3], &vol).await,
            Err(TransferError::Exists { .. })
        ));
        // Someone changes a byte of the pack.
        let packs = t.list("volumes/db/packs/").await.unwrap();
        assert_eq!(packs.len(), 1);
        let path = tmp.path().join(&packs[0]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = restore(&t, &m, &Volume::default()).await.unwrap_err();
        assert!(
            matches!(err, TransferError::Invalid { index: 3, .. }),
            "{err}"
        );
    }
}
