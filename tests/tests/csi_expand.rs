//! Online volume expansion, told as Kubernetes lives it: the
//! external-provisioner creates a volume (xfs), the attacher publishes it
//! on node 0 (its engine starts there), the kubelet stages and publishes
//! it for a pod, which writes a file; the external-resizer calls
//! ControllerExpandVolume (before that, while the volume is detached, a
//! transient engine on a node holding a replica grows it) and the engine
//! grows, checked with `corral volume
//! --engine ADDR --json info`; the same call again, and a smaller size, are
//! 0 OK and change nothing; the kubelet's NodeExpandVolume is refused while
//! the fuse attachment (nbdfuse: NBD fixes an export's size when it
//! connects) still shows the old size, and grows the filesystem once the
//! pod restarts and the volume is staged again. The file is intact. Last,
//! NodeExpandVolume alone grows the engine (what happens when the
//! controller cannot reach it) and, after the next restaging, the
//! filesystem.
//!
//! xfs rather than ext4: growing a mounted ext4 (`resize2fs`) takes
//! CAP_SYS_RESOURCE, which this test machine's root lacks, while
//! `xfs_growfs` takes CAP_SYS_ADMIN. Which command runs for ext4 is a unit
//! test of corral-csi (`staging/tests.rs`).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use corral_proto::csi::v1 as csi;
use corral_proto::v1 as pb;
use corral_tests::csi::{CsiCluster, pod_capability, storage_class};
use corral_tests::ext4::assert_root;
use corral_tests::{corral_bin, poll, run_bounded};
use tonic::Code;

const MIB: i64 = 1 << 20;
/// The PVC's size: xfs wants at least 300 MiB (the replicas are sparse).
const SIZE: i64 = 320 * MIB;
/// What the PVC grows to while it is detached.
const DETACHED: i64 = 384 * MIB;
/// What the PVC is resized to: not a multiple of 4096, so the plugin
/// rounds it up.
const RESIZED: i64 = 512 * MIB + 1;
const ROUNDED: i64 = 512 * MIB + 4096;
/// What the node plugin alone grows it to.
const LARGER: i64 = 576 * MIB;

#[test]
fn a_published_volume_grows_online_and_its_filesystem_follows() {
    assert_root();
    let mut c = CsiCluster::start(3).expect("start the cluster");
    if let Err(e) = story(&mut c) {
        panic!("{e:?}");
    }
}

fn expand_request(
    volume_id: &str,
    required: i64,
    limit: i64,
) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: volume_id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capability: Some(corral_tests::csi::ext4_writer()),
        ..Default::default()
    }
}

fn controller_expand(
    c: &CsiCluster,
    req: csi::ControllerExpandVolumeRequest,
) -> Result<csi::ControllerExpandVolumeResponse, tonic::Status> {
    c.block_on(c.controller().controller_expand_volume(req))
        .map(|r| r.into_inner())
}

/// `corral volume --engine CONTROL --json info`'s size.
fn engine_size(control: &str) -> Result<u64> {
    let out = run_bounded(
        std::process::Command::new(corral_bin())
            .args(["volume", "--engine", control, "--json", "info"]),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "volume info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    info["size"].as_u64().context("volume info without a size")
}

/// The filesystem's size as the pod's NodeGetVolumeStats reports it.
fn fs_total(c: &mut CsiCluster, volume_id: &str, pod: &str) -> Result<i64> {
    let stats = c.volume_stats(volume_id, 0, pod)?;
    stats
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .map(|u| u.total)
        .context("no byte usage")
}

fn node_expand(
    c: &mut CsiCluster,
    volume: &csi::Volume,
    required: i64,
) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
    let staging = c.staging_path(&volume.volume_id, 0).display().to_string();
    let mut node = c
        .node(0)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    c.block_on(node.node_expand_volume(csi::NodeExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        volume_path: staging.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        staging_target_path: staging,
        volume_capability: Some(pod_capability(volume)),
        ..Default::default()
    }))
    .map(|r| r.into_inner())
}

fn story(c: &mut CsiCluster) -> Result<()> {
    let volume = c.create_volume("grow", SIZE, storage_class(&[("fsType", "xfs")]), Some(0))?;
    let id = volume.volume_id.clone();

    // Detached: a transient engine grows it, and is gone after.
    let grown = controller_expand(c, expand_request(&id, DETACHED, 0))
        .context("expanding a detached volume")?;
    ensure!(grown.capacity_bytes == DETACHED, "detached: {grown:?}");
    for n in &c.nodes.nodes {
        let engines = c.block_on(async {
            corral_client::EngineManager::connect(&n.addr.to_string(), Duration::from_secs(5))
                .await?
                .list_engines()
                .await
        })?;
        ensure!(engines.is_empty(), "{}: engines left: {engines:?}", n.id);
    }
    let err = controller_expand(c, expand_request("pvc-none", RESIZED, 0))
        .expect_err("expanding an unknown volume");
    ensure!(err.code() == Code::NotFound, "unknown volume: {err}");

    let ctx = c.publish(&volume, 0)?;
    let control = ctx
        .get("controlAddress")
        .context("no controlAddress in the publish context")?
        .clone();
    c.nodes
        .wait_engine(0, &id, Duration::from_secs(60), "the engine to run", |s| {
            s.state == pb::EngineState::Running as i32
        })?;
    let pod = c.mount_for_pod(&volume, 0, ctx.clone(), "pod-a")?;
    std::fs::write(pod.join("kept.txt"), b"still here\n")?;
    let before = fs_total(c, &id, "pod-a")?;
    ensure!(before < DETACHED, "a 384 MiB filesystem reports {before}");

    // Over the limit once rounded: OUT_OF_RANGE, nothing changes.
    let err = controller_expand(c, expand_request(&id, RESIZED, RESIZED + 1))
        .expect_err("expanding past limit_bytes");
    ensure!(err.code() == Code::OutOfRange, "limit: {err}");
    ensure!(
        engine_size(&control)? == DETACHED as u64,
        "grew past the limit"
    );

    // The external-resizer: retried while the engine opens the volume.
    let grown = poll(
        Duration::from_secs(60),
        "ControllerExpandVolume",
        || match controller_expand(c, expand_request(&id, RESIZED, 0)) {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code() == Code::Unavailable => Ok(None),
            Err(e) => Err(e.into()),
        },
    )?;
    ensure!(grown.capacity_bytes == ROUNDED, "{grown:?}");
    ensure!(grown.node_expansion_required, "{grown:?}");
    ensure!(engine_size(&control)? == ROUNDED as u64, "engine size");

    // Idempotent; a smaller size than the volume's is 0 OK too.
    for required in [RESIZED, ROUNDED, SIZE] {
        let again = controller_expand(c, expand_request(&id, required, 0))?;
        ensure!(again.capacity_bytes == ROUNDED, "{required}: {again:?}");
    }
    ensure!(
        engine_size(&control)? == ROUNDED as u64,
        "engine size again"
    );

    // The kubelet: the fuse attachment still has the old size.
    let err = node_expand(c, &volume, RESIZED).expect_err("node expansion before restaging");
    ensure!(err.code() == Code::FailedPrecondition, "node: {err}");
    ensure!(
        fs_total(c, &id, "pod-a")? == before,
        "the filesystem changed"
    );

    // The pod restarts: staged again, the device shows the new size and
    // NodeExpandVolume grows the filesystem (twice: idempotent).
    c.unmount_for_pod(&id, 0, "pod-a")?;
    let pod = c.mount_for_pod(&volume, 0, ctx.clone(), "pod-b")?;
    for _ in 0..2 {
        let node = node_expand(c, &volume, RESIZED)?;
        ensure!(node.capacity_bytes == ROUNDED, "{node:?}");
    }
    let after = fs_total(c, &id, "pod-b")?;
    ensure!(
        after > before + 100 * MIB,
        "the filesystem did not grow: {before} -> {after}"
    );
    ensure!(
        std::fs::read(pod.join("kept.txt"))? == b"still here\n",
        "the file changed"
    );

    // When the controller cannot reach the engine (in Kubernetes it
    // listens on its node's loopback), the controller leaves it to the node
    // plugin: NodeExpandVolume alone grows the engine, then the filesystem
    // once the device shows the size.
    let err = node_expand(c, &volume, LARGER).expect_err("node expansion of the old device");
    ensure!(err.code() == Code::FailedPrecondition, "node: {err}");
    ensure!(
        engine_size(&control)? == LARGER as u64,
        "engine not grown by the node"
    );
    c.unmount_for_pod(&id, 0, "pod-b")?;
    c.mount_for_pod(&volume, 0, ctx, "pod-c")?;
    let node = node_expand(c, &volume, LARGER)?;
    ensure!(node.capacity_bytes == LARGER, "{node:?}");
    let largest = fs_total(c, &id, "pod-c")?;
    ensure!(
        largest > after + 50 * MIB,
        "the filesystem did not grow: {after} -> {largest}"
    );

    c.unmount_for_pod(&id, 0, "pod-c")?;
    c.unpublish(&id, 0)?;
    c.delete_volume(&id)?;
    Ok(())
}
