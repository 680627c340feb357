//! Backups through CSI (docs/kubernetes.md, "Backups"): volumes restored
//! from a backup (a StorageClass's `fromBackup`, or a VolumeSnapshot of a
//! backup-typed class as a PVC's data source), and backups taken, listed
//! and deleted as the CSI snapshots of a backup-typed VolumeSnapshotClass.
//!
//! - **Restore** (CreateVolume): the controller reads the backup's
//!   manifest first (it must exist, and fit in the size asked for), then
//!   creates the volume's replicas as for any volume, then has a node
//!   daemon holding one of them fill it through a transient engine started
//!   with `--from-backup` (`FillClone` without a source). As for a clone,
//!   CreateVolume answers once the replicas record the fill done.
//! - **Backup** (CreateSnapshot): the controller takes a corral snapshot
//!   of the volume (`csi-backup-BACKUP`, through its engine as for any
//!   snapshot: that fixes the point in time), then asks the daemon running
//!   the volume's engine (or a transient one) to back it up in the
//!   background (`CreateEngineBackup`). Until the backup's manifest is on
//!   the target the CSI snapshot is not `ready_to_use`; the snapshotter
//!   calls CreateSnapshot again until it is. Once written, the older
//!   `csi-backup-*` snapshots of the volume are deleted: the newest stays
//!   as the parent of the next, incremental, backup.
//! - **Delete** (DeleteSnapshot): the manifest goes (an absent one is
//!   success, as CSI asks), then the backup's snapshot on the volume if it
//!   is still there, then, in the background, the data no backup of the
//!   volume names any more (older than an hour: `backup gc`'s rule).
//!
//! The S3 keys are never parameters: the controller's and the node
//! daemons' environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, from a Secret in `deploy/`), inherited by the engines.
//! An S3 target's endpoint is the class's `backupS3Endpoint` (carried in
//! the snapshot id), else the controller's `AWS_ENDPOINT_URL`, else AWS:
//! the controller passes it on to the daemons and engines explicitly.

use corral_backup::target::{S3Settings, Target, TargetError};
use corral_backup::transfer::{TransferError, read_manifest};
use corral_backup::{BackupUrl, Manifest};
use corral_client::ClientError;
use corral_proto::csi::v1 as csi;
use corral_proto::v1 as pb;
use corral_proto::v1::engine_manager_client::EngineManagerClient;
use tonic::Status;

use super::ControllerService;
use crate::ids::{self, BackupRef};
use crate::snapshots::{Catalog, SNAPSHOT_CALL_TIMEOUT, through_engine, transient_spec};
use crate::status::client_status;

/// A new volume's backup: where it is and how large.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreSource {
    pub backup: BackupRef,
    /// Bytes of the backed-up volume.
    pub size: u64,
}

/// The controller's environment variable naming the S3 endpoint of
/// targets whose class names none (AWS's own name for it).
pub const ENDPOINT_VARIABLE: &str = "AWS_ENDPOINT_URL";

/// The endpoint of `target`: `given` (a class's `backupS3Endpoint`), else
/// [`ENDPOINT_VARIABLE`]'s; None for a `file://` target, or AWS.
pub fn endpoint_for(target: &str, given: Option<&str>) -> Option<String> {
    if !target.starts_with("s3://") {
        return None;
    }
    given.map(str::to_string).or_else(|| {
        std::env::var(ENDPOINT_VARIABLE)
            .ok()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
    })
}

/// The target at `url`, with the controller's S3 keys, at `given`'s
/// endpoint (see [`endpoint_for`]).
pub fn open_target(url: &str, given: Option<&str>) -> Result<Target, Status> {
    let settings = S3Settings {
        endpoint: endpoint_for(url, given),
        ..Default::default()
    };
    Target::open(url, &settings).map_err(|e| target_status(&e))
}

/// A target's error as the CSI status an operator or the CO acts on.
pub fn target_status(e: &TargetError) -> Status {
    let message = e.to_string();
    match e {
        TargetError::BadUrl { .. } => Status::invalid_argument(message),
        // The controller's environment lacks the keys: a deployment matter.
        TargetError::Credentials(_) | TargetError::NoBucket { .. } => {
            Status::failed_precondition(message)
        }
        TargetError::AccessDenied { .. } => Status::permission_denied(message),
        TargetError::NotFound { .. } => Status::not_found(message),
        _ => Status::unavailable(message),
    }
}

fn transfer_status(e: &TransferError) -> Status {
    match e {
        TransferError::Target(t) => target_status(t),
        other => Status::failed_precondition(other.to_string()),
    }
}

/// The manifest of backup `url`; None when it is not there.
async fn manifest(target: &Target, url: &BackupUrl) -> Result<Option<Manifest>, Status> {
    match read_manifest(target, &url.volume, &url.backup).await {
        Ok(m) => Ok(Some(m)),
        Err(TransferError::Target(TargetError::NotFound { .. })) => Ok(None),
        Err(e) => Err(transfer_status(&e)),
    }
}

/// A backup as a CSI snapshot with id `id`: ready once its manifest is
/// written (`manifest`), otherwise described by the snapshot it is taken
/// from.
fn backup_to_csi(
    id: &str,
    volume: &str,
    size: u64,
    created_unix_ms: u64,
    ready: bool,
) -> csi::Snapshot {
    let mut snapshot = csi::Snapshot {
        size_bytes: size.min(i64::MAX as u64) as i64,
        snapshot_id: id.to_string(),
        source_volume_id: volume.to_string(),
        creation_time: None,
        ready_to_use: ready,
        group_snapshot_id: String::new(),
    };
    let at = snapshot.creation_time.get_or_insert_with(Default::default);
    at.seconds = (created_unix_ms / 1000).min(i64::MAX as u64) as i64;
    at.nanos = ((created_unix_ms % 1000) * 1_000_000) as i32;
    snapshot
}

fn written(id: &str, m: &Manifest) -> csi::Snapshot {
    backup_to_csi(id, &m.volume, m.size, m.created_unix_ms, true)
}

/// The source of a volume restored from backup `url` (a StorageClass's
/// `fromBackup`): its manifest read, NOT_FOUND when it is not there.
pub async fn restore_source(url: &str, s3_endpoint: Option<&str>) -> Result<RestoreSource, Status> {
    let url = BackupUrl::parse(url)
        .map_err(|e| Status::invalid_argument(format!("parameter \"fromBackup\": {e}")))?;
    restore_of(BackupRef {
        url,
        s3_endpoint: s3_endpoint.map(str::to_string),
    })
    .await
}

/// The source of a volume restored from `backup`: NOT_FOUND when its
/// manifest is not there.
pub async fn restore_of(backup: BackupRef) -> Result<RestoreSource, Status> {
    let target = open_target(&backup.url.target, backup.s3_endpoint.as_deref())?;
    let m = manifest(&target, &backup.url)
        .await?
        .ok_or_else(|| Status::not_found(format!("backup {} does not exist", backup.url)))?;
    Ok(RestoreSource {
        size: m.size,
        backup,
    })
}

/// The source a backup-typed snapshot id names (a PVC's data source);
/// None when `snapshot_id` is not a backup's.
pub async fn snapshot_restore_source(snapshot_id: &str) -> Option<Result<RestoreSource, Status>> {
    if !ids::is_backup_snapshot_id(snapshot_id) {
        return None;
    }
    let Some(backup) = ids::parse_backup_snapshot_id(snapshot_id) else {
        return Some(Err(Status::not_found(format!(
            "source snapshot {snapshot_id} does not exist"
        ))));
    };
    Some(restore_of(backup).await.map_err(|e| {
        if e.code() == tonic::Code::NotFound {
            Status::not_found(format!(
                "source snapshot {snapshot_id} does not exist ({})",
                e.message()
            ))
        } else {
            e
        }
    }))
}

/// The size of a volume restored from a backup of `backup` bytes: the
/// capacity asked for, at least the backup's (OUT_OF_RANGE if smaller);
/// without one, the backup's.
pub fn restore_size(range: Option<&csi::CapacityRange>, backup: u64) -> Result<u64, Status> {
    let asked = range.is_some_and(|r| r.required_bytes != 0 || r.limit_bytes != 0);
    let size = if asked {
        super::volume_size(range)?
    } else {
        backup.div_ceil(super::SIZE_UNIT) * super::SIZE_UNIT
    };
    if size < backup {
        return Err(Status::out_of_range(format!(
            "capacity_range: {size} bytes cannot hold the backup's {backup} bytes; ask for at least that"
        )));
    }
    Ok(size)
}

impl ControllerService {
    /// After a restore that failed for good (its backup gone or unusable):
    /// delete the new volume's replicas if nothing ever used them (no fill
    /// recorded, never served, no engine), so that a retry starts clean.
    pub(super) async fn forget_unrestored(&self, id: &str) {
        let view = self.daemons.view().await;
        let holders = view.holders(id);
        let untouched = holders
            .iter()
            .filter_map(|n| n.replica(id))
            .all(|r| r.clone.is_none() && r.membership.as_ref().is_none_or(|m| m.generation == 0));
        if !untouched || !view.engines_of(id).is_empty() {
            return;
        }
        for n in holders {
            match n.control.delete(id).await {
                Ok(()) | Err(ClientError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(volume = %id, daemon = %n.addr, error = %e,
                        "cannot delete the replica of a volume whose restore failed")
                }
            }
        }
        tracing::info!(volume = %id, "restore failed: its replicas are deleted");
    }

    /// Fill the new volume `id` from its backup through a node daemon
    /// holding one of its replicas (a transient engine there), unless its
    /// replicas record it filled already.
    pub(super) async fn fill_restore(
        &self,
        id: &str,
        source: &RestoreSource,
    ) -> Result<(), Status> {
        let view = self.daemons.view().await;
        let holders = view.holders(id);
        let replicas: Vec<&pb::ReplicaInfo> =
            holders.iter().filter_map(|n| n.replica(id)).collect();
        let (Some(node), Some(replica)) = (holders.first(), replicas.first().copied()) else {
            return Err(Status::unavailable(format!(
                "volume {id}: its replicas are not reachable"
            )));
        };
        let made = format!("restored from {}", source.backup.url);
        if !super::clones::fill_needed(id, &replicas, &made)? {
            return Ok(());
        }
        let mut spec = transient_spec(&view, id, replica);
        spec.from_backup = source.backup.url.to_string();
        spec.backup_s3_endpoint = endpoint_for(
            &source.backup.url.target,
            source.backup.s3_endpoint.as_deref(),
        )
        .unwrap_or_default();
        let request = pb::FillCloneRequest {
            clone: Some(spec),
            source: None,
            snapshot: String::new(),
        };
        let mut client = EngineManagerClient::new(node.channel.clone());
        let limit = super::clones::FILL_TIMEOUT;
        let filled = match tokio::time::timeout(limit, client.fill_clone(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                return Err(client_status(&ClientError::from_status(
                    &node.addr, &status,
                )));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "volume {id}: still restoring from {} after {limit:?}",
                    source.backup.url
                )));
            }
        };
        tracing::info!(volume = %id, backup = %source.backup.url, node = node.node_id(),
            bytes = filled.filled_bytes, ms = filled.elapsed_ms, "restored from a backup");
        Ok(())
    }

    /// CreateSnapshot of a backup-typed class: the snapshot `name` of
    /// `volume` backed up to `target` (see the module's doc).
    pub(super) async fn take_backup(
        &self,
        name: &str,
        volume: &str,
        target: &str,
        s3_endpoint: Option<&str>,
    ) -> Result<csi::Snapshot, Status> {
        let (url, id) =
            ids::backup_for(name, volume, target, s3_endpoint).map_err(Status::invalid_argument)?;
        let snapshot = ids::backup_snapshot(&url.backup);
        let _turn = self.turn(volume).await;
        let store = open_target(&url.target, s3_endpoint)?;
        if let Some(m) = manifest(&store, &url).await? {
            return Ok(written(&id, &m));
        }
        // A target that cannot be used (keys, bucket, unreachable) is
        // reported before anything is taken.
        store.check().await.map_err(|e| target_status(&e))?;
        let view = self.daemons.view().await;
        let (node, spec) = Self::snapshot_node(&view, volume)?;
        let catalog = Catalog::gather(&view, Some(volume)).await;
        let taken = match catalog
            .backup_snapshots(volume)
            .find(|s| s.name == snapshot)
        {
            Some(s) => s.clone(),
            None => {
                let request = pb::EngineSnapshotRequest {
                    volume: volume.to_string(),
                    name: snapshot.clone(),
                    spec: Some(spec.clone()),
                };
                let done = through_engine(node, request, true)
                    .await
                    .map_err(|e| client_status(&e))?;
                let taken = done.snapshot.ok_or_else(|| {
                    Status::internal(format!(
                        "volume {volume}: the engine took snapshot {snapshot} but did not describe it"
                    ))
                })?;
                tracing::info!(
                    volume,
                    snapshot,
                    node = node.node_id(),
                    "snapshot taken for a backup"
                );
                taken
            }
        };
        // The older backups' snapshots go once this backup is written.
        let older: Vec<String> = catalog
            .backup_snapshots(volume)
            .filter(|s| s.name != snapshot && s.created_unix_ms <= taken.created_unix_ms)
            .map(|s| s.name.clone())
            .collect();
        let request = pb::EngineBackupRequest {
            volume: volume.to_string(),
            backup: Some(pb::CreateBackupRequest {
                target: url.target.clone(),
                snapshot: snapshot.clone(),
                name: url.backup.clone(),
                s3_endpoint: endpoint_for(&url.target, s3_endpoint).unwrap_or_default(),
                retain: 0,
            }),
            spec: Some(spec),
            then_delete: older,
        };
        let mut client = EngineManagerClient::new(node.channel.clone());
        let answer =
            tokio::time::timeout(SNAPSHOT_CALL_TIMEOUT, client.create_engine_backup(request))
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "volume {volume}: node {} did not answer about backup {}",
                        node.node_id(),
                        url.backup
                    ))
                })?;
        let not_ready = || backup_to_csi(&id, volume, taken.size, taken.created_unix_ms, false);
        match answer {
            Ok(r) if !r.get_ref().done => Ok(not_ready()),
            Ok(_) => {
                tracing::info!(volume, backup = %url, node = node.node_id(), "backup written");
                Ok(manifest(&store, &url)
                    .await?
                    .map_or_else(not_ready, |m| written(&id, &m)))
            }
            // Written by an earlier call whose answer was lost.
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                match manifest(&store, &url).await? {
                    Some(m) => Ok(written(&id, &m)),
                    None => Err(Status::aborted(status.message().to_string())),
                }
            }
            Err(status) => Err(client_status(&ClientError::from_status(
                &node.addr, &status,
            ))),
        }
    }

    /// A backup-typed snapshot as ListSnapshots and GetSnapshot describe
    /// it: ready once written; not ready while its snapshot is on the
    /// volume without it (being written, or failed: CreateSnapshot
    /// starts it again); None when it names nothing.
    pub(super) async fn backup_entry(
        &self,
        snapshot_id: &str,
    ) -> Result<Option<csi::Snapshot>, Status> {
        let Some(backup) = ids::parse_backup_snapshot_id(snapshot_id) else {
            return Ok(None);
        };
        let store = open_target(&backup.url.target, backup.s3_endpoint.as_deref())?;
        if let Some(m) = manifest(&store, &backup.url).await? {
            return Ok(Some(written(snapshot_id, &m)));
        }
        let volume = &backup.url.volume;
        let view = self.daemons.view().await;
        if view.holders(volume).is_empty() {
            return Ok(None);
        }
        let snapshot = ids::backup_snapshot(&backup.url.backup);
        let catalog = Catalog::gather(&view, Some(volume)).await;
        Ok(catalog
            .backup_snapshots(volume)
            .find(|s| s.name == snapshot)
            .map(|s| backup_to_csi(snapshot_id, volume, s.size, s.created_unix_ms, false)))
    }

    /// DeleteSnapshot of a backup-typed id (see the module's doc): OK when
    /// it names nothing (any more).
    pub(super) async fn remove_backup(&self, snapshot_id: &str) -> Result<(), Status> {
        let Some(backup) = ids::parse_backup_snapshot_id(snapshot_id) else {
            return Ok(());
        };
        let url = &backup.url;
        let store = open_target(&url.target, backup.s3_endpoint.as_deref())?;
        let remove = || async {
            match corral_backup::catalog::remove_backup(&store, &url.volume, &url.backup).await {
                Ok(()) => Ok(true),
                Err(TransferError::Target(TargetError::NotFound { .. })) => Ok(false),
                Err(e) => Err(transfer_status(&e)),
            }
        };
        let mut removed = remove().await?;
        let snapshot = ids::backup_snapshot(&url.backup);
        match self.delete_backup_snapshot(&url.volume, &snapshot).await {
            // Its snapshot was there without the backup: a backup still
            // being written when this call came, which the deletion waited
            // for (one backup or snapshot call at a time per volume on a
            // daemon). It may be written now.
            Ok(true) if !removed => removed = remove().await?,
            Ok(_) => {}
            Err(e) if removed => {
                tracing::warn!(volume = %url.volume, snapshot, error = %e,
                    "backup removed; its snapshot on the volume is left (the next backup deletes it)")
            }
            Err(e) => return Err(e),
        }
        if removed {
            tracing::info!(backup = %url, "backup removed");
            // What only it named, in the background: it reads every
            // backup of the volume.
            let volume = url.volume.clone();
            tokio::spawn(async move {
                match corral_backup::catalog::collect_garbage(
                    &store,
                    &volume,
                    corral_backup::catalog::DEFAULT_MIN_AGE,
                )
                .await
                {
                    Ok(gc) => tracing::info!(volume, deleted_packs = gc.deleted_packs,
                        deleted_pages = gc.deleted_pages, bytes_freed = gc.bytes_freed,
                        skipped = ?gc.skipped, "backup data collected"),
                    Err(e) => {
                        tracing::warn!(volume, error = %e, "collecting backup data failed")
                    }
                }
            });
        }
        Ok(())
    }

    /// Delete `snapshot` (one a backup was taken from) of `volume` if it
    /// has it; whether it had it.
    async fn delete_backup_snapshot(&self, volume: &str, snapshot: &str) -> Result<bool, Status> {
        let _turn = self.turn(volume).await;
        let view = self.daemons.view().await;
        if view.holders(volume).is_empty() {
            return Ok(false);
        }
        let catalog = Catalog::gather(&view, Some(volume)).await;
        if !catalog.backup_snapshots(volume).any(|s| s.name == snapshot) {
            return Ok(false);
        }
        let (node, spec) = Self::snapshot_node(&view, volume)?;
        let request = pb::EngineSnapshotRequest {
            volume: volume.to_string(),
            name: snapshot.to_string(),
            spec: Some(spec),
        };
        match through_engine(node, request, false).await {
            Ok(_) => Ok(true),
            Err(ClientError::NotFound { .. }) => Ok(false),
            Err(e) => Err(client_status(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_is_the_backup_size_unless_asked_and_never_smaller() {
        let range = |required: i64| {
            Some(csi::CapacityRange {
                required_bytes: required,
                limit_bytes: 0,
            })
        };
        assert_eq!(restore_size(None, 64 << 20).unwrap(), 64 << 20);
        assert_eq!(
            restore_size(range(128 << 20).as_ref(), 64 << 20).unwrap(),
            128 << 20
        );
        let small = restore_size(range(32 << 20).as_ref(), 64 << 20).unwrap_err();
        assert_eq!(small.code(), tonic::Code::OutOfRange);
        assert!(small.message().contains("backup"), "{}", small.message());
    }

    #[test]
    fn target_errors_become_statuses_an_operator_acts_on() {
        let code = |e: TargetError| target_status(&e).code();
        assert_eq!(
            code(TargetError::Credentials("no keys".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(TargetError::BadUrl {
                url: "x".into(),
                why: "y".into()
            }),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(TargetError::NotFound { object: "o".into() }),
            tonic::Code::NotFound
        );
    }

    #[tokio::test]
    async fn a_restore_from_a_missing_file_backup_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/pvc-1/snapshot-1", dir.path().display());
        let err = restore_source(&url, None).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        let id = format!("backup:{url}");
        let err = snapshot_restore_source(&id).await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        assert!(snapshot_restore_source("pvc-1@snapshot-1").await.is_none());
    }
}
