//! The `ReplicaControl` gRPC service: lifecycle and metadata of replicas.

use std::sync::Arc;

use corral_proto::v1::{
    self as pb, CreateReplicaRequest, DeleteReplicaRequest, DeleteReplicaResponse,
    ExpandReplicaRequest, GetReplicaRequest, ListReplicasRequest, ListReplicasResponse,
    ListSnapshotsRequest, ListSnapshotsResponse, OpenReplicaRequest, ReplicaInfo,
    ReservationRecord, SetMembershipRequest, SetReservationsRequest, SnapshotRequest,
    replica_control_server::ReplicaControl,
};
use corral_store::{CreateParams, Epoch, Generation, Member, Membership};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::error::ReplicaError;
use crate::registry::{HostedReplica, ReplicaRegistry};

/// Default chunk size when a create request leaves it 0.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;

/// Extents per message of a ChangedExtents answer (16 bytes each: 512 KiB).
const CHANGED_EXTENTS_PER_MESSAGE: usize = 32 * 1024;

/// A snapshot switched at an engine's request but not yet committed by its
/// second call is committed by the replica itself after this long (the
/// engine's call normally comes within milliseconds).
pub const UNCLAIMED_SNAPSHOT_COMMIT_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Implements `corral.v1.ReplicaControl`.
pub struct ControlService {
    registry: Arc<ReplicaRegistry>,
}

impl ControlService {
    pub fn new(registry: Arc<ReplicaRegistry>) -> Self {
        ControlService { registry }
    }
}

/// Store membership → protobuf.
pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        generation: m.generation.0,
        epoch: m.epoch.0,
        members: m
            .members
            .iter()
            .map(|m| pb::Member {
                address: m.address.clone(),
                instance_id: m.instance_id.clone(),
                mode: pb::ReplicaMode::from(m.mode) as i32,
            })
            .collect(),
    }
}

/// Protobuf membership → store, rejecting unknown modes.
pub fn membership_from_pb(m: &pb::Membership) -> Result<Membership, Status> {
    let members = m
        .members
        .iter()
        .map(|m| {
            let mode = corral_proto::replica_mode(m.mode).ok_or_else(|| {
                Status::invalid_argument(format!("member {}: unknown mode {}", m.address, m.mode))
            })?;
            Ok(Member {
                address: m.address.clone(),
                instance_id: m.instance_id.clone(),
                mode,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok(Membership {
        generation: Generation(m.generation),
        epoch: Epoch(m.epoch),
        members,
    })
}

/// Describe a hosted replica.
pub fn replica_info(hosted: &HostedReplica) -> ReplicaInfo {
    let meta = hosted.store.meta();
    let open = hosted.current_open();
    let open_epoch = open.epoch;
    ReplicaInfo {
        volume: meta.volume,
        size: meta.size,
        block_size: meta.block_size,
        chunk_size: meta.chunk_size,
        instance_id: meta.instance_id,
        epoch: meta.epoch.0,
        membership: Some(membership_to_pb(&meta.membership)),
        clean_shutdown: meta.clean_shutdown,
        dirty_regions: hosted.store.dirty_regions(),
        region_size: hosted.store.region_size(),
        open: open_epoch != Epoch(0) && open_epoch == meta.epoch,
        reservations: meta.reservations.map(|r| ReservationRecord {
            epoch: r.epoch.0,
            sequence: r.sequence,
            state: r.state.into(),
        }),
        open_session: open.session,
        clone: meta.clone.map(|c| pb::CloneRecord {
            source_engine: c.source_engine,
            snapshot: c.snapshot,
            auto_snapshot: c.auto_snapshot,
            source_size: c.source_size,
            filled_below: c.filled_below,
            done: c.done,
            backup: c.backup,
            s3_endpoint: c.s3_endpoint,
        }),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("task failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl ReplicaControl for ControlService {
    async fn create_replica(
        &self,
        request: Request<CreateReplicaRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        let registry = Arc::clone(&self.registry);
        let info = blocking(move || {
            let hosted = registry.create(CreateParams {
                volume: req.volume,
                size: req.size,
                block_size: if req.block_size == 0 {
                    512
                } else {
                    req.block_size
                },
                chunk_size: if req.chunk_size == 0 {
                    DEFAULT_CHUNK_SIZE
                } else {
                    req.chunk_size
                },
                instance_id: uuid::Uuid::new_v4().to_string(),
            })?;
            Ok(replica_info(&hosted))
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn open_replica(
        &self,
        request: Request<OpenReplicaRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        if req.epoch == 0 {
            return Err(Status::invalid_argument("epoch must be at least 1"));
        }
        let hosted = self.registry.get(&req.volume)?;
        let info = blocking(move || {
            let session = hosted.open_at(Epoch(req.epoch), req.engine_id)?;
            info!(volume = %hosted.volume, epoch = req.epoch, engine = req.engine_id, "opened by an engine");
            Ok(ReplicaInfo {
                open_session: session,
                ..replica_info(&hosted)
            })
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn get_replica(
        &self,
        request: Request<GetReplicaRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let hosted = self.registry.get(&request.into_inner().volume)?;
        Ok(Response::new(replica_info(&hosted)))
    }

    async fn list_replicas(
        &self,
        _request: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        let replicas = self
            .registry
            .all()
            .iter()
            .map(|h| replica_info(h))
            .collect();
        Ok(Response::new(ListReplicasResponse { replicas }))
    }

    async fn delete_replica(
        &self,
        request: Request<DeleteReplicaRequest>,
    ) -> Result<Response<DeleteReplicaResponse>, Status> {
        let volume = request.into_inner().volume;
        let registry = Arc::clone(&self.registry);
        blocking(move || registry.delete(&volume)).await?;
        Ok(Response::new(DeleteReplicaResponse {}))
    }

    async fn set_membership(
        &self,
        request: Request<SetMembershipRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        let membership = membership_from_pb(
            req.membership
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("membership missing"))?,
        )?;
        let hosted = self.registry.get(&req.volume)?;
        let info = blocking(move || {
            with_epoch(&hosted, Epoch(req.epoch), |h| {
                h.store.set_membership(membership)
            })
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn set_reservations(
        &self,
        request: Request<SetReservationsRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        let record = req
            .record
            .ok_or_else(|| Status::invalid_argument("reservation record missing"))?;
        let record = corral_store::ReservationRecord {
            epoch: Epoch(record.epoch),
            sequence: record.sequence,
            state: record.state.to_vec(),
        };
        let hosted = self.registry.get(&req.volume)?;
        let info = blocking(move || {
            with_epoch(&hosted, Epoch(req.epoch), |h| {
                h.store.set_reservations(record)
            })
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn expand_replica(
        &self,
        request: Request<ExpandReplicaRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        if req.size == 0 {
            return Err(Status::invalid_argument("expand: size must be given"));
        }
        let hosted = self.registry.get(&req.volume)?;
        let info = blocking(move || {
            with_epoch(&hosted, Epoch(req.epoch), |h| {
                let before = h.store.size();
                if req.size <= before {
                    // Already that large: a retried or interrupted expansion.
                    return Ok(());
                }
                h.store.grow(req.size)?;
                info!(volume = %h.volume, from = before, to = req.size, "replica grown");
                Ok(())
            })
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn create_snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let req = request.into_inner();
        let hosted = self.registry.get(&req.volume)?;
        // With `answer_when_switched` the answer goes out once the store has
        // switched heads in memory, its record left pending: the engine's
        // second call (the same create without it) commits it, once the
        // engine has let writes flow again, so that the commit's work does
        // not compete with the other replicas' switches for the CPU. Until
        // then this replica's flushes and FUA writes commit it first.
        let early = req.answer_when_switched;
        let asked = std::time::Instant::now();
        let weak = Arc::downgrade(&hosted);
        let taken = blocking(move || {
            let queued_us = asked.elapsed().as_micros() as u64;
            let mut taken = None;
            with_epoch(&hosted, Epoch(req.epoch), |h| {
                taken = Some(if early {
                    h.store.snapshot_switch(&req.name)?
                } else {
                    h.store.snapshot_create(&req.name)?
                });
                Ok(())
            })?;
            if early {
                tracing::info!(volume = %req.volume, snapshot = %req.name, queued_us,
                    switched_us = asked.elapsed().as_micros() as u64, "snapshot switched");
            }
            taken.ok_or_else(|| ReplicaError::NotFound(req.volume.clone()))
        })
        .await?;
        if early {
            tracing::info!(snapshot = %taken.name,
                handler_us = asked.elapsed().as_micros() as u64, "snapshot switch answer leaving");
            // An engine lost before its second call leaves the record to
            // this replica: committed a little later all the same.
            tokio::spawn(async move {
                tokio::time::sleep(UNCLAIMED_SNAPSHOT_COMMIT_AFTER).await;
                let Some(hosted) = weak.upgrade() else { return };
                let volume = hosted.volume.clone();
                let result =
                    tokio::task::spawn_blocking(move || hosted.store.commit_pending_snapshot())
                        .await;
                if let Ok(Err(e)) = result {
                    tracing::warn!(volume = %volume, error = %e,
                        "could not commit a switched snapshot's record; flushes retry it");
                }
            });
        }
        Ok(Response::new(snapshot_to_pb(&taken)))
    }

    async fn delete_snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let hosted = self.registry.get(&req.volume)?;
        let listed = blocking(move || {
            with_epoch(&hosted, Epoch(req.epoch), |h| {
                h.store.snapshot_delete(&req.name)
            })?;
            hosted.start_merging();
            Ok(list_snapshots(&hosted))
        })
        .await?;
        Ok(Response::new(listed))
    }

    async fn revert_snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        let hosted = self.registry.get(&req.volume)?;
        let info = blocking(move || {
            with_epoch(&hosted, Epoch(req.epoch), |h| {
                h.store.snapshot_revert(&req.name)?;
                info!(volume = %h.volume, snapshot = %req.name, "replica reverted to snapshot");
                Ok(())
            })
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let hosted = self.registry.get(&req.volume)?;
        let listed = blocking(move || Ok(list_snapshots(&hosted))).await?;
        Ok(Response::new(listed))
    }

    type ChangedExtentsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::ChangedExtentsChunk, Status>> + Send + 'static>,
    >;

    async fn changed_extents(
        &self,
        request: Request<pb::ChangedExtentsRequest>,
    ) -> Result<Response<Self::ChangedExtentsStream>, Status> {
        let req = request.into_inner();
        let hosted = self.registry.get(&req.volume)?;
        let extents = blocking(move || {
            let from = (!req.from_snapshot.is_empty()).then_some(req.from_snapshot.as_str());
            hosted
                .store
                .changed_extents(from, &req.to_snapshot)
                .map_err(|source| ReplicaError::Store {
                    volume: hosted.volume.clone(),
                    source,
                })
        })
        .await?;
        let messages: Vec<Result<pb::ChangedExtentsChunk, Status>> = extents
            .chunks(CHANGED_EXTENTS_PER_MESSAGE)
            .map(|c| {
                Ok(pb::ChangedExtentsChunk {
                    ranges: c.iter().flat_map(|&(o, l)| [o, l]).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn set_clone(
        &self,
        request: Request<pb::SetCloneRequest>,
    ) -> Result<Response<ReplicaInfo>, Status> {
        let req = request.into_inner();
        let r = req
            .record
            .ok_or_else(|| Status::invalid_argument("clone record missing"))?;
        let record = corral_store::CloneRecord {
            source_engine: r.source_engine,
            snapshot: r.snapshot,
            auto_snapshot: r.auto_snapshot,
            source_size: r.source_size,
            filled_below: r.filled_below,
            done: r.done,
            backup: r.backup,
            s3_endpoint: r.s3_endpoint,
        };
        let hosted = self.registry.get(&req.volume)?;
        let info =
            blocking(move || with_epoch(&hosted, Epoch(req.epoch), |h| h.store.set_clone(record)))
                .await?;
        Ok(Response::new(info))
    }
}

/// Store snapshot record → protobuf.
fn snapshot_to_pb(s: &corral_store::SnapshotInfo) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        name: s.name.clone(),
        created_unix_ms: s.created_unix_ms,
        size: s.size,
        allocated_bytes: s.allocated_bytes,
    }
}

/// Every snapshot and layer of a replica.
pub fn list_snapshots(hosted: &HostedReplica) -> ListSnapshotsResponse {
    let merge_pending = hosted.store.merge_pending();
    ListSnapshotsResponse {
        snapshots: hosted
            .store
            .snapshots()
            .iter()
            .map(snapshot_to_pb)
            .collect(),
        layers: hosted
            .store
            .layer_usage()
            .into_iter()
            .map(|l| pb::LayerUsage {
                snapshot: l.snapshot.unwrap_or_default(),
                provisioned_bytes: l.provisioned_bytes,
                allocated_bytes: l.allocated_bytes,
                deleting: l.deleting,
            })
            .collect(),
        merge_pending,
        merge_error: if merge_pending {
            hosted.merge_error().unwrap_or_default()
        } else {
            String::new()
        },
    }
}

/// Run a metadata update on behalf of the engine open at `epoch`, holding the
/// epoch gate so that a newer engine's open cannot interleave.
fn with_epoch(
    hosted: &HostedReplica,
    epoch: Epoch,
    update: impl FnOnce(&HostedReplica) -> Result<(), corral_store::StoreError>,
) -> Result<ReplicaInfo, ReplicaError> {
    let open = hosted.open_state.read().unwrap_or_else(|p| p.into_inner());
    let newest = open.epoch.max(hosted.store.epoch());
    if epoch < newest {
        // A newer engine has opened it: the caller is fenced.
        return Err(ReplicaError::Store {
            volume: hosted.volume.clone(),
            source: corral_store::StoreError::StaleEpoch {
                current: newest,
                given: epoch,
            },
        });
    }
    if epoch != open.epoch {
        // Not opened at this epoch (yet, or since the daemon restarted):
        // not a sign of a newer engine.
        return Err(ReplicaError::NotOpen {
            volume: hosted.volume.clone(),
            open: open.epoch,
            given: epoch,
        });
    }
    update(hosted).map_err(|source| ReplicaError::Store {
        volume: hosted.volume.clone(),
        source,
    })?;
    drop(open);
    Ok(replica_info(hosted))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry in `dir` holding a 1 MiB replica "v", and its service.
    async fn one_replica(dir: &std::path::Path) -> (Arc<ReplicaRegistry>, ControlService) {
        let registry = Arc::new(ReplicaRegistry::open(dir).unwrap());
        let control = ControlService::new(Arc::clone(&registry));
        control
            .create_replica(Request::new(CreateReplicaRequest {
                volume: "v".into(),
                size: 1 << 20,
                block_size: 4096,
                chunk_size: DEFAULT_CHUNK_SIZE,
            }))
            .await
            .unwrap();
        (registry, control)
    }

    /// A switch (the engine's first call) leaves the record pending; the
    /// engine's second call commits it; without one, the replica commits it
    /// itself after [`UNCLAIMED_SNAPSHOT_COMMIT_AFTER`].
    #[tokio::test]
    async fn a_switched_snapshot_waits_for_the_second_call_or_is_committed_unclaimed() {
        let tmp = tempfile::tempdir().unwrap();
        let (registry, control) = one_replica(tmp.path()).await;
        control
            .open_replica(Request::new(OpenReplicaRequest {
                volume: "v".into(),
                epoch: 1,
                engine_id: 7,
            }))
            .await
            .unwrap();
        let hosted = registry.get("v").unwrap();
        let ask = |name: &str, early: bool| SnapshotRequest {
            volume: "v".into(),
            epoch: 1,
            name: name.into(),
            answer_when_switched: early,
        };
        control
            .create_snapshot(Request::new(ask("claimed", true)))
            .await
            .unwrap();
        assert!(hosted.store.snapshot_record_pending());
        let second = control
            .create_snapshot(Request::new(ask("claimed", false)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.name, "claimed");
        assert!(!hosted.store.snapshot_record_pending());

        control
            .create_snapshot(Request::new(ask("unclaimed", true)))
            .await
            .unwrap();
        assert!(hosted.store.snapshot_record_pending());
        let deadline = std::time::Instant::now() + UNCLAIMED_SNAPSHOT_COMMIT_AFTER * 5;
        while hosted.store.snapshot_record_pending() {
            assert!(
                std::time::Instant::now() < deadline,
                "the replica never committed the unclaimed snapshot"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let names: Vec<String> = hosted
            .store
            .snapshots()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["claimed", "unclaimed"]);
    }

    /// ChangedExtents streams what the store says changed between two
    /// snapshots, and refuses an unknown one as NOT_FOUND.
    #[tokio::test]
    async fn changed_extents_come_from_the_store_as_byte_ranges() {
        use futures::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let (registry, control) = one_replica(tmp.path()).await;
        let hosted = registry.get("v").unwrap();
        hosted.store.write(0, &[1u8; 4096]).unwrap();
        hosted.store.snapshot_create("a").unwrap();
        hosted.store.write(8192, &[2u8; 8192]).unwrap();
        hosted.store.snapshot_create("b").unwrap();
        let ask = |from: &str, to: &str| pb::ChangedExtentsRequest {
            volume: "v".into(),
            from_snapshot: from.into(),
            to_snapshot: to.into(),
        };
        let mut stream = control
            .changed_extents(Request::new(ask("a", "b")))
            .await
            .unwrap()
            .into_inner();
        let mut ranges = Vec::new();
        while let Some(chunk) = stream.next().await {
            ranges.extend(chunk.unwrap().ranges);
        }
        assert_eq!(ranges, [8192, 8192]);
        let all = control
            .changed_extents(Request::new(ask("", "b")))
            .await
            .unwrap()
            .into_inner()
            .next()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(all.ranges, [0, 4096, 8192, 8192]);
        let err = control
            .changed_extents(Request::new(ask("", "nope")))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    }
}
