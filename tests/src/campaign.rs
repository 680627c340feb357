//! A randomized fault campaign, in the manner of Jepsen: real processes,
//! a seeded schedule of faults, and writers that know what they were told.
//!
//! Three replica daemons and an engine serve one volume; the engine reaches
//! each replica through a fault-injecting proxy ([`crate::proxy`]).
//! Verifying writers (one lane each, see [`crate::checker`]) write, flush
//! and read back through NBD the whole time, reconnecting whenever the
//! engine goes away and moving to whichever engine serves the volume now;
//! the [`Checker`] records per block every acknowledged and every flushed
//! write and every write whose outcome is unknown. A fault injector driven
//! by one seeded random generator
//!
//! - kills (`-9`) and restarts replica daemons — at random, the one being
//!   rebuilt, the one already out — and pauses them (`SIGSTOP`, shorter and
//!   longer than the replica timeout);
//! - replaces a disk (kills a daemon and wipes its data) while the others
//!   are RW;
//! - kills and restarts the engine, and pauses it;
//! - cuts the network between the engine and one replica, or a majority of
//!   them, slows a link (under and past the replica timeout) or makes it
//!   reset every connection, each healed after a random time shorter or
//!   longer than the replica timeout;
//! - has a second engine take the volume over, as a node daemon or the CSI
//!   plugin moves a volume: a new engine process opens it on the same
//!   replica daemons at a higher epoch, fencing the old one, which was
//!   killed first, paused (and resumed once the new one serves), left alive
//!   (the writers stay on it a while after the new one serves), or left
//!   alive on the minority side of a partition. The old one is killed a few
//!   seconds later. Only an engine that serves is taken over from;
//! - restarts a killed engine and starts a second one at the same moment,
//!   both opening the volume at once ([`CampaignConfig::racing_opens`]):
//!   they must not both serve at one epoch.
//!
//! Every read-back during the run must return the block's newest
//! acknowledged write or a later attempted one, and no write sent to an
//! engine after a newer one began serving may be acknowledged (the newer
//! one had fenced a majority of the replicas). At the end every process is
//! brought back, every replica must return to RW, `corral volume verify`
//! must find them identical, and every block must hold its newest
//! acknowledged write (or a later attempted one) — whichever engine
//! acknowledged it — read through the engine and from each replica's own
//! data file. (Across an engine kill the contract promises only flushed
//! writes; kill -9 keeps the page cache, so the campaign holds corral to
//! the stronger rule.)
//!
//! The same seed makes the same schedule of faults; what the processes do
//! in between varies with timing, so a seed replays a run's faults, not
//! every interleaving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checker::{BLOCK, Checker, Load, STRIPE_BLOCKS, pattern};
use serde_json::Value;

use crate::nbd_raw::{CMD_FLUSH, CMD_READ, CMD_WRITE, RawNbd};
use crate::proxy::Mode;
use crate::{Cluster, EngineSpec};

const MIB: u64 = 1 << 20;
const VOLUME: &str = "camp";
const REPLICAS: usize = 3;

/// What one campaign runs.
#[derive(Clone, Debug)]
pub struct CampaignConfig {
    pub seed: u64,
    /// How long faults are injected (healing and checking come after).
    pub duration: Duration,
    pub size_mib: u64,
    pub writers: u64,
    /// Sometimes restart a killed engine and start a second one at the
    /// same moment, both opening the volume at once (on by default).
    pub racing_opens: bool,
}

impl CampaignConfig {
    pub fn new(seed: u64, duration: Duration) -> Self {
        CampaignConfig {
            seed,
            duration,
            size_mib: 96,
            writers: 4,
            racing_opens: true,
        }
    }
}

/// What a campaign did and found (it returns an error on any violation).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub duration: Duration,
    pub faults: BTreeMap<&'static str, u64>,
    pub writes_acked: u64,
    pub writes_failed: u64,
    /// Writes sent to an engine after a newer one had taken over (each
    /// must fail: the old engine is fenced).
    pub refused_after_takeover: u64,
    pub flushes_acked: u64,
    pub readbacks: u64,
    pub reconnects: u64,
    /// Engine processes of the volume (the first and every one that took over).
    pub engines: usize,
    /// Blocks whose newest acknowledged write was also flushed, of all
    /// blocks with an acknowledged write.
    pub flushed_blocks: (u64, u64),
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        write!(
            f,
            "seed {} for {:.0?}: faults: {}; engines {}; writes acknowledged {}, failed {} ({} sent to a superseded engine, all refused); flushes {}; read-backs {}; reconnects {}; blocks flushed {}/{}",
            self.seed,
            self.duration,
            faults.join(", "),
            self.engines,
            self.writes_acked,
            self.writes_failed,
            self.refused_after_takeover,
            self.flushes_acked,
            self.readbacks,
            self.reconnects,
            self.flushed_blocks.0,
            self.flushed_blocks.1
        )
    }
}

/// The engine of a campaign: failures noticed in seconds, returns retried
/// often, a stale timeout short enough to pass during a run, rebuilds slow
/// enough to be interrupted, and an open timeout that outlasts any outage.
pub fn engine_spec(size_mib: u64) -> EngineSpec {
    EngineSpec::new(VOLUME, &format!("{size_mib}MiB"), &[0, 1, 2])
        .set("--replica-timeout", "2s")
        .arg("--replica-retry-interval", "300ms")
        .arg("--stale-replica-timeout", "8s")
        .arg("--rebuild-bandwidth", "48MiB")
        .arg("--open-timeout", "600s")
        .via_proxies()
}

/// Run one campaign.
pub fn run(cfg: &CampaignConfig) -> Result<Report> {
    eprintln!(
        "fault campaign: seed {} for {:?}{} (replay: CORRAL_CAMPAIGN_SEED={})",
        cfg.seed,
        cfg.duration,
        if cfg.racing_opens {
            ""
        } else {
            ", no racing opens"
        },
        cfg.seed
    );
    let mut cluster = Cluster::with_replicas(REPLICAS)?;
    let outcome = run_on(&mut cluster, cfg);
    if outcome.is_err() {
        // CORRAL_TEST_KEEP=1 keeps a failed campaign's logs and data.
        cluster.print_log_tails(60);
        if std::env::var_os("CORRAL_TEST_KEEP").is_some() {
            cluster.dir.disable_cleanup(true);
            eprintln!("kept {}", cluster.path().display());
        }
    }
    outcome
}

fn run_on(cluster: &mut Cluster, cfg: &CampaignConfig) -> Result<Report> {
    let spec = engine_spec(cfg.size_mib);
    let e = cluster.start_engine(&spec)?;
    let size = cfg.size_mib * MIB;
    let checker = Checker::new(size);
    checker
        .write_ok(cluster.engines[e].nbd, VOLUME, Load::fill(0, size))
        .context("initial fill")?;

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let target = Arc::new(Target::new(e, cluster.engines[e].nbd));
    let writers: Vec<JoinHandle<()>> = (0..cfg.writers)
        .map(|lane| {
            let mut w = CampaignWriter {
                checker: checker.clone(),
                target: Arc::clone(&target),
                lane,
                lanes: cfg.writers,
                rng: StdRng::seed_from_u64(cfg.seed ^ (lane + 1).wrapping_mul(0x9E37_79B9)),
                stop: Arc::clone(&stop),
                counters: Arc::clone(&counters),
                violations: Arc::clone(&violations),
            };
            std::thread::Builder::new()
                .name(format!("campaign-writer-{lane}"))
                .spawn(move || w.run())
                .expect("spawn writer")
        })
        .collect();

    let mut injector = Injector::new(cfg, e, spec, Arc::clone(&target), Arc::clone(&violations));
    let started = Instant::now();
    let outcome = injector.run(cluster, started + cfg.duration);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let _ = w.join();
    }
    outcome?;
    if let Err(e) = heal(cluster, &mut injector) {
        let found = violations.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if found.is_empty() {
            return Err(e);
        }
        bail!(
            "{} violation(s) during the run:\n{}\nhealing failed: {e:#}",
            found.len(),
            found.join("\n")
        );
    }
    let e = injector.engine;

    let mut report = Report {
        seed: cfg.seed,
        duration: cfg.duration,
        faults: injector.counts.clone(),
        writes_acked: counters.acked.load(Ordering::SeqCst),
        writes_failed: counters.failed.load(Ordering::SeqCst),
        refused_after_takeover: counters.refused_late.load(Ordering::SeqCst),
        flushes_acked: counters.flushes.load(Ordering::SeqCst),
        readbacks: counters.readbacks.load(Ordering::SeqCst),
        reconnects: counters.reconnects.load(Ordering::SeqCst),
        engines: cluster.engines.len(),
        flushed_blocks: (0, 0),
    };
    let found = std::mem::take(&mut *violations.lock().unwrap_or_else(|p| p.into_inner()));
    let checked = final_checks(cluster, &checker, e, &mut report);
    if !found.is_empty() {
        // What the end found too: were acknowledged writes lost?
        let end = match checked {
            Ok(()) => "every replica identical, every acknowledged write present".to_string(),
            Err(e) => format!("{e:#}"),
        };
        bail!(
            "{report}\n{} violation(s) during the run:\n{}\nat the end: {end}",
            found.len(),
            found.join("\n")
        );
    }
    checked?;
    Ok(report)
}

/// Every replica back to RW and identical; every acknowledged write there,
/// through engine `e` and in each replica's own data.
fn final_checks(
    cluster: &mut Cluster,
    checker: &Checker,
    e: usize,
    report: &mut Report,
) -> Result<()> {
    let nbd = cluster.engines[e].nbd;
    checker.flush(nbd, VOLUME).context("final flush")?;
    let verify = cluster.verify(e);
    let identical =
        matches!(&verify, Ok(v) if v["differences"].as_array().map(Vec::len) == Some(0));
    if !identical {
        // Say which replicas hold every acknowledged write and which lost some.
        let verify = match verify {
            Ok(v) => v.to_string(),
            Err(e) => format!("{e:#}"),
        };
        cluster.stop_all()?;
        let own: Vec<String> = (0..REPLICAS)
            .map(|r| match checker.verify_image(&cluster.head_file(r, VOLUME)) {
                Ok(v) => format!(
                    "replica-{r}: every acknowledged write ({} blocks hold a write of unknown outcome)",
                    v.unknown_outcome_blocks
                ),
                Err(e) => format!("replica-{r}: {e:#}"),
            })
            .collect();
        bail!("{report}: replicas differ: {verify}\n{}", own.join("\n"));
    }
    for _ in 0..REPLICAS {
        checker
            .verify(nbd, VOLUME)
            .with_context(|| format!("{report}: through the engine"))?;
    }
    report.flushed_blocks = checker.flushed_share();
    cluster.stop_all()?;
    for r in 0..REPLICAS {
        checker
            .verify_image(&cluster.head_file(r, VOLUME))
            .with_context(|| format!("{report}: replica-{r}'s own data"))?;
    }
    Ok(())
}

/// Bring every process back and wait until every replica is RW.
fn heal(cluster: &mut Cluster, injector: &mut Injector) -> Result<()> {
    cluster.heal();
    for r in 0..REPLICAS {
        if injector.paused[r] {
            cluster.replicas[r].process.resume()?;
            injector.paused[r] = false;
        }
        if cluster.replicas[r].process.exited().is_some()
            || cluster.replicas[r].process.pid().is_none()
        {
            cluster.restart_replica(r)?;
        }
    }
    // An engine taking over finishes doing so; every engine it replaces goes.
    if let Some(t) = injector.takeover.take() {
        resume_engine(cluster, t.from)?;
        cluster.wait_engine_ready(t.to, Duration::from_secs(180))?;
        injector.target.took_over(t.to);
        injector.engine = t.to;
        injector.engine_paused = false;
        injector.engine_down = false;
        injector.superseded.push(t.from);
    }
    for old in std::mem::take(&mut injector.superseded) {
        cluster.engines[old].process.kill9()?;
    }
    let e = injector.engine;
    // Fenced by an engine that raced it and is gone now: open again.
    if cluster.volume_info(e).is_ok_and(|i| i["state"] == "fenced") {
        cluster.engines[e].process.kill9()?;
    }
    if injector.engine_paused {
        resume_engine(cluster, e)?;
        injector.engine_paused = false;
    }
    if cluster.engines[e].process.exited().is_some() || cluster.engines[e].process.pid().is_none() {
        cluster.engines[e].process.start()?;
    }
    cluster.wait_engine_ready(e, Duration::from_secs(180))?;
    // An engine that raced this one may have opened at a higher epoch just
    // before it was killed above, and this one learns that it is fenced
    // only at its next request to a replica that engine reached: reopen
    // it (a new, higher epoch) whenever it says so, as an orchestrator
    // would. Each such reopen needs another racing engine to have fenced
    // it, and they are all gone: a few reopens are plenty.
    let mut reopens = 0;
    let waited = crate::poll(
        Duration::from_secs(180),
        "every replica RW after healing",
        || {
            let info = cluster.volume_info(e);
            if reopens < 3 && info.as_ref().is_ok_and(|i| i["state"] == "fenced") {
                reopens += 1;
                cluster.engines[e].process.kill9()?;
                cluster.engines[e].process.start()?;
                cluster.wait_engine_ready(e, Duration::from_secs(180))?;
                return Ok(None);
            }
            Ok(info
                .is_ok_and(|i| {
                    i["replicas_rw"] == REPLICAS as u64 && i["replicas_total"] == REPLICAS as u64
                })
                .then_some(()))
        },
    );
    waited.with_context(|| format!("replicas: {:?}", cluster.replica_ls(e)))
}

/// SIGCONT to engine `e` if it is running.
fn resume_engine(cluster: &Cluster, e: usize) -> Result<()> {
    if cluster.engines[e].process.pid().is_some() {
        cluster.engines[e].process.resume()?;
    }
    Ok(())
}

/// Where the writers connect, and which engine has taken over last.
struct Target {
    /// The engine serving now (index into the cluster's engines) and its
    /// NBD address: writers connected elsewhere move there.
    now: Mutex<(usize, SocketAddr)>,
    /// The newest engine known to serve after taking over — it had fenced
    /// a majority of the replicas. A write sent to an older engine after
    /// this was set must never be acknowledged.
    serving: AtomicUsize,
}

impl Target {
    fn new(engine: usize, nbd: SocketAddr) -> Self {
        Target {
            now: Mutex::new((engine, nbd)),
            serving: AtomicUsize::new(engine),
        }
    }

    fn now(&self) -> (usize, SocketAddr) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Engine `engine` serves after taking over; writers stay where they
    /// are until [`Target::follow`].
    fn took_over(&self, engine: usize) {
        self.serving.fetch_max(engine, Ordering::SeqCst);
    }

    /// Writers move to `engine`.
    fn follow(&self, engine: usize, nbd: SocketAddr) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = (engine, nbd);
    }

    /// Has an engine newer than `engine` taken over?
    fn superseded(&self, engine: usize) -> bool {
        self.serving.load(Ordering::SeqCst) > engine
    }
}

#[derive(Clone, Copy, Debug)]
enum Later {
    Resume(usize),
    Restart(usize),
    /// Restart engine `e` (the current one, killed); with `true`, start a
    /// second engine for the volume at the same moment.
    RestartEngine(usize, bool),
    /// SIGCONT to engine `e`.
    ResumeEngine(usize),
    /// The network between process `pid` (an engine) and these replicas
    /// passes again.
    HealLinks {
        pid: i32,
        replicas: [Option<usize>; 2],
    },
    /// Writers move to engine `e`.
    Follow(usize),
    /// Engine `e`, superseded, is killed.
    Retire(usize),
}

/// What happens to the old engine while a new one takes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Old {
    /// Killed (-9) first, as when its node dies.
    Killed,
    /// Paused (SIGSTOP) until the new one serves, then resumed: it wakes
    /// with requests in flight into replicas that now refuse it.
    Paused,
    /// Left alive and serving: the new one fences it while writers still
    /// write through it, and they stay a while after.
    Alive,
    /// Left alive but cut off from a majority of the replicas (a partition
    /// with the engine on the minority side).
    CutOff,
    /// Restarted a moment before, opening the volume at the same time as
    /// the new one. Whichever opens last fences the other; they must never
    /// both serve at one epoch. Writers follow the new one.
    Opening,
}

/// A new engine opening the volume to replace `from`.
#[derive(Clone, Copy, Debug)]
struct Takeover {
    from: usize,
    to: usize,
    old: Old,
    next_look: Instant,
}

/// The fault schedule: one seeded generator decides every fault.
struct Injector {
    rng: StdRng,
    counts: BTreeMap<&'static str, u64>,
    later: Vec<(Instant, Later)>,
    paused: [bool; REPLICAS],
    down: [bool; REPLICAS],
    /// The engine serving (or to serve) the volume.
    engine: usize,
    spec: EngineSpec,
    target: Arc<Target>,
    engine_down: bool,
    engine_paused: bool,
    /// A network fault between the engine and replicas is on.
    link_fault: bool,
    takeover: Option<Takeover>,
    /// Engines replaced by a newer one and still running (fenced).
    superseded: Vec<usize>,
    violations: Arc<Mutex<Vec<String>>>,
    racing_opens: bool,
}

impl Injector {
    fn new(
        cfg: &CampaignConfig,
        engine: usize,
        spec: EngineSpec,
        target: Arc<Target>,
        violations: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        Injector {
            violations,
            racing_opens: cfg.racing_opens,
            rng: StdRng::seed_from_u64(cfg.seed),
            counts: BTreeMap::new(),
            later: Vec::new(),
            paused: [false; REPLICAS],
            down: [false; REPLICAS],
            engine,
            spec,
            target,
            engine_down: false,
            engine_paused: false,
            link_fault: false,
            takeover: None,
            superseded: Vec::new(),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn after(&mut self, lo_ms: u64, hi_ms: u64, what: Later) {
        let wait = Duration::from_millis(self.rng.random_range(lo_ms..=hi_ms));
        self.later.push((Instant::now() + wait, what));
    }

    /// The engine runs, unpaused, and no other is taking over: it answers
    /// its control service and may take an engine fault.
    fn engine_steady(&self) -> bool {
        !self.engine_down && !self.engine_paused && self.takeover.is_none()
    }

    /// A replica daemon that is up and running.
    fn pick_live(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..REPLICAS)
            .filter(|r| !self.down[*r] && !self.paused[*r])
            .collect();
        (!live.is_empty()).then(|| live[self.rng.random_range(0..live.len())])
    }

    /// A live replica the engine reports in `mode`.
    fn pick_in_mode(&mut self, cluster: &Cluster, mode: &str) -> Option<usize> {
        if !self.engine_steady() {
            return None;
        }
        let e = self.engine;
        let listed = cluster.replica_ls(e).ok()?;
        let matching: Vec<usize> = (0..REPLICAS)
            .filter(|r| !self.down[*r] && !self.paused[*r])
            .filter(|r| {
                let addr = cluster.replica_address(e, *r);
                listed
                    .iter()
                    .any(|l| l["address"] == addr.as_str() && l["mode"] == mode)
            })
            .collect();
        (!matching.is_empty()).then(|| matching[self.rng.random_range(0..matching.len())])
    }

    fn kill(&mut self, cluster: &mut Cluster, r: usize, what: &'static str) -> Result<()> {
        cluster.replicas[r].process.kill9()?;
        self.down[r] = true;
        self.count(what);
        self.after(300, 6000, Later::Restart(r));
        Ok(())
    }

    fn run(&mut self, cluster: &mut Cluster, until: Instant) -> Result<()> {
        while Instant::now() < until {
            let nap = self.rng.random_range(200..1500);
            let wake = Instant::now() + Duration::from_millis(nap);
            while Instant::now() < wake {
                self.due(cluster)?;
                std::thread::sleep(Duration::from_millis(50));
            }
            if !self
                .violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return Ok(()); // stop early: the writers found lost data
            }
            match self.rng.random_range(0..24) {
                0..=3 => {
                    if let Some(r) = self.pick_live() {
                        self.kill(cluster, r, "replica killed")?;
                    }
                }
                4..=5 => {
                    if let Some(r) = self.pick_in_mode(cluster, "WO") {
                        self.kill(cluster, r, "replica killed mid-rebuild")?;
                    }
                }
                6 => {
                    if let Some(r) = self.pick_in_mode(cluster, "ERR") {
                        self.kill(cluster, r, "replica killed while out")?;
                    }
                }
                7..=9 => {
                    if let Some(r) = self.pick_live() {
                        cluster.replicas[r].process.pause()?;
                        self.paused[r] = true;
                        self.count("replica paused");
                        self.after(300, 4000, Later::Resume(r));
                    }
                }
                10..=11 => {
                    if self.engine_steady() {
                        cluster.engines[self.engine].process.kill9()?;
                        self.engine_down = true;
                        self.count("engine killed");
                        // Drawn either way: the same seed, the same schedule.
                        let race = self.rng.random_range(0..3) == 0 && self.racing_opens;
                        self.after(0, 2000, Later::RestartEngine(self.engine, race));
                    }
                }
                12 => self.replace_disk(cluster)?,
                13..=18 => self.network(cluster)?,
                19 => {
                    if self.engine_steady() {
                        cluster.engines[self.engine].process.pause()?;
                        self.engine_paused = true;
                        self.count("engine paused");
                        self.after(300, 4000, Later::ResumeEngine(self.engine));
                    }
                }
                _ => self.take_over(cluster)?,
            }
        }
        Ok(())
    }

    /// A network fault between the engine and replicas, through the
    /// proxies (for this engine process only): one replica cut off, a
    /// majority cut off, a slow link (under or past the replica timeout),
    /// a link that resets every connection. Each heals after a while,
    /// shorter or longer than the replica timeout.
    fn network(&mut self, cluster: &mut Cluster) -> Result<()> {
        if !self.engine_steady() || self.link_fault {
            return Ok(());
        }
        let e = self.engine;
        let pid = cluster.engines[e]
            .process
            .pid()
            .context("the engine is not running")?;
        let r = self.rng.random_range(0..REPLICAS);
        let (mode, replicas, heal_ms, what) = match self.rng.random_range(0..6) {
            0..=1 => (Mode::BlackHole, [Some(r), None], (300, 6000), "link cut"),
            2 => {
                let other = (r + self.rng.random_range(1..REPLICAS)) % REPLICAS;
                (
                    Mode::BlackHole,
                    [Some(r), Some(other)],
                    (300, 4000),
                    "majority cut off",
                )
            }
            3 => {
                let ms = self.rng.random_range(5..=250);
                (
                    Mode::Delay(Duration::from_millis(ms)),
                    [Some(r), None],
                    (1000, 6000),
                    "link slow",
                )
            }
            4 => {
                // Each way: a round trip takes longer than the replica timeout.
                let ms = self.rng.random_range(1200..=3000);
                (
                    Mode::Delay(Duration::from_millis(ms)),
                    [Some(r), None],
                    (1000, 6000),
                    "link slower than the timeout",
                )
            }
            _ => (Mode::Reset, [Some(r), None], (300, 4000), "link reset"),
        };
        for r in replicas.into_iter().flatten() {
            cluster.link(e, r, mode)?;
        }
        self.link_fault = true;
        self.count(what);
        self.after(heal_ms.0, heal_ms.1, Later::HealLinks { pid, replicas });
        Ok(())
    }

    /// A second engine opens the volume on the same replicas, as a node
    /// daemon or CSI moves a volume: it opens them at a higher epoch,
    /// fencing the old engine, which is killed, paused, left alive, or
    /// left alive on the minority side of a partition.
    fn take_over(&mut self, cluster: &mut Cluster) -> Result<()> {
        if !self.engine_steady() {
            return Ok(());
        }
        let from = self.engine;
        // Only from an engine that serves: one still opening may yet open
        // at a higher epoch than the new one (that race is its own fault,
        // see Old::Opening).
        let serving = cluster
            .volume_info(from)
            .is_ok_and(|i| i["state"] != "opening");
        if !serving {
            return Ok(());
        }
        let old = match self.rng.random_range(0..4) {
            0 => Old::Killed,
            1 => Old::Paused,
            2 => Old::Alive,
            _ => Old::CutOff,
        };
        match old {
            Old::Killed => {
                cluster.engines[from].process.kill9()?;
                self.count("takeover, old engine killed");
            }
            Old::Paused => {
                cluster.engines[from].process.pause()?;
                self.count("takeover, old engine paused");
            }
            Old::Alive => self.count("takeover, old engine alive"),
            Old::Opening => unreachable!("chosen above"),
            Old::CutOff => {
                let keep = self.rng.random_range(0..REPLICAS);
                for r in (0..REPLICAS).filter(|r| *r != keep) {
                    cluster.link(from, r, Mode::BlackHole)?;
                }
                self.count("takeover, old engine cut off");
            }
        }
        let to = cluster.spawn_engine(&self.spec)?;
        self.takeover = Some(Takeover {
            from,
            to,
            old,
            next_look: Instant::now(),
        });
        Ok(())
    }

    /// Has the engine taking over opened the volume? Then it serves.
    fn look_at_takeover(&mut self, cluster: &mut Cluster) -> Result<()> {
        let Some(t) = self.takeover else {
            return Ok(());
        };
        if Instant::now() < t.next_look {
            return Ok(());
        }
        if let Some(status) = cluster.engines[t.to].process.exited() {
            bail!(
                "engine-{} exited ({status}) while taking over:\n{}",
                t.to,
                cluster.engines[t.to].process.log_text()
            );
        }
        let info = cluster
            .volume_info(t.to)
            .ok()
            .filter(|i| i["state"] != "opening");
        let Some(info) = info else {
            self.takeover = Some(Takeover {
                next_look: Instant::now() + Duration::from_millis(250),
                ..t
            });
            return Ok(());
        };
        self.takeover = None;
        self.count("takeover done");
        if t.old == Old::Opening {
            return self.after_race(cluster, t, &info);
        }
        let nbd = cluster.engines[t.to].nbd;
        self.target.took_over(t.to);
        self.engine = t.to;
        self.superseded.push(t.from);
        match t.old {
            Old::Killed => self.target.follow(t.to, nbd),
            Old::Paused => {
                self.after(0, 1500, Later::ResumeEngine(t.from));
                self.after(0, 1500, Later::Follow(t.to));
            }
            Old::Alive | Old::CutOff => self.after(300, 3000, Later::Follow(t.to)),
            Old::Opening => unreachable!("handled by after_race"),
        }
        self.after(3000, 6000, Later::Retire(t.from));
        Ok(())
    }

    /// Two engines opened the volume at once and the new one serves: they
    /// must not both serve at one epoch. The old one goes at once (it may
    /// have opened last and fenced the new one: then the new one opens
    /// again).
    fn after_race(&mut self, cluster: &mut Cluster, t: Takeover, to_info: &Value) -> Result<()> {
        if let Ok(from_info) = cluster.volume_info(t.from)
            && from_info["state"] != "opening"
            && from_info["state"] != "fenced"
            && from_info["epoch"] == to_info["epoch"]
        {
            self.violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!(
                    "engine-{} and engine-{} both serve at epoch {} (engine-{}: {from_info}; engine-{}: {to_info})",
                    t.from, t.to, to_info["epoch"], t.from, t.to
                ));
        }
        cluster.engines[t.from].process.kill9()?;
        self.engine = t.to;
        let fenced = cluster
            .volume_info(t.to)
            .is_ok_and(|i| i["state"] == "fenced");
        if fenced {
            self.count("new engine fenced by the other, reopened");
            cluster.engines[t.to].process.kill9()?;
            cluster.engines[t.to].process.start()?;
        }
        self.target.follow(t.to, cluster.engines[t.to].nbd);
        Ok(())
    }

    /// A disk is replaced — only while every replica is RW, so that the
    /// others keep every acknowledged write.
    fn replace_disk(&mut self, cluster: &mut Cluster) -> Result<()> {
        if !self.engine_steady() || self.down.iter().chain(&self.paused).any(|b| *b) {
            return Ok(());
        }
        let all_rw = cluster
            .volume_info(self.engine)
            .is_ok_and(|i| i["replicas_rw"] == REPLICAS as u64);
        if !all_rw {
            return Ok(());
        }
        let r = self.rng.random_range(0..REPLICAS);
        cluster.replicas[r].process.kill9()?;
        let dir = cluster.replicas[r].data_dir.join(VOLUME);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("wipe {}", dir.display()))?;
        }
        self.down[r] = true;
        self.count("disk replaced");
        self.after(0, 3000, Later::Restart(r));
        Ok(())
    }

    /// Carry out what was scheduled for now.
    fn due(&mut self, cluster: &mut Cluster) -> Result<()> {
        self.look_at_takeover(cluster)?;
        let now = Instant::now();
        let (ready, rest): (Vec<_>, Vec<_>) = self.later.drain(..).partition(|(t, _)| *t <= now);
        self.later = rest;
        for (_, what) in ready {
            match what {
                Later::Resume(r) => {
                    if self.paused[r] {
                        cluster.replicas[r].process.resume()?;
                        self.paused[r] = false;
                    }
                }
                Later::Restart(r) => {
                    if self.down[r] {
                        cluster.restart_replica(r)?;
                        self.down[r] = false;
                    }
                }
                Later::RestartEngine(e, race) => {
                    if self.engine_down && e == self.engine {
                        cluster.engines[e].process.start()?;
                        self.engine_down = false;
                        if race && self.takeover.is_none() {
                            // Both open the volume at once: the epochs they
                            // choose must differ (one fences the other).
                            let to = cluster.spawn_engine(&self.spec)?;
                            self.count("two engines opening at once");
                            self.takeover = Some(Takeover {
                                from: e,
                                to,
                                old: Old::Opening,
                                next_look: Instant::now(),
                            });
                        }
                    }
                }
                Later::ResumeEngine(e) => {
                    resume_engine(cluster, e)?;
                    if e == self.engine {
                        self.engine_paused = false;
                    }
                }
                Later::HealLinks { pid, replicas } => {
                    for r in replicas.into_iter().flatten() {
                        cluster.proxy(r).set_mode_for(pid, Mode::Pass);
                    }
                    self.link_fault = false;
                }
                Later::Follow(e) => {
                    // Unless yet another engine has taken over meanwhile.
                    if e == self.engine {
                        self.target.follow(e, cluster.engines[e].nbd);
                    }
                }
                Later::Retire(e) => {
                    if e != self.engine {
                        if cluster.engines[e].process.pid().is_some() {
                            // What the old engine says of itself by now.
                            let state = cluster
                                .volume_info(e)
                                .ok()
                                .and_then(|i| i["state"].as_str().map(str::to_string));
                            self.count(match state.as_deref() {
                                Some("fenced") => "old engine retired: fenced",
                                Some("unavailable") => "old engine retired: unavailable",
                                Some("serving") => "old engine retired: serving",
                                Some("degraded") => "old engine retired: degraded",
                                Some(_) => "old engine retired: other state",
                                None => "old engine retired: no answer",
                            });
                        }
                        cluster.engines[e].process.kill9()?;
                        self.superseded.retain(|s| *s != e);
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    failed: AtomicU64,
    refused_late: AtomicU64,
    flushes: AtomicU64,
    readbacks: AtomicU64,
    reconnects: AtomicU64,
}

/// Flush cookies have this bit set; a read-back's cookie is 1 << 62.
const FLUSH: u64 = 1 << 63;
const READBACK: u64 = 1 << 62;

enum Pending {
    Write {
        first: u64,
        count: u64,
        stripe: u64,
        /// Sent after a newer engine than this connection's had taken over.
        late: bool,
    },
    /// The writes acknowledged before it was sent: (block, tag).
    Flush(Vec<(u64, u64)>),
}

/// One verifying writer that outlives its connections.
struct CampaignWriter {
    checker: Checker,
    target: Arc<Target>,
    lane: u64,
    lanes: u64,
    rng: StdRng,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl CampaignWriter {
    fn run(&mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            let (engine, addr) = self.target.now();
            match RawNbd::connect(addr, VOLUME) {
                Ok(nbd) => {
                    if let Err(e) = self.session(nbd, engine) {
                        // The connection broke: whatever was in flight stays
                        // of unknown outcome in the checker.
                        let _ = e;
                        self.counters.reconnects.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Stripes of this writer's lane.
    fn stripe(&mut self) -> u64 {
        let stripes = self.checker.size() / (BLOCK * STRIPE_BLOCKS);
        let s = self.rng.random_range(0..stripes / self.lanes) * self.lanes + self.lane;
        s.min(stripes - 1)
    }

    /// Write, flush and read back through `nbd`, a connection to engine
    /// `engine`, until stopped or told to move to another engine.
    fn session(&mut self, mut nbd: RawNbd, engine: usize) -> Result<()> {
        let depth = 4;
        let mut inflight: HashMap<u64, Pending> = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut acked_since_flush: Vec<(u64, u64)> = Vec::new();
        let mut flushes = 0u64;
        let mut since_flush = 0u32;
        let mut since_readback = 0u32;
        loop {
            if self.target.now().0 != engine {
                // Another engine serves: what is in flight here stays of
                // unknown outcome.
                return Ok(());
            }
            let stopping = self.stop.load(Ordering::SeqCst);
            // Every 24 writes, drain and read one block back.
            let draining = since_readback >= 24;
            while !stopping && !draining && inflight.len() < depth {
                if since_flush >= 16 {
                    since_flush = 0;
                    flushes += 1;
                    let cookie = FLUSH | flushes;
                    inflight.insert(
                        cookie,
                        Pending::Flush(std::mem::take(&mut acked_since_flush)),
                    );
                    nbd.send(CMD_FLUSH, cookie, 0, 0, &[])?;
                    continue;
                }
                let stripe = self.stripe();
                if busy.contains(&stripe) {
                    break;
                }
                let count = self.rng.random_range(1..=STRIPE_BLOCKS);
                let first =
                    stripe * STRIPE_BLOCKS + self.rng.random_range(0..=STRIPE_BLOCKS - count);
                let tag = self.checker.tag();
                let mut data = vec![0u8; (count * BLOCK) as usize];
                for (i, b) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
                    pattern(first + i as u64, tag, b);
                }
                self.checker.sent(first, count, tag);
                inflight.insert(
                    tag,
                    Pending::Write {
                        first,
                        count,
                        stripe,
                        late: self.target.superseded(engine),
                    },
                );
                busy.insert(stripe);
                since_flush += 1;
                since_readback += 1;
                nbd.send(CMD_WRITE, tag, first * BLOCK, data.len() as u32, &data)?;
            }
            if inflight.is_empty() {
                if stopping {
                    return Ok(());
                }
                if since_readback >= 24 {
                    since_readback = 0;
                    self.read_back(&mut nbd)?;
                }
                continue;
            }
            let (cookie, error, _) = nbd.reply(0)?;
            match inflight.remove(&cookie) {
                Some(Pending::Write {
                    first,
                    count,
                    stripe,
                    late,
                }) => {
                    busy.remove(&stripe);
                    if error == 0 && late {
                        self.violations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!(
                                "engine-{engine} acknowledged a write (blocks {first}..{}, tag {cookie}) sent after engine-{} had taken over",
                                first + count,
                                self.target.serving.load(Ordering::SeqCst)
                            ));
                    }
                    if late && error != 0 {
                        self.counters.refused_late.fetch_add(1, Ordering::SeqCst);
                    }
                    if error == 0 {
                        self.checker.acked(first, count, cookie);
                        acked_since_flush.extend((first..first + count).map(|b| (b, cookie)));
                        self.counters.acked.fetch_add(1, Ordering::SeqCst);
                    } else {
                        self.counters.failed.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Some(Pending::Flush(covered)) => {
                    if error == 0 {
                        self.checker.flushed(&covered);
                        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // Not durable as far as we know: try them again
                        // with the next flush.
                        acked_since_flush.extend(covered);
                    }
                }
                None => bail!("reply to a request never sent (cookie {cookie})"),
            }
        }
    }

    /// Read one block of this writer's lane (nothing is in flight) and check it.
    fn read_back(&mut self, nbd: &mut RawNbd) -> Result<()> {
        let stripe = self.stripe();
        let block = stripe * STRIPE_BLOCKS + self.rng.random_range(0..STRIPE_BLOCKS);
        nbd.send(CMD_READ, READBACK, block * BLOCK, BLOCK as u32, &[])?;
        let (cookie, error, data) = nbd.reply(BLOCK as usize)?;
        if cookie != READBACK {
            bail!("read-back answered with cookie {cookie}");
        }
        if error != 0 {
            return Ok(()); // the volume cannot serve it now: no verdict
        }
        self.counters.readbacks.fetch_add(1, Ordering::SeqCst);
        if let Err(why) = self.checker.check_block(block, &data) {
            self.violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("read-back of {why}"));
        }
        Ok(())
    }
}
