//! The CSI Node service: the kubelet's calls on the node where a pod runs.
//! Argument checks and status codes live here; the work is
//! [`NodeVolumes`](crate::staging::NodeVolumes)', run on a blocking thread
//! (commands, mounts and fsyncs block).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use crate::attach::Frontend;
use crate::capabilities::{check_capabilities, node_capabilities};
use crate::controller::{expansion_size, expansion_unit, publish_keys};
use crate::ids::TOPOLOGY_NODE_KEY;
use crate::staging::{Access, NodeError, NodeVolumes, Publication, device_size, fs_usage};
use crate::status::client_status;

/// The node service.
pub struct NodeService {
    node_id: String,
    volumes: Arc<NodeVolumes>,
}

impl NodeService {
    pub fn new(node_id: String, volumes: NodeVolumes) -> Self {
        NodeService {
            node_id,
            volumes: Arc::new(volumes),
        }
    }
}

fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::NotFound(m) => Status::not_found(m),
        NodeError::AlreadyExists(m) => Status::already_exists(m),
        NodeError::FailedPrecondition(m) => Status::failed_precondition(m),
        e => Status::internal(e.to_string()),
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

/// Where the engine serves the volume, from the publish context.
fn frontend(volume_id: &str, ctx: &std::collections::HashMap<String, String>) -> Frontend {
    let get = |k: &str| ctx.get(k).filter(|v| !v.is_empty()).cloned();
    Frontend {
        volume: get(publish_keys::VOLUME).unwrap_or_else(|| volume_id.to_string()),
        nbd: get(publish_keys::NBD),
        iscsi: get(publish_keys::ISCSI_PORTAL).zip(get(publish_keys::ISCSI_TARGET)),
    }
}

/// The access a capability asks for; a mount without an fs_type uses the
/// volume context's `fsType` (the StorageClass's), else ext4.
fn access(
    cap: Option<&csi::VolumeCapability>,
    volume_context: &std::collections::HashMap<String, String>,
) -> Result<Access, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    check_capabilities(std::slice::from_ref(cap)).map_err(Status::invalid_argument)?;
    Ok(match &cap.access_type {
        Some(csi::volume_capability::AccessType::Block(_)) => Access::Block,
        Some(csi::volume_capability::AccessType::Mount(m)) => Access::Mount {
            fs_type: if m.fs_type.is_empty() {
                volume_context
                    .get("fsType")
                    .cloned()
                    .unwrap_or_else(|| "ext4".into())
            } else {
                m.fs_type.clone()
            },
            flags: m.mount_flags.clone(),
        },
        None => {
            return Err(Status::invalid_argument(
                "volume_capability has no access_type",
            ));
        }
    })
}

/// The access mode's name (`SINGLE_NODE_WRITER`, ...) of a capability
/// [`access`] accepted.
fn mode_name(cap: Option<&csi::VolumeCapability>) -> String {
    cap.and_then(|c| c.access_mode.as_ref())
        .and_then(|m| csi::volume_capability::access_mode::Mode::try_from(m.mode).ok())
        .map(|m| m.as_str_name().to_string())
        .unwrap_or_default()
}

/// Whether `path` (which exists) holds the staged volume: a mounted
/// filesystem on its device (the staging mount or a bind of it), or the
/// device itself bound as a file (block access). `None` when the device
/// node is gone (say, the iSCSI session dropped), so it cannot tell.
fn holds_volume(path: &Path, device: &Path) -> Option<bool> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dev = std::fs::metadata(device).ok()?.rdev();
    let meta = std::fs::metadata(path).ok()?;
    Some(if meta.file_type().is_block_device() {
        meta.rdev() == dev
    } else {
        meta.dev() == dev
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("node task failed: {e}")))?
        .map_err(node_status)
}

/// The volume's health from its engine, as a CSI volume condition.
async fn condition(control: Option<&str>) -> Option<csi::VolumeCondition> {
    let addr = control?;
    let info = match corral_client::EngineControl::connect(addr, Duration::from_secs(3)).await {
        Ok(c) => c.info().await,
        Err(e) => Err(e),
    };
    Some(match info {
        Ok(i) if i.state == "serving" => csi::VolumeCondition {
            abnormal: false,
            message: format!(
                "{} of {} replicas up to date",
                i.replicas_rw, i.replicas_total
            ),
        },
        Ok(i) => csi::VolumeCondition {
            abnormal: true,
            message: format!(
                "engine is {}: {} of {} replicas up to date; {}",
                i.state, i.replicas_rw, i.replicas_total, i.writability
            ),
        },
        Err(e) => csi::VolumeCondition {
            abnormal: true,
            message: format!("engine unreachable: {e}"),
        },
    })
}

/// Grow the volume's engine at `control` to `range` (rounded up to the
/// volume's unit) unless it is that large already; the size it serves.
/// An engine that does not answer at the address recorded when the volume
/// was staged (restarted elsewhere since) is left to the controller: the
/// size asked for is then only what the device must show.
async fn grow_engine(control: &str, range: &csi::CapacityRange) -> Result<u64, Status> {
    let engine = match corral_client::EngineControl::connect(control, Duration::from_secs(60)).await
    {
        Ok(engine) => engine,
        Err(e @ corral_client::ClientError::Unreachable { .. }) => {
            tracing::warn!(control, error = %e, "engine unreachable: not growing it from the node");
            return expansion_size(Some(range), expansion_unit(0));
        }
        Err(e) => return Err(client_status(&e)),
    };
    let info = engine.info().await.map_err(|e| client_status(&e))?;
    let size = expansion_size(Some(range), expansion_unit(info.block_size))?;
    if info.size >= size {
        return Ok(info.size);
    }
    let grown = engine.expand(size).await.map_err(|e| client_status(&e))?;
    tracing::info!(
        control,
        old = grown.old_size,
        new = grown.new_size,
        "engine expanded by the node plugin"
    );
    Ok(grown.new_size.max(size))
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let access = access(req.volume_capability.as_ref(), &req.volume_context)?;
        let fe = frontend(&id, &req.publish_context);
        let control = req.publish_context.get(publish_keys::CONTROL).cloned();
        let volumes = Arc::clone(&self.volumes);
        blocking(move || volumes.stage(&id, &fe, &access, &staging, control)).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let volumes = Arc::clone(&self.volumes);
        blocking(move || volumes.unstage(&id, &staging)).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        let access = access(req.volume_capability.as_ref(), &req.volume_context)?;
        // CSI: "Staging target path not set: FAILED_PRECONDITION" when the
        // plugin has STAGE_UNSTAGE_VOLUME.
        if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is not set: stage the volume (NodeStageVolume) first",
            ));
        }
        let staging = PathBuf::from(&req.staging_target_path);
        let publication = Publication {
            target,
            read_only: req.readonly,
            mode: mode_name(req.volume_capability.as_ref()),
            block: access == Access::Block,
        };
        let fe = frontend(&id, &req.publish_context);
        let control = req.publish_context.get(publish_keys::CONTROL).cloned();
        let volumes = Arc::clone(&self.volumes);
        blocking(move || {
            volumes.publish(&id, &staging, &publication, || {
                volumes.stage(&id, &fe, &access, &staging, control)
            })
        })
        .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        let volumes = Arc::clone(&self.volumes);
        blocking(move || volumes.unpublish(&id, &target)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let volumes = Arc::clone(&self.volumes);
        let lookup = id.clone();
        let record = blocking(move || volumes.record(&lookup)).await?;
        let Some(record) = record else {
            return Err(Status::not_found(format!(
                "volume {id} is not staged on this node"
            )));
        };
        let meta = std::fs::metadata(&path)
            .map_err(|e| Status::not_found(format!("volume_path {}: {e}", path.display())))?;
        // CSI: NOT_FOUND when the volume "does not exist on specified
        // volume_path". A block volume's staging directory holds nothing
        // but is where it was staged; when the device itself is gone, the
        // paths recorded for the volume still count (its condition says
        // what is wrong).
        let staged_block = record.access == Access::Block && path == record.staging_path;
        let recorded =
            path == record.staging_path || record.publications.iter().any(|p| p.target == path);
        let here = match holds_volume(&path, record.attachment.device()) {
            Some(holds) => holds || staged_block,
            None => recorded,
        };
        if !here {
            return Err(Status::not_found(format!(
                "volume {id} is not staged or published at {}",
                path.display()
            )));
        }
        let usage = if meta.is_dir() && !staged_block {
            let u = fs_usage(&path).map_err(|e| Status::internal(format!("statvfs: {e}")))?;
            vec![
                csi::VolumeUsage {
                    available: u.available_bytes as i64,
                    total: u.total_bytes as i64,
                    used: u.used_bytes as i64,
                    unit: csi::volume_usage::Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: u.free_inodes as i64,
                    total: u.total_inodes as i64,
                    used: u.used_inodes as i64,
                    unit: csi::volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            let size = device_size(record.attachment.device())
                .or_else(|_| device_size(Path::new(&path)))
                .map_err(|e| Status::internal(format!("device size: {e}")))?;
            vec![csi::VolumeUsage {
                available: 0,
                total: size as i64,
                used: 0,
                unit: csi::volume_usage::Unit::Bytes as i32,
            }]
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: condition(record.control_address.as_deref()).await,
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        if let Some(cap) = &req.volume_capability {
            check_capabilities(std::slice::from_ref(cap)).map_err(Status::invalid_argument)?;
        }
        let volumes = Arc::clone(&self.volumes);
        let lookup = id.clone();
        let Some(record) = blocking(move || volumes.record(&lookup)).await? else {
            return Err(Status::not_found(format!(
                "volume {id} is not staged on this node"
            )));
        };
        let recorded =
            path == record.staging_path || record.publications.iter().any(|p| p.target == path);
        if !recorded {
            return Err(Status::not_found(format!(
                "volume {id} is not staged or published at {}",
                path.display()
            )));
        }
        // The engine runs on this node: make sure it serves the size asked
        // for (the controller could not reach it if it listens on this
        // node's loopback; growing it again to its size changes nothing).
        let wanted = match (&req.capacity_range, record.control_address.as_deref()) {
            (Some(range), Some(addr)) if range.required_bytes > 0 => {
                Some(grow_engine(addr, range).await?)
            }
            _ => None,
        };
        let volumes = Arc::clone(&self.volumes);
        let capacity = blocking(move || volumes.expand(&id, wanted)).await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: capacity.min(i64::MAX as u64) as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: node_capabilities(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let mut segments = std::collections::HashMap::new();
        segments.insert(TOPOLOGY_NODE_KEY.to_string(), self.node_id.clone());
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::AttachMethod;
    use crate::host::{Host, RecordingHost};
    use csi::node_server::Node;

    #[tokio::test]
    async fn node_expansion_checks_its_arguments_and_finds_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let host = Arc::new(RecordingHost::new());
        let service = NodeService::new(
            "node-0".into(),
            NodeVolumes::new(
                Arc::clone(&host) as Arc<dyn Host>,
                dir.path().join("state"),
                AttachMethod::Iscsi,
            ),
        );
        let request = |id: &str, path: &str| csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let cases = [
            (request("", "/stage/pvc-1"), tonic::Code::InvalidArgument),
            (request("pvc-1", ""), tonic::Code::InvalidArgument),
            (request("pvc-1", "/stage/pvc-1"), tonic::Code::NotFound),
        ];
        for (req, code) in cases {
            let err = service
                .node_expand_volume(Request::new(req.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{req:?}: {err}");
        }
        assert!(host.commands().is_empty(), "{:?}", host.commands());
    }
}
