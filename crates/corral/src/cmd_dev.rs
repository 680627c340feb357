//! `corral dev`: a whole corral on loopback — replica daemons and one
//! engine as child processes of this one, their data and logs under one
//! directory. Ctrl-C stops all of it; a second run reopens the same data.
//!
//! Every gRPC hop runs mutual TLS unless `--no-tls`: with no `--tls-*`
//! files given, a throwaway CA and one certificate for loopback are made
//! under `DIR/tls` (once; later runs reuse them) and every process gets
//! them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use corral_proto::v1::{
    ListReplicasRequest, VolumeInfoRequest, engine_control_client::EngineControlClient,
    replica_control_client::ReplicaControlClient,
};
use tokio::process::{Child, Command};

use crate::tls::TlsArgs;
use crate::units::parse_size;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of replica daemons (and replicas of the volume).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Volume size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Directory for replica data and logs.
    #[arg(long, default_value = ".corral-dev")]
    pub dir: PathBuf,
    /// Volume name (the NBD export name).
    #[arg(long, default_value = "dev")]
    pub volume: String,
    /// NBD address of the volume.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd: SocketAddr,
    /// Engine control address.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub listen: SocketAddr,
    /// First replica daemon port; the others follow it.
    #[arg(long, default_value_t = 9501)]
    pub replica_port: u16,
    /// Plain TCP between the processes (default: mutual TLS, with a
    /// throwaway CA under DIR/tls unless --tls-* files are given).
    #[arg(long)]
    pub no_tls: bool,
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    exited: bool,
}

fn spawn(exe: &Path, name: &str, args: &[String], logs: &Path) -> anyhow::Result<Proc> {
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("log file {}", log.display()))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log,
        exited: false,
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stop one child: SIGTERM, then SIGKILL after `grace`.
async fn stop(proc: &mut Proc, grace: Duration) {
    if proc.exited {
        return;
    }
    if let Some(pid) = proc.child.id() {
        // SAFETY: kill() with a pid we spawned and still own; no memory involved.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, proc.child.wait())
        .await
        .is_err()
    {
        eprintln!(
            "corral dev: {} did not stop in {grace:?}; killing it",
            proc.name
        );
        let _ = proc.child.kill().await;
    }
}

/// The engine exiting ends `dev`; a replica daemon exiting (someone killed
/// it to see what happens) is reported once and the volume carries on.
async fn check_alive(procs: &mut [Proc]) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        if p.exited {
            continue;
        }
        if let Some(status) = p.child.try_wait()? {
            p.exited = true;
            let msg = format!(
                "{} exited ({status}); last lines of {}:\n{}",
                p.name,
                p.log.display(),
                tail(&p.log, 15)
            );
            if p.name == "engine" {
                bail!(msg);
            }
            eprintln!(
                "corral dev: {msg}\ncorral dev: the volume keeps serving from the other replicas"
            );
        }
    }
    Ok(())
}

/// Waits until every replica daemon answers a control call. The engine is
/// started only then: an engine that opened a new volume before one daemon
/// was listening would count that replica as failed and rebuild it later.
async fn wait_replicas(addrs: &[String], procs: &mut [Proc]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for addr in addrs {
        loop {
            check_alive(procs).await?;
            if let Some(p) = procs.iter().find(|p| p.exited) {
                bail!(
                    "{} exited before it was ready; see {}",
                    p.name,
                    p.log.display()
                );
            }
            let attempt = async {
                let channel = corral_client::connect(addr, Duration::from_secs(1)).await?;
                ReplicaControlClient::new(channel)
                    .list_replicas(ListReplicasRequest {})
                    .await?;
                anyhow::Ok(())
            };
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                break;
            }
            if Instant::now() > deadline {
                bail!("the replica daemon at {addr} did not come up within 60 s; see the logs");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn wait_ready(listen: SocketAddr, procs: &mut [Proc]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        check_alive(procs).await?;
        let attempt = async {
            let channel =
                corral_client::connect(&listen.to_string(), Duration::from_secs(1)).await?;
            let info = EngineControlClient::new(channel)
                .get_volume_info(VolumeInfoRequest {})
                .await?
                .into_inner();
            if info.state == "opening" {
                bail!("still opening: {}", info.open_reason);
            }
            anyhow::Ok(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the engine did not come up within 90 s; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn run(args: DevArgs, tls: TlsArgs) -> anyhow::Result<()> {
    if args.replicas == 0 || args.replicas > 9 {
        bail!("--replicas must be between 1 and 9");
    }
    let shutdown = crate::shutdown::install()?;
    let exe = std::env::current_exe().context("locating the corral binary")?;
    let logs = args.dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let tls_files = match (tls.files()?, args.no_tls) {
        (Some(_), true) => bail!("--no-tls and --tls-* files together: choose one"),
        (Some(files), false) => Some(files),
        (None, true) => None,
        (None, false) => Some(
            corral_tls::pki::loopback_identity(&std::path::absolute(args.dir.join("tls"))?)
                .context("making corral dev's throwaway CA")?,
        ),
    };
    // This process dials its children with the same files.
    let tls_argv = match &tls_files {
        Some(files) => {
            crate::tls::install_files(files.clone(), tls.tls_server_name.clone())?;
            let mut argv = files.flags();
            if let Some(name) = &tls.tls_server_name {
                argv.extend(["--tls-server-name".to_string(), name.clone()]);
            }
            argv
        }
        None => Vec::new(),
    };

    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..args.replicas {
        let port = args
            .replica_port
            .checked_add(i as u16)
            .context("replica port out of range")?;
        let addr = format!("127.0.0.1:{port}");
        let data = args.dir.join(format!("replica-{i}"));
        // The daemons stand for nodes but share this machine: one I/O
        // thread each, like the engine, so they do not crowd each other.
        let argv = vec![
            "replica".to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--io-threads".into(),
            "1".into(),
        ];
        let argv = [argv, tls_argv.clone()].concat();
        replicas.push(spawn(&exe, &format!("replica-{i}"), &argv, &logs)?);
        addrs.push(addr);
    }
    let replicas_up = tokio::select! {
        r = wait_replicas(&addrs, &mut replicas) => r,
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = replicas_up {
        for p in replicas.iter_mut() {
            stop(p, Duration::from_secs(15)).await;
        }
        return Err(e);
    }
    let mut argv = vec![
        "engine".to_string(),
        "--volume".into(),
        args.volume.clone(),
        "--size".into(),
        args.size.to_string(),
        "--listen".into(),
        args.listen.to_string(),
        "--nbd".into(),
        args.nbd.to_string(),
    ];
    for a in &addrs {
        argv.push("--replica".into());
        argv.push(a.clone());
    }
    argv.extend(tls_argv.iter().cloned());
    let engine = spawn(&exe, "engine", &argv, &logs)?;
    let mut procs = vec![engine];
    procs.append(&mut replicas);

    let ready = tokio::select! {
        r = wait_ready(args.listen, &mut procs) => r,
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let outcome = match ready {
        Ok(()) => {
            let uri = format!("nbd://{}/{}", args.nbd, args.volume);
            let (tls_line, tls_flags) = match &tls_files {
                Some(files) => (
                    format!("mutual TLS on every gRPC hop (CA {})", files.ca.display()),
                    format!(" {}", files.flags().join(" ")),
                ),
                None => ("off (--no-tls)".to_string(), String::new()),
            };
            println!(
                "corral dev: volume {:?} ({} bytes, {} replicas) is up.\n\
                 \x20 NBD:     {uri}\n\
                 \x20 TLS:     {tls_line}\n\
                 \x20 control: corral volume --engine {}{tls_flags} info   (or: replica ls)\n\
                 \x20 data:    {}\n\
                 \x20 logs:    {}\n\
                 Try:\n\
                 \x20 nbdinfo {uri}\n\
                 \x20 fio --name=try --ioengine=nbd --uri={uri} --rw=randwrite --bs=4k --size=64m --iodepth=32 --verify=crc32c\n\
                 Ctrl-C stops everything; running this again reopens the same volume.",
                args.volume,
                args.size,
                args.replicas,
                args.listen,
                args.dir.display(),
                logs.display(),
            );
            // Serve until Ctrl-C, or until a process dies on its own.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if let Err(e) = check_alive(&mut procs).await {
                            break Err(e);
                        }
                    }
                }
            }
        }
        Err(e) => Err(e),
    };
    eprintln!("corral dev: stopping");
    // The engine first (it flushes the volume), then the replica daemons.
    for p in procs.iter_mut() {
        stop(p, Duration::from_secs(15)).await;
    }
    outcome
}
