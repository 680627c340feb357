//! Snapshots of a replica store: create, list, read, delete (a background
//! merge) and revert.
//!
//! - **Create** freezes the head as a read-only layer and starts an empty
//!   head in two steps. The switch, with in-flight I/O drained (the chain
//!   lock), only makes the head read-only and pushes a new one whose files
//!   were made before; the frozen layer stays out of the extent index
//!   (`LayerChain::unindexed`). The commit, with I/O flowing, scans the
//!   frozen layer's checksum file (holes skipped) for its extents, takes
//!   them into the index, syncs it and records its extent list and the new
//!   chain in one metadata commit. Nothing is copied.
//! - **Delete** marks the layer deleting (one commit) and returns;
//!   [`ReplicaStore::merge_step`] then merges it into its child one granule
//!   (4 MiB of volume) at a time: blocks the child has never written are
//!   copied into it and synced, the merge cursor is committed, and the
//!   granule is punched out of the deleted layer, so the extra space is one
//!   granule and a crash resumes at the cursor. Only the granule being merged
//!   waits for it; I/O elsewhere goes on.
//! - **Revert** (volume detached) replaces the head by one that shows the
//!   snapshot: blocks that newer snapshots hold are copied from the snapshot's
//!   view (or discarded) into the new head; the newer snapshots stay.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::chain::LayerChain;
use crate::entry::{self, BlockState, DISCARDED, UNWRITTEN};
use crate::error::{Result, StoreError};
use crate::index::{self, LayerId};
use crate::layer::{BLOCK, Fetch, Layer, remove_files};
use crate::meta;
use crate::store::lock;
use crate::{LayerInfo, LayerUsage, ReplicaStore, SnapshotInfo};

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 64;

/// Blocks merged per [`ReplicaStore::merge_step`]: 4 MiB of volume (32 KiB in unit tests,
/// so that their small volumes take several steps).
const GRANULE: u64 = if cfg!(test) { 8 } else { 1024 };

const BLOCK_USIZE: usize = BLOCK as usize;

/// Checks a snapshot name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
        return Err(StoreError::Invalid(format!(
            "snapshot name {name:?} must be 1 to {MAX_SNAPSHOT_NAME} bytes long"
        )));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(StoreError::Invalid(format!(
            "snapshot name {name:?} may hold only letters, digits, '.', '_' and '-', and may not start with '.' or '-'"
        )));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A snapshot switched to in memory whose record is not committed yet: the
/// chain's records with the frozen layer read-only and the new head, and the
/// frozen layer's extents once they are read.
#[derive(Debug)]
pub(crate) struct PendingLayerCommit {
    frozen_id: LayerId,
    head_id: LayerId,
    recs: Vec<LayerInfo>,
    extents: Option<Vec<index::Extent>>,
    /// When the heads were switched (for the log of the commit).
    switched_at: std::time::Instant,
}

/// The chain's layer records, oldest first.
fn infos(chain: &LayerChain) -> Vec<LayerInfo> {
    chain.layers().iter().map(|l| l.info.clone()).collect()
}

/// Position of the live (not deleting) snapshot `name`.
fn find(chain: &LayerChain, name: &str) -> Option<usize> {
    chain.layers().iter().position(|l| {
        l.info.read_only && !l.info.deleting && l.info.snapshot.as_deref() == Some(name)
    })
}

/// A fresh layer id: one more than any in the chain (the head is always the newest layer,
/// so an id is never reused).
fn next_id(chain: &LayerChain) -> LayerId {
    chain.layers().iter().map(|l| l.info.id).max().unwrap_or(0) + 1
}

impl ReplicaStore {
    fn snapshot_info(&self, chain: &LayerChain, pos: usize) -> SnapshotInfo {
        let l = &chain.layers()[pos];
        SnapshotInfo {
            name: l.info.snapshot.clone().unwrap_or_default(),
            created_unix_ms: l.info.created_unix_ms,
            size: l.blocks * BLOCK,
            allocated_bytes: l.layer.allocated_bytes(),
        }
    }

    /// Takes snapshot `name`: every write that completed before the call is in it, none
    /// that starts after. Idempotent: a snapshot of that name already there is returned
    /// as is. Returns once the snapshot is durable.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        let info = self.snapshot_switch(name)?;
        self.commit_pending_snapshot()?;
        Ok(info)
    }

    /// The first half of [`ReplicaStore::snapshot_create`]: takes snapshot `name` in
    /// memory only and returns — I/O flows again from then on, new writes going to the
    /// new head — leaving the frozen layer's index update, its sync and the record of
    /// the chain pending. The next [`ReplicaStore::flush`], [`ReplicaStore::sync`],
    /// FUA write, change of the chain (a create of any name, a delete, a merge step, a
    /// revert, a growth), [`ReplicaStore::commit_pending_snapshot`] or clean close
    /// commits it first (the new head's writes are durable only once the chain that
    /// names the new head is); so does a repeated create of the same name, which then
    /// returns once it is durable. A crash before that commit loses the snapshot and
    /// every write made after the switch (none of them was flushed). If the commit
    /// fails (a full disk), each of those calls fails until it succeeds, so nothing
    /// durable rests on a head the metadata does not name.
    pub fn snapshot_switch(&self, name: &str) -> Result<SnapshotInfo> {
        validate_name(name)?;
        let started = std::time::Instant::now();
        let _admin = lock(&self.admin);
        self.check_layer_commit()?;
        let admitted_us = started.elapsed().as_micros() as u64;
        {
            let chain = self.chain();
            if let Some(pos) = find(&chain, name) {
                return Ok(self.snapshot_info(&chain, pos));
            }
            if chain
                .layers()
                .iter()
                .any(|l| l.info.snapshot.as_deref() == Some(name))
            {
                return Err(StoreError::Busy(format!(
                    "snapshot {name:?} is still being deleted"
                )));
            }
        }
        // The next head's files, made durable (with the directory) only by
        // the commit, after I/O flows again; a crash before that commit
        // leaves them unnamed, and the next open removes them.
        let id = next_id(&self.chain());
        let file = format!("l{id}");
        let size = self.size();
        let new_head = Layer::create_unsynced(&self.dir, &file, size)?;
        let created_us = started.elapsed().as_micros() as u64;
        // `admin` is held: the chain changed only by I/O since the checks above.
        // With I/O drained (`chain_mut`), the heads are only switched in
        // memory, the frozen head left out of the index (`unindexed`). Its
        // extents are read and taken into the index, it is synced and the
        // metadata committed later, with I/O flowing (`commit_pending`).
        let mut commit_gate = lock(&self.layer_commit);
        let mut chain = self.chain_mut();
        let locked_us = started.elapsed().as_micros() as u64;
        let frozen_id = chain.head().info.id;
        let mut recs = infos(&chain);
        let hp = recs.len() - 1;
        recs[hp].read_only = true;
        recs[hp].snapshot = Some(name.to_string());
        recs[hp].created_unix_ms = now_ms();
        recs[hp].size = size;
        recs.push(LayerInfo::new(file.clone(), id, false, size));
        let layers = chain.layers_mut();
        layers[hp].info = recs[hp].clone();
        layers.push(crate::chain::ChainLayer {
            info: recs[hp + 1].clone(),
            layer: new_head,
            blocks: size / BLOCK,
        });
        chain.unindexed = Some(frozen_id);
        let info = self.snapshot_info(&chain, hp);
        drop(chain);
        *commit_gate = Some(PendingLayerCommit {
            frozen_id,
            head_id: id,
            recs,
            extents: None,
            switched_at: std::time::Instant::now(),
        });
        tracing::info!(
            dir = %self.dir.display(),
            snapshot = name,
            admitted_us,
            created_us,
            locked_us,
            switch_us = started.elapsed().as_micros() as u64,
            "snapshot switched; its record is pending"
        );
        Ok(info)
    }

    /// Commits the record of a snapshot switched in memory but not yet recorded
    /// ([`ReplicaStore::snapshot_switch`]), waiting for a commit under way; nothing if
    /// none is pending.
    pub fn commit_pending_snapshot(&self) -> Result<()> {
        self.check_layer_commit()
    }

    /// Whether a snapshot is switched in memory but its record not yet
    /// committed (waits for a commit under way).
    pub fn snapshot_record_pending(&self) -> bool {
        lock(&self.layer_commit).is_some()
    }

    /// Commits the record of a snapshot switched in memory but not yet
    /// recorded (see [`ReplicaStore::snapshot_switch`]), waiting for
    /// one under way. Every flush and every change of the chain calls it
    /// first.
    pub(crate) fn check_layer_commit(&self) -> Result<()> {
        let mut pending = lock(&self.layer_commit);
        self.commit_pending(&mut pending).map(|_| ())
    }

    /// Finishes `pending`, if any: reads the frozen layer's extents (once),
    /// takes them into the index (once), syncs the frozen layer, the new head
    /// and the directory, and commits the chain's record. Returns how many
    /// extents the frozen layer holds (0 if nothing was pending). The index
    /// is updated on a copy, with I/O flowing, and swapped in with I/O
    /// drained for a moment. Only one caller at a time (it holds
    /// `layer_commit`), and nothing else changes the index meanwhile: every
    /// change of the chain calls [`ReplicaStore::check_layer_commit`] first.
    pub(crate) fn commit_pending(&self, pending: &mut Option<PendingLayerCommit>) -> Result<usize> {
        let Some(p) = pending.as_mut() else {
            return Ok(0);
        };
        let started = std::time::Instant::now();
        let layer_of = |chain: &LayerChain, id: LayerId| -> Result<Layer> {
            let l = chain
                .layers()
                .iter()
                .find(|l| l.info.id == id)
                .ok_or_else(|| StoreError::Invalid(format!("layer {id} is not in the chain")))?;
            l.layer.try_clone()
        };
        let (frozen, frozen_blocks, head, index) = {
            let chain = self.chain();
            let frozen_blocks = chain
                .position(p.frozen_id)
                .map(|pos| chain.layers()[pos].blocks)
                .unwrap_or(0);
            // A copy of the index to update, while it still lacks the layer.
            let index = (chain.unindexed == Some(p.frozen_id)).then(|| chain.index.clone());
            (
                layer_of(&chain, p.frozen_id)?,
                frozen_blocks,
                layer_of(&chain, p.head_id)?,
                index,
            )
        };
        // The frozen layer takes no more writes: its entries are final.
        if p.extents.is_none() {
            p.extents = Some(frozen.written_extents(frozen_blocks)?);
        }
        let extents = p.extents.as_deref().unwrap_or_default();
        if let Some(mut index) = index {
            index.assign_sorted(extents, p.frozen_id);
            let mut chain = self.chain_mut();
            chain.index = index;
            chain.unindexed = None;
        }
        // The frozen layer's data and entries, and the new head's files
        // and directory entries, before the record that names them.
        frozen.sync()?;
        head.sync()?;
        meta::sync_dir(&self.dir)?;
        self.db
            .commit_chain(&p.recs, &[(p.frozen_id, extents)], &[], None)?;
        let n = extents.len();
        tracing::info!(
            dir = %self.dir.display(),
            frozen_extents = n,
            index_extents = self.chain().index.len(),
            commit_us = started.elapsed().as_micros() as u64,
            since_switch_us = p.switched_at.elapsed().as_micros() as u64,
            "snapshot recorded"
        );
        *pending = None;
        Ok(n)
    }

    /// The snapshots, oldest first (not those being deleted).
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let chain = self.chain();
        (0..chain.layers().len())
            .filter(|&p| {
                let i = &chain.layers()[p].info;
                i.read_only && !i.deleting && i.snapshot.is_some()
            })
            .map(|p| self.snapshot_info(&chain, p))
            .collect()
    }

    /// Space per layer, oldest first; the last is the writable head.
    pub fn layer_usage(&self) -> Vec<LayerUsage> {
        let chain = self.chain();
        chain
            .layers()
            .iter()
            .map(|l| LayerUsage {
                snapshot: l.info.snapshot.clone(),
                provisioned_bytes: l.blocks * BLOCK,
                allocated_bytes: l.layer.allocated_bytes(),
                deleting: l.info.deleting,
            })
            .collect()
    }

    /// Number of extents in the index of the read-only layers (its memory is about 40
    /// bytes per extent).
    pub fn index_extents(&self) -> usize {
        self.chain().index.len()
    }

    /// Reads `len` bytes at `offset` of snapshot `name`, verified like [`ReplicaStore::read`].
    pub fn read_snapshot(&self, name: &str, offset: u64, len: u64) -> Result<bytes::Bytes> {
        self.read_snapshot_with(name, offset, len, Fetch::MayWait)
    }

    /// [`ReplicaStore::read_snapshot`] if the page cache holds everything it
    /// needs; `Ok(None)` when some of it would have to come from the disk
    /// (as [`ReplicaStore::read_cached`]).
    pub fn read_snapshot_cached(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<bytes::Bytes>> {
        crate::error::unless_not_cached(self.read_snapshot_with(
            name,
            offset,
            len,
            Fetch::CachedOnly,
        ))
    }

    fn read_snapshot_with(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        fetch: Fetch,
    ) -> Result<bytes::Bytes> {
        let (top, size) = {
            let chain = self.chain();
            let pos = find(&chain, name).ok_or_else(|| StoreError::NoSuchSnapshot(name.into()))?;
            (pos, chain.layers()[pos].blocks * BLOCK)
        };
        let end = match offset.checked_add(len) {
            Some(end) if end <= size => end,
            _ => return Err(StoreError::OutOfRange { offset, len, size }),
        };
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        if len > crate::MAX_IO_LEN {
            return Err(StoreError::Invalid(format!(
                "read of {len} bytes exceeds the {}-byte limit",
                crate::MAX_IO_LEN
            )));
        }
        let first = offset / BLOCK;
        let end_block = end.div_ceil(BLOCK);
        let mut buf = vec![0u8; ((end_block - first) * BLOCK) as usize];
        {
            let _g = self.lock_shared(first, end_block);
            let chain = self.chain();
            // The chain may have changed between the two locks: look again.
            let top = find(&chain, name)
                .filter(|&p| p == top || chain.layers()[p].blocks * BLOCK == size)
                .ok_or_else(|| StoreError::NoSuchSnapshot(name.into()))?;
            let runs = chain.runs_at(top, first, (end_block - first) as usize, fetch)?;
            self.read_runs(runs, first, &mut buf, fetch)?;
        }
        let lo = (offset - first * BLOCK) as usize;
        Ok(bytes::Bytes::from(buf).slice(lo..lo + len as usize))
    }

    /// The byte ranges `(offset, length)` in which snapshot `to`'s view may
    /// differ from snapshot `from`'s (None: from an empty volume), from the
    /// layers' own entries, never from their data: every block some layer
    /// after `from` up to `to` wrote or discarded. What an incremental
    /// backup reads. Sorted, merged, 4096-byte aligned.
    pub fn changed_extents(&self, from: Option<&str>, to: &str) -> Result<Vec<(u64, u64)>> {
        // No merge step moves entries between the layers while they are read.
        let _admin = lock(&self.admin);
        let layers: Vec<(Layer, u64)> = {
            let chain = self.chain();
            let top = find(&chain, to).ok_or_else(|| StoreError::NoSuchSnapshot(to.into()))?;
            let bottom = match from {
                None => 0,
                Some(f) => {
                    let pos =
                        find(&chain, f).ok_or_else(|| StoreError::NoSuchSnapshot(f.into()))?;
                    if pos >= top {
                        return Err(StoreError::Invalid(format!(
                            "snapshot {f:?} is not older than {to:?}"
                        )));
                    }
                    pos + 1
                }
            };
            chain.layers()[bottom..=top]
                .iter()
                .map(|l| Ok((l.layer.try_clone()?, l.blocks)))
                .collect::<Result<_>>()?
        };
        // Read-only layers: their entries no longer change.
        let mut all: Vec<(u64, u64)> = Vec::new();
        for (layer, blocks) in &layers {
            all.extend(layer.written_extents(*blocks)?);
        }
        all.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (start, end) in all {
            match merged.last_mut() {
                Some((_, e)) if start <= *e => *e = (*e).max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(merged
            .into_iter()
            .map(|(s, e)| (s * BLOCK, (e - s) * BLOCK))
            .collect())
    }

    /// [`ReplicaStore::block_checksums`] of snapshot `name`'s view.
    pub fn snapshot_checksums(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u32>> {
        let size = {
            let chain = self.chain();
            let pos = find(&chain, name).ok_or_else(|| StoreError::NoSuchSnapshot(name.into()))?;
            chain.layers()[pos].blocks * BLOCK
        };
        let end = match offset.checked_add(len) {
            Some(end) if end <= size => end,
            _ => return Err(StoreError::OutOfRange { offset, len, size }),
        };
        if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
            return Err(StoreError::Invalid(format!(
                "checksum range offset {offset} length {len} is not 4096-byte aligned"
            )));
        }
        if len > crate::MAX_CHECKSUM_RANGE {
            return Err(StoreError::Invalid(format!(
                "checksum range of {len} bytes exceeds the {}-byte limit",
                crate::MAX_CHECKSUM_RANGE
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK;
        let end_block = end / BLOCK;
        let _g = self.lock_shared(first, end_block);
        let chain = self.chain();
        let top = find(&chain, name).ok_or_else(|| StoreError::NoSuchSnapshot(name.into()))?;
        chain.reported_at(top, first, (end_block - first) as usize)
    }

    /// Deletes snapshot `name`: it disappears from [`ReplicaStore::snapshots`] at once
    /// and its layer is merged into its child by [`ReplicaStore::merge_step`].
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        let _admin = lock(&self.admin);
        self.check_layer_commit()?;
        let mut chain = self.chain_mut();
        let pos = find(&chain, name).ok_or_else(|| StoreError::NoSuchSnapshot(name.into()))?;
        let mut recs = infos(&chain);
        recs[pos].deleting = true;
        recs[pos].merged_blocks = 0;
        self.db.commit_chain(&recs, &[], &[], None)?;
        chain.layers_mut()[pos].info = recs[pos].clone();
        tracing::info!(dir = %self.dir.display(), snapshot = name, "snapshot deleted; merging it into its child");
        Ok(())
    }

    /// True while a deleted snapshot's layer is still in the chain.
    pub fn merge_pending(&self) -> bool {
        self.chain().layers().iter().any(|l| l.info.deleting)
    }

    /// Merges one granule of a deleted snapshot into its child; false when no merge is
    /// left. The replica daemon calls it in the background until it returns false; after
    /// a crash, the merge goes on from its last committed granule.
    pub fn merge_step(&self) -> Result<bool> {
        let _admin = lock(&self.admin);
        self.check_layer_commit()?;
        // A merge under way first (its child must not change under it), else the oldest.
        let (pos, cursor, blocks) = {
            let chain = self.chain();
            let layers = chain.layers();
            let pick = layers
                .iter()
                .position(|l| l.info.deleting && l.info.merged_blocks > 0)
                .or_else(|| layers.iter().position(|l| l.info.deleting));
            let Some(pos) = pick else { return Ok(false) };
            (pos, layers[pos].info.merged_blocks, layers[pos].blocks)
        };
        // Skip what the layer does not hold: its extent list is exact (taken
        // when it was frozen, extended when a merge into it ended).
        let id = self.chain().layers()[pos].info.id;
        let cursor = match self
            .db
            .layer_extents(id)?
            .iter()
            .find(|&&(_, e)| e > cursor)
        {
            Some(&(s, _)) => s.max(cursor).min(blocks),
            None => blocks,
        };
        if cursor >= blocks {
            self.finish_merge(pos)?;
            return Ok(self.merge_pending());
        }
        let end = (cursor + GRANULE).min(blocks);
        let n = (end - cursor) as usize;
        let _g = self.lock_exclusive(cursor, end);
        {
            let chain = self.chain();
            let from = &chain.layers()[pos];
            let into = &chain.layers()[pos + 1];
            let src = from.entries(cursor, n)?;
            let dst = into.entries(cursor, n)?;
            let mut copied = false;
            let mut i = 0;
            while i < n {
                let take = |j: usize| {
                    src[j] != UNWRITTEN && dst[j] == UNWRITTEN && cursor + (j as u64) < into.blocks
                };
                if !take(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                let discarded = entry::state(src[i]) == BlockState::Discarded;
                while i < n
                    && take(i)
                    && (entry::state(src[i]) == BlockState::Discarded) == discarded
                {
                    i += 1;
                }
                let b0 = cursor + start as u64;
                let count = (i - start) as u64;
                if discarded {
                    into.layer.punch(b0 * BLOCK, count * BLOCK)?;
                } else {
                    let mut buf = vec![0u8; (count * BLOCK) as usize];
                    from.layer.read_data(b0 * BLOCK, &mut buf)?;
                    for (k, block) in buf.chunks_exact(BLOCK_USIZE).enumerate() {
                        if let Err(computed) = entry::verify(block, src[start + k]) {
                            return Err(StoreError::ChecksumMismatch {
                                offset: (b0 + k as u64) * BLOCK,
                                stored: src[start + k],
                                computed,
                            });
                        }
                    }
                    into.layer.write_data(b0 * BLOCK, &buf)?;
                }
                copied = true;
                // Entries are written after every piece of data is synced (below).
            }
            if copied {
                into.layer.sync_data_file()?;
                let mut entries = dst.clone();
                for j in 0..n {
                    if src[j] != UNWRITTEN
                        && dst[j] == UNWRITTEN
                        && cursor + (j as u64) < into.blocks
                    {
                        entries[j] = src[j];
                    }
                }
                let inside = (into.blocks.saturating_sub(cursor) as usize).min(n);
                into.layer.write_crcs(cursor, &entries[..inside])?;
                into.layer.sync_crc_file()?;
            }
        }
        {
            // The cursor is committed without the chain lock (only `admin`
            // changes the chain, and the granule's stripes keep its readers
            // out), so I/O elsewhere does not wait for the metadata sync; the
            // lock is taken for the in-memory update alone.
            let mut recs = infos(&self.chain());
            recs[pos].merged_blocks = end;
            self.db.commit_chain(&recs, &[], &[], None)?;
            let from_id = recs[pos].id;
            let into_id = recs[pos + 1].id;
            let into_is_head = pos + 2 == recs.len();
            let mut chain = self.chain_mut();
            chain.layers_mut()[pos].info = recs[pos].clone();
            chain
                .index
                .reassign(cursor, end, from_id, (!into_is_head).then_some(into_id));
        }
        {
            // The granule now lives in the child: give its space back.
            let chain = self.chain();
            let from = &chain.layers()[pos].layer;
            from.punch(cursor * BLOCK, (end - cursor) * BLOCK)?;
            from.punch_crcs(cursor, end - cursor)?;
        }
        Ok(true)
    }

    /// Drops a fully merged layer from the chain (its child now holds its extents too),
    /// then removes its files. Caller holds `admin`.
    fn finish_merge(&self, pos: usize) -> Result<()> {
        let mut chain = self.chain_mut();
        let recs = infos(&chain);
        let gone = recs[pos].clone();
        let child = recs[pos + 1].clone();
        let child_is_head = pos + 2 == recs.len();
        let mut kept = recs.clone();
        kept.remove(pos);
        if child_is_head {
            self.db.commit_chain(&kept, &[], &[gone.id], None)?;
        } else {
            let merged = index::union(
                &self.db.layer_extents(child.id)?,
                &self.db.layer_extents(gone.id)?,
            );
            self.db
                .commit_chain(&kept, &[(child.id, &merged)], &[gone.id], None)?;
        }
        chain.layers_mut().remove(pos);
        drop(chain);
        remove_files(&self.dir, &gone.name)?;
        tracing::info!(
            dir = %self.dir.display(),
            snapshot = gone.snapshot.as_deref().unwrap_or(""),
            "snapshot merged away"
        );
        Ok(())
    }

    /// Makes the volume's contents those of snapshot `name` again: what was written
    /// since is dropped. Snapshots taken after it stay. For a detached volume (the
    /// replica daemon refuses while an engine has it open); waits for any merge to end
    /// first ([`StoreError::Busy`] while one is pending).
    pub fn snapshot_revert(&self, name: &str) -> Result<()> {
        let _admin = lock(&self.admin);
        self.check_layer_commit()?;
        let mut chain = self.chain_mut();
        let top = find(&chain, name).ok_or_else(|| StoreError::NoSuchSnapshot(name.into()))?;
        if chain.layers().iter().any(|l| l.info.deleting) {
            return Err(StoreError::Busy(
                "a deleted snapshot is still being merged; revert when it is done".into(),
            ));
        }
        // The index as the durable extent lists give it: a merge into the
        // head forgets the merged blocks' owners in memory (the head holds
        // them), also where an older layer holds them too, and the head is
        // about to be replaced.
        let mut extents = std::collections::HashMap::new();
        for l in &chain.layers()[..chain.layers().len() - 1] {
            extents.insert(l.info.id, self.db.layer_extents(l.info.id)?);
        }
        chain.index = crate::store::fold_index(&infos(&chain), &extents);
        let size = self.size();
        let blocks = size / BLOCK;
        let id = next_id(&chain);
        let file = format!("l{id}");
        let new_head = Layer::create(&self.dir, &file, size)?;
        let built = (|| -> Result<()> {
            // Blocks whose newest owner is newer than the snapshot must show its view.
            let newer: Vec<(u64, u64)> = chain
                .index
                .segments(0, blocks)
                .into_iter()
                .filter(|&(_, _, o)| o.and_then(|id| chain.position(id)).is_some_and(|p| p > top))
                .map(|(s, e, _)| (s, e))
                .collect();
            for (s, e) in newer {
                let mut b = s;
                while b < e {
                    let n = GRANULE.min(e - b);
                    let mut entries = vec![DISCARDED; n as usize];
                    let mut buf = vec![0u8; (n * BLOCK) as usize];
                    let runs = chain.runs_at(top, b, n as usize, Fetch::MayWait)?;
                    for run in &runs {
                        if let crate::chain::Source::Layer(_, es) = &run.source {
                            let lo = (run.first - b) as usize;
                            for (k, &e) in es.iter().enumerate() {
                                entries[lo + k] = match entry::state(e) {
                                    // A hole of the bottom layer: zeroes.
                                    BlockState::Unwritten => DISCARDED,
                                    _ => e,
                                };
                            }
                        }
                    }
                    self.read_runs(runs, b, &mut buf, Fetch::MayWait)?;
                    new_head.write_data(b * BLOCK, &buf)?;
                    new_head.write_crcs(b, &entries)?;
                    b += n;
                }
            }
            new_head.sync()?;
            meta::sync_dir(&self.dir)
        })();
        let mut recs = infos(&chain);
        let old = recs.pop();
        recs.push(LayerInfo::new(file.clone(), id, false, size));
        if let Err(e) = built.and_then(|()| self.db.commit_chain(&recs, &[], &[], None)) {
            drop(new_head);
            if let Err(e2) = remove_files(&self.dir, &file) {
                tracing::warn!(error = %e2, "could not remove the files of an unrecorded layer");
            }
            return Err(e);
        }
        let layers = chain.layers_mut();
        let hp = layers.len() - 1;
        layers[hp] = crate::chain::ChainLayer {
            info: LayerInfo::new(file, id, false, size),
            layer: new_head,
            blocks,
        };
        drop(chain);
        if let Some(old) = old {
            remove_files(&self.dir, &old.name)?;
        }
        tracing::info!(dir = %self.dir.display(), snapshot = name, "reverted to snapshot");
        Ok(())
    }
}
