//! The engine's control gRPC service (`corral volume --engine ADDR ...`).
//! This is also the one place where the engine's control listener is built.
//!
//! The service runs from the moment the engine starts, before the volume is
//! open: while the engine waits (for replicas, or for an operator's
//! `salvage`), `info` says what it waits for.

use std::sync::{Arc, Mutex, OnceLock};

use corral_block::BlockDevice;
use corral_proto::v1::{
    AddReplicaRequest, ChunkDifference, ExpandVolumeRequest, ExpandVolumeResponse,
    ListEngineReplicasRequest, ListEngineReplicasResponse, ListSnapshotsResponse,
    ReadSnapshotRequest, ReadSnapshotResponse, RebuildStatusRequest, RebuildStatusResponse,
    RemoveReplicaRequest, ReplicaChangeResponse, ReplicaStatus, SalvageRequest, VerifyRequest,
    VerifyResponse, VolumeInfo, VolumeInfoRequest, VolumeListSnapshotsRequest,
    VolumeSnapshotRequest, VolumeSnapshotResponse,
    engine_control_server::{EngineControl, EngineControlServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::volume::Volume;

/// What the control service knows about its engine, before and after open.
pub struct EngineState {
    config: EngineConfig,
    volume: OnceLock<Arc<Volume>>,
    waiting_for: Mutex<String>,
    salvage: Mutex<Option<String>>,
    frontends: Mutex<String>,
    /// Snapshots a clone has read lately (name → when): not deletable.
    snapshot_readers: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The backup being written, if any: name, target, progress.
    backup: Mutex<Option<RunningBackup>>,
    /// Pages and manifests the last backups wrote, for the next one.
    recent_backup_objects: corral_backup::recent::RecentObjects,
}

#[derive(Clone)]
struct RunningBackup {
    name: String,
    target: String,
    progress: Arc<corral_backup::transfer::BackupProgress>,
}

/// A snapshot read by a clone within this is its clone's source still.
const CLONE_SOURCE_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EngineState {
    pub fn new(config: EngineConfig) -> Arc<Self> {
        Arc::new(EngineState {
            config,
            volume: OnceLock::new(),
            waiting_for: Mutex::new("starting".into()),
            salvage: Mutex::new(None),
            frontends: Mutex::new(String::new()),
            snapshot_readers: Mutex::new(std::collections::HashMap::new()),
            backup: Mutex::new(None),
            recent_backup_objects: Default::default(),
        })
    }

    /// The open volume, once there is one.
    pub fn volume(&self) -> Option<&Arc<Volume>> {
        self.volume.get()
    }

    pub fn set_volume(&self, volume: Arc<Volume>) {
        let _ = self.volume.set(volume);
    }

    pub fn set_waiting_for(&self, reason: &str) {
        *lock(&self.waiting_for) = reason.to_string();
    }

    pub fn set_frontends(&self, frontends: String) {
        *lock(&self.frontends) = frontends;
    }

    /// The frontends' addresses, once serving.
    pub fn frontends(&self) -> String {
        lock(&self.frontends).clone()
    }

    /// Why the volume is not open yet.
    pub fn waiting_for(&self) -> String {
        lock(&self.waiting_for).clone()
    }

    /// The replica an operator asked to trust, if any.
    pub fn salvage_target(&self) -> Option<String> {
        lock(&self.salvage).clone()
    }

    fn open_volume(&self) -> Result<&Arc<Volume>, Status> {
        self.volume.get().ok_or_else(|| {
            Status::unavailable(format!(
                "volume {} is not open yet: {}",
                self.config.volume,
                lock(&self.waiting_for)
            ))
        })
    }
}

/// Implements `corral.v1.EngineControl` for one volume.
pub struct ControlService {
    state: Arc<EngineState>,
}

impl ControlService {
    pub fn new(state: Arc<EngineState>) -> Self {
        ControlService { state }
    }
}

/// The volume's state, as `corral volume info` reports it in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeState {
    /// The engine waits to open it.
    Opening,
    /// Every replica RW.
    Serving,
    /// Writable, with some replicas out or rebuilding.
    Degraded,
    /// Too few RW replicas for the write policy: writes fail.
    Unavailable,
    /// A newer engine owns it.
    Fenced,
}

impl VolumeState {
    pub fn of(volume: &Volume) -> Self {
        let set = volume.replica_set();
        if set.is_fenced() {
            VolumeState::Fenced
        } else if set.check_writable().is_err() {
            VolumeState::Unavailable
        } else if set.rw_count() < set.total() {
            VolumeState::Degraded
        } else {
            VolumeState::Serving
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            VolumeState::Opening => "opening",
            VolumeState::Serving => "serving",
            VolumeState::Degraded => "degraded",
            VolumeState::Unavailable => "unavailable",
            VolumeState::Fenced => "fenced",
        }
    }
}

/// What it would take for the volume to stop accepting writes.
pub fn writability(rw: usize, total: usize, min_rw: usize, policy: &str) -> String {
    if rw < min_rw {
        return format!(
            "not writable: {rw} of {total} replicas RW, policy {policy} needs {min_rw}"
        );
    }
    let spare = rw - min_rw;
    format!(
        "writable while at least {min_rw} of {total} replicas are RW (policy {policy}); losing {} of the {rw} RW replicas would stop writes",
        spare + 1
    )
}

fn rebuilds(volume: &Volume) -> Vec<corral_proto::v1::RebuildStatus> {
    let set = volume.replica_set();
    let mut list = set.replays();
    list.extend(
        set.status()
            .iter()
            .filter_map(|s| s.rebuild.as_ref().map(|r| r.to_pb())),
    );
    list
}

/// [`crate::backup::create_backup`], its errors turned into gRPC statuses.
/// A backup target's error as the status an operator can act on: fix the
/// URL or the keys, create the bucket, or wait for the store.
fn target_status(e: &corral_backup::target::TargetError, message: String) -> Status {
    use corral_backup::target::TargetError;
    match e {
        TargetError::Credentials(_) | TargetError::BadUrl { .. } => {
            Status::invalid_argument(message)
        }
        TargetError::AccessDenied { .. } => Status::permission_denied(message),
        TargetError::NoBucket { .. } => Status::failed_precondition(message),
        _ => Status::unavailable(message),
    }
}

async fn backup_or_status(
    volume: &Arc<Volume>,
    target: &corral_backup::target::Target,
    name: &str,
    snapshot: &str,
    progress: &corral_backup::transfer::BackupProgress,
    recent: &corral_backup::recent::RecentObjects,
) -> Result<corral_backup::transfer::BackupReport, Status> {
    use corral_backup::transfer::TransferError;
    crate::backup::create_backup(volume, target, name, snapshot, Some(progress), Some(recent))
        .await
        .map_err(|e| match &e {
            crate::backup::BackupError::Transfer(TransferError::Exists { .. }) => {
                Status::already_exists(e.to_string())
            }
            crate::backup::BackupError::Transfer(TransferError::Format(_)) => {
                Status::invalid_argument(e.to_string())
            }
            crate::backup::BackupError::Transfer(TransferError::Target(t)) => {
                target_status(t, e.to_string())
            }
            crate::backup::BackupError::Volume { why, .. } if why.starts_with("no snapshot") => {
                Status::not_found(e.to_string())
            }
            _ => Status::unavailable(e.to_string()),
        })
}

#[tonic::async_trait]
impl EngineControl for ControlService {
    async fn get_volume_info(
        &self,
        _request: Request<VolumeInfoRequest>,
    ) -> Result<Response<VolumeInfo>, Status> {
        let cfg = &self.state.config;
        let Some(volume) = self.state.volume() else {
            return Ok(Response::new(VolumeInfo {
                name: cfg.volume.clone(),
                size: cfg.size,
                block_size: cfg.block_size,
                chunk_size: cfg.chunk_size,
                write_policy: cfg.write_policy.as_str().to_string(),
                state: VolumeState::Opening.as_str().into(),
                replicas_total: cfg.replicas.len() as u32,
                open_reason: lock(&self.state.waiting_for).clone(),
                stale_replica_timeout_ms: cfg.stale_replica_timeout.as_millis() as u64,
                ..Default::default()
            }));
        };
        let set = volume.replica_set();
        let rw = set.rw_count();
        let total = set.total();
        // Best effort: a slow or unreachable replica must not hold up `info`.
        let layers =
            match tokio::time::timeout(std::time::Duration::from_millis(500), set.snapshot_list())
                .await
            {
                Ok(Ok(listed)) => listed.layers,
                _ => Vec::new(),
            };
        Ok(Response::new(VolumeInfo {
            name: volume.name().to_string(),
            size: volume.size(),
            block_size: volume.block_size(),
            chunk_size: volume.chunk_map().chunk_size() as u32,
            epoch: set.epoch().0,
            generation: set.generation().0,
            write_policy: set.policy().as_str().to_string(),
            state: VolumeState::of(volume).as_str().to_string(),
            replicas_total: total as u32,
            replicas_rw: rw as u32,
            frontends: lock(&self.state.frontends).clone(),
            writability: writability(rw, total, set.min_rw(), set.policy().as_str()),
            repaired_blocks: volume.repaired_blocks(),
            rebuilds: rebuilds(volume),
            open_reason: String::new(),
            stale_replica_timeout_ms: cfg.stale_replica_timeout.as_millis() as u64,
            layers,
            clone: volume.clone_status(),
            backup: lock(&self.state.backup).as_ref().map(|b| {
                use std::sync::atomic::Ordering::Relaxed;
                corral_proto::v1::BackupProgress {
                    name: b.name.clone(),
                    target: b.target.clone(),
                    blocks_total: b.progress.blocks_total.load(Relaxed),
                    blocks_done: b.progress.blocks_done.load(Relaxed),
                    bytes_put: b.progress.bytes_put.load(Relaxed),
                }
            }),
        }))
    }

    async fn list_replicas(
        &self,
        _request: Request<ListEngineReplicasRequest>,
    ) -> Result<Response<ListEngineReplicasResponse>, Status> {
        let volume = self.state.open_volume()?;
        let replicas = volume
            .replica_set()
            .status()
            .into_iter()
            .map(|s| ReplicaStatus {
                address: s.address,
                mode: corral_proto::v1::ReplicaMode::from(s.mode) as i32,
                instance_id: s.instance_id,
                last_error: s.last_error,
                failed_for_ms: s
                    .failed_for
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        Ok(Response::new(ListEngineReplicasResponse { replicas }))
    }

    async fn add_replica(
        &self,
        request: Request<AddReplicaRequest>,
    ) -> Result<Response<ReplicaChangeResponse>, Status> {
        let volume = self.state.open_volume()?;
        let address = request.into_inner().address;
        if address.trim().is_empty() {
            return Err(Status::invalid_argument(
                "give the replica daemon's address",
            ));
        }
        corral_client::endpoint(&address, volume.replica_set().timeout())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let set = volume.replica_set();
        let existing = set.status().into_iter().find(|s| s.address == address);
        let message = match existing {
            Some(s) if s.mode != crate::replica_set::Mode::Err => {
                format!("{address} is already a member ({})", s.mode.as_str())
            }
            Some(_) => format!("{address} is a member in ERR: retrying it now"),
            None => {
                set.add_member(&address).await;
                format!("{address} added: it joins in WO mode and is rebuilt")
            }
        };
        volume.wake.notify_one();
        Ok(Response::new(ReplicaChangeResponse { message }))
    }

    async fn remove_replica(
        &self,
        request: Request<RemoveReplicaRequest>,
    ) -> Result<Response<ReplicaChangeResponse>, Status> {
        let volume = self.state.open_volume()?;
        let address = request.into_inner().address;
        volume
            .replica_set()
            .remove_member(&address)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(ReplicaChangeResponse {
            message: format!("{address} removed from volume {}", volume.name()),
        }))
    }

    async fn get_rebuild_status(
        &self,
        _request: Request<RebuildStatusRequest>,
    ) -> Result<Response<RebuildStatusResponse>, Status> {
        let volume = self.state.open_volume()?;
        Ok(Response::new(RebuildStatusResponse {
            rebuilds: rebuilds(volume),
        }))
    }

    async fn verify(
        &self,
        _request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let volume = self.state.open_volume()?;
        let report = volume
            .verify()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(VerifyResponse {
            replicas_compared: report.replicas.len() as u32,
            chunks_compared: report.chunks_compared,
            differences: report
                .differences
                .into_iter()
                .map(|(offset, length, replicas)| ChunkDifference {
                    offset,
                    length,
                    replicas,
                })
                .collect(),
        }))
    }

    async fn expand_volume(
        &self,
        request: Request<ExpandVolumeRequest>,
    ) -> Result<Response<ExpandVolumeResponse>, Status> {
        let volume = self.state.open_volume()?;
        let size = request.into_inner().size;
        Ok(Response::new(expand_volume(volume, size).await?))
    }

    async fn create_snapshot(
        &self,
        request: Request<VolumeSnapshotRequest>,
    ) -> Result<Response<VolumeSnapshotResponse>, Status> {
        let volume = self.state.open_volume()?;
        let name = request.into_inner().name;
        refuse_while_filling(volume, "snapshot")?;
        // Writes are held only while the replicas switch heads; each syncs
        // the frozen layer afterwards (`ReplicaSet::snapshot_create`).
        let report = volume
            .replica_set()
            .snapshot_create(&name)
            .await
            .map_err(snapshot_status)?;
        Ok(Response::new(snapshot_response("taken", &name, report)))
    }

    async fn delete_snapshot(
        &self,
        request: Request<VolumeSnapshotRequest>,
    ) -> Result<Response<VolumeSnapshotResponse>, Status> {
        let volume = self.state.open_volume()?;
        let request = request.into_inner();
        let name = request.name;
        if request.clone_filled {
            lock(&self.state.snapshot_readers).remove(&name);
        }
        if let Some(at) = lock(&self.state.snapshot_readers).get(&name)
            && at.elapsed() < CLONE_SOURCE_LEASE
        {
            return Err(Status::failed_precondition(format!(
                "snapshot {name} is the source of a clone still filling (read {}s ago); delete it once the clone is done",
                at.elapsed().as_secs()
            )));
        }
        let report = volume
            .replica_set()
            .snapshot_delete(&name)
            .await
            .map_err(snapshot_status)?;
        Ok(Response::new(snapshot_response("deleted", &name, report)))
    }

    async fn revert_snapshot(
        &self,
        request: Request<VolumeSnapshotRequest>,
    ) -> Result<Response<VolumeSnapshotResponse>, Status> {
        let volume = self.state.open_volume()?;
        let name = request.into_inner().name;
        refuse_while_filling(volume, "revert")?;
        let attached = corral_block::accept::live_connections();
        let report = volume
            .replica_set()
            .snapshot_revert(&name, attached, volume.chunk_count())
            .await
            .map_err(snapshot_status)?;
        Ok(Response::new(snapshot_response(
            "reverted to",
            &name,
            report,
        )))
    }

    async fn list_snapshots(
        &self,
        _request: Request<VolumeListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let volume = self.state.open_volume()?;
        let listed = volume
            .replica_set()
            .snapshot_list()
            .await
            .map_err(snapshot_status)?;
        Ok(Response::new(listed))
    }

    async fn read_snapshot(
        &self,
        request: Request<ReadSnapshotRequest>,
    ) -> Result<Response<ReadSnapshotResponse>, Status> {
        let volume = self.state.open_volume()?;
        let req = request.into_inner();
        if req.length > 4 << 20 {
            return Err(Status::invalid_argument(format!(
                "read snapshot: {} bytes is more than the 4 MiB a call may read",
                req.length
            )));
        }
        lock(&self.state.snapshot_readers).insert(req.name.clone(), std::time::Instant::now());
        let data = volume
            .read_snapshot(&req.name, req.offset, req.length)
            .await
            .map_err(|e| match e {
                corral_block::BlockError::Invalid(m) => Status::invalid_argument(m),
                e @ corral_block::BlockError::OutOfRange { .. } => {
                    Status::out_of_range(format!("read snapshot {}: {e}", req.name))
                }
                other => Status::unavailable(other.to_string()),
            })?;
        let crc32c = crc32c::crc32c(&data);
        Ok(Response::new(ReadSnapshotResponse { data, crc32c }))
    }

    async fn create_backup(
        &self,
        request: Request<corral_proto::v1::CreateBackupRequest>,
    ) -> Result<Response<corral_proto::v1::CreateBackupResponse>, Status> {
        let volume = self.state.open_volume()?;
        let req = request.into_inner();
        refuse_while_filling(volume, "backup")?;
        let settings = corral_backup::target::S3Settings {
            endpoint: (!req.s3_endpoint.is_empty()).then(|| req.s3_endpoint.clone()),
            credentials_file: self.state.config.s3_credentials.clone(),
            ..Default::default()
        };
        let target = corral_backup::target::Target::open(&req.target, &settings)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Before the snapshot: a target that cannot be used (keys, bucket,
        // unreachable) is reported with nothing taken.
        target
            .check()
            .await
            .map_err(|e| target_status(&e, e.to_string()))?;
        let snapshot = if req.snapshot.is_empty() {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let name = format!("backup-{ms}");
            volume
                .replica_set()
                .snapshot_create(&name)
                .await
                .map_err(snapshot_status)?;
            name
        } else {
            req.snapshot.clone()
        };
        let name = if req.name.is_empty() {
            snapshot.clone()
        } else {
            req.name.clone()
        };
        let progress = Arc::new(corral_backup::transfer::BackupProgress::default());
        *lock(&self.state.backup) = Some(RunningBackup {
            name: name.clone(),
            target: req.target.clone(),
            progress: Arc::clone(&progress),
        });
        let report = backup_or_status(
            volume,
            &target,
            &name,
            &snapshot,
            &progress,
            &self.state.recent_backup_objects,
        )
        .await;
        *lock(&self.state.backup) = None;
        let report = report?;
        // Retention runs after the backup is safely there; its failure is
        // reported, the backup stands.
        let (removed, gc) = if req.retain > 0 {
            let removed =
                corral_backup::catalog::retain(&target, volume.name(), req.retain as usize)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "backup {name} is written; keeping the last {}: {e}",
                            req.retain
                        ))
                    })?;
            let gc = corral_backup::catalog::collect_garbage(
                &target,
                volume.name(),
                corral_backup::catalog::DEFAULT_MIN_AGE,
            )
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "backup {name} is written and {} removed; collecting their data: {e}",
                    removed.join(", ")
                ))
            })?;
            (removed, Some(gc))
        } else {
            (Vec::new(), None)
        };
        let parent = report
            .manifest
            .as_ref()
            .and_then(|m| m.parent.clone())
            .unwrap_or_default();
        Ok(Response::new(corral_proto::v1::CreateBackupResponse {
            name,
            snapshot,
            parent,
            blocks_read: report.blocks_read,
            blocks_stored: report.blocks_stored,
            blocks_deduplicated: report.blocks_deduplicated,
            zero_blocks: report.zero_blocks,
            bytes_put: report.bytes_put,
            packs_put: report.packs_put,
            pages_put: report.pages_put,
            removed,
            gc_bytes_freed: gc.as_ref().map_or(0, |g| g.bytes_freed),
            gc_skipped: gc.and_then(|g| g.skipped).unwrap_or_default(),
        }))
    }

    async fn salvage(
        &self,
        request: Request<SalvageRequest>,
    ) -> Result<Response<ReplicaChangeResponse>, Status> {
        let replica = request.into_inner().replica;
        if self.state.volume().is_some() {
            return Err(Status::failed_precondition(
                "the volume is open and serving; salvage is for an engine waiting to open",
            ));
        }
        if !self.state.config.replicas.contains(&replica) {
            return Err(Status::invalid_argument(format!(
                "{replica} is not one of the engine's --replica addresses"
            )));
        }
        warn!(%replica, "operator asked to salvage from this replica");
        *lock(&self.state.salvage) = Some(replica.clone());
        Ok(Response::new(ReplicaChangeResponse {
            message: format!(
                "trusting {replica}: the engine opens the volume from it; the other replicas will be rebuilt"
            ),
        }))
    }
}

/// A snapshot error as a gRPC status: a bad name INVALID_ARGUMENT, an
/// unknown snapshot NOT_FOUND, a failure UNAVAILABLE.
fn snapshot_status(e: crate::replica_set::snapshot::SnapshotError) -> Status {
    use crate::replica_set::snapshot::SnapshotError;
    match e {
        SnapshotError::BadName(_) => Status::invalid_argument(e.to_string()),
        SnapshotError::NotFound { .. } => Status::not_found(e.to_string()),
        SnapshotError::Precondition(_) => Status::failed_precondition(e.to_string()),
        SnapshotError::Failed(_) => Status::unavailable(e.to_string()),
    }
}

fn snapshot_response(
    what: &str,
    name: &str,
    r: crate::replica_set::snapshot::SnapshotReport,
) -> VolumeSnapshotResponse {
    VolumeSnapshotResponse {
        message: format!("snapshot {name:?} {what} on {} replica(s)", r.done.len()),
        snapshot: r.snapshot,
        done: r.done,
        failed: r.failed,
    }
}

/// The answer to `ExpandVolume`: a refusal of the size is INVALID_ARGUMENT,
/// a failure to carry it out UNAVAILABLE (the message says what changed).
pub async fn expand_volume(volume: &Volume, size: u64) -> Result<ExpandVolumeResponse, Status> {
    let report = volume.expand(size).await.map_err(|e| {
        if e.is_invalid() {
            Status::invalid_argument(e.to_string())
        } else {
            Status::unavailable(e.to_string())
        }
    })?;
    let message = if report.old_size == report.new_size {
        format!(
            "volume {} already has {} bytes: nothing changed",
            volume.name(),
            report.new_size
        )
    } else if report.failed.is_empty() {
        format!(
            "volume {} expanded from {} to {} bytes on {} replica(s) (generation {})",
            volume.name(),
            report.old_size,
            report.new_size,
            report.grown.len(),
            report.generation
        )
    } else {
        format!(
            "volume {} expanded from {} to {} bytes (generation {}); {} replica(s) could not grow and are ERR until they return: {}",
            volume.name(),
            report.old_size,
            report.new_size,
            report.generation,
            report.failed.len(),
            report.failed.join("; ")
        )
    };
    Ok(ExpandVolumeResponse {
        old_size: report.old_size,
        new_size: report.new_size,
        generation: report.generation.0,
        grown: report.grown,
        failed: report.failed,
        message,
    })
}

/// Serve the control service on `listener` (over mutual TLS with `tls`)
/// until `shutdown` is cancelled.
pub async fn serve_control(
    listener: TcpListener,
    tls: Option<corral_tls::ServerTls>,
    state: Arc<EngineState>,
    shutdown: CancellationToken,
) -> Result<(), EngineError> {
    let incoming = corral_tls::grpc::incoming(listener, tls);
    // Control calls are small and few: 64 streams per connection at most,
    // messages within tonic's default 4 MiB.
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(64))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(EngineControlServer::new(ControlService::new(state)))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// A clone still filling refuses what would freeze or replace its head: a
/// snapshot taken now would lack the blocks filled after it.
fn refuse_while_filling(volume: &Volume, what: &str) -> Result<(), Status> {
    match volume.clone_status() {
        Some(s) if !s.done => Err(Status::failed_precondition(format!(
            "{what}: volume {} is a clone still filling from snapshot {} of {} ({} of {} bytes); wait for `corral volume clone status --wait`",
            volume.name(),
            s.snapshot,
            s.source_engine,
            s.filled_bytes,
            s.total_bytes
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::writability;

    #[test]
    fn writability_says_what_is_left() {
        assert!(writability(3, 3, 2, "quorum").contains("losing 2 of the 3"));
        assert!(writability(1, 3, 1, "available").contains("losing 1 of the 1"));
        assert!(writability(1, 3, 2, "quorum").starts_with("not writable"));
    }
}
