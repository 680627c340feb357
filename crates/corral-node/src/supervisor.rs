//! The async shell of one engine's supervision: a task that owns the
//! [`Supervision`] state machine and the engine process, turns what happens
//! (the process ends, it starts serving, a stop is requested, a timer
//! fires) into events, and carries out the machine's actions (spawn,
//! signal, wake up, forget). It publishes an [`EngineSnapshot`] after every
//! step for the manager to read or wait on.
//!
//! When the daemon shuts down the task ends and leaves the process
//! running: the record brings it back under supervision at the next start.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_client::{EngineControl, ReplicaControl};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::process::{EngineProcess, Launcher, send_signal};
use crate::record::EngineBook;
use crate::spec::{EngineAddresses, EngineSpec};
use crate::supervision::{Action, Event, Phase, RestartPolicy, Supervision};

/// How long a replica may take to say its epoch before a restart.
const SUPERSEDED_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an engine's control port is asked whether it serves yet.
const READINESS_POLL: Duration = Duration::from_millis(200);

/// What every supervisor of a daemon shares.
#[derive(Clone)]
pub struct SupervisorContext {
    pub launcher: Arc<Launcher>,
    pub book: Arc<EngineBook>,
    pub policy: RestartPolicy,
    /// How often an adopted process (not our child) is checked.
    pub adopted_poll: Duration,
    /// The daemon's shutdown: supervisors end, engines keep running.
    pub shutdown: CancellationToken,
}

/// One engine as its supervisor last saw it.
#[derive(Clone, Debug)]
pub struct EngineSnapshot {
    pub phase: Phase,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub exits: u64,
    pub last_exit: Option<String>,
    /// Where the output of the last process that ended starts in the log.
    pub last_exit_log_offset: u64,
}

/// A running supervision: the handle the manager keeps.
pub struct EngineSupervisor {
    pub spec: EngineSpec,
    pub addresses: EngineAddresses,
    status: watch::Receiver<EngineSnapshot>,
    stop: CancellationToken,
}

/// Resolves with the epoch the engine serves at.
type Probe = Pin<Box<dyn Future<Output = u64> + Send>>;

struct Shell {
    ctx: SupervisorContext,
    spec: EngineSpec,
    addresses: EngineAddresses,
    machine: Supervision,
    process: Option<EngineProcess>,
    probe: Option<Probe>,
    wake: Option<Instant>,
    log_offset: u64,
    last_exit_log_offset: u64,
    stop: CancellationToken,
    stop_fed: bool,
    status: watch::Sender<EngineSnapshot>,
}

impl EngineSupervisor {
    /// Supervise `spec`'s engine on `addresses`: start a process, or adopt
    /// `adopt` (a live process of it found at daemon start).
    pub fn start(
        ctx: SupervisorContext,
        spec: EngineSpec,
        addresses: EngineAddresses,
        adopt: Option<u32>,
    ) -> Self {
        let now = Instant::now();
        let (machine, actions, process) = match adopt {
            Some(pid) => (
                Supervision::adopt(ctx.policy, pid, now),
                vec![],
                Some(EngineProcess::Adopted {
                    pid,
                    volume: spec.volume.clone(),
                    control: addresses.control,
                    poll: ctx.adopted_poll,
                }),
            ),
            None => {
                let (m, a) = Supervision::start(ctx.policy);
                (m, a, None)
            }
        };
        let log_offset =
            std::fs::metadata(ctx.launcher.log_path(&spec.volume)).map_or(0, |m| m.len());
        let probe = process.is_some().then(|| readiness(addresses.control));
        let (status, rx) = watch::channel(snapshot(&machine, log_offset));
        let stop = CancellationToken::new();
        let shell = Shell {
            ctx,
            spec: spec.clone(),
            addresses,
            machine,
            process,
            probe,
            wake: None,
            log_offset,
            last_exit_log_offset: log_offset,
            stop: stop.clone(),
            stop_fed: false,
            status,
        };
        tokio::spawn(shell.run(actions));
        EngineSupervisor {
            spec,
            addresses,
            status: rx,
            stop,
        }
    }

    /// The engine now.
    pub fn snapshot(&self) -> EngineSnapshot {
        self.status.borrow().clone()
    }

    /// Follow its snapshots (closed when the supervision ends).
    pub fn subscribe(&self) -> watch::Receiver<EngineSnapshot> {
        self.status.clone()
    }

    /// Ask for the engine to be stopped (idempotent).
    pub fn request_stop(&self) {
        self.stop.cancel();
    }
}

fn snapshot(m: &Supervision, last_exit_log_offset: u64) -> EngineSnapshot {
    EngineSnapshot {
        phase: m.phase(),
        pid: m.pid(),
        restarts: m.restarts(),
        exits: m.exits(),
        last_exit: m.last_exit().map(str::to_string),
        last_exit_log_offset,
    }
}

/// Resolves once the engine at `control` answers and no longer opens.
fn readiness(control: SocketAddr) -> Probe {
    let addr = control.to_string();
    Box::pin(async move {
        loop {
            if let Ok(engine) = EngineControl::connect(&addr, Duration::from_secs(2)).await
                && let Ok(info) = engine.info().await
                && info.state != "opening"
            {
                return info.epoch;
            }
            tokio::time::sleep(READINESS_POLL).await;
        }
    })
}

async fn ended(process: &mut Option<EngineProcess>) -> String {
    match process {
        Some(p) => p.ended().await,
        None => std::future::pending().await,
    }
}

async fn served(probe: &mut Option<Probe>) -> u64 {
    match probe {
        Some(p) => p.await,
        None => std::future::pending().await,
    }
}

async fn woken(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Whether another engine has taken the volume over since ours last
/// served: a replica records a higher epoch than the one it held (a newer
/// engine opened it elsewhere, or the controller fenced it after losing
/// this node). Such an engine must not come back: it would fence the one
/// that now serves the volume.
async fn superseded(book: Arc<EngineBook>, spec: EngineSpec) -> Option<(String, u64, u64)> {
    let volume = &spec.volume;
    let held = book.engines().await.get(volume)?.epoch?;
    for addr in &spec.replicas {
        let Ok(control) = ReplicaControl::connect(addr, SUPERSEDED_CHECK_TIMEOUT).await else {
            continue;
        };
        if let Ok(info) = control.get(volume).await
            && info.epoch > held
        {
            return Some((addr.clone(), info.epoch, held));
        }
    }
    None
}

impl Shell {
    async fn run(mut self, first: Vec<Action>) {
        let volume = self.spec.volume.clone();
        let mut actions = first;
        loop {
            self.act(actions).await;
            self.status
                .send_replace(snapshot(&self.machine, self.last_exit_log_offset));
            if self.machine.phase() == Phase::Stopped {
                info!(volume = %volume, "engine stopped");
                return;
            }
            let event = tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => {
                    if let Some(p) = &self.process {
                        info!(volume = %volume, pid = p.pid(), "daemon stopping; the engine keeps running");
                    }
                    return;
                }
                _ = self.stop.cancelled(), if !self.stop_fed => {
                    self.stop_fed = true;
                    Event::StopRequested
                }
                how = ended(&mut self.process) => {
                    self.process = None;
                    self.probe = None;
                    self.last_exit_log_offset = self.log_offset;
                    if !matches!(self.machine.phase(), Phase::Stopping { .. }) {
                        warn!(volume = %volume, %how, "engine exited");
                    }
                    Event::Exited { how }
                }
                epoch = served(&mut self.probe) => {
                    self.probe = None;
                    info!(volume = %volume, epoch, "engine serving");
                    if let Err(e) = self.ctx.book.set_epoch(&volume, epoch).await {
                        warn!(volume = %volume, error = %e, "cannot record the engine's epoch");
                    }
                    Event::Serving
                }
                _ = woken(self.wake) => {
                    self.wake = None;
                    Event::Tick
                }
            };
            actions = self.machine.handle(event, Instant::now());
        }
    }

    /// Carry out `actions`, and those the events they cause bring.
    async fn act(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let follow = match action {
                Action::Spawn => self.spawn().await,
                Action::WakeAt(at) => {
                    self.wake = Some(at);
                    vec![]
                }
                Action::Signal { pid, signal } => {
                    let sent = match &self.process {
                        Some(p) if p.pid() == pid => p.signal(signal),
                        _ => send_signal(pid, signal),
                    };
                    match sent {
                        Ok(()) => {
                            info!(volume = %self.spec.volume, pid, ?signal, "signalled engine")
                        }
                        Err(e) => {
                            warn!(volume = %self.spec.volume, pid, ?signal, error = %e, "cannot signal engine")
                        }
                    }
                    vec![]
                }
                Action::Forget => vec![],
            };
            queue.extend(follow);
        }
    }

    /// Start a process; the machine's answer to how that went.
    async fn spawn(&mut self) -> Vec<Action> {
        let check = superseded(Arc::clone(&self.ctx.book), self.spec.clone());
        if let Some((replica, epoch, held)) = check.await {
            warn!(volume = %self.spec.volume, %replica, epoch, held, "a newer engine owns the volume: not restarting this one, forgetting it");
            if let Err(e) = self.ctx.book.remove(&self.spec.volume).await {
                warn!(volume = %self.spec.volume, error = %e, "cannot forget the engine");
            }
            return self.machine.handle(Event::StopRequested, Instant::now());
        }
        // The record's spec is the one to start: replica changes made
        // while the engine ran (AddEngineReplica, RemoveEngineReplica)
        // are written there.
        if let Some(recorded) = self.ctx.book.engines().await.get(&self.spec.volume) {
            self.spec = recorded.spec.clone();
        }
        let event = match self.ctx.launcher.spawn(&self.spec, &self.addresses) {
            Ok(launched) => {
                let pid = launched.pid;
                info!(volume = %self.spec.volume, pid, control = %self.addresses.control, "started engine");
                self.log_offset = launched.log_offset;
                self.process = Some(EngineProcess::Child {
                    child: launched.child,
                    pid,
                });
                self.probe = Some(readiness(self.addresses.control));
                if let Err(e) = self.ctx.book.set_pid(&self.spec.volume, pid).await {
                    warn!(volume = %self.spec.volume, error = %e, "cannot record the engine's pid");
                }
                Event::Spawned { pid }
            }
            Err(e) => {
                warn!(volume = %self.spec.volume, error = %e, "cannot start engine");
                Event::SpawnFailed {
                    reason: e.to_string(),
                }
            }
        };
        self.machine.handle(event, Instant::now())
    }
}
