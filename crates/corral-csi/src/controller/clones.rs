//! CreateVolume from a snapshot or from another volume (CLONE_VOLUME).
//!
//! The new volume's replicas are created as for any volume; then the node
//! daemon that runs the source's engine (or holds one of its replicas)
//! fills it (`FillClone`): the clone's engine reads the source through the
//! source engine's control service, which listens on that node's loopback,
//! so both run there — the source's own engine if it is attached there, a
//! transient one otherwise, and a transient engine of the clone. The call
//! answers once the clone's replicas record the fill done: the new volume
//! no longer needs its source, and may be published on any node.

use std::time::Duration;

use corral_client::ClientError;
use corral_proto::csi::v1 as csi;
use corral_proto::v1 as pb;
use corral_proto::v1::engine_manager_client::EngineManagerClient;
use tonic::Status;

use super::{ControllerService, SIZE_UNIT, volume_size};
use crate::ids;
use crate::snapshots::{Catalog, transient_spec};
use crate::status::client_status;

/// Bound on one fill as the controller waits for it (the node daemon goes
/// on to the end without it; a retried CreateVolume then finds it done).
pub(super) const FILL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSource {
    pub volume: String,
    /// The source's snapshot; None: the source as it is (a clone).
    pub snapshot: Option<String>,
    /// Bytes of the source (the snapshot's size when it was taken).
    pub size: u64,
}

/// The size of a clone: the capacity asked for, or, when none is, the
/// source's; OUT_OF_RANGE when smaller than the source.
pub fn clone_size(range: Option<&csi::CapacityRange>, source: u64) -> Result<u64, Status> {
    let asked = range.is_some_and(|r| r.required_bytes != 0 || r.limit_bytes != 0);
    let size = if asked {
        volume_size(range)?
    } else {
        source.div_ceil(SIZE_UNIT) * SIZE_UNIT
    };
    if size < source {
        return Err(Status::out_of_range(format!(
            "capacity_range: {size} bytes cannot hold the source's {source}"
        )));
    }
    Ok(size)
}

impl ControllerService {
    /// The source a content source names: NOT_FOUND when it does not exist.
    pub(super) async fn clone_source(
        &self,
        source: &csi::VolumeContentSource,
        new_volume: &str,
    ) -> Result<CloneSource, Status> {
        use csi::volume_content_source::Type;
        let view = self.daemons.view().await;
        let unreachable_note = || {
            view.unreachable
                .first()
                .map(|(addr, e)| format!(" ({addr} is unreachable: {e})"))
                .unwrap_or_default()
        };
        let found = match &source.r#type {
            Some(Type::Snapshot(s)) => {
                let id = &s.snapshot_id;
                if id.is_empty() {
                    return Err(Status::invalid_argument(
                        "volume_content_source: snapshot_id is required",
                    ));
                }
                let not_found = || {
                    Status::not_found(format!(
                        "source snapshot {id} does not exist{}",
                        unreachable_note()
                    ))
                };
                let (volume, snapshot) = ids::parse_snapshot_id(id).ok_or_else(not_found)?;
                if view.holders(volume).is_empty() {
                    return Err(not_found());
                }
                let catalog = Catalog::gather(&view, Some(volume)).await;
                let info = catalog.get(volume, snapshot).ok_or_else(not_found)?;
                CloneSource {
                    volume: volume.to_string(),
                    snapshot: Some(snapshot.to_string()),
                    size: info.size,
                }
            }
            Some(Type::Volume(v)) => {
                let volume = &v.volume_id;
                if volume.is_empty() {
                    return Err(Status::invalid_argument(
                        "volume_content_source: volume_id is required",
                    ));
                }
                let size = view
                    .holders(volume)
                    .iter()
                    .filter_map(|n| n.replica(volume))
                    .map(|r| r.size)
                    .min()
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "source volume {volume} does not exist{}",
                            unreachable_note()
                        ))
                    })?;
                CloneSource {
                    volume: volume.clone(),
                    snapshot: None,
                    size,
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "volume_content_source: no snapshot or volume given",
                ));
            }
        };
        if found.volume == new_volume {
            return Err(Status::invalid_argument(format!(
                "volume {new_volume} cannot be made from itself"
            )));
        }
        Ok(found)
    }

    /// Fill the new volume `id` from `source` through a node daemon (see
    /// the module's doc), unless its replicas record it filled already.
    pub(super) async fn fill_clone(&self, id: &str, source: &CloneSource) -> Result<(), Status> {
        let view = self.daemons.view().await;
        let replicas: Vec<&pb::ReplicaInfo> = view
            .holders(id)
            .iter()
            .filter_map(|n| n.replica(id))
            .collect();
        let Some(replica) = replicas.first().copied() else {
            return Err(Status::unavailable(format!(
                "volume {id}: its replicas are not reachable"
            )));
        };
        if !fill_needed(id, &replicas, &format!("made from {}", source.volume))? {
            return Ok(());
        }
        let source_holders = view.holders(&source.volume);
        let Some(source_replica) = source_holders
            .first()
            .and_then(|n| n.replica(&source.volume))
        else {
            return Err(Status::not_found(format!(
                "source volume {} does not exist",
                source.volume
            )));
        };
        let node = view
            .attached_on(&source.volume)
            .into_iter()
            .next()
            .or_else(|| source_holders.first().copied())
            .ok_or_else(|| Status::internal("no node for the fill"))?;
        let request = pb::FillCloneRequest {
            clone: Some(transient_spec(&view, id, replica)),
            source: Some(transient_spec(&view, &source.volume, source_replica)),
            snapshot: source.snapshot.clone().unwrap_or_default(),
        };
        let mut client = EngineManagerClient::new(node.channel.clone());
        let filled = match tokio::time::timeout(FILL_TIMEOUT, client.fill_clone(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                return Err(client_status(&ClientError::from_status(
                    &node.addr, &status,
                )));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "volume {id}: still filling from {} after {FILL_TIMEOUT:?}",
                    source.volume
                )));
            }
        };
        tracing::info!(volume = %id, source = %source.volume, snapshot = ?source.snapshot,
            node = node.node_id(), bytes = filled.filled_bytes, ms = filled.elapsed_ms, "clone filled");
        Ok(())
    }
}

/// Whether new volume `id` still needs its fill, from what its `replicas`
/// record: not once any records it done; refused (ALREADY_EXISTS) when it
/// has been served and was never `made` this way (a clone or a restore
/// makes a new volume only).
pub(super) fn fill_needed(
    id: &str,
    replicas: &[&pb::ReplicaInfo],
    made: &str,
) -> Result<bool, Status> {
    if replicas
        .iter()
        .any(|r| r.clone.as_ref().is_some_and(|c| c.done))
    {
        return Ok(false);
    }
    let filling = replicas.iter().any(|r| r.clone.is_some());
    let served = replicas
        .iter()
        .any(|r| r.membership.as_ref().is_some_and(|m| m.generation > 0));
    if served && !filling {
        return Err(Status::already_exists(format!(
            "volume {id} exists and was not {made}"
        )));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
        Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    }

    #[test]
    fn a_clone_is_the_source_size_unless_asked_and_never_smaller() {
        assert_eq!(clone_size(None, 64 << 20).unwrap(), 64 << 20);
        assert_eq!(clone_size(range(0, 0).as_ref(), 5000).unwrap(), 8192);
        assert_eq!(
            clone_size(range(128 << 20, 0).as_ref(), 64 << 20).unwrap(),
            128 << 20
        );
        let small = clone_size(range(32 << 20, 0).as_ref(), 64 << 20).unwrap_err();
        assert_eq!(small.code(), tonic::Code::OutOfRange);
        let limited = clone_size(range(0, 32 << 20).as_ref(), 64 << 20).unwrap_err();
        assert_eq!(limited.code(), tonic::Code::OutOfRange);
    }
}
