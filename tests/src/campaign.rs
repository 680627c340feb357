//! A randomized fault campaign, in the manner of Jepsen: real processes,
//! a seeded schedule of faults, and writers that know what they were told.
//!
//! Three replica daemons and an engine serve one volume. Verifying writers
//! (one lane each, see [`crate::checker`]) write, flush and read back
//! through NBD the whole time, reconnecting whenever the engine goes away;
//! the [`Checker`] records per block every acknowledged and every flushed
//! write and every write whose outcome is unknown. A fault injector driven
//! by one seeded random generator kills (`-9`) and restarts replica
//! daemons — at random, the one being rebuilt, the one already out —
//! pauses them (`SIGSTOP`, shorter and longer than the replica timeout),
//! replaces a disk (kills a daemon and wipes its data) while the others
//! are RW, and kills and restarts the engine.
//!
//! Every read-back during the run must return the block's newest
//! acknowledged write or a later attempted one. At the end every process
//! is brought back, every replica must return to RW, `corral volume
//! verify` must find them identical, and every block must hold its newest
//! acknowledged write (or a later attempted one) — read through the engine
//! and from each replica's own data file. (Across an engine kill the
//! contract promises only flushed writes; kill -9 keeps the page cache, so
//! the campaign holds corral to the stronger rule.)
//!
//! The same seed makes the same schedule of faults; what the processes do
//! in between varies with timing, so a seed replays a run's faults, not
//! every interleaving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checker::{BLOCK, Checker, Load, STRIPE_BLOCKS, pattern};
use crate::nbd_raw::{CMD_FLUSH, CMD_READ, CMD_WRITE, RawNbd};
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
}

impl CampaignConfig {
    pub fn new(seed: u64, duration: Duration) -> Self {
        CampaignConfig {
            seed,
            duration,
            size_mib: 96,
            writers: 4,
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
    pub flushes_acked: u64,
    pub readbacks: u64,
    pub reconnects: u64,
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
            "seed {} for {:.0?}: faults: {}; writes acknowledged {}, failed {}; flushes {}; read-backs {}; reconnects {}; blocks flushed {}/{}",
            self.seed,
            self.duration,
            faults.join(", "),
            self.writes_acked,
            self.writes_failed,
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
}

/// Run one campaign.
pub fn run(cfg: &CampaignConfig) -> Result<Report> {
    eprintln!(
        "fault campaign: seed {} for {:?} (replay: CORRAL_CAMPAIGN_SEED={})",
        cfg.seed, cfg.duration, cfg.seed
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
    let e = cluster.start_engine(&engine_spec(cfg.size_mib))?;
    let size = cfg.size_mib * MIB;
    let checker = Checker::new(size);
    checker
        .write_ok(cluster.engines[e].nbd, VOLUME, Load::fill(0, size))
        .context("initial fill")?;

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let writers: Vec<JoinHandle<()>> = (0..cfg.writers)
        .map(|lane| {
            let mut w = CampaignWriter {
                checker: checker.clone(),
                addr: cluster.engines[e].nbd,
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

    let mut injector = Injector::new(cfg.seed);
    let started = Instant::now();
    let outcome = injector.run(cluster, e, started + cfg.duration, &violations);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let _ = w.join();
    }
    outcome?;
    heal(cluster, e, &mut injector)?;

    let mut report = Report {
        seed: cfg.seed,
        duration: cfg.duration,
        faults: injector.counts.clone(),
        writes_acked: counters.acked.load(Ordering::SeqCst),
        writes_failed: counters.failed.load(Ordering::SeqCst),
        flushes_acked: counters.flushes.load(Ordering::SeqCst),
        readbacks: counters.readbacks.load(Ordering::SeqCst),
        reconnects: counters.reconnects.load(Ordering::SeqCst),
        flushed_blocks: (0, 0),
    };
    let found = std::mem::take(&mut *violations.lock().unwrap_or_else(|p| p.into_inner()));
    if !found.is_empty() {
        bail!(
            "{report}\n{} read-back(s) returned lost or wrong data:\n{}",
            found.len(),
            found.join("\n")
        );
    }

    // Every replica back to RW and identical; every acknowledged write there.
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
    Ok(report)
}

/// Bring every process back and wait until every replica is RW.
fn heal(cluster: &mut Cluster, e: usize, injector: &mut Injector) -> Result<()> {
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
    if cluster.engines[e].process.exited().is_some() || cluster.engines[e].process.pid().is_none() {
        cluster.engines[e].process.start()?;
    }
    cluster.wait_engine_ready(e, Duration::from_secs(180))?;
    cluster
        .wait_until(
            Duration::from_secs(180),
            "every replica RW after healing",
            |c| {
                c.volume_info(e).is_ok_and(|i| {
                    i["replicas_rw"] == REPLICAS as u64 && i["replicas_total"] == REPLICAS as u64
                })
            },
        )
        .with_context(|| format!("replicas: {:?}", cluster.replica_ls(e)))
}

#[derive(Clone, Copy, Debug)]
enum Later {
    Resume(usize),
    Restart(usize),
    RestartEngine,
}

/// The fault schedule: one seeded generator decides every fault.
struct Injector {
    rng: StdRng,
    counts: BTreeMap<&'static str, u64>,
    later: Vec<(Instant, Later)>,
    paused: [bool; REPLICAS],
    down: [bool; REPLICAS],
    engine_down: bool,
}

impl Injector {
    fn new(seed: u64) -> Self {
        Injector {
            rng: StdRng::seed_from_u64(seed),
            counts: BTreeMap::new(),
            later: Vec::new(),
            paused: [false; REPLICAS],
            down: [false; REPLICAS],
            engine_down: false,
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn after(&mut self, lo_ms: u64, hi_ms: u64, what: Later) {
        let wait = Duration::from_millis(self.rng.random_range(lo_ms..=hi_ms));
        self.later.push((Instant::now() + wait, what));
    }

    /// A replica daemon that is up and running.
    fn pick_live(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..REPLICAS)
            .filter(|r| !self.down[*r] && !self.paused[*r])
            .collect();
        (!live.is_empty()).then(|| live[self.rng.random_range(0..live.len())])
    }

    /// A live replica the engine reports in `mode`.
    fn pick_in_mode(&mut self, cluster: &Cluster, e: usize, mode: &str) -> Option<usize> {
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

    fn run(
        &mut self,
        cluster: &mut Cluster,
        e: usize,
        until: Instant,
        violations: &Mutex<Vec<String>>,
    ) -> Result<()> {
        while Instant::now() < until {
            let nap = self.rng.random_range(200..1500);
            let wake = Instant::now() + Duration::from_millis(nap);
            while Instant::now() < wake {
                self.due(cluster, e)?;
                std::thread::sleep(Duration::from_millis(50));
            }
            if !violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return Ok(()); // stop early: the writers found lost data
            }
            match self.rng.random_range(0..14) {
                0..=3 => {
                    if let Some(r) = self.pick_live() {
                        self.kill(cluster, r, "replica killed")?;
                    }
                }
                4..=5 => {
                    if !self.engine_down
                        && let Some(r) = self.pick_in_mode(cluster, e, "WO")
                    {
                        self.kill(cluster, r, "replica killed mid-rebuild")?;
                    }
                }
                6 => {
                    if !self.engine_down
                        && let Some(r) = self.pick_in_mode(cluster, e, "ERR")
                    {
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
                    if !self.engine_down {
                        cluster.engines[e].process.kill9()?;
                        self.engine_down = true;
                        self.count("engine killed");
                        self.after(0, 2000, Later::RestartEngine);
                    }
                }
                _ => self.replace_disk(cluster, e)?,
            }
        }
        Ok(())
    }

    /// A disk is replaced — only while every replica is RW, so that the
    /// others keep every acknowledged write.
    fn replace_disk(&mut self, cluster: &mut Cluster, e: usize) -> Result<()> {
        if self.engine_down || self.down.iter().chain(&self.paused).any(|b| *b) {
            return Ok(());
        }
        let all_rw = cluster
            .volume_info(e)
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
    fn due(&mut self, cluster: &mut Cluster, e: usize) -> Result<()> {
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
                Later::RestartEngine => {
                    if self.engine_down {
                        cluster.engines[e].process.start()?;
                        self.engine_down = false;
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
    },
    /// The writes acknowledged before it was sent: (block, tag).
    Flush(Vec<(u64, u64)>),
}

/// One verifying writer that outlives its connections.
struct CampaignWriter {
    checker: Checker,
    addr: SocketAddr,
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
            match RawNbd::connect(self.addr, VOLUME) {
                Ok(nbd) => {
                    if let Err(e) = self.session(nbd) {
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

    fn session(&mut self, mut nbd: RawNbd) -> Result<()> {
        let depth = 4;
        let mut inflight: HashMap<u64, Pending> = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut acked_since_flush: Vec<(u64, u64)> = Vec::new();
        let mut flushes = 0u64;
        let mut since_flush = 0u32;
        let mut since_readback = 0u32;
        loop {
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
                }) => {
                    busy.remove(&stripe);
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
