//! The rebuild benchmark (issue: failures and rebuild, item 9).
//!
//! 1. fio measures the disk: sequential 1 MiB buffered writes of the same
//!    amount of data, fsync at the end, in the same directory the replicas use.
//! 2. A 3-replica volume is filled with `--written` bytes through NBD.
//! 3. Full rebuild: one replica daemon is stopped, its data removed, and
//!    started again; the engine rebuilds it from scratch. Throughput =
//!    bytes copied / rebuild time, as the engine reports it.
//! 4. Partial rebuild: one replica is killed (-9), `--outage-write` bytes
//!    are written at random while it is away (for `--outage`), it comes
//!    back, and the catch-up is timed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_tests::tools::{fio_nbd, run_ok};
use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct RebuildArgs {
    /// Volume size.
    #[arg(long, default_value = "4GiB")]
    size: String,
    /// Bytes written before the full rebuild (fio size syntax).
    #[arg(long, default_value = "3g")]
    written: String,
    /// Bytes written while a replica is away (1% of 4 GiB by default).
    #[arg(long, default_value = "41m")]
    outage_write: String,
    /// How long the replica stays away in the partial-rebuild run.
    #[arg(long, default_value_t = 10)]
    outage_secs: u64,
}

fn wait_rebuilt(
    cluster: &Cluster,
    engine: usize,
    replica: usize,
    limit: Duration,
) -> Result<Value> {
    let addr = cluster.replicas[replica].addr.to_string();
    let deadline = Instant::now() + limit;
    loop {
        let info = cluster.volume_info(engine)?;
        if let Some(r) = info["rebuilds"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["address"] == addr.as_str()))
        {
            match r["state"].as_str() {
                Some("done") => return Ok(r.clone()),
                Some("failed") => bail!("rebuild failed: {r}"),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("rebuild of replica {replica} not done after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn mib_s(bytes: f64, ms: f64) -> f64 {
    bytes / (1024.0 * 1024.0) / (ms / 1000.0).max(1e-3)
}

pub fn run(args: &RebuildArgs) -> Result<()> {
    let mut cluster = Cluster::with_replicas(3)?;
    eprintln!("bench dir: {}", cluster.path().display());

    // 1. The disk.
    let disk_file = cluster.path().join("fio-disk.dat");
    let out = run_ok(
        "fio",
        &[
            "--name=disk",
            &format!("--filename={}", disk_file.display()),
            "--rw=write",
            "--bs=1m",
            &format!("--size={}", args.written),
            "--end_fsync=1",
            "--output-format=json",
        ],
        Duration::from_secs(600),
    )?;
    let json: Value = serde_json::from_slice(&out.stdout).context("fio json")?;
    let disk_bw = json["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
    std::fs::remove_file(&disk_file)?;

    // 2. Fill the volume.
    // The engine's default replica timeout (the fixture's is 3 s).
    let spec = EngineSpec::new("bench", &args.size, &[0, 1, 2])
        .set("--replica-timeout", "8s")
        .arg("--replica-retry-interval", "500ms")
        .arg("--stale-replica-timeout", "30m");
    let e = cluster.start_engine(&spec)?;
    let uri = cluster.engines[e].nbd_uri();
    let fill = Instant::now();
    fio_nbd(
        &uri,
        "fill",
        &[
            "--rw=write",
            "--bs=1m",
            &format!("--size={}", args.written),
            "--iodepth=8",
            "--end_fsync=1",
        ],
        Duration::from_secs(1800),
    )?;
    let fill_secs = fill.elapsed().as_secs_f64();

    // 3. Full rebuild of replica 2 from scratch.
    cluster.replicas[2]
        .process
        .terminate(Duration::from_secs(30))?;
    std::fs::remove_dir_all(cluster.replicas[2].data_dir.join("bench"))?;
    cluster.restart_replica(2)?;
    let full = wait_rebuilt(&cluster, e, 2, Duration::from_secs(1800))?;
    let full_ms = full["elapsed_ms"].as_f64().unwrap_or(0.0);
    let full_copied = full["copied_bytes"].as_f64().unwrap_or(0.0);
    let full_bw = mib_s(full_copied, full_ms);

    // 4. Partial rebuild after an outage of replica 1.
    cluster.replicas[1].process.kill9()?;
    let away = Instant::now();
    fio_nbd(
        &uri,
        "outage",
        &[
            "--rw=randwrite",
            "--bs=64k",
            &format!("--size={}", args.outage_write),
            "--iodepth=8",
        ],
        Duration::from_secs(600),
    )?;
    let left = Duration::from_secs(args.outage_secs).saturating_sub(away.elapsed());
    std::thread::sleep(left);
    cluster.restart_replica(1)?;
    let partial = wait_rebuilt(&cluster, e, 1, Duration::from_secs(600))?;
    let partial_ms = partial["elapsed_ms"].as_f64().unwrap_or(0.0);

    let verify = cluster.corral(&[
        "volume",
        "--engine",
        &cluster.engines[e].control.to_string(),
        "verify",
    ])?;
    let verified = verify.status.success();
    cluster.stop_all()?;

    println!("| measurement | value |");
    println!("| --- | --- |");
    println!(
        "| disk: fio sequential write, 1 MiB, {} + fsync | {disk_bw:.0} MiB/s |",
        args.written
    );
    println!(
        "| fill: {} through NBD onto 3 replicas | {fill_secs:.1} s |",
        args.written
    );
    println!(
        "| full rebuild: {:.0} MiB copied in {:.1} s | {full_bw:.0} MiB/s ({:.0}% of the disk) |",
        full_copied / 1048576.0,
        full_ms / 1000.0,
        full_bw / disk_bw.max(1e-9) * 100.0
    );
    println!(
        "| partial rebuild after a {} s outage with {} written: {:.1} MiB walked, {:.1} MiB copied | {:.2} s |",
        args.outage_secs,
        args.outage_write,
        partial["total_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        partial["copied_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        partial_ms / 1000.0
    );
    println!(
        "| corral volume verify after both | {} |",
        if verified { "identical" } else { "DIFFERENCES" }
    );
    if !verified {
        bail!("replicas differ after the rebuilds");
    }
    Ok(())
}
