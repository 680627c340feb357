//! A node dies under a mounted volume, told as Kubernetes lives it: the
//! external-provisioner creates the volume from the StorageClass,
//! the attacher publishes it on node A, the kubelet stages and publishes it
//! (fuse attach, ext4) and a pod writes and fsyncs files; node A's daemon
//! and engine are killed; the attacher unpublishes from A (unreachable) and
//! publishes on B at once; every file is intact on B; A returns and cannot
//! take the volume back, and its replica is caught up; DeleteVolume leaves
//! nothing behind on any node.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use corral_proto::csi::v1 as csi;
use corral_tests::csi::CsiCluster;
use corral_tests::ext4::assert_root;
use corral_tests::{node, poll};
use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};

fn storage_class() -> HashMap<String, String> {
    [
        ("numberOfReplicas", "3"),
        ("staleReplicaTimeout", "30"),
        ("fsType", "ext4"),
        ("dataLocality", "best-effort"),
        ("csi.storage.k8s.io/pvc/name", "data-mysql-0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn ext4_writer() -> csi::VolumeCapability {
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

/// Files with distinct contents, written and fsynced (file and directory).
fn write_files(dir: &Path, n: usize) -> Result<Vec<(String, Vec<u8>)>> {
    use std::io::Write;
    let mut files = Vec::new();
    for i in 0..n {
        let name = format!("row-{i:03}.dat");
        let data: Vec<u8> = (0..(64 * 1024 + i * 977))
            .map(|j| ((j * 31 + i * 7) % 251) as u8)
            .collect();
        let mut f = std::fs::File::create(dir.join(&name))?;
        f.write_all(&data)?;
        f.sync_all()?;
        files.push((name, data));
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(files)
}

/// What each node holds of `volume`: node indexes with a replica.
fn holders(c: &CsiCluster, volume: &str, up: &[usize]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for &i in up {
        let control = c.nodes.replica_control(i)?;
        let replicas = c.block_on(control.list())?;
        if replicas.iter().any(|r| r.volume == volume) {
            out.push(i);
        }
    }
    Ok(out)
}

#[test]
fn a_node_dies_under_a_mounted_volume_and_the_volume_moves_to_another_node() {
    assert_root();
    let mut c = CsiCluster::start(4).expect("start the cluster");
    // Failing by panic, so that the fixture prints every daemon's and
    // engine's log.
    if let Err(e) = story(&mut c) {
        panic!("{e:#}");
    }
}

fn story(c: &mut CsiCluster) -> Result<()> {
    let (a, b) = (0usize, 1usize);
    let node_a = c.nodes.nodes[a].id.clone();
    let node_b = c.nodes.nodes[b].id.clone();

    // The provisioner creates the PV for the pod that will run on A.
    let mut preferred = HashMap::new();
    preferred.insert("topology.corral.io/node".to_string(), node_a.clone());
    let create = csi::CreateVolumeRequest {
        name: "pvc-node-loss".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 64 << 20,
        }),
        volume_capabilities: vec![ext4_writer()],
        parameters: storage_class(),
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![csi::Topology {
                segments: preferred,
            }],
        }),
        ..Default::default()
    };
    let volume = c
        .block_on(c.controller().create_volume(create.clone()))?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    assert_eq!(volume.capacity_bytes, 64 << 20);
    let held = holders(c, &id, &[0, 1, 2, 3])?;
    assert_eq!(held.len(), 3, "three replicas on distinct nodes: {held:?}");
    assert!(
        held.contains(&a),
        "best-effort locality puts one on A: {held:?}"
    );
    // The provisioner retries: same volume, nothing new.
    let again = c
        .block_on(c.controller().create_volume(create))?
        .into_inner()
        .volume
        .context("no volume")?;
    assert_eq!(again.volume_id, id);
    assert_eq!(holders(c, &id, &[0, 1, 2, 3])?, held);

    // The attacher publishes on A; the kubelet stages and publishes.
    let published_a =
        c.block_on(c.controller().controller_publish_volume(
            csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node_a.clone(),
                volume_capability: Some(ext4_writer()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            },
        ))?
        .into_inner()
        .publish_context;
    let engine_a = c.nodes.get_engine(a, &id)?;
    let kubelet_a = c.kubelet_dir(a);
    let staging_a = kubelet_a.join("staging").join(&id);
    let target_a = kubelet_a.join("pods/mysql-0/volumes/data");
    let mut node_client = c.node(a)?;
    c.block_on(node_client.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: published_a.clone(),
        staging_target_path: staging_a.display().to_string(),
        volume_capability: Some(ext4_writer()),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    }))?;
    c.block_on(
        node_client.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            publish_context: published_a,
            staging_target_path: staging_a.display().to_string(),
            target_path: target_a.display().to_string(),
            volume_capability: Some(ext4_writer()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        }),
    )?;
    let files = write_files(&target_a, 24)?;

    // Node A dies: its daemon and its engine, at once.
    c.nodes.nodes[a].process.kill9()?;
    node::kill9(engine_a.pid)?;

    // The attacher moves the volume: unpublish from A (unreachable: the
    // volume is fenced through its replicas) and publish on B.
    c.block_on(c.controller().controller_unpublish_volume(
        csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_a.clone(),
            ..Default::default()
        },
    ))?;
    let published_b =
        c.block_on(c.controller().controller_publish_volume(
            csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node_b.clone(),
                volume_capability: Some(ext4_writer()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            },
        ))?
        .into_inner()
        .publish_context;
    let kubelet_b = c.kubelet_dir(b);
    let staging_b = kubelet_b.join("staging").join(&id);
    let target_b = kubelet_b.join("pods/mysql-0/volumes/data");
    let mut node_client = c.node(b)?;
    c.block_on(node_client.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: published_b.clone(),
        staging_target_path: staging_b.display().to_string(),
        volume_capability: Some(ext4_writer()),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    }))?;
    c.block_on(
        node_client.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            publish_context: published_b,
            staging_target_path: staging_b.display().to_string(),
            target_path: target_b.display().to_string(),
            volume_capability: Some(ext4_writer()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        }),
    )?;
    for (name, data) in &files {
        let got =
            std::fs::read(target_b.join(name)).with_context(|| format!("read {name} on B"))?;
        ensure!(&got == data, "{name} differs on node B");
    }

    // Node A returns. It must not take the volume back from B, and its
    // replica is caught up by B's engine.
    c.nodes.restart_node(a)?;
    let control_addr = c.nodes.get_engine(b, &id)?.control_address;
    let control_b = c.block_on(corral_client::EngineControl::connect(
        &control_addr,
        Duration::from_secs(5),
    ))?;
    poll(
        Duration::from_secs(60),
        "three RW replicas on B's engine",
        || {
            let info = c.block_on(control_b.info())?;
            Ok((info.replicas_rw == 3 && info.state == "serving").then_some(()))
        },
    )?;
    let more = write_files(&target_b, 4)?;
    ensure!(
        c.nodes.get_engine(a, &id).is_err(),
        "node A runs an engine for {id} again"
    );

    // The pod goes away; the volume is deleted.
    c.block_on(
        node_client.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target_b.display().to_string(),
        }),
    )?;
    c.block_on(
        node_client.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging_b.display().to_string(),
        }),
    )?;
    ensure!(!more.is_empty());
    c.block_on(c.controller().controller_unpublish_volume(
        csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_b.clone(),
            ..Default::default()
        },
    ))?;
    c.block_on(c.controller().delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    }))?;
    assert_eq!(holders(c, &id, &[0, 1, 2, 3])?, Vec::<usize>::new());
    for i in 0..4 {
        ensure!(
            c.nodes.get_engine(i, &id).is_err(),
            "node-{i} still runs an engine of {id}"
        );
    }
    Ok(())
}
