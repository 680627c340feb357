//! The controller's snapshot RPCs: CreateSnapshot, DeleteSnapshot,
//! ListSnapshots and GetSnapshot over [`crate::snapshots`].
//!
//! CreateSnapshot is idempotent by name: the name maps onto one corral
//! snapshot name ([`ids::snapshot_name`]), found again on the volume by a
//! retry; the same name on another volume is ALREADY_EXISTS. Snapshots are
//! ready when taken. DeleteSnapshot of an id that names nothing is OK.
//! A backup-typed VolumeSnapshotClass makes backups instead
//! (`controller/backups.rs`), with ids of their own ([`ids::BACKUP_ID_PREFIX`]).

use corral_proto::csi::v1 as csi;
use corral_proto::v1 as pb;
use tonic::Status;

use super::{ControllerService, page, required};
use crate::daemons::{ClusterView, NodeView};
use crate::ids;
use crate::snapshots::{
    Catalog, SnapshotKind, snapshot_class, through_engine, to_csi, transient_spec,
};
use crate::status::client_status;

impl ControllerService {
    /// The daemon to take a snapshot of `volume` through, and the spec of a
    /// transient engine for it should none run there: the node running its
    /// engine, else one holding a replica. NOT_FOUND for no replica.
    pub(super) fn snapshot_node<'v>(
        view: &'v ClusterView,
        volume: &str,
    ) -> Result<(&'v NodeView, pb::EngineSpec), Status> {
        let holders = view.holders(volume);
        let Some(replica) = holders.first().and_then(|n| n.replica(volume)) else {
            if let Some((addr, e)) = view.unreachable.first() {
                return Err(Status::unavailable(format!(
                    "volume {volume} not found on the reachable node daemons; \
                     {addr} is unreachable ({e}) and may hold it"
                )));
            }
            return Err(Status::not_found(format!("volume {volume} does not exist")));
        };
        let spec = transient_spec(view, volume, replica);
        let node = view
            .engines_of(volume)
            .into_iter()
            .next()
            .or_else(|| holders.first().copied())
            .ok_or_else(|| Status::not_found(format!("volume {volume} does not exist")))?;
        Ok((node, spec))
    }

    /// CreateSnapshot.
    pub(super) async fn take_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, Status> {
        let name = required(&req.name, "name")?;
        let volume = required(&req.source_volume_id, "source_volume_id")?;
        if let SnapshotKind::Backup {
            target,
            s3_endpoint,
        } = snapshot_class(&req.parameters)?
        {
            return self
                .take_backup(name, volume, &target, s3_endpoint.as_deref())
                .await;
        }
        let snapshot = ids::snapshot_name(name, volume);
        let _turn = self.turn(volume).await;
        let view = self.daemons.view().await;
        let (node, spec) = Self::snapshot_node(&view, volume)?;
        let catalog = Catalog::gather(&view, None).await;
        if let Some(other) = catalog.volumes_with(&snapshot).find(|v| *v != volume) {
            return Err(Status::already_exists(format!(
                "snapshot {name:?} exists, of volume {other}, not of {volume}"
            )));
        }
        if let Some(taken) = catalog.get(volume, &snapshot) {
            return Ok(to_csi(volume, taken));
        }
        let request = pb::EngineSnapshotRequest {
            volume: volume.to_string(),
            name: snapshot.clone(),
            spec: Some(spec),
        };
        let done = through_engine(node, request, true)
            .await
            .map_err(|e| client_status(&e))?;
        if !done.failed.is_empty() {
            tracing::warn!(volume, snapshot, failed = ?done.failed, "replicas without the snapshot (now ERR)");
        }
        let taken = done.snapshot.ok_or_else(|| {
            Status::internal(format!(
                "volume {volume}: the engine took snapshot {snapshot} but did not describe it"
            ))
        })?;
        tracing::info!(volume, snapshot, node = node.node_id(), "snapshot taken");
        // As ListSnapshots will describe it (the earliest of the replicas'
        // creation times), so that every answer about it is the same.
        let catalog = Catalog::gather(&self.daemons.view().await, Some(volume)).await;
        Ok(to_csi(
            volume,
            catalog.get(volume, &snapshot).unwrap_or(&taken),
        ))
    }

    /// DeleteSnapshot: OK when the id names nothing (any more).
    pub(super) async fn remove_snapshot(&self, snapshot_id: &str) -> Result<(), Status> {
        let id = required(snapshot_id, "snapshot_id")?;
        if ids::is_backup_snapshot_id(id) {
            return self.remove_backup(id).await;
        }
        let Some((volume, snapshot)) = ids::parse_snapshot_id(id) else {
            return Ok(());
        };
        let _turn = self.turn(volume).await;
        let view = self.daemons.view().await;
        if view.holders(volume).is_empty() {
            return Ok(());
        }
        let catalog = Catalog::gather(&view, Some(volume)).await;
        if catalog.get(volume, snapshot).is_none() {
            return Ok(());
        }
        let (node, spec) = Self::snapshot_node(&view, volume)?;
        let request = pb::EngineSnapshotRequest {
            volume: volume.to_string(),
            name: snapshot.to_string(),
            spec: Some(spec),
        };
        match through_engine(node, request, false).await {
            Ok(_) | Err(corral_client::ClientError::NotFound { .. }) => {}
            Err(e) => return Err(client_status(&e)),
        }
        tracing::info!(volume, snapshot, node = node.node_id(), "snapshot deleted");
        Ok(())
    }

    /// ListSnapshots: every snapshot, or those of one id or one source
    /// volume, in pages keyed on the last id (as ListVolumes).
    pub(super) async fn snapshots_page(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Status> {
        if req.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let empty = || csi::ListSnapshotsResponse {
            entries: Vec::new(),
            next_token: String::new(),
        };
        if ids::is_backup_snapshot_id(&req.snapshot_id) {
            // A backup is found by its id alone (the targets of backups
            // are not known otherwise: a listing without an id shows the
            // volumes' snapshots only).
            let listed: Vec<_> = self
                .backup_entry(&req.snapshot_id)
                .await?
                .filter(|s| {
                    req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
                })
                .into_iter()
                .collect();
            let ids: Vec<&String> = listed.iter().map(|s| &s.snapshot_id).collect();
            let (page_ids, next_token) =
                page(ids.into_iter(), &req.starting_token, req.max_entries)?;
            let entries = listed
                .iter()
                .filter(|s| page_ids.contains(&&s.snapshot_id))
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(s.clone()),
                })
                .collect();
            return Ok(csi::ListSnapshotsResponse {
                entries,
                next_token,
            });
        }
        let wanted = if req.snapshot_id.is_empty() {
            None
        } else {
            match ids::parse_snapshot_id(&req.snapshot_id) {
                Some(parts) => Some(parts),
                None => return Ok(empty()),
            }
        };
        let volume = match (wanted, req.source_volume_id.as_str()) {
            (Some((v, _)), source) if !source.is_empty() && source != v => return Ok(empty()),
            (Some((v, _)), _) => Some(v),
            (None, "") => None,
            (None, source) => Some(source),
        };
        let view = self.daemons.view().await;
        if volume.is_some_and(|v| view.holders(v).is_empty()) {
            return Ok(empty());
        }
        let catalog = Catalog::gather(&view, volume).await;
        let all = catalog.entries();
        let listed: Vec<&String> = all
            .iter()
            .filter(|(id, s)| {
                if req.snapshot_id.is_empty() {
                    volume.is_none_or(|v| s.source_volume_id == v)
                } else {
                    **id == req.snapshot_id
                }
            })
            .map(|(id, _)| id)
            .collect();
        let (ids, next_token) = page(listed.into_iter(), &req.starting_token, req.max_entries)?;
        let entries = ids
            .into_iter()
            .filter_map(|id| all.get(id))
            .map(|s| csi::list_snapshots_response::Entry {
                snapshot: Some(s.clone()),
            })
            .collect();
        Ok(csi::ListSnapshotsResponse {
            entries,
            next_token,
        })
    }

    /// GetSnapshot: NOT_FOUND when the id names nothing.
    pub(super) async fn find_snapshot(&self, snapshot_id: &str) -> Result<csi::Snapshot, Status> {
        let id = required(snapshot_id, "snapshot_id")?;
        let not_found = || Status::not_found(format!("snapshot {id} does not exist"));
        if ids::is_backup_snapshot_id(id) {
            return self.backup_entry(id).await?.ok_or_else(not_found);
        }
        let (volume, snapshot) = ids::parse_snapshot_id(id).ok_or_else(not_found)?;
        let view = self.daemons.view().await;
        if view.holders(volume).is_empty() {
            return Err(not_found());
        }
        let catalog = Catalog::gather(&view, Some(volume)).await;
        catalog
            .get(volume, snapshot)
            .map(|s| to_csi(volume, s))
            .ok_or_else(not_found)
    }
}
