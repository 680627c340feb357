//! Durable writes (issue 15): what a database's commit costs.
//!
//! In one run, beside each other:
//!
//! - **the disk**: fio on a file in the kind of directory the replicas use,
//!   `--ioengine=psync --rw=randwrite --bs=4k --fdatasync=1` — the rate at
//!   which this disk makes 4 KiB writes durable one at a time. Twice: on
//!   a new file (fio's default: allocated, never written, so each first
//!   write to a block makes the sync commit the filesystem's journal) and
//!   on a laid-out one (`--overwrite=1`, written in full first, as a
//!   database's files are); the volume likewise: one client on the new
//!   volume, then the volume written once in full and every other row on
//!   it, each row set against the disk of its layout;
//! - **the disk shared by three such writers at once**, each on its own
//!   file, as a 3-replica volume's replicas share this one disk: the rate
//!   of each writer is the most such a volume can make durable one write
//!   at a time, before any network hop;
//! - **a 3-replica volume** (three replica daemons and an engine on this
//!   machine): fio `--rw=randwrite --bs=4k --iodepth=1 --fsync=1` over NBD
//!   (NBD_CMD_FLUSH after every write), one client, then `--clients`
//!   clients at once; and buffered writes (QD32, no flush), to see they did
//!   not get slower. The same over iSCSI, one session and `--clients`
//!   sessions, each a WRITE(10) of 4 KiB at a random block then a
//!   SYNCHRONIZE CACHE(10) of the whole LUN, driven by this bench's own
//!   initiator ([`corral_tests::iscsi_raw`]): fio's libiscsi engine sends
//!   SYNCHRONIZE CACHE(16) with the LUN's size in *bytes* as its block
//!   count, which a target following SBC-4 (corral) refuses as out of
//!   range, so fio cannot time it;
//! - **syscalls per durable write** on one replica daemon: `strace -c -f`
//!   attached to it during a shorter single-client run, its `fdatasync`,
//!   `fsync`, `pwrite64` and `pwritev` calls divided by the writes fio
//!   issued.
//!
//! `--before BIN` measures an earlier corral build the same way in the same
//! run; `--without-write-through` this build with its engine's
//! write-through off (decision 76). `--rounds N` (with either) keeps every
//! build's laid-out volume up at once and runs only the durable rows (one
//! client and `--clients`, NBD and iSCSI) on each in turn, N rounds, and
//! prints the medians: an A/B comparison that the machine's drift between
//! one build's rows and the next does not decide. Latencies are fio's completion
//! latencies of the writes and of the flushes (`sync` in fio's JSON), 99th
//! percentile.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_tests::iscsi_raw::RawInitiator;
use corral_tests::tools::run_ok;
use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct DurableArgs {
    /// Seconds each fio run lasts.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Size of the volume and of the disk's test file, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Clients of the many-clients run.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Seconds of the run measured under strace.
    #[arg(long, default_value_t = 5)]
    strace_seconds: u64,
    /// Another corral binary (an earlier build) to measure in the same run.
    #[arg(long)]
    before: Option<PathBuf>,
    /// Also measure this build's engine with `--no-write-through` (every
    /// write as sent, a flush round for every flush; decision 76).
    #[arg(long)]
    without_write_through: bool,
    /// Above 1: measure only the durable rows on the laid-out volume (one
    /// client and `--clients`, over NBD and iSCSI), with every system's
    /// cluster up at once, each row run on every system in turn, this many
    /// rounds; medians. For A/B comparisons on a noisy machine.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// Replicas of the volume measured, each a replica daemon on this machine.
const REPLICAS: u32 = 3;

/// One fio run's outcome.
struct Run {
    iops: f64,
    writes: u64,
    write_p99_us: f64,
    sync_p99_us: f64,
}

fn percentile_us(stat: &Value, p: &str) -> f64 {
    stat["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0
}

/// Sum write IOPS and issued writes over fio's jobs (group reporting off).
fn parse(json: &str) -> Result<Run> {
    let start = json.find('{').context("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&json[start..]).context("fio's JSON")?;
    let jobs = v["jobs"].as_array().context("fio JSON without jobs")?;
    let mut run = Run {
        iops: 0.0,
        writes: 0,
        write_p99_us: 0.0,
        sync_p99_us: 0.0,
    };
    for j in jobs {
        if j["error"].as_i64().unwrap_or(0) != 0 {
            bail!("fio job failed: {j}");
        }
        run.iops += j["write"]["iops"].as_f64().unwrap_or(0.0);
        run.writes += j["write"]["total_ios"].as_u64().unwrap_or(0);
        run.write_p99_us = run
            .write_p99_us
            .max(percentile_us(&j["write"]["clat_ns"], "99.000000"));
        run.sync_p99_us = run
            .sync_p99_us
            .max(percentile_us(&j["sync"]["lat_ns"], "99.000000"));
    }
    if run.writes == 0 {
        bail!("fio completed no writes");
    }
    Ok(run)
}

fn fio(args: &[String], limit: Duration) -> Result<Run> {
    let mut all = vec!["--output-format=json".to_string()];
    all.extend(args.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run_ok("fio", &refs, limit)?;
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// How the files written are laid out when the durable writes begin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Never written: fio's default for a new file (allocated with
    /// `fallocate`, so its extents are unwritten), a new volume's sparse
    /// replica files. The first write to a block changes the filesystem's
    /// metadata, and the sync that makes it durable commits the journal.
    New,
    /// Written in full first (fio `--overwrite=1`; the volume written once
    /// sequentially), as a database's preallocated log and data files are:
    /// a sync writes data and flushes the disk's cache, nothing else.
    LaidOut,
}

/// `writers` fio writers on files of their own in `dir`, each making 4 KiB
/// random writes durable one at a time (`psync`, `fdatasync` after each).
fn disk_writers(dir: &Path, args: &DurableArgs, writers: u32, layout: Layout) -> Result<Run> {
    let sub = dir.join("disk-durable");
    std::fs::create_dir_all(&sub)?;
    let run = fio(
        &[
            "--name=disk".into(),
            format!("--overwrite={}", u8::from(layout == Layout::LaidOut)),
            format!("--directory={}", sub.display()),
            format!("--numjobs={writers}"),
            "--ioengine=psync".into(),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--fdatasync=1".into(),
            format!("--size={}m", args.size_mib),
            format!("--runtime={}", args.seconds),
            "--time_based".into(),
        ],
        Duration::from_secs(args.seconds + 300),
    );
    let _ = std::fs::remove_dir_all(&sub);
    run
}

/// The disk's own durable rate: one such writer.
fn disk(dir: &Path, args: &DurableArgs, layout: Layout) -> Result<Run> {
    disk_writers(dir, args, 1, layout)
}

/// The disk shared by `writers` such writers at once, each on a file of
/// its own, as the replicas of a volume on this one disk are: the rate of
/// each writer (the sum divided by `writers`) is the most a volume with
/// that many replicas here can make durable one write at a time, each
/// write waiting for every replica's sync.
fn disk_shared(dir: &Path, args: &DurableArgs, writers: u32, layout: Layout) -> Result<Run> {
    disk_writers(dir, args, writers, layout).map(|r| Run {
        iops: r.iops / f64::from(writers),
        writes: r.writes / u64::from(writers),
        ..r
    })
}

/// fio over NBD: `extra` added to a time-based 4 KiB random-write job.
fn nbd(uri: &str, args: &DurableArgs, seconds: u64, extra: &[String]) -> Result<Run> {
    let mut job = vec![
        "--name=volume".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--size={}m", args.size_mib),
        format!("--runtime={seconds}"),
        "--time_based".into(),
        "--randrepeat=0".into(),
    ];
    job.extend(extra.iter().cloned());
    fio(&job, Duration::from_secs(seconds + 300))
}

/// Writes every block of the volume once (1 MiB sequential writes, then a
/// flush), so that later writes overwrite blocks the replicas' files hold.
fn lay_out(uri: &str, args: &DurableArgs) -> Result<()> {
    let job = [
        "--name=layout".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=write".into(),
        "--bs=1m".into(),
        "--iodepth=8".into(),
        format!("--size={}m", args.size_mib),
        "--end_fsync=1".into(),
    ];
    let run = fio(&job, Duration::from_secs(600))?;
    if run.writes < args.size_mib {
        bail!(
            "laying out the volume wrote {} MiB of {}",
            run.writes,
            args.size_mib
        );
    }
    Ok(())
}

/// `clients` clients at QD1, each with a flush after every write.
fn durable(uri: &str, args: &DurableArgs, clients: u32, seconds: u64) -> Result<Run> {
    nbd(
        uri,
        args,
        seconds,
        &[
            "--iodepth=1".into(),
            "--fsync=1".into(),
            format!("--numjobs={clients}"),
        ],
    )
}

/// `clients` iSCSI sessions to `volume` at `portal`, each at QD1: a 4 KiB
/// WRITE(10) at a random block, then SYNCHRONIZE CACHE(10) of the whole
/// LUN, for `seconds`. The write and flush latencies are this initiator's
/// (send to status), 99th percentile over all sessions.
fn iscsi_durable(portal: SocketAddr, volume: &str, clients: u32, seconds: u64) -> Result<Run> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let sessions: Vec<_> = (0..clients)
        .map(|i| {
            let volume = volume.to_string();
            std::thread::spawn(move || -> Result<(Vec<u32>, Vec<u32>)> {
                let mut s = RawInitiator::login_as(
                    portal,
                    &volume,
                    &format!("iqn.2026-12.io.corral:bench-{i}"),
                    i as u8,
                );
                // READ CAPACITY(16): the LUN's last block and block length.
                let mut cdb = [0u8; 16];
                cdb[0] = 0x9e;
                cdb[1] = 0x10;
                cdb[13] = 32;
                // The first command of a new session meets the target's
                // POWER ON OCCURRED unit attention: asked again.
                let mut answer = s.command(&cdb, &[], 32);
                for _ in 0..2 {
                    if answer.0 != 2 {
                        break;
                    }
                    answer = s.command(&cdb, &[], 32);
                }
                let (status, cap) = answer;
                if status != 0 || cap.len() < 12 {
                    bail!("READ CAPACITY(16): status {status:#04x}");
                }
                let last = u64::from_be_bytes(cap[0..8].try_into()?);
                let block = u64::from(u32::from_be_bytes(cap[8..12].try_into()?));
                if block == 0 || 4096 % block != 0 {
                    bail!("LUN block length {block}: not a divisor of 4096");
                }
                let per = 4096 / block;
                let slots = (last + 1) / per;
                let data = vec![0x5au8; 4096];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(i);
                let (mut writes, mut syncs) = (Vec::new(), Vec::new());
                while Instant::now() < deadline {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let lba = (rng % slots) * per;
                    let mut write = [0u8; 10];
                    write[0] = 0x2a;
                    write[2..6].copy_from_slice(&u32::try_from(lba)?.to_be_bytes());
                    write[7..9].copy_from_slice(&u16::try_from(per)?.to_be_bytes());
                    let t = Instant::now();
                    let (status, _) = s.command(&write, &data, 0);
                    writes.push(t.elapsed().as_micros() as u32);
                    if status != 0 {
                        bail!("WRITE(10) at {lba}: status {status:#04x}");
                    }
                    // Block 0, no count: the whole LUN.
                    let t = Instant::now();
                    let (status, _) = s.command(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
                    syncs.push(t.elapsed().as_micros() as u32);
                    if status != 0 {
                        bail!("SYNCHRONIZE CACHE(10): status {status:#04x}");
                    }
                }
                Ok((writes, syncs))
            })
        })
        .collect();
    let started = Instant::now();
    let (mut writes, mut syncs) = (Vec::new(), Vec::new());
    for s in sessions {
        let (w, f) = s
            .join()
            .map_err(|_| anyhow::anyhow!("an iSCSI session failed (see above)"))??;
        writes.extend(w);
        syncs.extend(f);
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-3);
    if writes.is_empty() {
        bail!("no iSCSI write completed");
    }
    let p99 = |v: &mut Vec<u32>| {
        v.sort_unstable();
        f64::from(v[(v.len() * 99 / 100).min(v.len() - 1)])
    };
    Ok(Run {
        iops: writes.len() as f64 / elapsed,
        writes: writes.len() as u64,
        write_p99_us: p99(&mut writes),
        sync_p99_us: p99(&mut syncs),
    })
}

/// Calls of `name` in `strace -c` output (its summary table).
fn strace_calls(summary: &str, name: &str) -> u64 {
    summary
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors,] syscall
            (cols.last() == Some(&name)).then(|| cols.get(3)?.parse::<u64>().ok())?
        })
        .sum()
}

/// What one build of corral did.
struct System {
    name: String,
    /// One client on the new volume, before it is laid out.
    one_new: Run,
    /// The rest on the laid-out volume.
    one: Run,
    many: Run,
    /// The same over iSCSI (SYNCHRONIZE CACHE after each write).
    iscsi_one: Run,
    iscsi_many: Run,
    /// Buffered writes (no flush), QD32: "no slower than before".
    buffered: Run,
    /// Per durable write on one replica daemon: (syncs, positional writes),
    /// one client and many.
    syscalls: (f64, f64),
    syscalls_many: (f64, f64),
}

/// Syscalls of process `pid` per write fio issued during `load`:
/// (fdatasync + fsync, positional writes).
fn per_write(pid: &str, dir: &Path, load: impl FnOnce() -> Result<Run>) -> Result<(f64, f64)> {
    let trace = dir.join("strace.txt");
    let trace_arg = trace.display().to_string();
    let mut strace = std::process::Command::new("strace")
        .args(["-c", "-f", "-o", &trace_arg, "-p", pid])
        .spawn()
        .context("strace")?;
    std::thread::sleep(Duration::from_millis(500));
    let traced = load();
    // SIGINT ends strace with its summary.
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    let traced = traced?;
    let summary = std::fs::read_to_string(&trace).context("strace summary")?;
    let per = |name: &str| strace_calls(&summary, name) as f64 / traced.writes as f64;
    Ok((
        per("fdatasync") + per("fsync"),
        per("pwrite64") + per("pwritev") + per("pwritev2"),
    ))
}

/// A 3-replica volume "durable" of `bin`'s processes: the cluster and
/// its engine's index.
fn start_volume(bin: &Path, engine_flags: &[&str], args: &DurableArgs) -> Result<(Cluster, usize)> {
    // The fixture starts every process from CORRAL_BIN.
    // SAFETY: the bench is single-threaded here; nothing reads the environment meanwhile.
    unsafe { std::env::set_var("CORRAL_BIN", bin) };
    let mut cluster = Cluster::new()?;
    for _ in 0..REPLICAS {
        cluster.start_replica_with(&["--io-threads", "1"])?;
    }
    let mut spec = EngineSpec::new("durable", &format!("{}MiB", args.size_mib), &[0, 1, 2])
        .set("--replica-timeout", "8s");
    spec.extra
        .extend(engine_flags.iter().map(|f| f.to_string()));
    let e = cluster.start_engine(&spec)?;
    Ok((cluster, e))
}

fn measure(name: &str, bin: &Path, engine_flags: &[&str], args: &DurableArgs) -> Result<System> {
    let (mut cluster, e) = start_volume(bin, engine_flags, args)?;
    let uri = cluster.engines[e].nbd_uri();
    let logs = |c: &Cluster| c.print_log_tails(60);
    let one_new = durable(&uri, args, 1, args.seconds).inspect_err(|_| logs(&cluster))?;
    lay_out(&uri, args).inspect_err(|_| logs(&cluster))?;
    let one = durable(&uri, args, 1, args.seconds).inspect_err(|_| logs(&cluster))?;
    let many = durable(&uri, args, args.clients, args.seconds).inspect_err(|_| logs(&cluster))?;
    let portal = cluster.engines[e].iscsi;
    let iscsi_one =
        iscsi_durable(portal, "durable", 1, args.seconds).inspect_err(|_| logs(&cluster))?;
    let iscsi_many = iscsi_durable(portal, "durable", args.clients, args.seconds)
        .inspect_err(|_| logs(&cluster))?;
    let buffered =
        nbd(&uri, args, args.seconds, &["--iodepth=32".into()]).inspect_err(|_| logs(&cluster))?;
    eprintln!(
        "durable: {name}: {:.0} durable writes/s on the new volume; laid out {:.0} / {:.0} (1 / {} clients), over iSCSI {:.0} / {:.0}; buffered {:.0} writes/s",
        one_new.iops,
        one.iops,
        many.iops,
        args.clients,
        iscsi_one.iops,
        iscsi_many.iops,
        buffered.iops
    );

    // Syscalls of one replica daemon per durable write.
    let pid = cluster.replicas[0]
        .process
        .pid()
        .context("replica pid")?
        .to_string();
    let dir = cluster.path().to_path_buf();
    let syscalls = per_write(&pid, &dir, || durable(&uri, args, 1, args.strace_seconds))?;
    let syscalls_many = per_write(&pid, &dir, || {
        durable(&uri, args, args.clients, args.strace_seconds)
    })?;
    cluster.stop_all()?;
    Ok(System {
        name: name.to_string(),
        one_new,
        one,
        many,
        iscsi_one,
        iscsi_many,
        buffered,
        syscalls,
        syscalls_many,
    })
}

pub fn run(args: &DurableArgs) -> Result<()> {
    if args.seconds == 0 || args.clients == 0 {
        bail!("--seconds and --clients must be at least 1");
    }
    // Before `measure` changes the environment.
    let current = corral_tests::corral_bin();
    if args.rounds > 1 {
        return rounds(&current, args);
    }
    // The disk's run, in the kind of directory the replicas use.
    let scratch = Cluster::new()?;
    let base_new = disk(scratch.path(), args, Layout::New)?;
    let shared_new = disk_shared(scratch.path(), args, REPLICAS, Layout::New)?;
    let base = disk(scratch.path(), args, Layout::LaidOut)?;
    let shared = disk_shared(scratch.path(), args, REPLICAS, Layout::LaidOut)?;
    drop(scratch);
    eprintln!(
        "durable: disk {:.0} durable writes/s on a new file ({:.0} per writer with {REPLICAS} at once), {:.0} laid out ({:.0})",
        base_new.iops, shared_new.iops, base.iops, shared.iops
    );
    let mut systems = Vec::new();
    if let Some(before) = &args.before {
        systems.push(measure("before", before, &[], args)?);
    }
    if args.without_write_through {
        systems.push(measure(
            "corral, write-through off",
            &current,
            &["--no-write-through"],
            args,
        )?);
    }
    systems.push(measure("corral", &current, &[], args)?);

    println!(
        "### Durable 4 KiB random writes over NBD and iSCSI, {} s per row, {} MiB volume\n",
        args.seconds, args.size_mib
    );
    println!(
        "Each row against the disk's rate on files of the same layout: new (never written) or laid out (written in full first).\n"
    );
    println!("| run | durable writes/s | % of disk | write p99 | flush p99 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let row = |name: &str, r: &Run, disk: &Run| {
        println!(
            "| {name} | {:.0} | {:.0}% | {:.0} µs | {:.0} µs |",
            r.iops,
            100.0 * r.iops / disk.iops,
            r.write_p99_us,
            r.sync_p99_us
        );
    };
    row(
        "disk, new file: fio psync, fdatasync after each write",
        &base_new,
        &base_new,
    );
    row(
        &format!(
            "disk, new files, shared by {REPLICAS} such writers at once (one per replica): each writer"
        ),
        &shared_new,
        &base_new,
    );
    for s in &systems {
        row(
            &format!("{}, new volume: 1 client, flush after each write", s.name),
            &s.one_new,
            &base_new,
        );
    }
    row(
        "disk, laid-out file (--overwrite=1): fio psync, fdatasync after each write",
        &base,
        &base,
    );
    row(
        &format!("disk, laid-out files, shared by {REPLICAS} such writers at once: each writer"),
        &shared,
        &base,
    );
    let row = |name: &str, r: &Run| row(name, r, &base);
    for s in &systems {
        let (n, c) = (&s.name, args.clients);
        row(
            &format!("{n}, laid-out volume: 1 client, flush after each write"),
            &s.one,
        );
        row(
            &format!("{n}: {c} clients, flush after each write"),
            &s.many,
        );
        row(
            &format!("{n}: 1 iSCSI session, SYNCHRONIZE CACHE after each write"),
            &s.iscsi_one,
        );
        row(
            &format!("{n}: {c} iSCSI sessions, SYNCHRONIZE CACHE after each write"),
            &s.iscsi_many,
        );
    }
    let c = args.clients;
    println!(
        "\n| build | {c} clients ÷ 1 | {c} iSCSI sessions ÷ 1 | syncs per durable write, 1 client | positional writes per durable write, 1 client | syncs per durable write, {c} clients | buffered 4 KiB writes/s, QD32 |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &systems {
        println!(
            "| {} | {:.2}× | {:.2}× | {:.2} | {:.2} | {:.2} | {:.0} |",
            s.name,
            s.many.iops / s.one.iops,
            s.iscsi_many.iops / s.iscsi_one.iops,
            s.syscalls.0,
            s.syscalls.1,
            s.syscalls_many.0,
            s.buffered.iops
        );
    }
    println!(
        "\n(syscalls: strace -c -f on one replica daemon during {} s runs of their own; iSCSI latencies: this bench's initiator, send to status)",
        args.strace_seconds
    );
    Ok(())
}

/// `--rounds`: every system's laid-out volume up at once; in each round,
/// each row on each system in turn. Prints every round and the medians.
fn rounds(current: &Path, args: &DurableArgs) -> Result<()> {
    let mut systems: Vec<(&str, &Path, &[&str])> = Vec::new();
    if let Some(before) = &args.before {
        systems.push(("before", before, &[]));
    }
    if args.without_write_through {
        systems.push((
            "corral, write-through off",
            current,
            &["--no-write-through"],
        ));
    }
    systems.push(("corral", current, &[]));
    if systems.len() < 2 {
        bail!("--rounds compares builds: give --before or --without-write-through");
    }
    let mut up = Vec::new();
    for (name, bin, flags) in &systems {
        let (cluster, e) = start_volume(bin, flags, args)?;
        let uri = cluster.engines[e].nbd_uri();
        lay_out(&uri, args).inspect_err(|_| cluster.print_log_tails(60))?;
        let portal = cluster.engines[e].iscsi;
        up.push((*name, cluster, uri, portal));
    }
    let c = args.clients;
    // Per system, per round: [1 client, c clients, 1 session, c sessions].
    let mut rates = vec![Vec::new(); up.len()];
    for round in 1..=args.rounds {
        let mut row = vec![Vec::with_capacity(4); up.len()];
        for kind in 0..4 {
            for (i, (_, cluster, uri, portal)) in up.iter().enumerate() {
                let run = match kind {
                    0 => durable(uri, args, 1, args.seconds),
                    1 => durable(uri, args, c, args.seconds),
                    2 => iscsi_durable(*portal, "durable", 1, args.seconds),
                    _ => iscsi_durable(*portal, "durable", c, args.seconds),
                }
                .inspect_err(|_| cluster.print_log_tails(60))?;
                row[i].push(run.iops);
            }
        }
        for (i, (name, ..)) in up.iter().enumerate() {
            let (one, many, s_one, s_many) = (row[i][0], row[i][1], row[i][2], row[i][3]);
            eprintln!(
                "durable: round {round}: {name}: NBD {one:.0} / {many:.0} ({:.2}x), iSCSI {s_one:.0} / {s_many:.0} ({:.2}x)",
                many / one,
                s_many / s_one
            );
        }
        for (i, r) in row.into_iter().enumerate() {
            rates[i].push(r);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "### Durable 4 KiB random writes on a laid-out volume, {} rounds of {} s per row, medians\n",
        args.rounds, args.seconds
    );
    println!(
        "| build | 1 client | {c} clients | {c} ÷ 1 | 1 iSCSI session | {c} sessions | {c} ÷ 1 |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, (name, ..)) in up.iter().enumerate() {
        let col = |k: usize| median(rates[i].iter().map(|r| r[k]).collect());
        let ratio = |a: usize, b: usize| median(rates[i].iter().map(|r| r[a] / r[b]).collect());
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {:.2}× |",
            col(0),
            col(1),
            ratio(1, 0),
            col(2),
            col(3),
            ratio(3, 2)
        );
    }
    for (_, mut cluster, ..) in up {
        cluster.stop_all()?;
    }
    Ok(())
}
