//! The cluster fixture for corral's end-to-end tests.
//!
//! A [`Cluster`] starts real `corral` processes — replica daemons and
//! engines — on 127.0.0.1 with ports picked free, under one temporary
//! directory, and can kill (-9), pause (SIGSTOP) and resume (SIGCONT) any of
//! them. Every wait is bounded. Each process's log is kept in the cluster
//! directory and printed when a test fails (the fixture's `Drop`), so a
//! failing scenario explains itself.
//!
//! [`campaign`] runs a seeded, randomized fault campaign over such a
//! cluster. The tests drive volumes through real tools (fio, nbdinfo, nbdcopy,
//! nbdfuse); [`tools`] has small wrappers that fail loudly when a tool is
//! missing instead of skipping, and [`ext4`] puts a real ext4 filesystem on
//! a volume's NBD export. [`s3`] runs a real S3 server (s3s-fs) on loopback
//! for the backup targets.

pub mod campaign;
pub mod checker;
pub mod csi;
pub mod ext4;
pub mod iscsi_raw;
pub mod nbd_raw;
pub mod node;
pub mod proxy;
pub mod s3;
pub mod tools;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::proxy::{Mode, Proxy};

/// The `corral` binary under test: `$CORRAL_BIN`, or the workspace's debug build.
pub fn corral_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CORRAL_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug").join("corral")
}

/// A free TCP port on 127.0.0.1 (bound and released; the race is tiny).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// The one polling loop of the test suite: call `check` every 50 ms until
/// it yields a value or fails, at most `limit`; `check` returns
/// `Ok(Some(value))` when done, `Ok(None)` to go on, `Err` to give up.
pub fn poll<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `check` holds, at most `limit` (see [`poll`]).
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    poll(limit, what, || Ok(check().then_some(())))
}

/// Wait (bounded) for a child process to exit; its status.
pub fn wait_exit(
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> Result<std::process::ExitStatus> {
    poll(limit, what, || Ok(child.try_wait()?))
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, limit: Duration) -> Result<()> {
    wait_until(limit, &format!("something to listen on {addr}"), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// One running (or stopped) corral process.
pub struct Process {
    pub name: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// Environment variables set for the process (beside RUST_LOG).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Process {
    fn spawn(name: &str, args: Vec<String>, log: PathBuf) -> Result<Self> {
        Self::spawn_with_env(name, args, log, Vec::new())
    }

    fn spawn_with_env(
        name: &str,
        args: Vec<String>,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        let mut p = Process {
            name: name.to_string(),
            args,
            log,
            env,
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// (Re)start the process with its original arguments.
    pub fn start(&mut self) -> Result<()> {
        let bin = corral_bin();
        if !bin.exists() {
            bail!(
                "{} is missing: build it first (cargo build -p corral), or set CORRAL_BIN",
                bin.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&bin)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} {:?}", bin.display(), self.args))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, sig: i32) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        // SAFETY: sending a signal to a child we spawned.
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        // SAFETY: signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let waited = wait_exit(&mut c, limit, &format!("{} to exit on SIGTERM", self.name));
        if waited.is_err() {
            let _ = c.kill();
            let _ = c.wait();
        }
        waited
    }

    /// SIGSTOP: the process hangs, its sockets stay open.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Has it exited on its own? (Reaps it if so.)
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log, past its first `from` bytes, says "Address already
    /// in use" (a start since then found its port taken).
    fn port_taken_since(&self, from: usize) -> bool {
        self.log_text()
            .get(from..)
            .unwrap_or_default()
            .contains("Address already in use")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: resume first in case it was paused, then kill our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A replica daemon of the cluster.
pub struct Replica {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub process: Process,
}

/// An engine of the cluster.
pub struct Engine {
    pub volume: String,
    pub control: SocketAddr,
    pub nbd: SocketAddr,
    /// The engine's iSCSI portal (target `iqn.2026-11.io.corral:<volume>`, LUN 0).
    pub iscsi: SocketAddr,
    pub process: Process,
    /// The replica addresses on its command line (proxies' when proxied).
    pub replica_addrs: Vec<String>,
}

impl Engine {
    pub fn nbd_uri(&self) -> String {
        format!("nbd://{}/{}", self.nbd, self.volume)
    }

    /// The libiscsi URL of the volume's LUN 0.
    pub fn iscsi_url(&self) -> String {
        iscsi_url(self.iscsi, &self.volume)
    }
}

/// The libiscsi URL of LUN 0 of the corral target for `volume` at `portal`.
pub fn iscsi_url(portal: SocketAddr, volume: &str) -> String {
    format!("iscsi://{portal}/iqn.2026-11.io.corral:{volume}/0")
}

/// How to start an engine.
#[derive(Clone, Debug)]
pub struct EngineSpec {
    pub volume: String,
    pub size: String,
    /// Indexes into the cluster's replicas.
    pub replicas: Vec<usize>,
    pub extra: Vec<String>,
    /// Reach the replicas through the cluster's fault-injecting proxies
    /// (one per replica daemon, shared by every proxied engine).
    pub proxied: bool,
    /// Environment variables for the engine process (S3 keys, say).
    pub env: Vec<(String, String)>,
}

impl EngineSpec {
    pub fn new(volume: &str, size: &str, replicas: &[usize]) -> Self {
        EngineSpec {
            volume: volume.to_string(),
            size: size.to_string(),
            replicas: replicas.to_vec(),
            extra: vec!["--replica-timeout".into(), "3s".into()],
            proxied: false,
            env: Vec::new(),
        }
    }

    /// Set `key` to `value` in the engine's environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.extra.push(flag.to_string());
        self.extra.push(value.to_string());
        self
    }

    /// Set `flag` to `value`, replacing an earlier value of the same flag
    /// (the engine refuses a flag given twice).
    pub fn set(mut self, flag: &str, value: &str) -> Self {
        if let Some(i) = self.extra.iter().position(|a| a == flag)
            && i + 1 < self.extra.len()
        {
            self.extra[i + 1] = value.to_string();
            return self;
        }
        self.arg(flag, value)
    }

    /// Connect to every replica through the cluster's proxy for it (see
    /// [`Cluster::proxy`] and [`Cluster::link`]).
    pub fn via_proxies(mut self) -> Self {
        self.proxied = true;
        self
    }
}

/// Real corral processes on loopback, under one temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub engines: Vec<Engine>,
    /// The proxy in front of each replica daemon, made when a proxied
    /// engine first needs it.
    pub proxies: Vec<Option<Proxy>>,
    /// tmpfs file systems mounted for replica data dirs (unmounted on drop).
    mounts: Vec<PathBuf>,
    /// `--tls-*` flags every `corral` process of the cluster gets (empty:
    /// plain TCP); see [`Cluster::with_tls`].
    pub tls: Vec<String>,
}

impl Cluster {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("corral-test-").tempdir()?;
        Ok(Cluster {
            dir,
            replicas: Vec::new(),
            engines: Vec::new(),
            proxies: Vec::new(),
            mounts: Vec::new(),
            tls: Vec::new(),
        })
    }

    /// From now on every process this cluster starts, and every `corral`
    /// command it runs, uses mutual TLS with `files`.
    pub fn with_tls(&mut self, files: &corral_tls::TlsFiles) {
        self.tls = files.flags();
    }

    /// A cluster with `n` replica daemons already up.
    pub fn with_replicas(n: usize) -> Result<Self> {
        let mut c = Cluster::new()?;
        for _ in 0..n {
            c.start_replica()?;
        }
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start a new replica daemon; returns its index.
    pub fn start_replica(&mut self) -> Result<usize> {
        self.start_replica_with(&[])
    }

    /// Start a new replica daemon with extra arguments (e.g. `--metrics ADDR`).
    pub fn start_replica_with(&mut self, extra: &[&str]) -> Result<usize> {
        let i = self.replicas.len();
        let addr = free_addr();
        let data_dir = self.path().join(format!("replica-{i}"));
        let args = vec![
            "replica".into(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        let mut args = args;
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.tls.iter().cloned());
        let log = self.path().join(format!("replica-{i}.log"));
        let process = Process::spawn(&format!("replica-{i}"), args, log)?;
        wait_for_port(addr, Duration::from_secs(20))?;
        self.replicas.push(Replica {
            addr,
            data_dir,
            process,
        });
        Ok(i)
    }

    /// Restart a stopped replica daemon on the same address and data dir.
    /// Its port, freed by the stop, can be taken meanwhile (by another
    /// test's connection): a daemon that exits at once is started again a
    /// few times, as the holder lets it go.
    pub fn restart_replica(&mut self, i: usize) -> Result<()> {
        let r = &mut self.replicas[i];
        let mut tries = 0;
        loop {
            let logged = r.process.log_text().len();
            r.process.start()?;
            let serving = poll(
                Duration::from_secs(20),
                &format!("replica-{i} to listen on {}", r.addr),
                || {
                    if let Some(status) = r.process.exited() {
                        bail!("replica-{i} exited ({status}) before listening");
                    }
                    Ok(
                        TcpStream::connect_timeout(&r.addr, Duration::from_millis(200))
                            .is_ok()
                            .then_some(()),
                    )
                },
            );
            match serving {
                Err(e)
                    if e.to_string().contains("before listening")
                        && r.process.port_taken_since(logged)
                        && tries < 5 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => bail!("{e}:\n{}", r.process.log_text()),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Start an engine; returns its index once its control service answers.
    pub fn start_engine(&mut self, spec: &EngineSpec) -> Result<usize> {
        // A port picked free can be taken by another process before the
        // engine binds it: start again on new ports (a few times at most).
        for _ in 0..3 {
            let i = self.spawn_engine(spec)?;
            match self.wait_engine_ready(i, Duration::from_secs(60)) {
                Ok(()) => return Ok(i),
                Err(e) if e.to_string().contains("Address already in use") => {
                    self.engines.pop();
                    let _ = std::fs::remove_file(self.path().join(format!("engine-{i}.log")));
                }
                Err(e) => return Err(e),
            }
        }
        bail!(
            "engine for {}: its ports were taken three times",
            spec.volume
        )
    }

    /// Start an engine process without waiting for it to serve.
    pub fn spawn_engine(&mut self, spec: &EngineSpec) -> Result<usize> {
        let i = self.engines.len();
        // Held until the engine starts, so that nothing this fixture binds
        // meanwhile (a proxy) is given one of them.
        let bind = || TcpListener::bind("127.0.0.1:0");
        let held = [bind()?, bind()?, bind()?];
        let (control, nbd, iscsi) = (
            held[0].local_addr()?,
            held[1].local_addr()?,
            held[2].local_addr()?,
        );
        let mut args: Vec<String> = vec![
            "engine".into(),
            "--volume".into(),
            spec.volume.clone(),
            "--size".into(),
            spec.size.clone(),
            "--listen".into(),
            control.to_string(),
            "--nbd".into(),
            nbd.to_string(),
            "--iscsi".into(),
            iscsi.to_string(),
        ];
        let mut replica_addrs = Vec::new();
        for r in &spec.replicas {
            let addr = if spec.proxied {
                self.ensure_proxy(*r)?.to_string()
            } else {
                self.replicas[*r].addr.to_string()
            };
            args.push("--replica".into());
            args.push(addr.clone());
            replica_addrs.push(addr);
        }
        args.extend(spec.extra.iter().cloned());
        args.extend(self.tls.iter().cloned());
        let log = self.path().join(format!("engine-{i}.log"));
        drop(held);
        let process = Process::spawn_with_env(&format!("engine-{i}"), args, log, spec.env.clone())?;
        self.engines.push(Engine {
            volume: spec.volume.clone(),
            control,
            nbd,
            iscsi,
            process,
            replica_addrs,
        });
        Ok(i)
    }

    /// Wait until engine `i` answers `volume info`.
    pub fn wait_engine_ready(&mut self, i: usize, limit: Duration) -> Result<()> {
        poll(limit, &format!("engine-{i} to serve"), || {
            if let Some(status) = self.engines[i].process.exited() {
                bail!(
                    "engine-{i} exited ({status}) before serving:\n{}",
                    self.engines[i].process.log_text()
                );
            }
            // The control service answers while the engine still waits to
            // open the volume ("opening"); ready means serving.
            Ok(self
                .volume_info(i)
                .is_ok_and(|info| info["state"] != "opening")
                .then_some(()))
        })
    }

    /// Restart engine `i` with the same arguments (same ports: the story's
    /// clients know them). A port freed by the stop can be taken meanwhile
    /// (by another test's connection): tried again a few times, as the
    /// holder lets it go.
    pub fn restart_engine(&mut self, i: usize) -> Result<()> {
        let mut tries = 0;
        loop {
            let logged = self.engines[i].process.log_text().len();
            self.engines[i].process.start()?;
            match self.wait_engine_ready(i, Duration::from_secs(60)) {
                Err(_) if self.engines[i].process.port_taken_since(logged) && tries < 5 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// Copy `file` to engine `engine`'s volume at offset 0 with nbdcopy,
    /// flushing at the end.
    pub fn write_flushed(&self, engine: usize, file: &Path) -> Result<()> {
        tools::run_ok(
            "nbdcopy",
            &[
                "--flush",
                &file.display().to_string(),
                &self.engines[engine].nbd_uri(),
            ],
            Duration::from_secs(120),
        )?;
        Ok(())
    }

    /// The first `len` bytes of engine `engine`'s volume, read with nbdcopy.
    pub fn read_back(&self, engine: usize, len: usize) -> Result<Vec<u8>> {
        let out = self.path().join("readback");
        tools::run_ok(
            "nbdcopy",
            &[&self.engines[engine].nbd_uri(), &out.display().to_string()],
            Duration::from_secs(120),
        )?;
        let mut data = std::fs::read(&out)?;
        data.truncate(len);
        Ok(data)
    }

    /// Run `corral` with arguments, bounded in time.
    pub fn corral(&self, args: &[&str]) -> Result<Output> {
        run_bounded(
            Command::new(corral_bin()).args(args).args(&self.tls),
            Duration::from_secs(60),
        )
    }

    /// `corral volume --engine E --json info`.
    pub fn volume_info(&self, engine: usize) -> Result<Value> {
        let control = self.engines[engine].control.to_string();
        let out = self.corral(&["volume", "--engine", &control, "--json", "info"])?;
        if !out.status.success() {
            bail!("volume info: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `corral volume --engine E --json replica ls`.
    pub fn replica_ls(&self, engine: usize) -> Result<Vec<Value>> {
        let control = self.engines[engine].control.to_string();
        let out = self.corral(&["volume", "--engine", &control, "--json", "replica", "ls"])?;
        if !out.status.success() {
            bail!("replica ls: {}", String::from_utf8_lossy(&out.stderr));
        }
        match serde_json::from_slice(&out.stdout)? {
            Value::Array(items) => Ok(items),
            other => bail!("replica ls: expected an array, got {other}"),
        }
    }

    /// Mode ("RW", "WO", "ERR") of the replica at `addr` as engine `engine` reports it.
    pub fn replica_mode(&self, engine: usize, replica: usize) -> Result<String> {
        let addr = self.replica_address(engine, replica);
        for r in self.replica_ls(engine)? {
            if r["address"] == addr.as_str() {
                return Ok(r["mode"].as_str().unwrap_or_default().to_string());
            }
        }
        bail!("replica {addr} not listed by engine-{engine}")
    }

    /// Wait until `check` holds for the cluster, at most `limit` (see [`poll`]).
    pub fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        mut check: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        wait_until(limit, what, || check(self))
    }

    /// The head data file of `volume` on replica `i` (for comparing replicas
    /// byte for byte once they are stopped).
    pub fn head_file(&self, replica: usize, volume: &str) -> PathBuf {
        self.replicas[replica]
            .data_dir
            .join(volume)
            .join("head.img")
    }

    /// The proxy in front of replica daemon `replica`, made on first use
    /// (its address; set its mode with [`Cluster::proxy`]).
    pub fn ensure_proxy(&mut self, replica: usize) -> Result<SocketAddr> {
        if self.proxies.len() <= replica {
            self.proxies.resize_with(replica + 1, || None);
        }
        if self.proxies[replica].is_none() {
            self.proxies[replica] = Some(Proxy::start(self.replicas[replica].addr)?);
        }
        Ok(self.proxies[replica].as_ref().map(Proxy::addr).unwrap())
    }

    /// The proxy in front of replica daemon `replica` (panics if no proxied
    /// engine uses it). Its mode applies to every engine's connections;
    /// [`Cluster::link`] sets one engine's.
    pub fn proxy(&self, replica: usize) -> &Proxy {
        self.proxies
            .get(replica)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| {
                panic!("no proxy for replica-{replica}: use EngineSpec::via_proxies")
            })
    }

    /// Set how the network between engine `engine` (its current process)
    /// and replica `replica` behaves, leaving other engines' links alone.
    pub fn link(&self, engine: usize, replica: usize, mode: Mode) -> Result<()> {
        let pid = self.engines[engine]
            .process
            .pid()
            .with_context(|| format!("engine-{engine} is not running"))?;
        self.proxy(replica).set_mode_for(pid, mode);
        Ok(())
    }

    /// A network partition: `engines` and `replicas` on one side, every
    /// other replica — and every other engine, including engines started
    /// later — on the other. Needs the replicas' proxies (proxied engines).
    pub fn partition(&self, engines: &[usize], replicas: &[usize]) -> Result<()> {
        let pids = engines
            .iter()
            .map(|e| {
                self.engines[*e]
                    .process
                    .pid()
                    .with_context(|| format!("engine-{e} is not running"))
            })
            .collect::<Result<Vec<_>>>()?;
        for (r, proxy) in self.proxies.iter().enumerate() {
            let Some(proxy) = proxy else { continue };
            let (ours, others) = if replicas.contains(&r) {
                (Mode::Pass, Mode::BlackHole)
            } else {
                (Mode::BlackHole, Mode::Pass)
            };
            for pid in &pids {
                proxy.set_mode_for(*pid, ours);
            }
            proxy.set_mode(others);
        }
        Ok(())
    }

    /// Heal every proxy: everything passes again.
    pub fn heal(&self) {
        for p in self.proxies.iter().flatten() {
            p.heal();
        }
    }

    /// The address engine `engine` knows replica `replica` by (its proxy's
    /// when the engine is proxied).
    pub fn replica_address(&self, engine: usize, replica: usize) -> String {
        let direct = self.replicas[replica].addr.to_string();
        let proxied = self
            .proxies
            .get(replica)
            .and_then(Option::as_ref)
            .map(|p| p.addr().to_string());
        let named = &self.engines[engine].replica_addrs;
        match proxied {
            Some(p) if named.contains(&p) => p,
            _ => direct,
        }
    }

    /// The newest rebuild into replica `replica` that `volume info` of
    /// engine `engine` lists, if any.
    pub fn rebuild_of(&self, engine: usize, replica: usize) -> Result<Option<Value>> {
        let addr = self.replica_address(engine, replica);
        let info = self.volume_info(engine)?;
        Ok(info["rebuilds"]
            .as_array()
            .and_then(|list| list.iter().rev().find(|r| r["address"] == addr.as_str()))
            .cloned())
    }

    /// The newest rebuild into `replica` once it has ended (the engine
    /// records the outcome just after the replica turns RW, so it may still
    /// read "running" for a moment after that).
    pub fn finished_rebuild(&self, engine: usize, replica: usize) -> Result<Value> {
        poll(Duration::from_secs(30), "a finished rebuild", || {
            Ok(self
                .rebuild_of(engine, replica)?
                .filter(|r| r["state"] != "running"))
        })
        .with_context(|| format!("replica-{replica}"))
    }

    /// `corral volume --engine E --json verify`: Ok(report) when the RW
    /// replicas are identical, an error with the differences otherwise.
    pub fn verify(&self, engine: usize) -> Result<Value> {
        let control = self.engines[engine].control.to_string();
        let out = self.corral(&["volume", "--engine", &control, "--json", "verify"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "volume verify failed ({}): {stdout} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_str(&stdout)?)
    }

    /// Wait until engine `engine` reports `state` ("serving", "degraded",
    /// "unavailable", "fenced", "opening"); returns its last `volume info`.
    pub fn wait_state(&self, engine: usize, state: &str, limit: Duration) -> Result<Value> {
        let mut last = None;
        poll(limit, &format!("engine-{engine} {state}"), || {
            let info = self.volume_info(engine).ok();
            let done = info.as_ref().is_some_and(|i| i["state"] == state);
            last = info.clone();
            Ok(info.filter(|_| done))
        })
        .with_context(|| format!("last info {last:?}"))
    }

    /// Wait until engine `engine` reports replica `replica` in `mode`.
    pub fn wait_mode(
        &self,
        engine: usize,
        replica: usize,
        mode: &str,
        limit: Duration,
    ) -> Result<()> {
        self.wait_until(
            limit,
            &format!("replica-{replica} {mode} on engine-{engine}"),
            |c| c.replica_mode(engine, replica).ok().as_deref() == Some(mode),
        )
        .with_context(|| format!("{:?}", self.replica_ls(engine)))
    }

    /// Start a replica daemon whose data dir is a tmpfs of `size` (`mount -o
    /// size=`, e.g. "8m"): a small disk that fills up. Needs root; the file
    /// system is unmounted when the cluster is dropped.
    pub fn start_replica_on_tmpfs(&mut self, size: &str) -> Result<usize> {
        let i = self.replicas.len();
        let data_dir = self.path().join(format!("replica-{i}"));
        std::fs::create_dir_all(&data_dir)?;
        let out = run_bounded(
            Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &data_dir.display().to_string(),
            ]),
            Duration::from_secs(10),
        )?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs on {} failed (the test needs root): {}",
                data_dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.mounts.push(data_dir);
        let j = self.start_replica()?;
        debug_assert_eq!(i, j);
        Ok(j)
    }

    /// Stop everything cleanly: engines first, then replica daemons.
    pub fn stop_all(&mut self) -> Result<()> {
        for e in &mut self.engines {
            if e.process.pid().is_some() {
                let status = e.process.terminate(Duration::from_secs(20))?;
                if !status.success() {
                    bail!("{} exited with {status} on SIGTERM", e.process.name);
                }
            }
        }
        for r in &mut self.replicas {
            if r.process.pid().is_some() {
                let status = r.process.terminate(Duration::from_secs(20))?;
                if !status.success() {
                    bail!("{} exited with {status} on SIGTERM", r.process.name);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.print_logs_if_failing();
        // CORRAL_TEST_KEEP=1 keeps a failing test's directory (logs, data).
        if std::thread::panicking() && std::env::var_os("CORRAL_TEST_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.path().display());
        }
        if !self.mounts.is_empty() {
            // Nothing may hold files on a tmpfs we unmount.
            for e in &mut self.engines {
                let _ = e.process.kill9();
            }
            for r in &mut self.replicas {
                let _ = r.process.kill9();
            }
            for m in self.mounts.drain(..) {
                if let Ok(path) = std::ffi::CString::new(m.display().to_string()) {
                    // SAFETY: a valid C string; MNT_DETACH so a busy mount still goes.
                    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}

impl Cluster {
    fn print_logs_if_failing(&self) {
        if std::thread::panicking() {
            // CORRAL_TEST_LOG_LINES=N prints more of each log.
            let keep = std::env::var("CORRAL_TEST_LOG_LINES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(40usize);
            self.print_log_tails(keep);
        }
    }

    /// Print the last `keep` lines of every process's log to stderr.
    pub fn print_log_tails(&self, keep: usize) {
        for p in self
            .engines
            .iter()
            .map(|e| &e.process)
            .chain(self.replicas.iter().map(|r| &r.process))
        {
            let text = p.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- last lines of {} ({}) -----", p.name, p.log.display());
            for l in &lines[lines.len().saturating_sub(keep)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Run a command with a time limit; kill it when over.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    match wait_exit(&mut child, limit, &format!("{cmd:?} to finish")) {
        Ok(_) => Ok(child.wait_with_output()?),
        Err(e) => {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!("{e}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Compare two files byte for byte; returns the first differing offset.
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    use std::io::Read;
    let mut fa = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a)?);
    let mut fb = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b)?);
    let mut ba = vec![0u8; 1 << 16];
    let mut bb = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if n == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }

    fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}
