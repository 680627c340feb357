//! The fio matrix: every system under test and every baseline on loopback,
//! the same jobs, one run, one markdown table per job.
//!
//! Systems: fio straight on a file (the disk), nbdkit's file plugin (NBD
//! baseline), tgt with a file backing store (iSCSI baseline, Longhorn v1's
//! frontend), `corral serve-file` over NBD and iSCSI, and corral volumes
//! with 1 and 3 replicas over NBD and iSCSI. Jobs: 4 KiB random read and
//! write at QD32 and QD1, 1 MiB sequential write and read at QD8. For each:
//! IOPS, MiB/s, p50/p99/p99.9 completion latency, and the CPU seconds the
//! serving processes spent per GiB moved.
//!
//! With TLS (issue 14): `corral serve-file` with NBD over TLS, and a
//! 3-replica volume with mutual TLS on every gRPC hop and NBD over TLS,
//! each compared with its plain row. fio's nbd engine reaches TLS through
//! libnbd, which takes its certificates from `$HOME/.pki/libnbd` when not
//! run as root: those rows run fio as `nobody` with a HOME of the bench's.
//!
//! `--rounds N` (N above 1) measures only those TLS pairs, with all four
//! systems up at once and each job run on the four one after the other in
//! every round, and reports each round, the medians, each pair's ratio per
//! round and the machine's steal time during each run: on a shared
//! machine one run's ratio moves by 15 points or more.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_tests::tools::require;
use corral_tests::{Cluster, EngineSpec, free_addr, run_bounded, wait_for_port};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct MatrixArgs {
    /// Run every job for one second on a small file: keeps the harness working (the test suite uses it).
    #[arg(long)]
    quick: bool,
    /// Seconds per job.
    #[arg(long, default_value_t = 15)]
    runtime: u64,
    /// Size of the file / volume each system serves, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Only systems whose name contains one of these (comma-separated),
    /// e.g. `--only nbdkit,serve-file`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave out the TLS rows.
    #[arg(long)]
    no_tls: bool,
    /// Only jobs whose name contains one of these (comma-separated), e.g.
    /// `--jobs qd32`.
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Above 1: measure only the TLS pairs (serve-file and a 3-replica
    /// volume, each with TLS and without), all four up at once, in this
    /// many rounds; within a round each job runs on the four systems one
    /// after the other, so a drift of the machine's speed falls on both
    /// sides of a pair. Reports each round and the medians.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
}

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

const JOBS: &[Job] = &[
    Job {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        qd: 32,
    },
    Job {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        qd: 1,
    },
    Job {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
    },
    Job {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        qd: 1,
    },
    Job {
        name: "seqwrite-1m-qd8",
        rw: "write",
        bs: "1m",
        qd: 8,
    },
    Job {
        name: "seqread-1m-qd8",
        rw: "read",
        bs: "1m",
        qd: 8,
    },
];

/// How fio reaches a system.
#[derive(Clone)]
enum Target {
    File(PathBuf),
    Nbd(String),
    /// `nbds://` with libnbd's certificates under `home`/.pki/libnbd.
    NbdTls {
        uri: String,
        home: PathBuf,
    },
    Iscsi(String),
}

/// The bench's TLS: one CA and identity for every process, and a HOME
/// whose `.pki/libnbd` holds them for fio (run as `nobody`).
struct BenchTls {
    files: corral_tls::TlsFiles,
    home: tempfile::TempDir,
}

impl BenchTls {
    fn new() -> Result<BenchTls> {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::Builder::new()
            .prefix("corral-bench-tls-")
            .tempdir()?;
        let libnbd = home.path().join(".pki/libnbd");
        std::fs::create_dir_all(&libnbd)?;
        let pki = corral_tls::pki::Pki::new("corral bench CA")?;
        let files = corral_tls::TlsFiles {
            cert: libnbd.join("client-cert.pem"),
            key: libnbd.join("client-key.pem"),
            ca: libnbd.join("ca-cert.pem"),
        };
        pki.issue(
            "corral bench",
            corral_tls::pki::LOOPBACK_NAMES,
            corral_tls::pki::Validity::Days(1),
        )?
        .write(&files.cert, &files.key)?;
        pki.write_ca(&files.ca)?;
        // fio runs as nobody: it must read its HOME and the throwaway key.
        for dir in [home.path(), &home.path().join(".pki"), &libnbd] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644))?;
        Ok(BenchTls { files, home })
    }

    fn args(&self) -> Vec<String> {
        self.files.flags()
    }
}

/// One measured job.
#[derive(Clone, Debug, Default)]
struct Sample {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu_s_per_gib: Option<f64>,
    /// The same, per serving process (for a volume: each replica daemon,
    /// then the engine).
    cpu_per_process: Vec<f64>,
    /// Share of the machine's CPU time the hypervisor gave to others
    /// during the job (`steal` in /proc/stat), in percent.
    steal_pct: f64,
}

/// The machine's CPU time so far from /proc/stat: (steal, all), in ticks.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let all = fields.iter().take(8).sum();
    (fields.get(7).copied().unwrap_or(0), all)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may contain spaces) start after ") ".
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks / if hz > 0 { hz as f64 } else { 100.0 }
}

struct Runner {
    fio: PathBuf,
    fio_iscsi: Option<PathBuf>,
    runtime: u64,
    size_mib: u64,
    quick: bool,
}

impl Runner {
    fn fio_args(&self, target: &Target, job: &Job) -> (PathBuf, Vec<String>) {
        let mut args = vec![
            format!("--name={}", job.name),
            format!("--rw={}", job.rw),
            format!("--bs={}", job.bs),
            format!("--iodepth={}", job.qd),
            format!("--size={}m", self.size_mib),
            format!("--runtime={}", self.runtime),
            "--time_based".into(),
            format!("--ramp_time={}", if self.quick { 0 } else { 2 }),
            "--randrepeat=0".into(),
            "--output-format=json".into(),
        ];
        let bin = match target {
            Target::File(p) => {
                args.push("--ioengine=io_uring".into());
                args.push(format!("--filename={}", p.display()));
                self.fio.clone()
            }
            Target::Nbd(uri) => {
                args.push("--ioengine=nbd".into());
                args.push(format!("--uri={uri}"));
                self.fio.clone()
            }
            Target::NbdTls { uri, home } => {
                args.push("--ioengine=nbd".into());
                args.push(format!("--uri={uri}"));
                let mut wrapped = vec![
                    "--reuid=nobody".to_string(),
                    "--regid=nogroup".into(),
                    "--clear-groups".into(),
                    "env".into(),
                    format!("HOME={}", home.display()),
                    self.fio.display().to_string(),
                ];
                wrapped.append(&mut args);
                return (PathBuf::from("setpriv"), wrapped);
            }
            Target::Iscsi(url) => {
                args.push("--ioengine=libiscsi".into());
                args.push(format!("--filename={url}"));
                self.fio_iscsi.clone().unwrap_or_else(|| self.fio.clone())
            }
        };
        (bin, args)
    }

    /// Write the whole target once so that reads hit real data.
    fn prefill(&self, target: &Target) -> Result<()> {
        let job = Job {
            name: "prefill",
            rw: "write",
            bs: "1m",
            qd: 8,
        };
        let (bin, mut args) = self.fio_args(target, &job);
        args.retain(|a| {
            a != "--time_based" && !a.starts_with("--runtime") && !a.starts_with("--ramp_time")
        });
        let out = run_bounded(Command::new(bin).args(&args), Duration::from_secs(1800))?;
        if !out.status.success() {
            bail!("prefill failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn run(&self, target: &Target, job: &Job, pids: &[u32]) -> Result<Sample> {
        let (bin, args) = self.fio_args(target, job);
        let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let ticks_before = machine_ticks();
        let out = run_bounded(
            Command::new(&bin).args(&args),
            Duration::from_secs(self.runtime + 120),
        )?;
        let cpu_used: Vec<f64> = pids
            .iter()
            .zip(&cpu_before)
            .map(|(p, before)| cpu_seconds(*p) - before)
            .collect();
        let ticks_after = machine_ticks();
        let steal_pct = 100.0 * ticks_after.0.saturating_sub(ticks_before.0) as f64
            / ticks_after.1.saturating_sub(ticks_before.1).max(1) as f64;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "fio {} failed: {}",
                job.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // fio (libiscsi) may print notes before the JSON document.
        let start = text.find('{').context("no JSON from fio")?;
        let v: Value = serde_json::from_str(&text[start..]).context("fio JSON")?;
        let j = &v["jobs"][0];
        if j["error"].as_i64().unwrap_or(0) != 0 {
            bail!("fio {} reported error {}", job.name, j["error"]);
        }
        let side = if j["read"]["io_bytes"].as_f64().unwrap_or(0.0) > 0.0 {
            &j["read"]
        } else {
            &j["write"]
        };
        let pct = |k: &str| side["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
        let bytes = side["io_bytes"].as_f64().unwrap_or(0.0);
        let gib = bytes / (1u64 << 30) as f64;
        Ok(Sample {
            iops: side["iops"].as_f64().unwrap_or(0.0),
            mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            p50_us: pct("50.000000"),
            p99_us: pct("99.000000"),
            p999_us: pct("99.900000"),
            cpu_s_per_gib: (!pids.is_empty() && gib > 0.0)
                .then(|| cpu_used.iter().sum::<f64>() / gib),
            cpu_per_process: if gib > 0.0 {
                cpu_used.iter().map(|c| c / gib).collect()
            } else {
                Vec::new()
            },
            steal_pct,
        })
    }
}

/// A process we started, stopped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn preallocated(dir: &Path, name: &str, size_mib: u64) -> Result<PathBuf> {
    let path = dir.join(name);
    let f = std::fs::File::create(&path)?;
    f.set_len(size_mib << 20)?;
    Ok(path)
}

/// tgt on a control socket of its own, torn down on drop (SIGTERM alone does not stop tgtd).
struct Tgt {
    daemon: Option<Daemon>,
    ctl: String,
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("tgtadm")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&[
            "-C", &self.ctl, "--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
            "--tid", "1",
        ]);
        quiet(&["-C", &self.ctl, "--mode", "system", "--op", "delete"]);
        std::thread::sleep(Duration::from_millis(300));
        self.daemon.take();
    }
}

fn start_tgt(file: &Path) -> Result<(Tgt, Target, u32)> {
    require("tgtd")?;
    let portal = free_addr();
    let ctl = (100 + std::process::id() % 100).to_string();
    let child = Command::new("tgtd")
        .args(["-f", "--iscsi", &format!("portal={portal}"), "-C", &ctl])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start tgtd")?;
    let pid = child.id();
    let tgt = Tgt {
        daemon: Some(Daemon(child)),
        ctl: ctl.clone(),
    };
    wait_for_port(portal, Duration::from_secs(10))?;
    let adm = |args: &[&str]| -> Result<()> {
        let st = Command::new("tgtadm")
            .args(["-C", &ctl, "--lld", "iscsi"])
            .args(args)
            .status()?;
        if !st.success() {
            bail!("tgtadm {args:?} failed");
        }
        Ok(())
    };
    adm(&[
        "--mode",
        "target",
        "--op",
        "new",
        "--tid",
        "1",
        "--targetname",
        "iqn.2026-11.io.tgt:bench",
    ])?;
    adm(&[
        "--mode",
        "logicalunit",
        "--op",
        "new",
        "--tid",
        "1",
        "--lun",
        "1",
        "--backing-store",
        &file.display().to_string(),
        "--bstype",
        "rdwr",
    ])?;
    adm(&[
        "--mode",
        "target",
        "--op",
        "bind",
        "--tid",
        "1",
        "--initiator-address",
        "ALL",
    ])?;
    let url = format!(
        "iscsi\\://127.0.0.1\\:{}/iqn.2026-11.io.tgt\\:bench/1",
        portal.port()
    );
    Ok((tgt, Target::Iscsi(url), pid))
}

fn iscsi_url(addr: std::net::SocketAddr, iqn: &str) -> String {
    format!(
        "iscsi\\://127.0.0.1\\:{}/{}/0",
        addr.port(),
        iqn.replace(':', "\\:")
    )
}

type Results = Vec<(String, Vec<Sample>)>;

/// The jobs `--jobs` selects.
fn selected_jobs(args: &MatrixArgs) -> Vec<&'static Job> {
    JOBS.iter()
        .filter(|j| args.jobs.is_empty() || args.jobs.iter().any(|w| j.name.contains(w.as_str())))
        .collect()
}

/// `corral serve-file` on a new file `file_name` in `dir`, over NBD or
/// iSCSI; with `tls`, NBD that requires TLS.
fn start_serve_file(
    corral: &Path,
    dir: &Path,
    file_name: &str,
    size_mib: u64,
    nbd: bool,
    tls: Option<&BenchTls>,
) -> Result<(Daemon, Target, u32)> {
    let file = preallocated(dir, file_name, size_mib)?;
    let addr = free_addr();
    let flag = if nbd { "--nbd" } else { "--iscsi" };
    let mut command = Command::new(corral);
    command.args([
        "serve-file",
        "--file",
        &file.display().to_string(),
        "--name",
        "bench",
        flag,
        &addr.to_string(),
    ]);
    if let Some(tls) = tls {
        command.args(tls.args()).args(["--nbd-tls", "require"]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let daemon = Daemon(child);
    wait_for_port(addr, Duration::from_secs(10))?;
    let target = match (nbd, tls) {
        (true, Some(tls)) => Target::NbdTls {
            uri: format!("nbds://{addr}/bench"),
            home: tls.home.path().to_path_buf(),
        },
        (true, None) => Target::Nbd(format!("nbd://{addr}/bench")),
        (false, _) => Target::Iscsi(iscsi_url(addr, "iqn.2026-11.io.corral:bench")),
    };
    Ok((daemon, target, pid))
}

/// A volume of `replicas` replica daemons and an engine in `cluster`; with
/// `tls`, mutual TLS on every hop and NBD that requires it. Returns the
/// volume's name, its engine's index, and the pids whose CPU is counted
/// (each replica daemon, then the engine).
fn start_volume(
    cluster: &mut Cluster,
    size_mib: u64,
    replicas: usize,
    tls: Option<&BenchTls>,
) -> Result<(String, usize, Vec<u32>)> {
    cluster.tls = tls.map(BenchTls::args).unwrap_or_default();
    let first = cluster.replicas.len();
    // Three "nodes" share this machine: one I/O thread per daemon, as
    // `corral dev` runs them.
    for _ in 0..replicas {
        cluster.start_replica_with(&["--io-threads", "1"])?;
    }
    let idx: Vec<usize> = (first..first + replicas).collect();
    let volume = format!("bench{replicas}{}", if tls.is_some() { "tls" } else { "" });
    // The engine's own default replica timeout, not the test fixture's
    // short one: a replica whose writeback stalls for 3 s on this shared
    // disk is slow, and the product would not fail it.
    let mut spec =
        EngineSpec::new(&volume, &format!("{size_mib}MiB"), &idx).set("--replica-timeout", "8s");
    if tls.is_some() {
        spec = spec.arg("--nbd-tls", "require");
    }
    let started = cluster.start_engine(&spec);
    cluster.tls = Vec::new();
    let e = started?;
    let mut pids: Vec<u32> = idx
        .iter()
        .filter_map(|i| cluster.replicas[*i].process.pid())
        .map(|p| p as u32)
        .collect();
    if let Some(p) = cluster.engines[e].process.pid() {
        pids.push(p as u32);
    }
    Ok((volume, e, pids))
}

/// The NBD target of a volume [`start_volume`] started.
fn volume_nbd(cluster: &Cluster, e: usize, volume: &str, tls: Option<&BenchTls>) -> Target {
    match tls {
        Some(tls) => Target::NbdTls {
            uri: format!("nbds://{}/{volume}", cluster.engines[e].nbd),
            home: tls.home.path().to_path_buf(),
        },
        None => Target::Nbd(cluster.engines[e].nbd_uri()),
    }
}

fn measure(
    runner: &Runner,
    jobs: &[&Job],
    name: &str,
    target: &Target,
    pids: &[u32],
    results: &mut Results,
) -> Result<()> {
    eprintln!("== {name}");
    runner.prefill(target)?;
    let mut samples = Vec::new();
    for job in jobs {
        // Start every job with no dirty page cache left by the one before
        // (or by another system's run): writeback of earlier data would
        // otherwise throttle whichever job happens to come next.
        // SAFETY: sync() takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let s = runner.run(target, job, pids)?;
        eprintln!(
            "   {:<18} {:>9.0} IOPS {:>8.1} MiB/s p99 {:>8.0} µs",
            job.name, s.iops, s.mib_s, s.p99_us
        );
        samples.push(s);
    }
    results.push((name.to_string(), samples));
    Ok(())
}

pub fn run(args: &MatrixArgs) -> Result<()> {
    let (runtime, size_mib) = if args.quick {
        (1, 64)
    } else {
        (args.runtime, args.size_mib)
    };
    let fio = require("fio")?;
    let fio_iscsi = {
        let out = Command::new("scripts/build-fio-libiscsi.sh")
            .stderr(Stdio::inherit())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            }
            _ => bail!(
                "scripts/build-fio-libiscsi.sh failed: the iSCSI rows need fio with libiscsi (run from the repository root)"
            ),
        }
    };
    let runner = Runner {
        fio,
        fio_iscsi,
        runtime,
        size_mib,
        quick: args.quick,
    };
    let jobs = selected_jobs(args);
    if jobs.is_empty() {
        bail!("--jobs selects none of the jobs");
    }
    if args.rounds > 1 {
        return tls_rounds(&runner, &jobs, args.rounds);
    }
    let wanted =
        |name: &str| args.only.is_empty() || args.only.iter().any(|o| name.contains(o.as_str()));
    let corral = corral_tests::corral_bin();
    let mut results: Results = Vec::new();
    let mut cluster = Cluster::new()?;
    let dir = cluster.path().to_path_buf();

    if wanted("disk") {
        let file = preallocated(&dir, "disk.img", size_mib)?;
        measure(
            &runner,
            &jobs,
            "disk (fio on a file)",
            &Target::File(file.clone()),
            &[],
            &mut results,
        )?;
        std::fs::remove_file(file)?;
    }
    if wanted("nbdkit") {
        let file = preallocated(&dir, "nbdkit.img", size_mib)?;
        let port = free_addr();
        let child = Command::new(require("nbdkit")?)
            .args([
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                &port.port().to_string(),
                "file",
                &file.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id();
        let _d = Daemon(child);
        wait_for_port(port, Duration::from_secs(10))?;
        measure(
            &runner,
            &jobs,
            "nbdkit file (NBD)",
            &Target::Nbd(format!("nbd://{port}")),
            &[pid],
            &mut results,
        )?;
    }
    let tls = if args.no_tls {
        None
    } else {
        Some(BenchTls::new()?)
    };
    for (label, nbd, with_tls) in [
        ("corral serve-file (NBD)", true, false),
        ("corral serve-file, TLS (NBD)", true, true),
        ("corral serve-file (iSCSI)", false, false),
    ] {
        if !wanted(label) || (with_tls && tls.is_none()) {
            continue;
        }
        let (_d, target, pid) = start_serve_file(
            &corral,
            &dir,
            "serve.img",
            size_mib,
            nbd,
            tls.as_ref().filter(|_| with_tls),
        )?;
        measure(&runner, &jobs, label, &target, &[pid], &mut results)?;
    }
    if wanted("tgt") {
        let file = preallocated(&dir, "tgt.img", size_mib)?;
        let (_tgt, target, pid) = start_tgt(&file)?;
        measure(&runner, &jobs, "tgt (iSCSI)", &target, &[pid], &mut results)?;
    }
    for (replicas, with_tls) in [(1usize, false), (3, false), (3, true)] {
        let what = if with_tls { ", TLS on every hop" } else { "" };
        let nbd_label = format!("corral volume, {replicas} replica(s){what} (NBD)");
        let iscsi_label = format!("corral volume, {replicas} replica(s) (iSCSI)");
        let iscsi_wanted = wanted(&iscsi_label) && !with_tls;
        if (!wanted(&nbd_label) && !iscsi_wanted) || (with_tls && tls.is_none()) {
            continue;
        }
        let vtls = tls.as_ref().filter(|_| with_tls);
        let (volume, e, pids) = start_volume(&mut cluster, size_mib, replicas, vtls)?;
        if wanted(&nbd_label) {
            let t = volume_nbd(&cluster, e, &volume, vtls);
            measure(&runner, &jobs, &nbd_label, &t, &pids, &mut results)
                .inspect_err(|_| cluster.print_log_tails(60))?;
        }
        if iscsi_wanted {
            let t = Target::Iscsi(iscsi_url(
                cluster.engines[e].iscsi,
                &format!("iqn.2026-11.io.corral:{volume}"),
            ));
            measure(&runner, &jobs, &iscsi_label, &t, &pids, &mut results)
                .inspect_err(|_| cluster.print_log_tails(60))?;
        }
    }
    cluster.stop_all()?;
    print_tables(&results, &jobs, runtime, size_mib);
    Ok(())
}

fn find<'a>(results: &'a Results, name: &str) -> Option<&'a Vec<Sample>> {
    results.iter().find(|(n, _)| n == name).map(|(_, s)| s)
}

/// The row each system is compared with.
fn baseline(name: &str) -> Option<&'static str> {
    Some(match name {
        "corral serve-file (NBD)" => "nbdkit file (NBD)",
        "corral serve-file, TLS (NBD)" => "corral serve-file (NBD)",
        "corral volume, 3 replica(s), TLS on every hop (NBD)" => {
            "corral volume, 3 replica(s) (NBD)"
        }
        "corral serve-file (iSCSI)" => "tgt (iSCSI)",
        n if n.starts_with("corral volume") && n.ends_with("(NBD)") => "corral serve-file (NBD)",
        n if n.starts_with("corral volume") && n.ends_with("(iSCSI)") => {
            "corral serve-file (iSCSI)"
        }
        "nbdkit file (NBD)" | "tgt (iSCSI)" => "disk (fio on a file)",
        _ => return None,
    })
}

fn print_tables(results: &Results, jobs: &[&Job], runtime: u64, size_mib: u64) {
    println!(
        "Each job: {runtime} s on a {size_mib} MiB file or volume, after a full sequential prefill and a sync().\n"
    );
    for (j, job) in jobs.iter().enumerate() {
        println!("### {}\n", job.name);
        println!(
            "| system | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | CPU s/GiB | of which replicas + engine | vs | ratio |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---|---|---:|");
        for (name, samples) in results {
            let s = &samples[j];
            let cpu = s
                .cpu_s_per_gib
                .map_or("–".to_string(), |c| format!("{c:.2}"));
            let (vs, ratio) = match baseline(name).and_then(|b| find(results, b).map(|bs| (b, bs)))
            {
                Some((b, bs)) if bs[j].iops > 0.0 => {
                    (b.to_string(), format!("{:.2}×", s.iops / bs[j].iops))
                }
                _ => ("".to_string(), "".to_string()),
            };
            let split = process_split(&s.cpu_per_process);
            println!(
                "| {name} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {cpu} | {split} | {vs} | {ratio} |",
                s.iops, s.mib_s, s.p50_us, s.p99_us, s.p999_us
            );
        }
        println!();
    }
}

/// The TLS pairs in rounds (`--rounds`): serve-file over NBD and a
/// 3-replica volume, each with TLS and without, all up at once.
fn tls_rounds(runner: &Runner, jobs: &[&Job], rounds: u32) -> Result<()> {
    let corral = corral_tests::corral_bin();
    let tls = BenchTls::new()?;
    let mut cluster = Cluster::new()?;
    let dir = cluster.path().to_path_buf();
    let size_mib = runner.size_mib;
    let (_plain_file, plain_file, plain_file_pid) =
        start_serve_file(&corral, &dir, "serve.img", size_mib, true, None)?;
    let (_tls_file, tls_file, tls_file_pid) =
        start_serve_file(&corral, &dir, "serve-tls.img", size_mib, true, Some(&tls))?;
    let (volume, e, plain_pids) = start_volume(&mut cluster, size_mib, 3, None)?;
    let plain_volume = volume_nbd(&cluster, e, &volume, None);
    let (volume, e, tls_pids) = start_volume(&mut cluster, size_mib, 3, Some(&tls))?;
    let tls_volume = volume_nbd(&cluster, e, &volume, Some(&tls));
    let systems: [(&str, Target, Vec<u32>); 4] = [
        ("corral serve-file (NBD)", plain_file, vec![plain_file_pid]),
        ("corral serve-file, TLS (NBD)", tls_file, vec![tls_file_pid]),
        (
            "corral volume, 3 replica(s) (NBD)",
            plain_volume,
            plain_pids,
        ),
        (
            "corral volume, 3 replica(s), TLS on every hop (NBD)",
            tls_volume,
            tls_pids,
        ),
    ];
    for (name, target, _) in &systems {
        eprintln!("== prefill {name}");
        runner
            .prefill(target)
            .inspect_err(|_| cluster.print_log_tails(60))?;
    }
    // samples[system][job][round]
    let mut samples = vec![vec![Vec::new(); jobs.len()]; systems.len()];
    for round in 1..=rounds {
        for (j, job) in jobs.iter().enumerate() {
            for (k, (name, target, pids)) in systems.iter().enumerate() {
                // SAFETY: sync() takes no arguments and cannot fail.
                unsafe { libc::sync() };
                let s = runner
                    .run(target, job, pids)
                    .inspect_err(|_| cluster.print_log_tails(60))?;
                eprintln!(
                    "   round {round} {:<18} {name:<52} {:>9.0} IOPS, {:.1} CPU s/GiB, steal {:.1}%",
                    job.name,
                    s.iops,
                    s.cpu_s_per_gib.unwrap_or(f64::NAN),
                    s.steal_pct
                );
                samples[k][j].push(s);
            }
        }
    }
    cluster.stop_all()?;
    println!(
        "Each job: {} s on a {size_mib} MiB file or volume per round, {rounds} rounds; in each round every job ran on the four systems one after the other.\n",
        runner.runtime
    );
    for (j, job) in jobs.iter().enumerate() {
        println!("### {}\n", job.name);
        let heads: Vec<String> = (1..=rounds).map(|r| format!("round {r}")).collect();
        println!(
            "| system | {} | median IOPS | median CPU s/GiB | of which replicas + engine |",
            heads.join(" | ")
        );
        println!("|---|{}---:|---:|---|", "---:|".repeat(rounds as usize));
        for (k, (name, _, _)) in systems.iter().enumerate() {
            let iops: Vec<f64> = samples[k][j].iter().map(|s| s.iops).collect();
            let cpu: Vec<f64> = samples[k][j]
                .iter()
                .map(|s| s.cpu_s_per_gib.unwrap_or(f64::NAN))
                .collect();
            let cells: Vec<String> = samples[k][j]
                .iter()
                .map(|s| format!("{:.0} (steal {:.0}%)", s.iops, s.steal_pct))
                .collect();
            // Each process's median (replica daemons, then the engine).
            let processes = samples[k][j].first().map_or(0, |s| s.cpu_per_process.len());
            let each: Vec<f64> = (0..processes)
                .map(|p| {
                    let v: Vec<f64> = samples[k][j]
                        .iter()
                        .filter_map(|s| s.cpu_per_process.get(p).copied())
                        .collect();
                    median(&v)
                })
                .collect();
            let split = process_split(&each);
            println!(
                "| {name} | {} | {:.0} | {:.2} | {split} |",
                cells.join(" | "),
                median(&iops),
                median(&cpu)
            );
        }
        println!(
            "\n| TLS against plain | {} | median of the rounds' ratios |",
            heads.join(" | ")
        );
        println!("|---|{}---:|", "---:|".repeat(rounds as usize));
        for (what, plain, with) in [
            ("serve-file (IOPS)", 0, 1),
            ("3-replica volume (IOPS)", 2, 3),
        ] {
            let ratios: Vec<f64> = samples[with][j]
                .iter()
                .zip(&samples[plain][j])
                .map(|(t, p)| if p.iops > 0.0 { t.iops / p.iops } else { 0.0 })
                .collect();
            let cells: Vec<String> = ratios.iter().map(|r| format!("{r:.2}×")).collect();
            println!(
                "| {what} | {} | {:.2}× |",
                cells.join(" | "),
                median(&ratios)
            );
        }
        println!();
    }
    Ok(())
}

/// CPU per process as "replica / replica / replica + engine" (a volume's
/// pids list each replica daemon, then the engine); empty for one process.
fn process_split(cpu: &[f64]) -> String {
    match cpu.split_last() {
        Some((engine, replicas)) if !replicas.is_empty() => {
            let r: Vec<String> = replicas.iter().map(|c| format!("{c:.1}")).collect();
            format!("{} + {engine:.1}", r.join(" / "))
        }
        _ => String::new(),
    }
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}
