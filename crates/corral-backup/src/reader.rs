//! Reading a backup back: a backup named by one URL
//! (`TARGET/VOLUME/BACKUP`, [`BackupUrl`]) and [`BackupReader`], which
//! reads any byte range of the backed-up volume, every block checked
//! against its BLAKE3 before it is returned. A restore through the engine
//! fills a new volume with it; [`crate::transfer::restore`] writes a whole
//! backup into a sink with the same span reads.
//!
//! Blocks of one pack that lie near each other are read with one ranged
//! GET ([`spans`]); the pages of the last few GiB read are kept in memory.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::block::{self, BLOCK_SIZE};
use crate::manifest::Manifest;
use crate::target::{Target, TargetError};
use crate::transfer::{TransferError, read_manifest};
use crate::{BlockRef, FormatError, PAGE_BLOCKS, Page, layout};

/// Largest ranged GET (several neighbouring blocks of one pack).
pub(crate) const READ_SPAN: u64 = 8 << 20;
/// Pages (one GiB of the volume each, about 1 MiB decoded) kept in memory.
const CACHED_PAGES: usize = 4;

/// A backup's address: the target it is on, the volume and the backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupUrl {
    /// `file:///DIR` or `s3://BUCKET[/PREFIX]`.
    pub target: String,
    pub volume: String,
    pub backup: String,
}

impl BackupUrl {
    /// Parses `file:///DIR/VOLUME/BACKUP` or `s3://BUCKET[/PREFIX]/VOLUME/BACKUP`.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("file://") {
            ("file://", rest)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            ("s3://", rest)
        } else {
            return Err(bad(
                "expected file:///DIR/VOLUME/BACKUP or s3://BUCKET/PREFIX/VOLUME/BACKUP",
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (base, backup) = rest
            .rsplit_once('/')
            .ok_or_else(|| bad("it names no volume and backup"))?;
        let (base, volume) = base
            .rsplit_once('/')
            .ok_or_else(|| bad("it names no volume and backup"))?;
        let target = match scheme {
            "file://" if base.is_empty() => "file:///".to_string(),
            "s3://" if base.is_empty() => return Err(bad("no bucket before VOLUME/BACKUP")),
            _ => format!("{scheme}{base}"),
        };
        let checked = |what: &'static str, name: &str| {
            layout::check_name(what, name).map_err(|e| bad(&e.to_string()))
        };
        checked("volume", volume)?;
        checked("backup", backup)?;
        Ok(BackupUrl {
            target,
            volume: volume.to_string(),
            backup: backup.to_string(),
        })
    }
}

impl std::fmt::Display for BackupUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.target.trim_end_matches('/'),
            self.volume,
            self.backup
        )
    }
}

/// Groups `wanted` (sorted by pack and offset) into runs read with one
/// ranged GET each: same pack, each block starting at or before the end of
/// the run so far, the run at most [`READ_SPAN`] long.
pub(crate) fn spans(wanted: &[(u64, BlockRef)]) -> Vec<Range<usize>> {
    // Offsets come from the target: no overflow on forged ones.
    let end_of = |r: &BlockRef| r.offset.saturating_add(u64::from(r.len));
    let mut out = Vec::new();
    let mut i = 0;
    while i < wanted.len() {
        let pack = wanted[i].1.pack;
        let start = wanted[i].1.offset;
        let mut end = end_of(&wanted[i].1);
        let mut j = i + 1;
        while j < wanted.len()
            && wanted[j].1.pack == pack
            && wanted[j].1.offset <= end
            && end_of(&wanted[j].1) - start <= READ_SPAN
        {
            end = end.max(end_of(&wanted[j].1));
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// A run of blocks read and checked: each block's index and data, and the
/// bytes the GET returned (which the blocks stored as they are are views of).
pub(crate) struct FetchedSpan {
    pub blocks: Vec<(u64, Bytes)>,
    pub bytes_read: u64,
    pub got: Bytes,
}

impl FetchedSpan {
    /// Blocks `first..first + count` as one view of the bytes the GET
    /// returned, when this span holds exactly them, in order, stored as
    /// they are and one after another in the pack (what a full backup of
    /// incompressible data is): a restore then passes them on uncopied.
    fn as_one_view(&self, first: u64, count: u64) -> Option<Bytes> {
        let start = self.blocks.first()?.1.as_ptr() as usize;
        let whole = self.blocks.len() as u64 == count
            && self.blocks.iter().enumerate().all(|(i, (index, data))| {
                *index == first + i as u64
                    && data.len() == BLOCK_SIZE
                    && data.as_ptr() as usize == start + i * BLOCK_SIZE
            });
        let at = start.checked_sub(self.got.as_ptr() as usize)?;
        let end = at.checked_add(count as usize * BLOCK_SIZE)?;
        (whole && end <= self.got.len()).then(|| self.got.slice(at..end))
    }
}

/// Reads one run of [`spans`] with a ranged GET and checks every block
/// against its hash (on the blocking pool: lz4 and BLAKE3 of up to 8 MiB).
pub(crate) async fn fetch_span(
    target: &Target,
    volume: &str,
    run: &[(u64, BlockRef)],
) -> Result<FetchedSpan, TransferError> {
    let Some(first) = run.first() else {
        return Ok(FetchedSpan {
            blocks: Vec::new(),
            bytes_read: 0,
            got: Bytes::new(),
        });
    };
    let start = first.1.offset;
    let end = run
        .iter()
        .map(|(_, r)| r.offset.saturating_add(u64::from(r.len)))
        .max()
        .unwrap_or(start);
    let bytes = target
        .get_range(&layout::pack(volume, &first.1.pack), start..end)
        .await?;
    let bytes_read = bytes.len() as u64;
    let got = bytes.clone();
    let run = run.to_vec();
    let decode = move || -> Result<Vec<(u64, Bytes)>, TransferError> {
        let mut blocks = Vec::with_capacity(run.len());
        for (index, r) in &run {
            let at = (r.offset - start) as usize;
            let stored = at
                .checked_add(r.len as usize)
                .filter(|e| *e <= bytes.len())
                .map(|e| bytes.slice(at..e))
                .ok_or(TransferError::Invalid {
                    index: *index,
                    why: "its pack is shorter than its page says".into(),
                })?;
            let data = block::open_stored(stored, &r.hash).map_err(|e| TransferError::Invalid {
                index: *index,
                why: e.to_string(),
            })?;
            blocks.push((*index, data));
        }
        Ok(blocks)
    };
    let blocks = off_runtime(decode).await?;
    Ok(FetchedSpan {
        blocks,
        bytes_read,
        got,
    })
}

/// Runs `work` (hashing, compressing: CPU for a while) on the blocking
/// pool when inside a runtime, so that the runtime's threads keep serving
/// I/O; in place otherwise. A task that panicked re-raises its panic.
pub(crate) async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Reads page `index` of `manifest` (None: the GiB is all zeroes) and
/// checks it covers the blocks the manifest says.
pub(crate) async fn read_page(
    target: &Target,
    manifest: &Manifest,
    index: usize,
) -> Result<Option<(Page, u64)>, TransferError> {
    let Some(id) = manifest.page(index)? else {
        return Ok(None);
    };
    let object = target.get(&layout::page(&manifest.volume, &id)).await?;
    let page = Page::decode(&object, &id)?;
    let in_page = manifest.blocks_in_page(index);
    if page.blocks.len() != in_page {
        return Err(FormatError::Invalid {
            what: "page",
            why: format!(
                "{} blocks where the manifest needs {in_page}",
                page.blocks.len()
            ),
        }
        .into());
    }
    Ok(Some((page, object.len() as u64)))
}

/// Reads byte ranges of one backup's volume.
pub struct BackupReader {
    target: Target,
    manifest: Manifest,
    /// The pages read last (index, page; None: all zero), newest last.
    pages: Mutex<Vec<(usize, Option<Arc<Page>>)>>,
}

impl std::fmt::Debug for BackupReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupReader")
            .field("target", &self.target)
            .field("volume", &self.manifest.volume)
            .field("backup", &self.manifest.name)
            .finish_non_exhaustive()
    }
}

impl BackupReader {
    /// Opens backup `backup` of `volume` on `target` (reads its manifest).
    pub async fn open(target: Target, volume: &str, backup: &str) -> Result<Self, TransferError> {
        let manifest = read_manifest(&target, volume, backup).await?;
        Ok(BackupReader {
            target,
            manifest,
            pages: Mutex::new(Vec::new()),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The target the backup is read from.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The backed-up volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.size
    }

    async fn page(&self, index: usize) -> Result<Option<Arc<Page>>, TransferError> {
        {
            let cached = crate::lock(&self.pages);
            if let Some((_, page)) = cached.iter().find(|(i, _)| *i == index) {
                return Ok(page.clone());
            }
        }
        let page = read_page(&self.target, &self.manifest, index)
            .await?
            .map(|(p, _)| Arc::new(p));
        let mut cached = crate::lock(&self.pages);
        cached.retain(|(i, _)| *i != index);
        if cached.len() >= CACHED_PAGES {
            cached.remove(0);
        }
        cached.push((index, page.clone()));
        Ok(page)
    }

    /// The volume's bytes `offset..offset + len` as backed up, every block
    /// checked; None when they are all zeroes (nothing stored for them).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Option<Bytes>, TransferError> {
        let size = self.manifest.size;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(|| TransferError::Invalid {
                index: offset / BLOCK_SIZE as u64,
                why: format!("{len} bytes at {offset} lie beyond the backup's {size} bytes"),
            })?;
        if len == 0 {
            return Ok(None);
        }
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let last = end.div_ceil(bs);
        let mut wanted: Vec<(u64, BlockRef)> = Vec::new();
        let mut index = first;
        while index < last {
            let page_index = (index / PAGE_BLOCKS as u64) as usize;
            let page_end = ((page_index as u64 + 1) * PAGE_BLOCKS as u64).min(last);
            if let Some(page) = self.page(page_index).await? {
                let base = page_index as u64 * PAGE_BLOCKS as u64;
                for b in index..page_end {
                    if let Some(Some(r)) = page.blocks.get((b - base) as usize) {
                        wanted.push((b, *r));
                    }
                }
            }
            index = page_end;
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        wanted.sort_by_key(|(_, r)| (r.pack, r.offset));
        let runs = spans(&wanted);
        let fetched = futures::future::try_join_all(
            runs.iter()
                .map(|run| fetch_span(&self.target, &self.manifest.volume, &wanted[run.clone()])),
        )
        .await?;
        let span_start = first * bs;
        let from = (offset - span_start) as usize;
        if let [span] = &fetched[..]
            && let Some(all) = span.as_one_view(first, last - first)
        {
            return Ok(Some(all.slice(from..from + len as usize)));
        }
        let mut out = BytesMut::zeroed(((last - first) * bs) as usize);
        for span in fetched {
            for (index, data) in span.blocks {
                let at = ((index - first) * bs) as usize;
                out[at..at + data.len().min(BLOCK_SIZE)]
                    .copy_from_slice(&data[..data.len().min(BLOCK_SIZE)]);
            }
        }
        Ok(Some(out.freeze().slice(from..from + len as usize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_urls_split_into_target_volume_and_backup() {
        let u = BackupUrl::parse("s3://bucket/some/prefix/vol-1/b2").unwrap();
        assert_eq!(u.target, "s3://bucket/some/prefix");
        assert_eq!((u.volume.as_str(), u.backup.as_str()), ("vol-1", "b2"));
        assert_eq!(u.to_string(), "s3://bucket/some/prefix/vol-1/b2");
        let u = BackupUrl::parse("s3://bucket/vol/b/").unwrap();
        assert_eq!(u.target, "s3://bucket");
        let u = BackupUrl::parse("file:///srv/backups/vol/b").unwrap();
        assert_eq!(u.target, "file:///srv/backups");
        assert_eq!(
            BackupUrl::parse("file:///vol/b").unwrap().target,
            "file:///"
        );
        for bad in [
            "s3://vol/b",
            "s3://bucket/b",
            "file:///b",
            "http://x/v/b",
            "s3://bucket/v/..",
            "",
        ] {
            assert!(BackupUrl::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    /// A span whose blocks are the GET's bytes one after another comes back
    /// as a view of them; any other shape does not.
    #[test]
    fn a_span_of_whole_blocks_side_by_side_is_one_view_of_the_get() {
        let got = Bytes::from((0..3 * BLOCK_SIZE).map(|i| i as u8).collect::<Vec<_>>());
        let block = |i: usize| got.slice(i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE);
        let span = |blocks: Vec<(u64, Bytes)>| FetchedSpan {
            blocks,
            bytes_read: got.len() as u64,
            got: got.clone(),
        };
        let all = span(vec![(7, block(0)), (8, block(1)), (9, block(2))]);
        let view = all.as_one_view(7, 3).unwrap();
        assert_eq!((view.as_ptr(), view.len()), (got.as_ptr(), got.len()));
        let tail = span(vec![(8, block(1)), (9, block(2))]);
        assert_eq!(
            tail.as_one_view(8, 2).unwrap().as_ptr(),
            got[BLOCK_SIZE..].as_ptr()
        );
        // A block missing (a zero block between), out of place, or not
        // the GET's own bytes (decompressed): copied instead.
        assert!(all.as_one_view(7, 4).is_none());
        assert!(
            span(vec![(7, block(0)), (9, block(2))])
                .as_one_view(7, 3)
                .is_none()
        );
        assert!(
            span(vec![(7, block(0)), (8, block(2))])
                .as_one_view(7, 2)
                .is_none()
        );
        let copied = Bytes::from(block(1).to_vec());
        assert!(
            span(vec![(7, block(0)), (8, copied)])
                .as_one_view(7, 2)
                .is_none()
        );
        assert!(
            span(vec![(7, block(0).slice(..100))])
                .as_one_view(7, 1)
                .is_none()
        );
        assert!(span(Vec::new()).as_one_view(7, 0).is_none());
    }
}
