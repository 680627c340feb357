//! A fixture for the CSI plugin, doing what Kubernetes does: node daemons
//! ([`NodeCluster`]), one `corral csi --controller` over all of them (the
//! controller Deployment), and a `corral csi --node` per node (the node
//! DaemonSet's plugin), each on its own unix socket, driven through the
//! CSI gRPC clients as the sidecars and the kubelet drive them.
//!
//! The node plugins attach with `fuse` (nbdfuse + a loop device), the one
//! method this machine's kernel allows; everything they mount lives under
//! the fixture's directory, and `Drop` unmounts it, detaches loop devices
//! and stops nbdfuse even when a test fails half way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use corral_proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;
use tonic::transport::Channel;

use crate::Process;
use crate::node::NodeCluster;

/// A gRPC channel over a unix socket, as the CSI sidecars use.
pub async fn unix_channel(path: &Path) -> Result<Channel> {
    let path = path.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://csi.invalid")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

/// One `corral csi` process.
pub struct CsiPlugin {
    pub socket: PathBuf,
    pub process: Process,
    pub channel: Channel,
}

/// Node daemons with the CSI plugin over them.
pub struct CsiCluster {
    pub nodes: NodeCluster,
    pub controller: CsiPlugin,
    /// Node plugins by node index (started on first use).
    pub node_plugins: Vec<Option<CsiPlugin>>,
}

impl CsiCluster {
    /// `n` node daemons and a controller over all of them.
    pub fn start(n: usize) -> Result<Self> {
        let nodes = NodeCluster::start(n)?;
        let mut args = vec![
            "csi".to_string(),
            "--endpoint".into(),
            String::new(),
            "--node-id".into(),
            "controller".into(),
            "--controller".into(),
            "--daemon-timeout".into(),
            "3s".into(),
            "--reconcile-interval".into(),
            "1s".into(),
        ];
        for node in &nodes.nodes {
            args.push("--daemons".into());
            args.push(node.addr.to_string());
        }
        let controller = start_plugin(&nodes, "controller", args)?;
        let node_plugins = (0..n).map(|_| None).collect();
        Ok(CsiCluster {
            nodes,
            controller,
            node_plugins,
        })
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.nodes.block_on(f)
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.controller.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.controller.channel.clone())
    }

    /// Node `i`'s node plugin (started with the fuse attach method if it
    /// is not running).
    pub fn node(&mut self, i: usize) -> Result<NodeClient<Channel>> {
        if self.node_plugins[i].is_none() {
            let id = self.nodes.nodes[i].id.clone();
            let state = self.nodes.path().join(format!("csi-{id}"));
            let args = vec![
                "csi".to_string(),
                "--endpoint".into(),
                String::new(),
                "--node-id".into(),
                id.clone(),
                "--node".into(),
                "--attach".into(),
                "fuse".into(),
                "--state-dir".into(),
                state.display().to_string(),
            ];
            self.node_plugins[i] = Some(start_plugin(&self.nodes, &format!("csi-{id}"), args)?);
        }
        let plugin = self.node_plugins[i]
            .as_ref()
            .context("the node plugin was just started")?;
        Ok(NodeClient::new(plugin.channel.clone()))
    }

    /// Kill node `i`'s node plugin (as a DaemonSet rollout would) and
    /// start it again on the same socket and state directory.
    pub fn restart_node_plugin(&mut self, i: usize) -> Result<NodeClient<Channel>> {
        if let Some(mut plugin) = self.node_plugins[i].take() {
            plugin.process.kill9()?;
            let _ = std::fs::remove_file(&plugin.socket);
        }
        self.node(i)
    }

    /// A directory under the fixture for kubelet-style paths.
    pub fn kubelet_dir(&self, node: usize) -> PathBuf {
        self.nodes.path().join(format!("kubelet-{node}"))
    }
}

/// Start a plugin: its endpoint goes in the argument after `--endpoint`.
fn start_plugin(nodes: &NodeCluster, name: &str, mut args: Vec<String>) -> Result<CsiPlugin> {
    let socket = nodes.path().join(format!("{name}.sock"));
    let at = args
        .iter()
        .position(|a| a == "--endpoint")
        .context("no --endpoint")?;
    args[at + 1] = format!("unix://{}", socket.display());
    let log = nodes.path().join(format!("{name}.log"));
    let mut process = Process::spawn(name, args, log)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = process.exited() {
            bail!("{name} exited ({status}):\n{}", process.log_text());
        }
        if std::time::Instant::now() > deadline {
            bail!("{name} made no socket in 20 s:\n{}", process.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let channel = nodes.block_on(unix_channel(&socket))?;
    Ok(CsiPlugin {
        socket,
        process,
        channel,
    })
}

/// Undo what node plugins left under `dir`: loop devices over files there
/// (first: once the fuse mount under a loop device is lazily unmounted, its
/// backing file no longer shows under `dir`; a busy one is detached when
/// its last user goes), mounts (deepest first), nbdfuse processes serving
/// there.
pub fn clean_mounts_under(dir: &Path) {
    let prefix = dir.display().to_string();
    if let Ok(out) = std::process::Command::new("losetup")
        .args(["--noheadings", "-O", "NAME,BACK-FILE", "-l"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.split_whitespace();
            if let (Some(name), Some(back)) = (parts.next(), parts.next())
                && back.starts_with(&prefix)
            {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", name])
                    .status();
            }
        }
    }
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(|p| p.replace("\\040", " "))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in &points {
        let _ = std::process::Command::new("umount")
            .args(["-l", p])
            .status();
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("nbdfuse") && cmdline.contains(&prefix) {
                // SAFETY: kill(2) on a pid we just read; no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for CsiCluster {
    fn drop(&mut self) {
        clean_mounts_under(self.nodes.path());
    }
}

/// The StorageClass parameters, with `overrides` applied.
pub fn storage_class(overrides: &[(&str, &str)]) -> HashMap<String, String> {
    let mut p: HashMap<String, String> = [
        ("numberOfReplicas", "3"),
        ("staleReplicaTimeout", "30"),
        ("fsType", "ext4"),
        ("dataLocality", "best-effort"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in overrides {
        p.insert(k.to_string(), v.to_string());
    }
    p
}

/// A single-node writer with an ext4 mount: a PVC's usual capability.
pub fn ext4_writer() -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

/// The capability the kubelet passes for a pod's mount of `volume`: its
/// StorageClass's filesystem.
pub fn pod_capability(volume: &csi::Volume) -> csi::VolumeCapability {
    let mut cap = ext4_writer();
    if let (Some(fs), Some(csi::volume_capability::AccessType::Mount(m))) = (
        volume.volume_context.get("fsType"),
        cap.access_type.as_mut(),
    ) {
        m.fs_type = fs.clone();
    }
    cap
}

/// What the sidecars and the kubelet do, one call each.
impl CsiCluster {
    /// The external-provisioner: CreateVolume, for a pod that will run on
    /// `consumer` (its node in the preferred topology), if any.
    pub fn create_volume(
        &self,
        name: &str,
        bytes: i64,
        parameters: HashMap<String, String>,
        consumer: Option<usize>,
    ) -> Result<csi::Volume> {
        let preferred = consumer
            .map(|i| {
                let mut segments = HashMap::new();
                segments.insert(
                    "topology.corral.io/node".to_string(),
                    self.nodes.nodes[i].id.clone(),
                );
                vec![csi::Topology { segments }]
            })
            .unwrap_or_default();
        let request = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: bytes,
            }),
            volume_capabilities: vec![ext4_writer()],
            parameters,
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: vec![],
                preferred,
            }),
            ..Default::default()
        };
        self.block_on(self.controller().create_volume(request))?
            .into_inner()
            .volume
            .context("CreateVolume returned no volume")
    }

    /// The external-attacher: ControllerPublishVolume on node `node`.
    pub fn publish(&self, volume: &csi::Volume, node: usize) -> Result<HashMap<String, String>> {
        let request = csi::ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: self.nodes.nodes[node].id.clone(),
            volume_capability: Some(ext4_writer()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        Ok(self
            .block_on(self.controller().controller_publish_volume(request))?
            .into_inner()
            .publish_context)
    }

    /// The external-attacher: ControllerUnpublishVolume from node `node`.
    pub fn unpublish(&self, volume_id: &str, node: usize) -> Result<()> {
        let request = csi::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: self.nodes.nodes[node].id.clone(),
            ..Default::default()
        };
        self.block_on(self.controller().controller_unpublish_volume(request))?;
        Ok(())
    }

    /// The staging path the kubelet of `node` uses for a volume.
    pub fn staging_path(&self, volume_id: &str, node: usize) -> PathBuf {
        self.kubelet_dir(node).join("staging").join(volume_id)
    }

    /// The path a pod `pod` on `node` sees the volume at.
    pub fn pod_path(&self, node: usize, pod: &str) -> PathBuf {
        self.kubelet_dir(node)
            .join("pods")
            .join(pod)
            .join("volumes/data")
    }

    /// The kubelet of `node`: NodeStageVolume then NodePublishVolume for
    /// pod `pod`; where the pod sees the filesystem.
    pub fn mount_for_pod(
        &mut self,
        volume: &csi::Volume,
        node: usize,
        publish_context: HashMap<String, String>,
        pod: &str,
    ) -> Result<PathBuf> {
        let id = volume.volume_id.clone();
        let staging = self.staging_path(&id, node).display().to_string();
        let target = self.pod_path(node, pod);
        let mut client = self.node(node)?;
        self.block_on(client.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(pod_capability(volume)),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        }))?;
        self.block_on(client.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id,
            publish_context,
            staging_target_path: staging,
            target_path: target.display().to_string(),
            volume_capability: Some(pod_capability(volume)),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        }))?;
        Ok(target)
    }

    /// The kubelet of `node` once pod `pod` is gone: NodeUnpublishVolume
    /// then NodeUnstageVolume.
    pub fn unmount_for_pod(&mut self, volume_id: &str, node: usize, pod: &str) -> Result<()> {
        let staging = self.staging_path(volume_id, node).display().to_string();
        let target = self.pod_path(node, pod).display().to_string();
        let mut client = self.node(node)?;
        self.block_on(
            client.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target,
            }),
        )?;
        self.block_on(client.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging,
        }))?;
        Ok(())
    }

    /// The kubelet's volume health check: NodeGetVolumeStats on `node`
    /// for pod `pod`'s path.
    pub fn volume_stats(
        &mut self,
        volume_id: &str,
        node: usize,
        pod: &str,
    ) -> Result<csi::NodeGetVolumeStatsResponse> {
        let path = self.pod_path(node, pod).display().to_string();
        let mut client = self.node(node)?;
        Ok(self
            .block_on(
                client.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: volume_id.into(),
                    volume_path: path,
                    staging_target_path: String::new(),
                }),
            )?
            .into_inner())
    }

    /// The external-provisioner: DeleteVolume.
    pub fn delete_volume(&self, volume_id: &str) -> Result<()> {
        self.block_on(self.controller().delete_volume(csi::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        }))?;
        Ok(())
    }

    /// The external-provisioner for a PVC with a `dataSource`: CreateVolume
    /// of `bytes` (0: no capacity range) from `source`.
    pub fn create_volume_from(
        &self,
        name: &str,
        bytes: i64,
        parameters: HashMap<String, String>,
        source: csi::VolumeContentSource,
    ) -> Result<csi::Volume> {
        let request = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: (bytes > 0).then_some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![ext4_writer()],
            parameters,
            volume_content_source: Some(source),
            ..Default::default()
        };
        self.block_on(self.controller().create_volume(request))?
            .into_inner()
            .volume
            .context("CreateVolume returned no volume")
    }

    /// The external-snapshotter: CreateSnapshot `name` of `volume_id` with
    /// a VolumeSnapshotClass's `parameters`, called again (as the
    /// snapshotter does for a snapshot not yet `readyToUse`) until it is
    /// ready, at most `limit`.
    pub fn create_snapshot_until_ready(
        &self,
        name: &str,
        volume_id: &str,
        parameters: HashMap<String, String>,
        limit: Duration,
    ) -> Result<csi::Snapshot> {
        let request = csi::CreateSnapshotRequest {
            source_volume_id: volume_id.into(),
            name: name.into(),
            parameters,
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + limit;
        loop {
            let snapshot = self
                .block_on(self.controller().create_snapshot(request.clone()))?
                .into_inner()
                .snapshot
                .context("CreateSnapshot returned no snapshot")?;
            if snapshot.ready_to_use {
                return Ok(snapshot);
            }
            if std::time::Instant::now() > deadline {
                bail!("snapshot {name} of {volume_id} not ready after {limit:?}: {snapshot:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The external-snapshotter: DeleteSnapshot.
    pub fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.block_on(
            self.controller()
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.into(),
                    ..Default::default()
                }),
        )?;
        Ok(())
    }

    /// ListSnapshots of one snapshot id: the entry, if any.
    pub fn list_snapshot(&self, snapshot_id: &str) -> Result<Option<csi::Snapshot>> {
        let listed = self
            .block_on(self.controller().list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: snapshot_id.into(),
                ..Default::default()
            }))?
            .into_inner();
        Ok(listed.entries.into_iter().find_map(|e| e.snapshot))
    }
}

/// A VolumeSnapshotClass's parameters for backups to `target`
/// (`file:///DIR` or `s3://BUCKET/PREFIX`).
pub fn backup_class(target: &str) -> HashMap<String, String> {
    [("type", "backup"), ("backupTarget", target)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A PVC's `dataSource`: the VolumeSnapshot whose id is `snapshot_id`.
pub fn snapshot_source(snapshot_id: &str) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type};
    csi::VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot_id.into(),
        })),
    }
}
