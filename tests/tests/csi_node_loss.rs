//! A node dies under a mounted volume, told as Kubernetes lives it: the
//! external-provisioner creates the volume from the StorageClass,
//! the attacher publishes it on node A, the kubelet stages and publishes it
//! (fuse attach, ext4) and a pod writes and fsyncs files; node A's daemon
//! and engine are killed; the attacher unpublishes from A (unreachable) and
//! publishes on B at once; every file is intact on B; A returns and cannot
//! take the volume back, and its replica is caught up; another replica's
//! node goes away for longer than the stale-replica timeout and the replica
//! is replaced on the spare node; DeleteVolume leaves nothing behind on any
//! node.
//!
//! The StorageClass is the issue's, except `staleReplicaTimeout`: "6s"
//! (corral also takes a duration there) instead of 30 minutes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use corral_tests::csi::{CsiCluster, storage_class};
use corral_tests::ext4::assert_root;
use corral_tests::{node, poll};

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
    let all = [0, 1, 2, 3];

    // The provisioner creates the PV for the pod that will run on A.
    let parameters = storage_class(&[("staleReplicaTimeout", "6s")]);
    let volume = c.create_volume("pvc-node-loss", 64 << 20, parameters.clone(), Some(a))?;
    let id = volume.volume_id.clone();
    assert_eq!(volume.capacity_bytes, 64 << 20);
    let held = holders(c, &id, &all)?;
    assert_eq!(held.len(), 3, "three replicas on distinct nodes: {held:?}");
    assert!(
        held.contains(&a),
        "best-effort locality puts one on A: {held:?}"
    );
    // The provisioner retries: same volume, nothing new.
    let again = c.create_volume("pvc-node-loss", 64 << 20, parameters, Some(a))?;
    assert_eq!(again.volume_id, id);
    assert_eq!(holders(c, &id, &all)?, held);

    // The attacher publishes on A; the kubelet stages and publishes; the
    // pod writes.
    let on_a = c.publish(&volume, a)?;
    let engine_a = c.nodes.get_engine(a, &id)?;
    let pod_a = c.mount_for_pod(&volume, a, on_a, "mysql-0")?;
    let files = write_files(&pod_a, 24)?;

    // Node A dies: its daemon and its engine, at once.
    c.nodes.nodes[a].process.kill9()?;
    node::kill9(engine_a.pid)?;

    // The attacher moves the volume: unpublish from A (unreachable: the
    // volume is fenced through its replicas) and publish on B.
    c.unpublish(&id, a)?;
    let on_b = c.publish(&volume, b)?;
    let pod_b = c.mount_for_pod(&volume, b, on_b, "mysql-0")?;
    for (name, data) in &files {
        let got = std::fs::read(pod_b.join(name)).with_context(|| format!("read {name} on B"))?;
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
    write_files(&pod_b, 4)?;
    ensure!(
        c.nodes.get_engine(a, &id).is_err(),
        "node A runs an engine for {id} again"
    );
    let stats = c.volume_stats(&id, b, "mysql-0")?;
    let condition = stats
        .volume_condition
        .clone()
        .context("no volume condition")?;
    ensure!(
        !condition.abnormal,
        "healthy volume reported abnormal: {condition:?}"
    );
    ensure!(
        stats.usage.iter().any(|u| u.total > 0 && u.used > 0),
        "no usage: {stats:?}"
    );

    // The node plugin on B restarts (a DaemonSet rollout): the mount and
    // the engine are not its own, so the pod's I/O goes on.
    c.restart_node_plugin(b)?;
    write_files(&pod_b, 2)?;

    // Another replica's node goes away for good: past the stale-replica
    // timeout its replica is replaced on the node that had none.
    let held = holders(c, &id, &all)?;
    let gone = *held
        .iter()
        .find(|&&n| n != a && n != b)
        .context("a replica node besides A and B")?;
    let spare = (0..4)
        .find(|n| !held.contains(n))
        .context("a node without a replica")?;
    let gone_addr = c.nodes.nodes[gone].addr.to_string();
    let spare_addr = c.nodes.nodes[spare].addr.to_string();
    c.nodes.nodes[gone].process.kill9()?;
    poll(
        Duration::from_secs(90),
        "the stale replica to be replaced",
        || {
            let replicas = c.block_on(control_b.replicas())?;
            let rw: Vec<&str> = replicas
                .iter()
                .filter(|r| r.mode == corral_proto::v1::ReplicaMode::Rw as i32)
                .map(|r| r.address.as_str())
                .collect();
            let done = replicas.len() == 3
                && rw.len() == 3
                && rw.contains(&spare_addr.as_str())
                && !replicas.iter().any(|r| r.address == gone_addr);
            Ok(done.then_some(()))
        },
    )?;
    for (name, data) in &files {
        let got = std::fs::read(pod_b.join(name))?;
        ensure!(&got == data, "{name} differs after the replacement");
    }
    let after = c.volume_stats(&id, b, "mysql-0")?.volume_condition;
    ensure!(
        after.as_ref().is_some_and(|v| !v.abnormal),
        "still abnormal after the replacement: {after:?}"
    );
    // The lost node returns: its replica, no longer a member, is deleted.
    c.nodes.restart_node(gone)?;
    poll(
        Duration::from_secs(30),
        "the former replica to be deleted",
        || Ok((!holders(c, &id, &[gone])?.contains(&gone)).then_some(())),
    )?;
    ensure!(
        holders(c, &id, &all)?.len() == 3,
        "three replicas after the cleanup"
    );
    // A volume in use is not deleted.
    let refused = c
        .delete_volume(&id)
        .expect_err("DeleteVolume of a published volume");
    ensure!(
        refused
            .downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == tonic::Code::FailedPrecondition),
        "DeleteVolume in use: {refused:#}"
    );

    // The pod goes away; the volume is deleted and nothing is left.
    c.unmount_for_pod(&id, b, "mysql-0")?;
    c.unpublish(&id, b)?;
    c.delete_volume(&id)?;
    assert_eq!(holders(c, &id, &all)?, Vec::<usize>::new());
    for i in all {
        ensure!(
            c.nodes.get_engine(i, &id).is_err(),
            "node-{i} still runs an engine of {id}"
        );
    }
    Ok(())
}

#[test]
fn a_cut_off_node_s_engine_can_write_nothing_once_the_volume_has_moved() {
    let mut c = CsiCluster::start(3).expect("start the cluster");
    if let Err(e) = partition_story(&mut c) {
        panic!("{e:#}");
    }
}

/// Node A is cut off (its daemon and engine frozen), the volume moves to
/// B; when A's engine runs again, its writes fail and B's data stands.
fn partition_story(c: &mut CsiCluster) -> Result<()> {
    use corral_tests::nbd_raw::RawNbd;
    let (a, b) = (0usize, 1usize);
    let volume = c.create_volume("pvc-partition", 16 << 20, storage_class(&[]), None)?;
    let id = volume.volume_id.clone();
    let on_a = c.publish(&volume, a)?;
    let nbd_a: std::net::SocketAddr = on_a["nbdAddress"].parse()?;
    let mut client_a = RawNbd::connect(nbd_a, &id)?;
    let first = vec![0xa1u8; 64 << 10];
    client_a
        .write(0, &first)?
        .map_err(|e| anyhow::anyhow!("write on A: {e}"))?;
    client_a
        .flush()?
        .map_err(|e| anyhow::anyhow!("flush on A: {e}"))?;

    // A is cut off: its daemon and its engine stop answering.
    let engine_a = c.nodes.get_engine(a, &id)?;
    c.nodes.nodes[a].process.pause()?;
    // SAFETY: signalling the engine process the test just looked up.
    unsafe { libc::kill(engine_a.pid as i32, libc::SIGSTOP) };
    let moved = (|| -> Result<Vec<u8>> {
        c.unpublish(&id, a)?;
        let on_b = c.publish(&volume, b)?;
        let mut client_b = RawNbd::connect(on_b["nbdAddress"].parse()?, &id)?;
        let read = client_b
            .read(0, 64 << 10)?
            .map_err(|e| anyhow::anyhow!("read on B: {e}"))?;
        ensure!(read == first, "B does not read what A wrote and flushed");
        let second = vec![0xb2u8; 64 << 10];
        client_b
            .write(0, &second)?
            .map_err(|e| anyhow::anyhow!("write on B: {e}"))?;
        client_b
            .flush()?
            .map_err(|e| anyhow::anyhow!("flush on B: {e}"))?;
        Ok(second)
    })();
    // A runs again, whatever happened above.
    // SAFETY: as above.
    unsafe { libc::kill(engine_a.pid as i32, libc::SIGCONT) };
    c.nodes.nodes[a].process.resume()?;
    let second = moved?;

    // A's engine, running again with its old client, must not write.
    let stale = vec![0xccu8; 64 << 10];
    let wrote = client_a
        .write(0, &stale)
        .ok()
        .and_then(|r| r.ok())
        .and_then(|()| client_a.flush().ok())
        .and_then(|r| r.ok());
    ensure!(
        wrote.is_none(),
        "the cut-off engine acknowledged a write and a flush"
    );
    let on_b = c.nodes.get_engine(b, &id)?;
    let mut check = RawNbd::connect(on_b.nbd_address.parse()?, &id)?;
    let now = check
        .read(0, 64 << 10)?
        .map_err(|e| anyhow::anyhow!("read on B: {e}"))?;
    ensure!(now == second, "B's data changed after A's engine ran again");
    Ok(())
}
