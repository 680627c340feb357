//! The `EngineManager` gRPC service (`proto/corral/v1/node.proto`): a thin
//! layer that turns requests into [`EngineManager`] calls and its errors
//! into statuses.

use std::sync::Arc;

use corral_proto::v1::{self as pb, engine_manager_server::EngineManager as EngineManagerRpc};
use tonic::{Request, Response, Status};

use crate::error::NodeError;
use crate::manager::EngineManager;

/// Implements `corral.v1.EngineManager`.
pub struct EngineManagerService {
    manager: Arc<EngineManager>,
}

impl EngineManagerService {
    pub fn new(manager: Arc<EngineManager>) -> Self {
        EngineManagerService { manager }
    }
}

#[tonic::async_trait]
impl EngineManagerRpc for EngineManagerService {
    async fn get_node_info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.manager.node_info()?))
    }

    async fn start_engine(
        &self,
        request: Request<pb::StartEngineRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("invalid engine spec: spec: missing"))?;
        Ok(Response::new(self.manager.start(&spec).await?))
    }

    async fn stop_engine(
        &self,
        request: Request<pb::StopEngineRequest>,
    ) -> Result<Response<pb::StopEngineResponse>, Status> {
        self.manager.stop(&request.into_inner().volume).await?;
        Ok(Response::new(pb::StopEngineResponse {}))
    }

    async fn get_engine(
        &self,
        request: Request<pb::GetEngineRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        Ok(Response::new(
            self.manager.get(&request.into_inner().volume)?,
        ))
    }

    async fn list_engines(
        &self,
        _request: Request<pb::ListEnginesRequest>,
    ) -> Result<Response<pb::ListEnginesResponse>, Status> {
        Ok(Response::new(pb::ListEnginesResponse {
            engines: self.manager.list(),
        }))
    }

    async fn get_engine_replicas(
        &self,
        request: Request<pb::GetEngineRequest>,
    ) -> Result<Response<pb::ListEngineReplicasResponse>, Status> {
        let replicas = self
            .manager
            .engine_replicas(&request.into_inner().volume)
            .await?;
        Ok(Response::new(pb::ListEngineReplicasResponse { replicas }))
    }

    async fn add_engine_replica(
        &self,
        request: Request<pb::EngineReplicaRequest>,
    ) -> Result<Response<pb::ReplicaChangeResponse>, Status> {
        let req = request.into_inner();
        let message = self
            .manager
            .change_engine_replica(&req.volume, &req.address, true)
            .await?;
        Ok(Response::new(pb::ReplicaChangeResponse { message }))
    }

    async fn remove_engine_replica(
        &self,
        request: Request<pb::EngineReplicaRequest>,
    ) -> Result<Response<pb::ReplicaChangeResponse>, Status> {
        let req = request.into_inner();
        let message = self
            .manager
            .change_engine_replica(&req.volume, &req.address, false)
            .await?;
        Ok(Response::new(pb::ReplicaChangeResponse { message }))
    }

    async fn create_engine_snapshot(
        &self,
        request: Request<pb::EngineSnapshotRequest>,
    ) -> Result<Response<pb::VolumeSnapshotResponse>, Status> {
        let req = request.into_inner();
        // Carried out to the end even if the caller goes away: a transient
        // engine must be stopped, not left behind by a cancelled call.
        let manager = Arc::clone(&self.manager);
        let done = finish(async move {
            manager
                .snapshot(&req.volume, &req.name, req.spec.as_ref(), true)
                .await
        })
        .await?;
        Ok(Response::new(done))
    }

    async fn delete_engine_snapshot(
        &self,
        request: Request<pb::EngineSnapshotRequest>,
    ) -> Result<Response<pb::VolumeSnapshotResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        let done = finish(async move {
            manager
                .snapshot(&req.volume, &req.name, req.spec.as_ref(), false)
                .await
        })
        .await?;
        Ok(Response::new(done))
    }

    async fn list_hosted_snapshots(
        &self,
        request: Request<pb::ListHostedSnapshotsRequest>,
    ) -> Result<Response<pb::ListHostedSnapshotsResponse>, Status> {
        let volumes = self
            .manager
            .hosted_snapshots(&request.into_inner().volume)
            .await?;
        Ok(Response::new(pb::ListHostedSnapshotsResponse { volumes }))
    }

    async fn expand_engine(
        &self,
        request: Request<pb::ExpandEngineRequest>,
    ) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        let done = finish(async move {
            manager
                .expand(&req.volume, req.size, req.spec.as_ref())
                .await
        })
        .await?;
        Ok(Response::new(done))
    }

    async fn fill_clone(
        &self,
        request: Request<pb::FillCloneRequest>,
    ) -> Result<Response<pb::FillCloneResponse>, Status> {
        let req = request.into_inner();
        let clone = req
            .clone
            .ok_or_else(|| Status::invalid_argument("invalid engine spec: clone: missing"))?;
        let manager = Arc::clone(&self.manager);
        // No source: a restore (clone.from_backup), or a bad request, which
        // fill_restore names.
        let done = match req.source {
            Some(source) => {
                finish(async move { manager.fill_clone(&clone, &source, &req.snapshot).await })
                    .await?
            }
            None => finish(async move { manager.fill_restore(&clone).await }).await?,
        };
        Ok(Response::new(done))
    }

    async fn create_engine_backup(
        &self,
        request: Request<pb::EngineBackupRequest>,
    ) -> Result<Response<pb::EngineBackupResponse>, Status> {
        // The backup runs in a task of its own (the caller asks again);
        // this call waits a few seconds for it.
        let answer = self
            .manager
            .backup(request.into_inner(), crate::manager::BACKUP_ANSWER_WAIT)
            .await?;
        Ok(Response::new(answer))
    }
}

/// Run `work` in a task of its own, to its end whether or not the caller
/// waits for it (tonic drops a handler whose client has gone).
async fn finish<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, NodeError>> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::spawn(work)
        .await
        .map_err(|e| NodeError::Task(e.to_string()))?
}
