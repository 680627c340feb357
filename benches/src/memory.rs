//! Idle memory of a large sparse volume: one replica daemon and an engine
//! serving a 1 TiB volume (goal: each under 64 MiB RSS; Longhorn's
//! per-block index alone costs 256 MiB per TiB).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use corral_tests::tools::fio_nbd;
use corral_tests::{Cluster, EngineSpec};

#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Volume size.
    #[arg(long, default_value = "1TiB")]
    size: String,
}

fn rss_mib(pid: i32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

pub fn run(args: &MemoryArgs) -> Result<()> {
    let mut cluster = Cluster::with_replicas(1)?;
    let e = cluster.start_engine(&EngineSpec::new("big", &args.size, &[0]))?;
    // Touch the volume a little (first and last GiB), then let it idle.
    let uri = cluster.engines[e].nbd_uri();
    fio_nbd(
        &uri,
        "touch",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=1g",
            "--io_size=16m",
            "--iodepth=8",
        ],
        Duration::from_secs(300),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let engine = rss_mib(cluster.engines[e].process.pid().context("engine pid")?)?;
    let replica = rss_mib(cluster.replicas[0].process.pid().context("replica pid")?)?;
    cluster.stop_all()?;
    println!(
        "| process (idle, {} volume, 16 MiB written) | RSS |",
        args.size
    );
    println!("| --- | ---: |");
    println!("| engine | {engine:.1} MiB |");
    println!("| replica daemon | {replica:.1} MiB |");
    Ok(())
}
