//! Backing a volume up to a target (docs/backups.md, "Backup create"):
//! the engine's part. It chooses the snapshot (taking one if none is
//! named), finds the newest backup of the volume on the target whose
//! snapshot the volume still has (the parent), asks an RW replica where
//! the two snapshots' views may differ (`ChangedExtents`, from the layers'
//! entries), and writes the 64 KiB blocks touching those ranges, read from
//! the snapshot's view through the replicas, with
//! [`corral_backup::transfer::write_backup`], under a lease on the target
//! (so garbage collection leaves the volume alone meanwhile).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;

use corral_backup::block::BLOCK_SIZE;
use corral_backup::lease::{self, HeldLease, LEASE_TTL, LeaseKind};
use corral_backup::recent::RecentObjects;
use corral_backup::target::Target;
use corral_backup::transfer::{
    self, BackupAids, BackupProgress, BackupReport, BackupSpec, BlockSource, TransferError,
};
use corral_backup::{Manifest, layout};

use crate::replica_set::Mode;
use crate::volume::Volume;

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup of volume {volume}: {why}")]
    Volume { volume: String, why: String },
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// Reads 64 KiB blocks of a snapshot's view through the volume's replicas.
struct SnapshotBlocks<'a> {
    volume: &'a Volume,
    snapshot: String,
    size: u64,
}

impl BlockSource for SnapshotBlocks<'_> {
    async fn read_block(&self, index: u64) -> Result<Bytes, String> {
        self.read_blocks(index, 1).await
    }

    /// One read of the snapshot's view for the whole run (the last block
    /// of the volume zero-padded), kept as it came from the replica: not
    /// copied unless padded.
    async fn read_blocks(&self, first: u64, count: u64) -> Result<Bytes, String> {
        let offset = first * BLOCK_SIZE as u64;
        let want = count * BLOCK_SIZE as u64;
        let len = self.size.saturating_sub(offset).min(want) as u32;
        let data = self
            .volume
            .read_snapshot(&self.snapshot, offset, len)
            .await
            .map_err(|e| e.to_string())?;
        if data.len() as u64 == want {
            return Ok(data);
        }
        let mut blocks = data.to_vec();
        blocks.resize(want as usize, 0);
        Ok(Bytes::from(blocks))
    }
}

/// The 64 KiB blocks that byte ranges touch.
fn blocks_of(ranges: &[(u64, u64)]) -> Vec<u64> {
    let b = BLOCK_SIZE as u64;
    let mut out = BTreeSet::new();
    for &(offset, len) in ranges {
        if len == 0 {
            continue;
        }
        out.extend(offset / b..(offset + len).div_ceil(b));
    }
    out.into_iter().collect()
}

/// Backs snapshot `snapshot` of `volume` up to `target` as backup `name`
/// (the snapshot must exist; the caller takes one first if it wants a new
/// one). Incremental against the newest backup of the volume there whose
/// snapshot the volume still has.
pub async fn create_backup(
    volume: &Arc<Volume>,
    target: &Target,
    name: &str,
    snapshot: &str,
    progress: Option<&BackupProgress>,
    recent: Option<&RecentObjects>,
) -> Result<BackupReport, BackupError> {
    // What interrupted backups of this volume put: reused, not uploaded
    // again (resuming is running the backup again).
    let recorded = lease::recorded_packs(target, volume.name())
        .await
        .map_err(TransferError::from)?;
    let reusable = transfer::blocks_in_packs(target, volume.name(), &recorded).await;
    if !reusable.is_empty() {
        tracing::info!(volume = %volume.name(), backup = name, packs = recorded.len(),
            blocks = reusable.len(), "an interrupted backup left blocks on the target: reusing them");
    }
    // Garbage collection leaves the volume alone while this runs.
    let lease = HeldLease::take(target, volume.name(), LeaseKind::Backup, name, LEASE_TTL)
        .await
        .map_err(TransferError::from)?;
    let aids = BackupAids {
        reusable: Some(&reusable),
        lease: Some(&lease),
        progress,
        recent,
    };
    let result = write_snapshot(volume, target, name, snapshot, aids).await;
    if let Err(e) = lease.release().await {
        tracing::warn!(volume = %volume.name(), backup = name, error = %e,
            "could not delete the backup's lease: it expires on its own");
    }
    result
}

async fn write_snapshot(
    volume: &Arc<Volume>,
    target: &Target,
    name: &str,
    snapshot: &str,
    aids: BackupAids<'_>,
) -> Result<BackupReport, BackupError> {
    let started = std::time::Instant::now();
    let fail = |why: String| BackupError::Volume {
        volume: volume.name().to_string(),
        why,
    };
    let set = volume.replica_set();
    let listed = set.snapshot_list().await.map_err(|e| fail(e.to_string()))?;
    let Some(snap) = listed.snapshots.iter().find(|s| s.name == snapshot) else {
        return Err(fail(format!("no snapshot {snapshot:?}")));
    };
    // The parent: the newest backup whose snapshot is older than this one.
    let position = |n: &str| listed.snapshots.iter().position(|s| s.name == n);
    let here = position(snapshot);
    let mut parent: Option<Manifest> = None;
    for object in target
        .list_objects(&layout::backups(volume.name()))
        .await
        .map_err(TransferError::from)?
    {
        let Some(b) = layout::backup_of_manifest(volume.name(), &object.name) else {
            continue;
        };
        let m =
            transfer::read_listed_manifest(target, volume.name(), &b, &object, aids.recent).await?;
        let older = matches!((position(&m.snapshot), here), (Some(p), Some(h)) if p < h);
        if older
            && parent
                .as_ref()
                .is_none_or(|p| m.created_unix_ms > p.created_unix_ms)
        {
            parent = Some(m);
        }
    }
    // Where the views differ, from one RW replica's layers.
    let Some((_, client, _)) = set
        .write_targets()
        .into_iter()
        .find(|(_, _, mode)| *mode == Mode::Rw)
    else {
        return Err(fail("no RW replica".into()));
    };
    let ranges = client
        .control()
        .changed_extents(
            volume.name(),
            parent.as_ref().map(|p| p.snapshot.as_str()),
            snapshot,
        )
        .await
        .map_err(|e| fail(format!("changed extents: {e}")))?;
    let changed = blocks_of(&ranges);
    let spec = BackupSpec {
        volume: volume.name().to_string(),
        name: name.to_string(),
        snapshot: snapshot.to_string(),
        size: snap.size,
        created_unix_ms: snap.created_unix_ms,
        pack_bytes: transfer::PACK_BYTES,
    };
    let source = SnapshotBlocks {
        volume,
        snapshot: snapshot.to_string(),
        size: snap.size,
    };
    let planned_ms = started.elapsed().as_millis() as u64;
    let report =
        transfer::write_backup_with(target, &spec, parent.as_ref(), &changed, &source, aids)
            .await?;
    tracing::info!(volume = %volume.name(), backup = name, snapshot,
        parent = ?parent.as_ref().map(|p| &p.name), blocks_read = report.blocks_read,
        blocks_stored = report.blocks_stored, bytes_put = report.bytes_put, planned_ms,
        took_ms = started.elapsed().as_millis() as u64, "backup written");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_map_to_the_64_kib_blocks_they_touch() {
        let k = 1024u64;
        assert_eq!(blocks_of(&[]), Vec::<u64>::new());
        assert_eq!(blocks_of(&[(0, 4 * k)]), [0]);
        assert_eq!(blocks_of(&[(60 * k, 8 * k)]), [0, 1]);
        assert_eq!(
            blocks_of(&[(64 * k, 64 * k), (4 * k, 4 * k), (200 * k, 0)]),
            [0, 1]
        );
        assert_eq!(blocks_of(&[(1 << 30, 4 * k)]), [16_384]);
    }
}
