//! Kubernetes' view of corral's speed, through the CSI plugin as the
//! sidecars and the kubelet drive it (fuse attach, ext4), on three node
//! daemons on loopback:
//!
//! - **create → mounted**: CreateVolume, ControllerPublishVolume,
//!   NodeStageVolume (mkfs.ext4, mount) and NodePublishVolume, until the
//!   pod's path is a mounted filesystem;
//! - **node loss → mounted elsewhere**: from kill -9 of the node daemon
//!   and the engine on node A to the volume mounted for the pod on node B
//!   (ControllerUnpublish from the unreachable A — a fence through the
//!   replicas —, ControllerPublish, stage and publish on B). Kubernetes'
//!   own detection time (node NotReady, pod eviction) comes on top.
//!
//! p50 and max over `--runs` runs; numbers go to docs/benchmarks.md.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use corral_tests::csi::{CsiCluster, clean_mounts_under, storage_class};

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// Runs of each measurement.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: i64,
}

fn summary(name: &str, mut times: Vec<Duration>) -> String {
    times.sort();
    let p50 = times[times.len() / 2];
    let max = times[times.len() - 1];
    format!(
        "| {name} | {} | {:.2} s | {:.2} s |",
        times.len(),
        p50.as_secs_f64(),
        max.as_secs_f64()
    )
}

pub fn run(args: &CsiArgs) -> Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let mut c = CsiCluster::start(3)?;
    let (a, b) = (0usize, 1usize);
    let mut create = Vec::new();
    let mut failover = Vec::new();
    for run in 0..args.runs {
        let name = format!("pvc-bench-{run}");
        let t0 = Instant::now();
        let volume = c.create_volume(&name, args.size_mib << 20, storage_class(&[]), Some(a))?;
        let on_a = c.publish(&volume, a)?;
        let pod = c.mount_for_pod(&volume, a, on_a, &name)?;
        create.push(t0.elapsed());
        std::fs::write(pod.join("marker"), name.as_bytes())?;
        std::fs::File::open(pod.join("marker"))?.sync_all()?;
        let id = volume.volume_id.clone();
        let engine_a = c.nodes.get_engine(a, &id)?;

        let t1 = Instant::now();
        c.nodes.nodes[a].process.kill9()?;
        corral_tests::node::kill9(engine_a.pid)?;
        c.unpublish(&id, a)?;
        let on_b = c.publish(&volume, b)?;
        let moved = c.mount_for_pod(&volume, b, on_b, &name)?;
        failover.push(t1.elapsed());
        let marker = std::fs::read(moved.join("marker")).context("the marker on B")?;
        anyhow::ensure!(marker == name.as_bytes(), "the marker differs on B");

        // Put node A back and clean up for the next run.
        clean_mounts_under(&c.kubelet_dir(a));
        clean_mounts_under(&c.nodes.path().join(format!("csi-{}", c.nodes.nodes[a].id)));
        c.nodes.restart_node(a)?;
        c.unmount_for_pod(&id, b, &name)?;
        c.unpublish(&id, b)?;
        c.delete_volume(&id)?;
        eprintln!(
            "run {run}: create→mounted {:.2} s, node loss→mounted {:.2} s",
            create[run].as_secs_f64(),
            failover[run].as_secs_f64()
        );
    }
    println!("| measurement | runs | p50 | max |");
    println!("|---|---|---|---|");
    println!(
        "{}",
        summary("CreateVolume → ext4 mounted for the pod", create)
    );
    println!("{}", summary("node A killed → mounted on node B", failover));
    Ok(())
}
