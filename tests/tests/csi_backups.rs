//! Backups through the CSI driver, told as Kubernetes lives them, on three
//! node daemons and a `file://` target (a temporary directory):
//!
//! 1. The external-provisioner creates a volume; the attacher publishes it
//!    and a writer fills 12 MiB of it through its engine's NBD export.
//! 2. A VolumeSnapshot of a backup-typed class (`type: backup`,
//!    `backupTarget`): the snapshotter's CreateSnapshot fails while the
//!    target cannot be written, and is called again until the snapshot is
//!    ready (a backup is uploaded in the background); the backup is then
//!    on the target (`corral backup ls`), its id names it, and the
//!    volume's own snapshot list and ListSnapshots show no CSI snapshot
//!    for it. The volume is written again afterwards.
//! 3. A PVC whose dataSource is that VolumeSnapshot, and another of a
//!    StorageClass with `fromBackup`, are created, published on other
//!    nodes and read back bit-exact: the volume as it was at the backup.
//! 4. A size smaller than the backup is refused (OUT_OF_RANGE) before
//!    anything is made; a backup that does not exist is NOT_FOUND.
//! 5. A second backup, of the volume now detached (a transient engine), is
//!    incremental against the first, and the first's snapshot leaves the
//!    volume.
//! 6. DeleteSnapshot removes each backup (gone from `corral backup ls`)
//!    and its snapshot on the volume; a second DeleteSnapshot is fine.
//! 7. Backups outlive their volume: the volume is deleted (the snapshot a
//!    third backup was taken from does not hold it), a new volume is made
//!    from that backup, and the backup is deleted after its volume.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use corral_proto::csi::v1 as csi;
use corral_tests::csi::{CsiCluster, backup_class, snapshot_source, storage_class};
use corral_tests::nbd_raw::RawNbd;
use corral_tests::tools::pattern;
use serde_json::Value;

const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;
/// Bytes the writer fills before the backup (the rest stays zero).
const WRITTEN: usize = 12 * MIB;

/// The NBD export a publish context names.
fn export(published: &HashMap<String, String>, volume: &str) -> Result<RawNbd> {
    let addr = published
        .get("nbdAddress")
        .context("no nbdAddress in the publish context")?;
    RawNbd::connect(addr.parse()?, volume)
}

fn write_at(nbd: &mut RawNbd, offset: usize, data: &[u8]) -> Result<()> {
    for (i, chunk) in data.chunks(MIB).enumerate() {
        nbd.write((offset + i * MIB) as u64, chunk)?
            .map_err(|e| anyhow!("write at {}: errno {e}", offset + i * MIB))?;
    }
    nbd.flush()?.map_err(|e| anyhow!("flush: errno {e}"))?;
    Ok(())
}

fn read_all(nbd: &mut RawNbd, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    for at in (0..len).step_by(MIB) {
        let n = MIB.min(len - at);
        out.extend(
            nbd.read(at as u64, n as u32)?
                .map_err(|e| anyhow!("read at {at}: errno {e}"))?,
        );
    }
    Ok(out)
}

/// `corral backup --target URL --json ls`: the backups, as JSON.
fn backup_ls(target: &str) -> Result<Vec<Value>> {
    let out = std::process::Command::new(corral_tests::corral_bin())
        .args(["backup", "--target", target, "--json", "ls"])
        .output()?;
    ensure!(
        out.status.success(),
        "corral backup ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    Ok(listed["backups"].as_array().cloned().unwrap_or_default())
}

/// The snapshots the replica of `volume` on node `i` holds.
fn replica_snapshots(c: &CsiCluster, i: usize, volume: &str) -> Result<Vec<String>> {
    let control = c.nodes.replica_control(i)?;
    let listed = c.block_on(control.list_snapshots(volume))?;
    Ok(listed.snapshots.into_iter().map(|s| s.name).collect())
}

fn code_of(e: &anyhow::Error) -> Option<tonic::Code> {
    e.downcast_ref::<tonic::Status>().map(|s| s.code())
}

/// Publish `volume` on `node`, read `len` bytes through its export,
/// unpublish.
fn read_through(c: &CsiCluster, volume: &csi::Volume, node: usize, len: usize) -> Result<Vec<u8>> {
    let published = c.publish(volume, node)?;
    let read = export(&published, &volume.volume_id).and_then(|mut nbd| read_all(&mut nbd, len));
    c.unpublish(&volume.volume_id, node)?;
    read
}

#[test]
fn volumes_are_backed_up_and_restored_through_csi() {
    let c = CsiCluster::start(3).expect("start the cluster");
    // Failing by panic, so that the fixture prints every daemon's and
    // engine's log.
    if let Err(e) = story(&c) {
        panic!("{e:#}");
    }
}

fn story(c: &CsiCluster) -> Result<()> {
    let dir = c.nodes.path().join("backups");
    std::fs::create_dir_all(&dir)?;
    let target = format!("file://{}", dir.display());
    let class = backup_class(&target);

    // 1. A volume, published on node 0, written through its engine.
    let source = c.create_volume("pvc-bk-source", SIZE as i64, storage_class(&[]), None)?;
    let id = source.volume_id.clone();
    let published = c.publish(&source, 0)?;
    let mut nbd = export(&published, &id)?;
    let mut image = vec![0u8; SIZE];
    image[..WRITTEN].copy_from_slice(&pattern(1, WRITTEN));
    write_at(&mut nbd, 0, &image[..WRITTEN])?;

    // 2. A backup-typed VolumeSnapshot, through the running engine. A
    // target it cannot write to fails the call (the snapshotter retries);
    // once it can, the backup is taken.
    std::fs::create_dir_all(dir.join("volumes"))?;
    let blocker = dir.join("volumes").join(&id);
    std::fs::write(&blocker, b"not a directory")?;
    let refused = c
        .block_on(c.controller().create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snapshot-bk-1".into(),
            parameters: class.clone(),
            ..Default::default()
        }))
        .unwrap_err();
    ensure!(
        refused.message().contains(&id),
        "the error names what it could not use: {refused}"
    );
    std::fs::remove_file(&blocker)?;
    let first = c.create_snapshot_until_ready(
        "snapshot-bk-1",
        &id,
        class.clone(),
        Duration::from_secs(120),
    )?;
    let url = format!("{target}/{id}/snapshot-bk-1");
    ensure!(
        first.snapshot_id == format!("backup:{url}"),
        "the id names the backup: {first:?}"
    );
    ensure!(
        first.source_volume_id == id && first.size_bytes == SIZE as i64,
        "{first:?}"
    );
    ensure!(first.creation_time.is_some(), "{first:?}");
    let listed = backup_ls(&target)?;
    ensure!(listed.len() == 1, "one backup on the target: {listed:?}");
    ensure!(listed[0]["url"] == url.as_str(), "{listed:?}");
    // The snapshot it was taken from stays on the volume (the next
    // backup's parent) but is no CSI snapshot.
    ensure!(
        replica_snapshots(c, 0, &id)? == ["csi-backup-snapshot-bk-1"],
        "{:?}",
        replica_snapshots(c, 0, &id)
    );
    let all = c
        .block_on(
            c.controller()
                .list_snapshots(csi::ListSnapshotsRequest::default()),
        )?
        .into_inner();
    ensure!(all.entries.is_empty(), "ListSnapshots: {all:?}");
    let by_id = c
        .list_snapshot(&first.snapshot_id)?
        .context("listed by id")?;
    ensure!(
        by_id.ready_to_use && by_id.size_bytes == SIZE as i64,
        "{by_id:?}"
    );
    // The same CreateSnapshot again is the same snapshot.
    let again = c.create_snapshot_until_ready(
        "snapshot-bk-1",
        &id,
        class.clone(),
        Duration::from_secs(10),
    )?;
    ensure!(again.snapshot_id == first.snapshot_id, "{again:?}");
    ensure!(
        again.creation_time == first.creation_time,
        "{again:?} {first:?}"
    );

    // Written after the backup: no restore may see it.
    write_at(&mut nbd, 0, &pattern(2, 2 * MIB))?;
    drop(nbd);

    // 3. A PVC from the VolumeSnapshot, and one of a fromBackup class.
    let from_snapshot = c.create_volume_from(
        "pvc-bk-from-snapshot",
        SIZE as i64,
        storage_class(&[("numberOfReplicas", "2")]),
        snapshot_source(&first.snapshot_id),
    )?;
    ensure!(
        from_snapshot.capacity_bytes == SIZE as i64,
        "{from_snapshot:?}"
    );
    let read = read_through(c, &from_snapshot, 1, SIZE)?;
    ensure!(
        read == image,
        "the volume made from the backup's snapshot is not the volume at the backup"
    );
    let restore_class = storage_class(&[("fromBackup", &url), ("numberOfReplicas", "2")]);
    let from_class = c.create_volume(
        "pvc-bk-from-class",
        2 * SIZE as i64,
        restore_class.clone(),
        None,
    )?;
    ensure!(
        from_class.volume_context.get("fromBackup") == Some(&url),
        "{from_class:?}"
    );
    let read = read_through(c, &from_class, 2, 2 * SIZE)?;
    ensure!(
        read[..SIZE] == image[..] && read[SIZE..].iter().all(|b| *b == 0),
        "the volume of the fromBackup class is not the backup, then zeroes"
    );
    // CreateVolume again (the provisioner's retry) finds it made.
    let retried = c.create_volume(
        "pvc-bk-from-class",
        2 * SIZE as i64,
        restore_class.clone(),
        None,
    )?;
    ensure!(retried.volume_id == from_class.volume_id, "{retried:?}");

    // 4. Too small, and missing: refused before anything is made.
    let small = c
        .create_volume_from(
            "pvc-bk-too-small",
            (SIZE / 2) as i64,
            storage_class(&[]),
            snapshot_source(&first.snapshot_id),
        )
        .unwrap_err();
    ensure!(
        code_of(&small) == Some(tonic::Code::OutOfRange),
        "too small from the snapshot: {small:#}"
    );
    ensure!(format!("{small:#}").contains("backup"), "{small:#}");
    let small = c
        .create_volume("pvc-bk-too-small", (SIZE / 2) as i64, restore_class, None)
        .unwrap_err();
    ensure!(
        code_of(&small) == Some(tonic::Code::OutOfRange),
        "too small from the class: {small:#}"
    );
    let missing = c
        .create_volume(
            "pvc-bk-missing",
            SIZE as i64,
            storage_class(&[("fromBackup", &format!("{target}/{id}/no-such"))]),
            None,
        )
        .unwrap_err();
    ensure!(
        code_of(&missing) == Some(tonic::Code::NotFound),
        "a missing backup: {missing:#}"
    );
    for i in 0..3 {
        let replicas = c.block_on(c.nodes.replica_control(i)?.list())?;
        ensure!(
            !replicas
                .iter()
                .any(|r| r.volume == "pvc-bk-too-small" || r.volume == "pvc-bk-missing"),
            "node-{i} holds a replica of a refused volume"
        );
    }

    // 5. A second backup, of the volume attached nowhere: incremental.
    c.unpublish(&id, 0)?;
    let at_first = image.clone();
    image[..2 * MIB].copy_from_slice(&pattern(2, 2 * MIB));
    let second = c.create_snapshot_until_ready(
        "snapshot-bk-2",
        &id,
        class.clone(),
        Duration::from_secs(120),
    )?;
    let listed = backup_ls(&target)?;
    let parent = listed
        .iter()
        .find(|b| b["name"] == "snapshot-bk-2")
        .map(|b| b["parent"].clone());
    ensure!(
        parent == Some(Value::from("snapshot-bk-1")),
        "the second backup's parent: {listed:?}"
    );
    ensure!(
        replica_snapshots(c, 0, &id)? == ["csi-backup-snapshot-bk-2"],
        "the first backup's snapshot is deleted: {:?}",
        replica_snapshots(c, 0, &id)
    );
    let restored = c.create_volume_from(
        "pvc-bk-second",
        0,
        storage_class(&[("numberOfReplicas", "1")]),
        snapshot_source(&second.snapshot_id),
    )?;
    ensure!(restored.capacity_bytes == SIZE as i64, "{restored:?}");
    ensure!(
        read_through(c, &restored, 0, SIZE)? == image,
        "the second backup is not the volume as it was then"
    );

    // 6. DeleteSnapshot removes the backups; twice is fine.
    for snapshot in [&first, &second] {
        c.delete_snapshot(&snapshot.snapshot_id)?;
        c.delete_snapshot(&snapshot.snapshot_id)?;
        ensure!(
            c.list_snapshot(&snapshot.snapshot_id)?.is_none(),
            "{} still listed",
            snapshot.snapshot_id
        );
        let err = c
            .block_on(c.controller().get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: snapshot.snapshot_id.clone(),
                ..Default::default()
            }))
            .unwrap_err();
        ensure!(err.code() == tonic::Code::NotFound, "{err}");
    }
    let listed = backup_ls(&target)?;
    ensure!(listed.is_empty(), "backups left on the target: {listed:?}");
    ensure!(
        replica_snapshots(c, 0, &id)?.is_empty(),
        "the last backup's snapshot is deleted with it: {:?}",
        replica_snapshots(c, 0, &id)
    );
    // A restored volume does not depend on its backup.
    ensure!(
        read_through(c, &from_snapshot, 0, SIZE)? == at_first,
        "a volume restored from a deleted backup changed"
    );

    // 7. A backup outlives its volume.
    let third =
        c.create_snapshot_until_ready("snapshot-bk-3", &id, class, Duration::from_secs(120))?;
    ensure!(
        replica_snapshots(c, 0, &id)? == ["csi-backup-snapshot-bk-3"],
        "{:?}",
        replica_snapshots(c, 0, &id)
    );
    c.delete_volume(&id)?;
    let after = c.create_volume_from(
        "pvc-bk-after-source",
        0,
        storage_class(&[("numberOfReplicas", "1")]),
        snapshot_source(&third.snapshot_id),
    )?;
    ensure!(
        read_through(c, &after, 1, SIZE)? == image,
        "the volume made from the deleted volume's backup is not that volume"
    );
    c.delete_snapshot(&third.snapshot_id)?;
    c.delete_snapshot(&third.snapshot_id)?;
    let listed = backup_ls(&target)?;
    ensure!(listed.is_empty(), "backups left on the target: {listed:?}");
    for v in [&from_snapshot, &from_class, &restored, &after] {
        c.delete_volume(&v.volume_id)?;
    }
    for i in 0..3 {
        let replicas = c.block_on(c.nodes.replica_control(i)?.list())?;
        ensure!(replicas.is_empty(), "node-{i} still holds {replicas:?}");
    }
    Ok(())
}
