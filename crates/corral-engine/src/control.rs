//! The engine's control gRPC service (`corral volume --engine ADDR ...`).
//! This is also the one place where the engine's control listener is built.

use std::sync::Arc;

use corral_block::BlockDevice;
use corral_proto::v1::{
    ListEngineReplicasRequest, ListEngineReplicasResponse, ReplicaStatus, VolumeInfo,
    VolumeInfoRequest,
    engine_control_server::{EngineControl, EngineControlServer},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::error::EngineError;
use crate::volume::Volume;

/// Implements `corral.v1.EngineControl` for one volume.
pub struct ControlService {
    volume: Arc<Volume>,
    frontends: String,
}

impl ControlService {
    pub fn new(volume: Arc<Volume>, frontends: String) -> Self {
        ControlService { volume, frontends }
    }

    /// The volume's state in one word.
    fn state(&self) -> &'static str {
        let set = self.volume.replica_set();
        if set.is_fenced() {
            "fenced"
        } else if set.check_writable().is_err() {
            "unavailable"
        } else if set.rw_count() < set.total() {
            "degraded"
        } else {
            "serving"
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

#[tonic::async_trait]
impl EngineControl for ControlService {
    async fn get_volume_info(
        &self,
        _request: Request<VolumeInfoRequest>,
    ) -> Result<Response<VolumeInfo>, Status> {
        let set = self.volume.replica_set();
        let rw = set.rw_count();
        let total = set.total();
        Ok(Response::new(VolumeInfo {
            name: self.volume.name().to_string(),
            size: self.volume.size(),
            block_size: self.volume.block_size(),
            chunk_size: self.volume.chunk_map().chunk_size() as u32,
            epoch: set.epoch(),
            generation: set.generation(),
            write_policy: set.policy().as_str().to_string(),
            state: self.state().to_string(),
            replicas_total: total as u32,
            replicas_rw: rw as u32,
            frontends: self.frontends.clone(),
            writability: writability(rw, total, set.min_rw(), set.policy().as_str()),
        }))
    }

    async fn list_replicas(
        &self,
        _request: Request<ListEngineReplicasRequest>,
    ) -> Result<Response<ListEngineReplicasResponse>, Status> {
        let replicas = self
            .volume
            .replica_set()
            .status()
            .into_iter()
            .map(|s| ReplicaStatus {
                address: s.address,
                mode: s.mode.to_pb() as i32,
                instance_id: s.instance_id,
                last_error: s.last_error,
            })
            .collect();
        Ok(Response::new(ListEngineReplicasResponse { replicas }))
    }
}

/// Serve the control service on `listener` until `shutdown` resolves.
pub async fn serve_control(
    listener: TcpListener,
    volume: Arc<Volume>,
    frontends: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), EngineError> {
    let incoming = TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(EngineControlServer::new(ControlService::new(
            volume, frontends,
        )))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
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
