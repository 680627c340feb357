//! A fixture of node daemons (`corral node`): real processes on 127.0.0.1,
//! each with its own data dir and engine port range, under one temporary
//! directory, driven from the test through `corral_client` (the
//! `EngineManager` and `ReplicaControl` clients, on a runtime the fixture
//! owns).
//!
//! Engines started by a daemon outlive it by design, so the fixture's `Drop`
//! kills them as well: every engine a daemon has recorded, and every pid
//! the test has seen — after checking that the process is still one of
//! this fixture's engines. When a test fails, the last lines of every
//! daemon's and engine's log are printed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use corral_client::{EngineManager, ReplicaControl};
use corral_proto::v1 as pb;

use crate::{Process, free_addr, poll, wait_for_port};

/// Ports per node daemon's engine range.
const PORTS_PER_NODE: usize = 20;
/// How long a control call may take (StartEngine waits for the engine).
const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// Engine arguments the fixture's daemons give every engine: quick to
/// notice and retry replicas, bounded opening.
pub const TEST_ENGINE_ARGS: &str =
    "--replica-timeout 3s --replica-retry-interval 200ms --open-timeout 20s";

/// A distinct engine port range for each daemon this test process starts,
/// below the ephemeral ports `free_addr` hands out.
fn next_port_range() -> (u16, u16) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let slots = 10_000 / PORTS_PER_NODE;
    let slot = (std::process::id() as usize * 37 + NEXT.fetch_add(1, Ordering::Relaxed)) % slots;
    let first = 20_000 + slot * PORTS_PER_NODE;
    (first as u16, (first + PORTS_PER_NODE - 1) as u16)
}

/// One node daemon.
pub struct NodeDaemon {
    pub id: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Its engine port range, inclusive.
    pub ports: (u16, u16),
    pub process: Process,
}

impl NodeDaemon {
    /// The engines' record file.
    pub fn record_path(&self) -> PathBuf {
        self.data_dir.join(".engines").join("engines.json")
    }

    /// The log file of `volume`'s engine.
    pub fn engine_log_path(&self, volume: &str) -> PathBuf {
        self.data_dir.join(".engines").join(format!("{volume}.log"))
    }

    /// The recorded engines: (volume, pid) pairs.
    pub fn recorded(&self) -> Result<Vec<(String, Option<u32>)>> {
        let text = match std::fs::read(self.record_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        let record: serde_json::Value = serde_json::from_slice(&text)?;
        let engines = record["engines"]
            .as_array()
            .context("the record has no engines list")?;
        Ok(engines
            .iter()
            .map(|e| {
                let volume = e["spec"]["volume"].as_str().unwrap_or_default().to_string();
                let pid = e["pid"].as_u64().map(|p| p as u32);
                (volume, pid)
            })
            .collect())
    }
}

/// Node daemons on loopback.
pub struct NodeCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeDaemon>,
    runtime: tokio::runtime::Runtime,
    /// Every engine pid the test has seen (killed at the end if alive).
    seen_pids: Mutex<BTreeSet<u32>>,
}

impl NodeCluster {
    /// `n` node daemons, up and answering.
    pub fn start(n: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut c = NodeCluster {
            dir: tempfile::Builder::new()
                .prefix("corral-node-test-")
                .tempdir()?,
            nodes: Vec::new(),
            runtime,
            seen_pids: Mutex::new(BTreeSet::new()),
        };
        for _ in 0..n {
            c.start_node(&[])?;
        }
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start another node daemon (with `extra` arguments); its index.
    pub fn start_node(&mut self, extra: &[&str]) -> Result<usize> {
        let i = self.nodes.len();
        let addr = free_addr();
        let data_dir = self.path().join(format!("node-{i}"));
        let ports = next_port_range();
        let mut args: Vec<String> = [
            "node",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--node-id",
            &format!("node-{i}"),
            "--engine-ports",
            &format!("{}-{}", ports.0, ports.1),
            "--frontend-address",
            "127.0.0.1",
            "--engine-args",
            TEST_ENGINE_ARGS,
            "--restart-delay",
            "200ms",
            "--restart-delay-max",
            "2s",
            "--stop-timeout",
            "15s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self.path().join(format!("node-{i}.log"));
        let process = Process::spawn(&format!("node-{i}"), args, log)?;
        self.nodes.push(NodeDaemon {
            id: format!("node-{i}"),
            addr,
            data_dir,
            ports,
            process,
        });
        self.wait_node(i)?;
        Ok(i)
    }

    /// Wait until node `i` listens (bounded).
    fn wait_node(&mut self, i: usize) -> Result<()> {
        let addr = self.nodes[i].addr;
        if let Err(e) = wait_for_port(addr, Duration::from_secs(30)) {
            let status = self.nodes[i].process.exited();
            bail!(
                "node-{i} does not listen ({e}); exited: {status:?}\n{}",
                self.nodes[i].process.log_text()
            );
        }
        Ok(())
    }

    /// Start node `i` again with its arguments (same address, data dir, ports).
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].process.start()?;
        self.wait_node(i)
    }

    /// Run a future on the fixture's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Node `i`'s engine manager.
    pub fn manager(&self, i: usize) -> Result<EngineManager> {
        let addr = self.nodes[i].addr.to_string();
        Ok(self.block_on(EngineManager::connect(&addr, CALL_TIMEOUT))?)
    }

    /// Node `i`'s replica control service.
    pub fn replica_control(&self, i: usize) -> Result<ReplicaControl> {
        let addr = self.nodes[i].addr.to_string();
        Ok(self.block_on(ReplicaControl::connect(&addr, CALL_TIMEOUT))?)
    }

    /// Create `volume`'s replica on each of `nodes`.
    pub fn create_replicas(&self, volume: &str, size: u64, nodes: &[usize]) -> Result<()> {
        for &i in nodes {
            let control = self.replica_control(i)?;
            self.block_on(control.create(pb::CreateReplicaRequest {
                volume: volume.to_string(),
                size,
                block_size: 0,
                chunk_size: 0,
            }))
            .with_context(|| format!("create {volume} on node-{i}"))?;
        }
        Ok(())
    }

    /// An engine spec over the replicas on `nodes`, serving NBD.
    pub fn spec(&self, volume: &str, size: u64, nodes: &[usize]) -> pb::EngineSpec {
        pb::EngineSpec {
            volume: volume.to_string(),
            size,
            replicas: nodes
                .iter()
                .map(|&i| self.nodes[i].addr.to_string())
                .collect(),
            nbd: true,
            ..Default::default()
        }
    }

    /// Remember an engine pid for the cleanup.
    pub fn saw(&self, status: &pb::EngineStatus) {
        if status.pid != 0 {
            self.seen_pids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(status.pid);
        }
    }

    /// StartEngine on node `i`.
    pub fn start_engine(&self, i: usize, spec: pb::EngineSpec) -> Result<pb::EngineStatus> {
        let manager = self.manager(i)?;
        let status = self.block_on(manager.start_engine(spec))?;
        self.saw(&status);
        Ok(status)
    }

    /// GetEngine on node `i`.
    pub fn get_engine(&self, i: usize, volume: &str) -> Result<pb::EngineStatus> {
        let manager = self.manager(i)?;
        let status = self.block_on(manager.get_engine(volume))?;
        self.saw(&status);
        Ok(status)
    }

    /// Poll GetEngine on node `i` until `done` holds for the status; the
    /// status then. Errors while the daemon comes up are retried.
    pub fn wait_engine(
        &self,
        i: usize,
        volume: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&pb::EngineStatus) -> bool,
    ) -> Result<pb::EngineStatus> {
        let mut last = None;
        poll(limit, what, || {
            let status = self.get_engine(i, volume).ok();
            let ok = status.as_ref().is_some_and(&done);
            last = status.clone();
            Ok(status.filter(|_| ok))
        })
        .with_context(|| format!("last status of {volume} on node-{i}: {last:?}"))
    }

    /// The engine log of `volume` on node `i`.
    pub fn engine_log(&self, i: usize, volume: &str) -> String {
        std::fs::read_to_string(self.nodes[i].engine_log_path(volume)).unwrap_or_default()
    }

    fn print_logs(&self, keep: usize) {
        let tail = |name: &str, path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- last lines of {name} ({}) -----", path.display());
            for l in &lines[lines.len().saturating_sub(keep)..] {
                eprintln!("{l}");
            }
        };
        for n in &self.nodes {
            tail(&n.process.name, &n.process.log);
            if let Ok(entries) = std::fs::read_dir(n.data_dir.join(".engines")) {
                for e in entries.flatten() {
                    let path = e.path();
                    if path.extension().is_some_and(|x| x == "log") {
                        tail(&format!("{} engine", n.id), &path);
                    }
                }
            }
        }
    }
}

/// Whether process `pid` is an engine serving its control port in `ports`.
fn is_fixture_engine(pid: u32, ports: (u16, u16)) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let listen = argv
        .windows(2)
        .find(|w| w[0] == "--listen")
        .and_then(|w| w[1].parse::<SocketAddr>().ok());
    argv.get(1).is_some_and(|a| a == "engine")
        && listen.is_some_and(|a| (ports.0..=ports.1).contains(&a.port()))
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = std::env::var("CORRAL_TEST_LOG_LINES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(40usize);
            self.print_logs(keep);
            if std::env::var_os("CORRAL_TEST_KEEP").is_some() {
                self.dir.disable_cleanup(true);
                eprintln!("kept {}", self.path().display());
            }
        }
        let mut pids = self
            .seen_pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for n in &mut self.nodes {
            let _ = n.process.kill9();
            if let Ok(recorded) = n.recorded() {
                pids.extend(recorded.into_iter().filter_map(|(_, pid)| pid));
            }
        }
        for pid in pids {
            if self.nodes.iter().any(|n| is_fixture_engine(pid, n.ports)) {
                // SAFETY: a positive pid checked to be one of our engines.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The process group of `pid`.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // Fields after the name: state, ppid, pgrp, ...
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// SIGKILL process `pid` (an engine the test means to kill).
pub fn kill9(pid: u32) -> Result<()> {
    // SAFETY: signalling one positive pid.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
        bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
