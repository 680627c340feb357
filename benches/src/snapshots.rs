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
//!   the writes held per snapshot (the engine's log) beside a replica's
//!   control round trip timed during the run without snapshots;
//! - **reads through a chain**: fio 4 KiB random reads at QD32 on three
//!   volumes with the same history and 1, 10 and 100 snapshots in their
//!   chains (see [`chain_reads`]); three runs each, in rotation, each after a
//!   host `sync`, the median kept;
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
    /// Only the reads through a chain (no load, no delete).
    #[arg(long)]
    reads_only: bool,
}

struct Fio {
    iops: f64,
    p99_us: f64,
    max_us: f64,
    bw_mib: f64,
    /// Total I/Os of the job.
    ios: f64,
}

/// CPU µs per read of the engine and of the three replica daemons together.
#[derive(Clone, Copy, Default)]
struct CpuPerIo {
    engine_us: f64,
    replicas_us: f64,
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
        ios: s["total_ios"].as_f64().unwrap_or(0.0),
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
    let limit = Duration::from_secs(args.seconds + 300);
    let load_mib = 512.min(args.size_mib);
    if args.reads_only {
        let reads = chain_reads(&mut cluster, &rt, args, load_mib, limit)?;
        cluster.stop_all()?;
        print_reads(&reads);
        return Ok(());
    }
    let spec = EngineSpec::new("snapbench", &format!("{}MiB", args.size_mib), &[0, 1, 2])
        .set("--replica-timeout", "8s");
    let e = cluster.start_engine(&spec)?;
    let uri = cluster.engines[e].nbd_uri();
    let control_addr = cluster.engines[e].control.to_string();
    let control = rt.block_on(corral_client::EngineControl::connect(
        &control_addr,
        Duration::from_secs(30),
    ))?;

    // Create under load. During the run without snapshots, a replica
    // daemon's control round trip (GetReplica) is timed every 20 ms: what
    // "one round trip" costs under this load, beside the writes held per
    // snapshot in the next run.
    let pinging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pinger = {
        let addr = cluster.replicas[0].addr.to_string();
        let pinging = std::sync::Arc::clone(&pinging);
        std::thread::spawn(move || -> Result<Vec<Duration>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let replica = rt.block_on(corral_client::ReplicaControl::connect(
                &addr,
                Duration::from_secs(30),
            ))?;
            let mut rtts = Vec::new();
            while pinging.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                rt.block_on(replica.get("snapbench"))?;
                rtts.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(rtts)
        })
    };
    let plain = fio(
        &nbd_job(&uri, "randwrite", "4k", 32, args.seconds, load_mib),
        limit,
        "write",
    );
    pinging.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut rtts = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
    rtts.sort();
    let plain = plain?;
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
    // Writes held per snapshot, as the engine logs them.
    let mut held: Vec<Duration> = cluster.engines[e]
        .process
        .log_text()
        .lines()
        .filter(|l| l.contains("snapshot taken") && l.contains("snapshot=\"load-"))
        .filter_map(|l| l.split("paused_us=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_micros)
        .collect();
    held.sort();
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

    // Reads through a chain of 1, 10 and 100 snapshots: three volumes of
    // their own with the same history, measured in rotation.
    let reads = chain_reads(&mut cluster, &rt, args, load_mib, limit)?;

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
    println!(
        "\nWrites held per snapshot (engine log `paused_us`): p50 {:.1} ms, max {:.1} ms over {} snapshots. \
         A replica control round trip (GetReplica) during the run without snapshots: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} calls.",
        pct(&held, 0.5),
        held.last()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN),
        held.len(),
        pct(&rtts, 0.5),
        pct(&rtts, 0.99),
        rtts.last()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN),
        rtts.len()
    );
    print_reads(&reads);
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

/// Rounds of writes behind [`chain_reads`]' volumes; the longest chain
/// takes a snapshot after each.
const CHAIN_ROUNDS: usize = 100;

/// One row of [`chain_reads`]: snapshots in the chain, the median run, the
/// lowest and highest IOPS of the three, and the median run's CPU.
type ChainRow = (usize, Fio, (f64, f64), CpuPerIo);

fn print_reads(reads: &[ChainRow]) {
    println!("\n### 4 KiB random reads, QD32, through a chain of snapshots\n");
    println!(
        "| snapshots in the chain | IOPS (median of 3) | lowest – highest | read p99 | vs 1 snapshot | engine CPU per read | 3 replica daemons' CPU per read |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let base = reads.first().map(|(_, f, _, _)| f.iops).unwrap_or(f64::NAN);
    for (n, f, (lo, hi), cpu) in reads {
        println!(
            "| {n} | {:.0} | {lo:.0} – {hi:.0} | {:.0} µs | {:+.1}% | {:.1} µs | {:.1} µs |",
            f.iops,
            f.p99_us,
            100.0 * (f.iops / base - 1.0),
            cpu.engine_us,
            cpu.replicas_us,
        );
    }
}

/// Random 4 KiB reads at QD32 through chains of 1, 10 and 100 snapshots.
///
/// Three volumes of `size_mib` on the same three replica daemons, with one
/// history: every block written once (1 MiB sequential writes), then
/// [`CHAIN_ROUNDS`] rounds of 512 random 4 KiB writes on all three at once.
/// They differ only in where the snapshots fall: after every round (100),
/// every tenth round (10), the last round (1). So the data, the blocks
/// written and the writes' history are the same, and only the chain differs.
/// Each is then read three times, the volumes in rotation (each position in
/// the order once), each run after a host `sync` (this is a bench, not the
/// product) so that writeback does not share the disk with the reads, and
/// with the volume's files read into the page cache ([`warm_page_cache`]).
/// The engines stop at the end.
///
/// Earlier versions read one volume as its chain grew (1, then 10, then 100)
/// and only wrote where the random writes fell: the rows then also measured
/// the time into the run and a working set that grew with the chain, and
/// two runs of one build disagreed by up to 60 points.
fn chain_reads(
    cluster: &mut corral_tests::Cluster,
    rt: &tokio::runtime::Runtime,
    args: &SnapshotArgs,
    size_mib: u64,
    limit: Duration,
) -> Result<Vec<ChainRow>> {
    let chains = [1usize, 10, 100];
    let mut vols = Vec::new();
    for n in chains {
        let name = format!("chain{n}");
        let spec = EngineSpec::new(&name, &format!("{size_mib}MiB"), &[0, 1, 2])
            .set("--replica-timeout", "8s");
        let e = cluster.start_engine(&spec)?;
        let control = rt.block_on(corral_client::EngineControl::connect(
            &cluster.engines[e].control.to_string(),
            Duration::from_secs(30),
        ))?;
        vols.push((n, e, cluster.engines[e].nbd_uri(), control));
    }
    // One fio with a job per volume: the three get the same writes at once.
    let all = |common: &[String]| -> Result<()> {
        let mut a = vec!["--output-format=json".to_string()];
        a.extend(common.iter().cloned());
        for (n, _, uri, _) in &vols {
            a.push(format!("--name=chain{n}"));
            a.push(format!("--uri={uri}"));
        }
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run_ok("fio", &refs, limit).map(|_| ())
    };
    all(&[
        "--ioengine=nbd".into(),
        "--rw=write".into(),
        "--bs=1m".into(),
        "--iodepth=8".into(),
        format!("--size={size_mib}m"),
    ])?;
    for round in 0..CHAIN_ROUNDS {
        all(&[
            "--ioengine=nbd".into(),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=32".into(),
            format!("--size={size_mib}m"),
            "--number_ios=512".into(),
            "--randrepeat=0".into(),
        ])?;
        for (n, _, _, control) in &vols {
            if (round + 1) % (CHAIN_ROUNDS / n) == 0 {
                rt.block_on(control.create_snapshot(&format!("chain-{round}")))?;
            }
        }
    }
    let replica_pids: Vec<i32> = cluster
        .replicas
        .iter()
        .filter_map(|r| r.process.pid())
        .collect();
    let cpu_of = |pids: &[i32]| -> Result<f64> {
        pids.iter()
            .map(|&p| crate::floor::process_cpu_s(p))
            .sum::<Result<f64>>()
    };
    let mut runs: Vec<Vec<(Fio, CpuPerIo)>> = chains.iter().map(|_| Vec::new()).collect();
    for turn in 0..3 {
        for k in 0..vols.len() {
            let v = (turn + k) % vols.len();
            run_ok("sync", &[], limit)?;
            let name = format!("chain{}", vols[v].0);
            for r in &cluster.replicas {
                warm_page_cache(&r.data_dir.join(&name))?;
            }
            let engine_pid: Vec<i32> = cluster.engines[vols[v].1]
                .process
                .pid()
                .into_iter()
                .collect();
            let (e0, r0) = (cpu_of(&engine_pid)?, cpu_of(&replica_pids)?);
            let f = fio(
                &nbd_job(&vols[v].2, "randread", "4k", 32, args.seconds, size_mib),
                limit,
                "read",
            )?;
            let (e1, r1) = (cpu_of(&engine_pid)?, cpu_of(&replica_pids)?);
            let per = |d: f64| {
                if f.ios > 0.0 {
                    d * 1e6 / f.ios
                } else {
                    f64::NAN
                }
            };
            let cpu = CpuPerIo {
                engine_us: per(e1 - e0),
                replicas_us: per(r1 - r0),
            };
            runs[v].push((f, cpu));
        }
    }
    for (_, e, _, _) in &vols {
        cluster.engines[*e]
            .process
            .terminate(Duration::from_secs(30))?;
    }
    let mut out = Vec::new();
    for (n, mut r) in chains.into_iter().zip(runs) {
        r.sort_by(|a, b| a.0.iops.total_cmp(&b.0.iops));
        let spread = (r[0].0.iops, r[2].0.iops);
        let (f, cpu) = r.swap_remove(1);
        out.push((n, f, spread, cpu));
    }
    Ok(out)
}

/// Reads every written byte of the files in `dir` (a replica's volume
/// directory), skipping holes, so that a read run starts with the volume in
/// the page cache. This machine's kernel pages out file pages it sees idle
/// (DAMON reclaim, `kdamond`), and more of a long chain's layers — written
/// in small pieces, scattered in memory — than of one file read as a whole:
/// without this, the read rows measure that policy as much as the chain.
fn warm_page_cache(dir: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = std::fs::File::open(&path)?;
        let size = file.metadata()?.len();
        let seek = |from: u64, whence: libc::c_int| -> Option<u64> {
            let off = libc::off_t::try_from(from).ok()?;
            // SAFETY: lseek only reads its integer arguments; `file` owns the descriptor.
            let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
            u64::try_from(rc).ok()
        };
        let mut pos = 0;
        while pos < size {
            // No data after `pos` (ENXIO) ends the file.
            let Some(data) = seek(pos, libc::SEEK_DATA) else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE).unwrap_or(size).min(size);
            let mut at = data;
            while at < hole {
                let n = (hole - at).min(buf.len() as u64) as usize;
                let got = file.read_at(&mut buf[..n], at)?;
                if got == 0 {
                    break;
                }
                at += got as u64;
            }
            pos = hole.max(data + 1);
        }
    }
    Ok(())
}
