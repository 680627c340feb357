//! Snapshots (issue 11): what a snapshot costs a volume under load.
//!
//! Three replica daemons and an engine on this machine, fio over NBD:
//!
//! - **create under load**: fio 4 KiB random writes at QD32 for `--seconds`,
//!   with a snapshot taken every `--every-ms` through the engine's control
//!   API; the snapshot calls' latency (p50/p99/max: the writes' drain and
//!   one round trip with writes held, then the slowest replica's sync and
//!   commit with writes flowing), and fio's IOPS and completion-latency
//!   p99/max (the longest stall) beside the same run without snapshots;
//! - **reads through a chain**: fio 4 KiB random reads at QD32 with 1, 10
//!   and 100 snapshots in the chain (between two snapshots, fio writes 512
//!   random 4 KiB blocks), once the snapshots taken under load are deleted
//!   and merged away; three runs each after a host `sync`, the median kept;
//! - **delete**: a snapshot holding `--delete-mib` MiB (written sequentially,
//!   never overwritten in the head) is deleted; the time until every replica
//!   has merged it away, as MiB/s of snapshot data per replica and summed
//!   over the three, beside the disk's own sequential write speed (fio, 1 MiB
//!   writes and an fsync at the end, in the same kind of directory).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_tests::tools::run_ok;
use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Seconds of each fio run under load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Milliseconds between two snapshots under load.
    #[arg(long, default_value_t = 500)]
    every_ms: u64,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// MiB held by the snapshot that is deleted.
    #[arg(long, default_value_t = 1024)]
    delete_mib: u64,
}

struct Fio {
    iops: f64,
    p99_us: f64,
    max_us: f64,
    bw_mib: f64,
}

fn fio(args: &[String], limit: Duration, rw: &str) -> Result<Fio> {
    let mut all = vec!["--output-format=json".to_string()];
    all.extend(args.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run_ok("fio", &refs, limit)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("fio's JSON")?;
    let j = &v["jobs"][0];
    if j["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job failed: {j}");
    }
    let s = &j[rw];
    Ok(Fio {
        iops: s["iops"].as_f64().unwrap_or(0.0),
        p99_us: s["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1000.0,
        max_us: s["clat_ns"]["max"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        bw_mib: s["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
    })
}

fn nbd_job(uri: &str, rw: &str, bs: &str, qd: u32, seconds: u64, size_mib: u64) -> Vec<String> {
    vec![
        "--name=snap".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={qd}"),
        format!("--size={size_mib}m"),
        format!("--runtime={seconds}"),
        "--time_based".into(),
        "--randrepeat=0".into(),
    ]
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

pub fn run(args: &SnapshotArgs) -> Result<()> {
    if args.seconds == 0 || args.every_ms == 0 || args.delete_mib == 0 {
        bail!("--seconds, --every-ms and --delete-mib must be at least 1");
    }
    if args.delete_mib > args.size_mib {
        bail!("--delete-mib must fit in --size-mib");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut cluster = Cluster::with_replicas(3)?;
    let spec = EngineSpec::new("snapbench", &format!("{}MiB", args.size_mib), &[0, 1, 2])
        .set("--replica-timeout", "8s");
    let e = cluster.start_engine(&spec)?;
    let uri = cluster.engines[e].nbd_uri();
    let control_addr = cluster.engines[e].control.to_string();
    let control = rt.block_on(corral_client::EngineControl::connect(
        &control_addr,
        Duration::from_secs(30),
    ))?;
    let limit = Duration::from_secs(args.seconds + 300);
    let load_mib = 512.min(args.size_mib);

    // Create under load.
    let plain = fio(
        &nbd_job(&uri, "randwrite", "4k", 32, args.seconds, load_mib),
        limit,
        "write",
    )?;
    let job = nbd_job(&uri, "randwrite", "4k", 32, args.seconds, load_mib);
    let loaded = std::thread::spawn(move || fio(&job, limit, "write"));
    let mut took = Vec::new();
    let started = Instant::now();
    let mut n = 0;
    std::thread::sleep(Duration::from_millis(500));
    while started.elapsed() < Duration::from_secs(args.seconds.saturating_sub(1).max(1)) {
        let t = Instant::now();
        rt.block_on(control.create_snapshot(&format!("load-{n}")))?;
        took.push(t.elapsed());
        n += 1;
        std::thread::sleep(Duration::from_millis(args.every_ms));
    }
    let loaded = loaded
        .join()
        .map_err(|_| anyhow::anyhow!("fio thread panicked"))??;
    took.sort();
    for i in 0..n {
        rt.block_on(control.delete_snapshot(&format!("load-{i}")))?;
    }
    let addrs: Vec<String> = cluster
        .replicas
        .iter()
        .map(|r| r.addr.to_string())
        .collect();
    let merged = |what: &str| -> Result<()> {
        for addr in &addrs {
            let replica = rt.block_on(corral_client::ReplicaControl::connect(
                addr,
                Duration::from_secs(30),
            ))?;
            let t = Instant::now();
            loop {
                let listed = rt.block_on(replica.list_snapshots("snapbench"))?;
                if !listed.merge_pending {
                    break;
                }
                if t.elapsed() > Duration::from_secs(1800) {
                    bail!("{addr}: {what}: the merge did not end in 30 minutes");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    };
    // Reads below must not share the disk with these merges.
    merged("the snapshots taken under load")?;

    // Reads through a chain of 1, 10 and 100 snapshots.
    let mut reads = Vec::new();
    let mut chain = 0;
    for target in [1usize, 10, 100] {
        while chain < target {
            fio(
                &[
                    nbd_job(&uri, "randwrite", "4k", 32, 1, load_mib),
                    vec!["--number_ios=512".into()],
                ]
                .concat(),
                limit,
                "write",
            )?;
            rt.block_on(control.create_snapshot(&format!("chain-{chain}")))?;
            chain += 1;
        }
        // Three runs, the median kept: with the replicas' page cache
        // writing back what the chain's writes left dirty, single runs of
        // the same chain differed by tens of percent. A host-wide `sync`
        // first (this is a bench, not the product) so that writeback does
        // not share the disk with the reads.
        let mut runs = Vec::new();
        for _ in 0..3 {
            run_ok("sync", &[], limit)?;
            runs.push(fio(
                &nbd_job(&uri, "randread", "4k", 32, args.seconds, load_mib),
                limit,
                "read",
            )?);
        }
        runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        let spread = (runs[0].iops, runs[2].iops);
        reads.push((target, runs.swap_remove(1), spread));
    }

    // Delete a snapshot holding `delete_mib`: written past the chain's area.
    let offset_mib = args.size_mib - args.delete_mib;
    fio(
        &[
            "--name=fill".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=write".into(),
            "--bs=1m".into(),
            "--iodepth=8".into(),
            format!("--offset={offset_mib}m"),
            format!("--size={}m", args.delete_mib),
        ],
        limit,
        "write",
    )?;
    rt.block_on(control.create_snapshot("big"))?;
    rt.block_on(control.create_snapshot("after-big"))?;
    let t = Instant::now();
    rt.block_on(control.delete_snapshot("big"))?;
    merged("the big snapshot")?;
    let merge = t.elapsed();
    // The disk's own sequential writes in the cluster's directory.
    let file = cluster.path().join("disk-seq.fio");
    let disk = fio(
        &[
            "--name=disk".into(),
            format!("--filename={}", file.display()),
            "--ioengine=psync".into(),
            "--rw=write".into(),
            "--bs=1m".into(),
            format!("--size={}m", args.delete_mib),
            "--end_fsync=1".into(),
        ],
        limit,
        "write",
    )?;
    let _ = std::fs::remove_file(&file);
    cluster.stop_all()?;

    println!(
        "### Snapshots under load: 3 replicas, NBD, fio 4 KiB random writes QD32, {} s, a snapshot every {} ms\n",
        args.seconds, args.every_ms
    );
    println!(
        "| run | IOPS | write p99 | write max | snapshots | create p50 | create p99 | create max |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| no snapshots | {:.0} | {:.0} µs | {:.0} µs | 0 | | | |",
        plain.iops, plain.p99_us, plain.max_us
    );
    println!(
        "| snapshots | {:.0} | {:.0} µs | {:.0} µs | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        loaded.iops,
        loaded.p99_us,
        loaded.max_us,
        took.len(),
        pct(&took, 0.5),
        pct(&took, 0.99),
        took.last()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    );
    println!("\n### 4 KiB random reads, QD32, through a chain of snapshots\n");
    println!(
        "| snapshots in the chain | IOPS (median of 3) | lowest – highest | read p99 | vs 1 snapshot |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let base = reads.first().map(|(_, f, _)| f.iops).unwrap_or(f64::NAN);
    for (n, f, (lo, hi)) in &reads {
        println!(
            "| {n} | {:.0} | {lo:.0} – {hi:.0} | {:.0} µs | {:+.1}% |",
            f.iops,
            f.p99_us,
            100.0 * (f.iops / base - 1.0)
        );
    }
    let per_replica = args.delete_mib as f64 / merge.as_secs_f64();
    println!(
        "\n### Deleting a snapshot that holds {} MiB\n",
        args.delete_mib
    );
    println!(
        "| merge time (all 3 replicas) | per replica | 3 replicas together | disk sequential write | together ÷ disk |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {:.1} s | {:.0} MiB/s | {:.0} MiB/s | {:.0} MiB/s | {:.0}% |",
        merge.as_secs_f64(),
        per_replica,
        3.0 * per_replica,
        disk.bw_mib,
        100.0 * 3.0 * per_replica / disk.bw_mib
    );
    Ok(())
}
