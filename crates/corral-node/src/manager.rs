//! The engine manager: which engines run on this node. It validates start
//! requests, hands out ports, keeps the record ([`crate::record::EngineBook`]) in step
//! with the supervisors ([`EngineSupervisor`]), brings the recorded engines
//! back when the daemon starts (adopting those still alive), and answers
//! for the node (identity, capacity). The gRPC service is a thin layer over
//! it (`service`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_client::EngineControl;
use corral_proto::v1 as pb;
use corral_replica::ReplicaRegistry;
use tracing::{info, warn};

use crate::error::NodeError;
use crate::ports::{PortRange, bindable};
use crate::process::{is_our_engine, log_tail};
use crate::record::EngineRecord;
use crate::spec::{EngineAddresses, EngineSpec, iscsi_target};
use crate::supervision::Phase;
use crate::supervisor::{EngineSnapshot, EngineSupervisor, SupervisorContext};

/// Lines of an engine's log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// What the manager needs to know about its node.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub node_id: String,
    pub data_dir: PathBuf,
    /// The address engines serve their control and frontends on.
    pub frontend_ip: IpAddr,
    /// This daemon's replica address as engines should name it.
    pub replica_address: String,
    pub engine_ports: PortRange,
    /// How long StartEngine waits for an engine to serve.
    pub start_timeout: Duration,
}

/// Bound on a call relayed to an engine's control service.
const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A clone's fill that makes no progress for this long is given up.
pub const CLONE_STUCK_AFTER: Duration = Duration::from_secs(60);
/// Bound on a snapshot relayed to an engine: it drains writes and syncs
/// every replica, which takes seconds under a heavy write load.
const SNAPSHOT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one backup written through an engine: as long as its data
/// takes to read and put.
const BACKUP_CALL_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// How long a CreateEngineBackup call waits for its backup before
/// answering that it is still being written.
pub const BACKUP_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A backup of [`EngineManager::backup`]: volume, target, backup name.
type BackupKey = (String, String, String);
/// How a backup ended: its report, or its error as a status code and text.
type BackupOutcome = Result<pb::CreateBackupResponse, (tonic::Code, String)>;

/// A backup written in the background.
struct BackupJob {
    /// The snapshot it backs up (not to be deleted while it runs).
    snapshot: String,
    outcome: tokio::sync::watch::Receiver<Option<BackupOutcome>>,
}

/// The engines of this node.
pub struct EngineManager {
    config: ManagerConfig,
    context: SupervisorContext,
    registry: Arc<ReplicaRegistry>,
    engines: Mutex<BTreeMap<String, Arc<EngineSupervisor>>>,
    /// Start and stop of one volume take turns.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Volumes whose engine runs for one call only ([`EngineManager::snapshot`]).
    transient: Mutex<BTreeSet<String>>,
    /// Backups being written, or written and not yet reported.
    backups: Mutex<HashMap<BackupKey, BackupJob>>,
}

impl EngineManager {
    /// A manager over `context.book`'s record: every recorded engine is
    /// brought back (adopted if its process is alive, started otherwise).
    pub async fn open(
        config: ManagerConfig,
        context: SupervisorContext,
        registry: Arc<ReplicaRegistry>,
    ) -> Arc<Self> {
        let manager = Arc::new(EngineManager {
            config,
            context,
            registry,
            engines: Mutex::new(BTreeMap::new()),
            turns: Mutex::new(HashMap::new()),
            transient: Mutex::new(BTreeSet::new()),
            backups: Mutex::new(HashMap::new()),
        });
        for (volume, record) in manager.context.book.engines().await {
            if record.transient {
                // The call it ran for ended with the daemon: stop it.
                manager.end_transient(&volume, &record).await;
                continue;
            }
            let alive = record
                .pid
                .filter(|pid| is_our_engine(*pid, &volume, record.addresses.control));
            match alive {
                Some(pid) => {
                    info!(volume = %volume, pid, "adopting the recorded engine, still running")
                }
                None => info!(volume = %volume, "restarting the recorded engine"),
            }
            let supervisor = EngineSupervisor::start(
                manager.context.clone(),
                record.spec,
                record.addresses,
                alive,
            );
            manager.lock().insert(volume, Arc::new(supervisor));
        }
        manager
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<EngineSupervisor>>> {
        // Inserts and removes are single operations: a poisoned map is whole.
        self.engines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn turn(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(turns.entry(volume.to_string()).or_default())
    }

    /// The volume's supervision; one that has ended on its own (a newer
    /// engine took the volume over) is dropped here.
    fn supervisor(&self, volume: &str) -> Option<Arc<EngineSupervisor>> {
        let mut engines = self.lock();
        if engines
            .get(volume)
            .is_some_and(|s| s.snapshot().phase == Phase::Stopped)
        {
            engines.remove(volume);
        }
        engines.get(volume).cloned()
    }

    /// Start `spec`'s engine, or return the one running with the same spec.
    pub async fn start(&self, spec: &pb::EngineSpec) -> Result<pb::EngineStatus, NodeError> {
        let spec = EngineSpec::from_pb(spec)?;
        let turn = self.turn(&spec.volume);
        let _turn = turn.lock().await;
        self.start_in_turn(spec, false).await
    }

    /// [`Self::start`], the volume's turn held; a `transient` engine is
    /// recorded as such.
    async fn start_in_turn(
        &self,
        spec: EngineSpec,
        transient: bool,
    ) -> Result<pb::EngineStatus, NodeError> {
        if self.context.shutdown.is_cancelled() {
            return Err(NodeError::ShuttingDown);
        }
        if let Some(running) = self.supervisor(&spec.volume) {
            let differs = running.spec.differences(&spec);
            if !differs.is_empty() {
                return Err(NodeError::SpecDiffers {
                    volume: spec.volume,
                    differs: differs.join(", "),
                });
            }
            if running.snapshot().phase == Phase::Running {
                return Ok(self.status(&running));
            }
            return self.until_serving(&running, false).await;
        }
        let addresses = self.record_new(&spec, transient).await?;
        if transient {
            self.transients().insert(spec.volume.clone());
        }
        info!(volume = %spec.volume, transient, control = %addresses.control, nbd = ?addresses.nbd, iscsi = ?addresses.iscsi, "starting engine");
        let supervisor = Arc::new(EngineSupervisor::start(
            self.context.clone(),
            spec.clone(),
            addresses,
            None,
        ));
        self.lock()
            .insert(spec.volume.clone(), Arc::clone(&supervisor));
        match self.until_serving(&supervisor, true).await {
            Err(failed @ NodeError::EngineFailed { .. }) => {
                // A new engine that cannot start leaves nothing behind.
                if let Err(e) = self.stop_and_forget(&spec.volume, &supervisor).await {
                    warn!(volume = %spec.volume, error = %e, "cannot clean up a failed engine");
                }
                Err(failed)
            }
            other => other,
        }
    }

    /// Give a new engine its ports and record it.
    async fn record_new(
        &self,
        spec: &EngineSpec,
        transient: bool,
    ) -> Result<EngineAddresses, NodeError> {
        let range = self.config.engine_ports;
        let ip = self.config.frontend_ip;
        self.context
            .book
            .update(|engines| {
                let taken: BTreeSet<u16> =
                    engines.values().flat_map(|r| r.addresses.ports()).collect();
                let needed = spec.ports_needed();
                let no_ports = || NodeError::NoPorts {
                    range: range.to_string(),
                    needed,
                };
                let ports = range
                    .allocate(needed, &taken, |port| bindable(ip, port))
                    .ok_or_else(no_ports)?;
                let addresses = EngineAddresses::assign(ip, spec, &ports).ok_or_else(no_ports)?;
                engines.insert(
                    spec.volume.clone(),
                    EngineRecord {
                        spec: spec.clone(),
                        addresses,
                        pid: None,
                        epoch: None,
                        transient,
                    },
                );
                Ok(addresses)
            })
            .await
    }

    /// Wait (bounded by the start timeout) until the engine serves; an exit
    /// in the meantime is an error quoting its log. At the timeout, the
    /// status as it is (starting, or backing off).
    async fn until_serving(
        &self,
        supervisor: &EngineSupervisor,
        new: bool,
    ) -> Result<pb::EngineStatus, NodeError> {
        let mut status = supervisor.subscribe();
        let exits_before = status.borrow().exits;
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        loop {
            let seen = status.borrow_and_update().clone();
            if seen.phase == Phase::Running {
                return Ok(self.status(supervisor));
            }
            if seen.exits > exits_before {
                let volume = supervisor.spec.volume.clone();
                let log = self.context.launcher.log_path(&volume);
                let log_tail = log_tail(&log, seen.last_exit_log_offset, LOG_TAIL_LINES);
                let exit = seen.last_exit.unwrap_or_default();
                return Err(if new {
                    NodeError::EngineFailed {
                        volume,
                        exit,
                        log_tail,
                    }
                } else {
                    NodeError::EngineRestarting {
                        volume,
                        exit,
                        log_tail,
                    }
                });
            }
            if seen.phase == Phase::Stopped {
                return Err(NodeError::NotFound(supervisor.spec.volume.clone()));
            }
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return Err(NodeError::ShuttingDown);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(self.status(supervisor)),
            }
        }
    }

    /// Stop the volume's engine (flushing first) and forget it. Unknown: Ok.
    pub async fn stop(&self, volume: &str) -> Result<(), NodeError> {
        let turn = self.turn(volume);
        let _turn = turn.lock().await;
        let Some(supervisor) = self.supervisor(volume) else {
            return Ok(());
        };
        self.stop_and_forget(volume, &supervisor).await
    }

    async fn stop_and_forget(
        &self,
        volume: &str,
        supervisor: &EngineSupervisor,
    ) -> Result<(), NodeError> {
        let mut status = supervisor.subscribe();
        supervisor.request_stop();
        // SIGKILL follows SIGTERM after the stop timeout; then it must end.
        let limit = self.context.policy.stop_timeout + Duration::from_secs(10);
        let stopped = tokio::time::timeout(limit, async {
            loop {
                if status.borrow_and_update().phase == Phase::Stopped {
                    return true;
                }
                if status.changed().await.is_err() {
                    // The supervision ended: stopped, or the daemon stops.
                    return status.borrow().phase == Phase::Stopped;
                }
            }
        })
        .await;
        match stopped {
            Ok(true) => {}
            Ok(false) => return Err(NodeError::ShuttingDown),
            Err(_) => return Err(NodeError::StopTimedOut(volume.to_string())),
        }
        self.lock().remove(volume);
        self.transients().remove(volume);
        self.context
            .book
            .update(|engines| {
                engines.remove(volume);
                Ok(())
            })
            .await?;
        info!(volume = %volume, "engine stopped and forgotten");
        Ok(())
    }

    /// The control client of the volume's running engine.
    async fn engine_control(&self, volume: &str) -> Result<EngineControl, NodeError> {
        let supervisor = self
            .supervisor(volume)
            .ok_or_else(|| NodeError::NotFound(volume.to_string()))?;
        self.control_of(&supervisor, ENGINE_CALL_TIMEOUT).await
    }

    async fn control_of(
        &self,
        supervisor: &EngineSupervisor,
        timeout: Duration,
    ) -> Result<EngineControl, NodeError> {
        let addr = supervisor.addresses.control.to_string();
        Ok(EngineControl::connect(&addr, timeout).await?)
    }

    /// The engine's replicas as it sees them.
    pub async fn engine_replicas(&self, volume: &str) -> Result<Vec<pb::ReplicaStatus>, NodeError> {
        Ok(self.engine_control(volume).await?.replicas().await?)
    }

    /// Add (`add`) or remove a replica of the running engine, and make the
    /// record's spec follow so that a restart opens the new set.
    pub async fn change_engine_replica(
        &self,
        volume: &str,
        address: &str,
        add: bool,
    ) -> Result<String, NodeError> {
        if address.trim().is_empty() {
            return Err(NodeError::bad_spec("address", "empty"));
        }
        let turn = self.turn(volume);
        let _turn = turn.lock().await;
        let control = self.engine_control(volume).await?;
        let message = if add {
            control.add_replica(address).await?
        } else {
            control.remove_replica(address).await?
        };
        self.context
            .book
            .update(|engines| {
                if let Some(r) = engines.get_mut(volume) {
                    r.spec.replicas.retain(|a| a != address);
                    if add {
                        r.spec.replicas.push(address.to_string());
                    }
                }
                Ok(())
            })
            .await?;
        info!(volume = %volume, replica = %address, add, "engine's replicas changed");
        Ok(message)
    }

    /// The status of the volume's engine.
    pub fn get(&self, volume: &str) -> Result<pb::EngineStatus, NodeError> {
        self.supervisor(volume)
            .map(|s| self.status(&s))
            .ok_or_else(|| NodeError::NotFound(volume.to_string()))
    }

    /// Every engine, by volume name.
    pub fn list(&self) -> Vec<pb::EngineStatus> {
        let all: Vec<Arc<EngineSupervisor>> = self
            .lock()
            .values()
            .filter(|s| s.snapshot().phase != Phase::Stopped)
            .cloned()
            .collect();
        all.iter().map(|s| self.status(s)).collect()
    }

    fn status(&self, supervisor: &EngineSupervisor) -> pb::EngineStatus {
        let spec = &supervisor.spec;
        let addrs = &supervisor.addresses;
        let seen: EngineSnapshot = supervisor.snapshot();
        let state = match seen.phase {
            Phase::Spawning | Phase::Starting => pb::EngineState::Starting,
            Phase::Running => pb::EngineState::Running,
            Phase::Backoff { .. } => pb::EngineState::Backoff,
            Phase::Stopping { .. } | Phase::Stopped => pb::EngineState::Stopping,
        };
        let address =
            |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        pb::EngineStatus {
            spec: Some(spec.to_pb()),
            state: state as i32,
            pid: seen.pid.unwrap_or(0),
            control_address: addrs.control.to_string(),
            nbd_address: address(addrs.nbd),
            iscsi_address: address(addrs.iscsi),
            iscsi_target: if spec.iscsi {
                iscsi_target(&spec.volume)
            } else {
                String::new()
            },
            restarts: seen.restarts,
            last_exit: seen.last_exit.unwrap_or_default(),
            transient: self.transients().contains(&spec.volume),
        }
    }

    fn transients(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // Single inserts and removes: a poisoned set is whole.
        self.transient.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A transient engine found in the record at start: its call ended with
    /// the daemon that started it, so it is stopped (SIGTERM: it flushes and
    /// exits) and forgotten, never brought back.
    async fn end_transient(&self, volume: &str, record: &EngineRecord) {
        if let Some(pid) = record
            .pid
            .filter(|pid| is_our_engine(*pid, volume, record.addresses.control))
        {
            info!(volume = %volume, pid, "stopping a transient engine left by the previous daemon");
            // SAFETY: a signal to a process checked to be that engine.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        if let Err(e) = self.context.book.remove(volume).await {
            warn!(volume = %volume, error = %e, "cannot forget a transient engine");
        }
    }

    /// Take (`create`) or delete snapshot `name` of `volume` through its
    /// engine on this node: the running one, or, when none runs here and
    /// `spec` is given, a transient one started from it without frontends
    /// and stopped after the call. The volume's turn is held throughout, so
    /// a start or stop of it here waits for the snapshot.
    pub async fn snapshot(
        &self,
        volume: &str,
        name: &str,
        spec: Option<&pb::EngineSpec>,
        create: bool,
    ) -> Result<pb::VolumeSnapshotResponse, NodeError> {
        self.through_engine(volume, spec, |control: EngineControl| async move {
            if create {
                control.create_snapshot(name).await
            } else {
                control.delete_snapshot(name).await
            }
        })
        .await
    }

    /// Grow `volume` to `size` bytes through its engine on this node: the
    /// running one, or a transient one from `spec` (a volume attached
    /// nowhere), as [`Self::snapshot`]. A volume already at least that large
    /// is left as it is (its size in both fields of the answer).
    pub async fn expand(
        &self,
        volume: &str,
        size: u64,
        spec: Option<&pb::EngineSpec>,
    ) -> Result<pb::ExpandVolumeResponse, NodeError> {
        self.through_engine(volume, spec, |control: EngineControl| async move {
            // Already that large (a retried call, or a smaller size than it
            // has): nothing to do, rather than a refused shrink.
            let serving = control.info().await?.size;
            if serving >= size {
                return Ok(pb::ExpandVolumeResponse {
                    old_size: serving,
                    new_size: serving,
                    message: format!("volume {volume} already has {serving} bytes"),
                    ..Default::default()
                });
            }
            control.expand(size).await
        })
        .await
    }

    /// Run `call` on `volume`'s engine here: the running one, or a
    /// transient one started from `spec` without frontends and stopped
    /// after the call. The volume's turn is held throughout, so a start or
    /// stop of it here waits for the call.
    async fn through_engine<T, F>(
        &self,
        volume: &str,
        spec: Option<&pb::EngineSpec>,
        call: impl FnOnce(EngineControl) -> F,
    ) -> Result<T, NodeError>
    where
        F: std::future::Future<Output = Result<T, corral_client::ClientError>>,
    {
        let spec = spec
            .map(|s| {
                let mut spec = EngineSpec::from_pb(s)?;
                if spec.volume != volume {
                    return Err(NodeError::bad_spec(
                        "volume",
                        format!("{:?} is not the volume {volume:?}", spec.volume),
                    ));
                }
                // It serves no client.
                spec.nbd = false;
                spec.iscsi = false;
                Ok(spec)
            })
            .transpose()?;
        let turn = self.turn(volume);
        let _turn = turn.lock().await;
        if let Some(running) = self.supervisor(volume) {
            if running.snapshot().phase != Phase::Running {
                self.until_serving(&running, false).await?;
            }
            let control = self.control_of(&running, SNAPSHOT_CALL_TIMEOUT).await?;
            return Ok(call(control).await?);
        }
        let Some(spec) = spec else {
            return Err(NodeError::NotFound(volume.to_string()));
        };
        let started = self.start_in_turn(spec, true).await?;
        let outcome = async {
            if started.state != pb::EngineState::Running as i32 {
                return Err(NodeError::NotServing {
                    volume: volume.to_string(),
                    after: self.config.start_timeout,
                });
            }
            let running = self
                .supervisor(volume)
                .ok_or_else(|| NodeError::NotFound(volume.to_string()))?;
            let control = self.control_of(&running, SNAPSHOT_CALL_TIMEOUT).await?;
            Ok(call(control).await?)
        }
        .await;
        self.stop_transient(volume).await;
        outcome
    }

    /// Fill the new volume of `clone` from snapshot `snapshot` of the volume
    /// of `source` (or from that volume as it is, for an empty `snapshot`),
    /// both engines on this node, where the clone's can reach the source's
    /// control service: the source's running engine or a transient one from
    /// `source`, and a transient engine of the clone. Answers once the
    /// clone's engine says it is filled (its replicas record it done); a
    /// fill that makes no progress for [`CLONE_STUCK_AFTER`] is an error.
    /// Both volumes' turns are held throughout.
    pub async fn fill_clone(
        &self,
        clone: &pb::EngineSpec,
        source: &pb::EngineSpec,
        snapshot: &str,
    ) -> Result<pb::FillCloneResponse, NodeError> {
        let mut clone = EngineSpec::from_pb(clone)?;
        let mut source = EngineSpec::from_pb(source)?;
        if clone.volume == source.volume {
            return Err(NodeError::bad_spec(
                "clone",
                "a volume cannot be its own clone",
            ));
        }
        (clone.nbd, clone.iscsi) = (false, false);
        (source.nbd, source.iscsi) = (false, false);
        (source.clone_from, source.clone_snapshot) = (String::new(), String::new());
        (source.from_backup, source.backup_s3_endpoint) = (String::new(), String::new());
        if !clone.from_backup.is_empty() {
            return Err(NodeError::bad_spec(
                "source",
                "a restore (clone.from_backup) fills from its backup, not from a source volume",
            ));
        }
        let started = std::time::Instant::now();
        // Both turns, in name order: two fills never wait for each other.
        let (first, second) = if clone.volume < source.volume {
            (self.turn(&clone.volume), self.turn(&source.volume))
        } else {
            (self.turn(&source.volume), self.turn(&clone.volume))
        };
        let _first = first.lock().await;
        let _second = second.lock().await;
        if self.supervisor(&clone.volume).is_some() {
            return Err(NodeError::InUse(clone.volume));
        }
        let (source_control, source_transient) = match self.supervisor(&source.volume) {
            Some(running) => {
                if running.snapshot().phase != Phase::Running {
                    self.until_serving(&running, false).await?;
                }
                (running.addresses.control.to_string(), false)
            }
            None => {
                let status = self.start_in_turn(source.clone(), true).await?;
                if status.state != pb::EngineState::Running as i32 {
                    self.stop_transient(&source.volume).await;
                    return Err(NodeError::NotServing {
                        volume: source.volume,
                        after: self.config.start_timeout,
                    });
                }
                (status.control_address, true)
            }
        };
        clone.clone_from = source_control;
        clone.clone_snapshot = snapshot.to_string();
        let volume = clone.volume.clone();
        let outcome = self.fill_in_transient(clone, snapshot.is_empty()).await;
        if source_transient {
            self.stop_transient(&source.volume).await;
        }
        let filled_bytes = outcome?;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        info!(volume = %volume, source = %source.volume, snapshot, filled_bytes, elapsed_ms, "clone filled");
        Ok(pb::FillCloneResponse {
            filled_bytes,
            elapsed_ms,
        })
    }

    /// Start a transient engine of `spec` (the caller holds the volume's
    /// turn), wait until its replicas record the fill done (see
    /// [`until_filled`]), and stop it whatever happened; the bytes filled.
    async fn fill_in_transient(
        &self,
        spec: EngineSpec,
        delete_source_snapshot: bool,
    ) -> Result<u64, NodeError> {
        let volume = spec.volume.clone();
        let outcome = async {
            let status = self.start_in_turn(spec, true).await?;
            if status.state != pb::EngineState::Running as i32 {
                return Err(NodeError::NotServing {
                    volume: volume.clone(),
                    after: self.config.start_timeout,
                });
            }
            let control =
                EngineControl::connect(&status.control_address, ENGINE_CALL_TIMEOUT).await?;
            until_filled(&control, &volume, delete_source_snapshot).await
        }
        .await;
        self.stop_transient(&volume).await;
        outcome
    }

    /// Fill the new volume of `restore` from the backup its `from_backup`
    /// names, through a transient engine of it on this node (without
    /// frontends), stopped once its replicas record the fill done. A fill
    /// that makes no progress for [`CLONE_STUCK_AFTER`] is an error; a
    /// backup that is not there, or larger than the volume, makes the
    /// engine exit at once ([`NodeError::EngineFailed`], its log quoted).
    pub async fn fill_restore(
        &self,
        restore: &pb::EngineSpec,
    ) -> Result<pb::FillCloneResponse, NodeError> {
        let mut spec = EngineSpec::from_pb(restore)?;
        if spec.from_backup.is_empty() {
            return Err(NodeError::bad_spec(
                "source",
                "missing: a clone needs its source's spec (a restore, clone.from_backup)",
            ));
        }
        (spec.nbd, spec.iscsi) = (false, false);
        let started = std::time::Instant::now();
        let volume = spec.volume.clone();
        let backup = spec.from_backup.clone();
        let turn = self.turn(&volume);
        let _turn = turn.lock().await;
        if self.supervisor(&volume).is_some() {
            return Err(NodeError::InUse(volume));
        }
        let filled_bytes = self.fill_in_transient(spec, false).await?;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        info!(volume = %volume, backup = %backup, filled_bytes, elapsed_ms, "restored from a backup");
        Ok(pb::FillCloneResponse {
            filled_bytes,
            elapsed_ms,
        })
    }

    fn backup_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<BackupKey, BackupJob>> {
        // Single inserts and removes: a poisoned map is whole.
        self.backups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Back `request.volume` up through its engine here (the running one,
    /// or a transient one from `request.spec`), in the background: start
    /// the backup if none of that volume, target and name is known here,
    /// then wait up to `wait` for it. Done: its report (forgotten once
    /// told); failed: its error (likewise, so the next call starts again);
    /// otherwise `done: false`.
    pub async fn backup(
        self: &Arc<Self>,
        request: pb::EngineBackupRequest,
        wait: Duration,
    ) -> Result<pb::EngineBackupResponse, NodeError> {
        let pb::EngineBackupRequest {
            volume,
            backup,
            spec,
            then_delete,
        } = request;
        let backup = backup.ok_or_else(|| NodeError::bad_spec("backup", "missing"))?;
        for (value, what) in [
            (&backup.target, "the target"),
            (&backup.snapshot, "the snapshot to back up"),
            (&backup.name, "the backup's name"),
        ] {
            if value.is_empty() {
                return Err(NodeError::bad_spec("backup", format!("{what} is missing")));
            }
        }
        if let Some(s) = &spec {
            let checked = EngineSpec::from_pb(s)?;
            if checked.volume != volume {
                return Err(NodeError::bad_spec(
                    "volume",
                    format!("{:?} is not the volume {volume:?}", checked.volume),
                ));
            }
        }
        let key: BackupKey = (volume.clone(), backup.target.clone(), backup.name.clone());
        let mut outcome = {
            let mut jobs = self.backup_jobs();
            match jobs.get(&key) {
                Some(job) => job.outcome.clone(),
                None => {
                    let (tell, outcome) = tokio::sync::watch::channel(None);
                    jobs.insert(
                        key.clone(),
                        BackupJob {
                            snapshot: backup.snapshot.clone(),
                            outcome: outcome.clone(),
                        },
                    );
                    info!(volume = %volume, backup = %backup.name, snapshot = %backup.snapshot,
                        target = %backup.target, "backup started");
                    let manager = Arc::clone(self);
                    tokio::spawn(async move {
                        let result = manager
                            .write_backup(&volume, backup, spec.as_ref(), then_delete)
                            .await
                            .map_err(|e| {
                                let status = tonic::Status::from(e);
                                (status.code(), status.message().to_string())
                            });
                        let _ = tell.send(Some(result));
                    });
                    outcome
                }
            }
        };
        let ended = match tokio::time::timeout(wait, outcome.wait_for(Option::is_some)).await {
            Err(_) => {
                return Ok(pb::EngineBackupResponse {
                    done: false,
                    backup: None,
                });
            }
            Ok(Ok(seen)) => seen.clone(),
            Ok(Err(_)) => None,
        };
        self.backup_jobs().remove(&key);
        match ended {
            Some(Ok(report)) => Ok(pb::EngineBackupResponse {
                done: true,
                backup: Some(report),
            }),
            Some(Err((code, why))) => Err(NodeError::BackupFailed {
                volume: key.0,
                backup: key.2,
                code,
                why,
            }),
            None => Err(NodeError::Task(format!(
                "the backup {} of {} ended without a word",
                key.2, key.0
            ))),
        }
    }

    /// The backup itself (see [`Self::backup`]), then the deletion of the
    /// snapshots in `then_delete` that no other backup here waits for.
    async fn write_backup(
        &self,
        volume: &str,
        backup: pb::CreateBackupRequest,
        spec: Option<&pb::EngineSpec>,
        then_delete: Vec<String>,
    ) -> Result<pb::CreateBackupResponse, NodeError> {
        let name = backup.name.clone();
        let written = self
            .through_engine(volume, spec, |control: EngineControl| async move {
                let written = control.create_backup(backup, BACKUP_CALL_TIMEOUT).await?;
                for old in then_delete {
                    if self.backup_waits_for(volume, &old) {
                        continue;
                    }
                    match control.delete_snapshot(&old).await {
                        Ok(_) | Err(corral_client::ClientError::NotFound { .. }) => {}
                        Err(e) => {
                            warn!(volume = %volume, snapshot = %old, error = %e,
                                "cannot delete an older backup's snapshot")
                        }
                    }
                }
                Ok(written)
            })
            .await;
        match &written {
            Ok(w) => {
                info!(volume = %volume, backup = %name, bytes_put = w.bytes_put, parent = %w.parent, "backup written")
            }
            Err(e) => warn!(volume = %volume, backup = %name, error = %e, "backup failed"),
        }
        written
    }

    /// Whether a backup known here backs up `snapshot` of `volume`.
    fn backup_waits_for(&self, volume: &str, snapshot: &str) -> bool {
        self.backup_jobs()
            .iter()
            .any(|((v, _, _), job)| v == volume && job.snapshot == snapshot)
    }

    /// Stop `volume`'s engine if it is a transient one of this daemon's
    /// (the caller holds the volume's turn).
    async fn stop_transient(&self, volume: &str) {
        if !self.transients().contains(volume) {
            return;
        }
        if let Some(supervisor) = self.supervisor(volume)
            && let Err(e) = self.stop_and_forget(volume, &supervisor).await
        {
            warn!(volume = %volume, error = %e, "cannot stop the transient engine");
        }
    }

    /// The snapshots of the replicas hosted here: of `volume`, or of all
    /// when it is empty.
    pub async fn hosted_snapshots(
        &self,
        volume: &str,
    ) -> Result<Vec<pb::HostedSnapshots>, NodeError> {
        let hosted: Vec<_> = if volume.is_empty() {
            self.registry.all()
        } else {
            vec![self.registry.get(volume)?]
        };
        tokio::task::spawn_blocking(move || {
            hosted
                .iter()
                .map(|h| pb::HostedSnapshots {
                    volume: h.volume.clone(),
                    snapshots: corral_replica::control::list_snapshots(h).snapshots,
                })
                .collect()
        })
        .await
        .map_err(|e| NodeError::Task(e.to_string()))
    }

    /// The node: identity, room, addresses.
    pub fn node_info(&self) -> Result<pb::NodeInfo, NodeError> {
        let (capacity_bytes, free_bytes) = filesystem_space(&self.config.data_dir)?;
        let allocated_bytes = self
            .registry
            .all()
            .iter()
            .map(|r| r.store.meta().size)
            .sum();
        Ok(pb::NodeInfo {
            node_id: self.config.node_id.clone(),
            capacity_bytes,
            free_bytes,
            allocated_bytes,
            frontend_address: self.config.frontend_ip.to_string(),
            replica_address: self.config.replica_address.clone(),
        })
    }
}

/// Wait until the engine at `control` (a new volume's) says it is filled
/// (its replicas record the fill done); the bytes filled. A fill making no
/// progress for [`CLONE_STUCK_AFTER`] is an error. `delete_source_snapshot`:
/// a clone of a whole volume, whose source snapshot is deleted here too.
async fn until_filled(
    control: &EngineControl,
    volume: &str,
    delete_source_snapshot: bool,
) -> Result<u64, NodeError> {
    let mut progress = (0u64, tokio::time::Instant::now());
    loop {
        let Some(fill) = control.info().await?.clone else {
            // Not filling: the replicas record the fill done.
            return Ok(progress.0);
        };
        if fill.done {
            if delete_source_snapshot && fill.backup.is_empty() {
                // The clone deletes the snapshot it took of the source
                // once done, just after saying so: delete it here too
                // (whoever is second finds nothing), before the source's
                // engine may be stopped.
                let source =
                    EngineControl::connect(&fill.source_engine, SNAPSHOT_CALL_TIMEOUT).await?;
                match source.delete_clone_snapshot(&fill.snapshot).await {
                    Ok(_) | Err(corral_client::ClientError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(fill.filled_bytes);
        }
        if fill.filled_bytes > progress.0 {
            progress = (fill.filled_bytes, tokio::time::Instant::now());
        } else if progress.1.elapsed() > CLONE_STUCK_AFTER {
            return Err(NodeError::CloneStuck {
                volume: volume.to_string(),
                filled: fill.filled_bytes,
                total: fill.total_bytes,
                why: fill.error,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Size and free space (for unprivileged users) of the filesystem holding `path`.
pub fn filesystem_space(path: &std::path::Path) -> Result<(u64, u64), NodeError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        NodeError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path"),
        )
    })?;
    // SAFETY: statvfs fills the struct it is given; it is plain data.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(NodeError::io(path, std::io::Error::last_os_error()));
    }
    let unit = st.f_frsize as u64;
    Ok((
        (st.f_blocks as u64).saturating_mul(unit),
        (st.f_bavail as u64).saturating_mul(unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Launcher;
    use crate::record::{EngineBook, RecordFile};
    use crate::supervision::RestartPolicy;
    use std::os::unix::fs::PermissionsExt;
    use tokio_util::sync::CancellationToken;

    /// A manager whose "engine" is the shell script `body`.
    fn manager(dir: &std::path::Path, body: &str) -> Arc<EngineManager> {
        let script = dir.join("fake-engine");
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data_dir = dir.join("data");
        let registry = Arc::new(ReplicaRegistry::open(&data_dir).unwrap());
        let book = EngineBook::open(RecordFile::new(dir.join("engines.json"))).unwrap();
        let context = SupervisorContext {
            launcher: Arc::new(Launcher {
                binary: script,
                extra_args: vec![],
                log_dir: dir.join("logs"),
                local_replica: None,
            }),
            book: Arc::new(book),
            policy: RestartPolicy {
                first_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(200),
                reset_after: Duration::from_secs(60),
                stop_timeout: Duration::from_millis(300),
            },
            adopted_poll: Duration::from_millis(50),
            shutdown: CancellationToken::new(),
        };
        let config = ManagerConfig {
            node_id: "n".into(),
            data_dir,
            frontend_ip: "127.0.0.1".parse().unwrap(),
            replica_address: "127.0.0.1:1".into(),
            engine_ports: PortRange::new(45000, 45100).unwrap(),
            start_timeout: Duration::from_millis(300),
        };
        Arc::new(EngineManager {
            config,
            context,
            registry,
            engines: Mutex::new(BTreeMap::new()),
            turns: Mutex::new(HashMap::new()),
            transient: Mutex::new(BTreeSet::new()),
            backups: Mutex::new(HashMap::new()),
        })
    }

    fn spec() -> pb::EngineSpec {
        pb::EngineSpec {
            volume: "v".into(),
            size: 1 << 20,
            replicas: vec!["127.0.0.1:1".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_engine_that_never_serves_is_reported_starting_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "exec sleep 30");
        let status = m.start(&spec()).await.unwrap();
        assert_eq!(status.state, pb::EngineState::Starting as i32);
        assert!(status.pid != 0);
        assert_eq!(m.get("v").unwrap().pid, status.pid);
        assert_eq!(m.context.book.engines().await["v"].pid, Some(status.pid));
        m.stop("v").await.unwrap();
        assert!(m.list().is_empty());
        assert!(m.context.book.engines().await.is_empty());
    }

    #[tokio::test]
    async fn an_engine_that_ignores_sigterm_is_killed_at_the_stop_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "trap '' TERM\nwhile :; do sleep 0.05; done");
        let status = m.start(&spec()).await.unwrap();
        m.stop("v").await.unwrap();
        assert!(crate::process::command_line(status.pid).is_none(), "killed");
        assert!(m.get("v").is_err());
    }

    #[tokio::test]
    async fn a_new_engine_that_exits_at_once_is_an_error_quoting_its_log_and_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(
            dir.path(),
            "echo 'boom: cannot open the volume' >&2\nexit 3",
        );
        let e = m.start(&spec()).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, NodeError::EngineFailed { .. }), "{text}");
        assert!(
            text.contains("exit status 3") && text.contains("boom"),
            "{text}"
        );
        assert!(m.list().is_empty());
        assert!(m.context.book.engines().await.is_empty());
        // Nothing holds its ports any more: they were only in the record.
    }

    #[tokio::test]
    async fn a_running_engine_with_another_spec_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "exec sleep 30");
        let first = m.start(&spec()).await.unwrap();
        let same = m.start(&spec()).await.unwrap();
        assert_eq!(same.pid, first.pid);
        let mut other = spec();
        other.nbd = true;
        let e = m.start(&other).await.unwrap_err();
        assert!(
            matches!(e, NodeError::SpecDiffers { ref differs, .. } if differs == "nbd"),
            "{e}"
        );
        m.stop("v").await.unwrap();
    }

    #[tokio::test]
    async fn a_snapshot_through_an_engine_that_never_serves_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "exec sleep 30");
        let e = m.snapshot("v", "s", None, true).await.unwrap_err();
        assert!(
            matches!(e, NodeError::NotFound(_)),
            "no engine, no spec: {e}"
        );
        let e = m.snapshot("v", "s", Some(&spec()), true).await.unwrap_err();
        assert!(matches!(e, NodeError::NotServing { .. }), "{e}");
        assert!(m.list().is_empty(), "the transient engine is stopped");
        assert!(m.context.book.engines().await.is_empty());
        let mut other = spec();
        other.volume = "w".into();
        let e = m.snapshot("v", "s", Some(&other), false).await.unwrap_err();
        assert!(
            matches!(
                e,
                NodeError::BadSpec {
                    field: "volume",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_restarted_daemon_forgets_a_transient_engine_instead_of_restarting_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "exec sleep 30");
        let mut transient = EngineSpec::from_pb(&spec()).unwrap();
        transient.nbd = false;
        let status = {
            let turn = m.turn("v");
            let _turn = turn.lock().await;
            m.start_in_turn(transient, true).await.unwrap()
        };
        assert!(status.transient && status.pid != 0, "{status:?}");
        assert!(m.context.book.engines().await["v"].transient);
        let again =
            EngineManager::open(m.config.clone(), m.context.clone(), Arc::clone(&m.registry)).await;
        assert!(again.list().is_empty(), "not brought back");
        assert!(again.context.book.engines().await.is_empty(), "forgotten");
        m.stop("v").await.unwrap();
    }

    #[tokio::test]
    async fn a_backup_runs_in_the_background_and_its_failure_is_told_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "exec sleep 30");
        let request = pb::EngineBackupRequest {
            volume: "v".into(),
            backup: Some(pb::CreateBackupRequest {
                target: "file:///backups".into(),
                snapshot: "csi-backup-b1".into(),
                name: "b1".into(),
                ..Default::default()
            }),
            spec: Some(spec()),
            then_delete: vec!["csi-backup-b0".into()],
        };
        // Started, not waited for: not done yet.
        let first = m
            .backup(request.clone(), Duration::from_millis(1))
            .await
            .unwrap();
        assert!(!first.done && first.backup.is_none());
        assert!(m.backup_waits_for("v", "csi-backup-b1"));
        assert!(!m.backup_waits_for("v", "csi-backup-b0"));
        // The same backup asked again is the same job: its engine never
        // serves, so it fails, and says so once.
        let e = m
            .backup(request.clone(), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                NodeError::BackupFailed {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("did not serve"), "{e}");
        assert!(m.list().is_empty(), "the transient engine is stopped");
        assert!(!m.backup_waits_for("v", "csi-backup-b1"), "forgotten");
        // Told once: the next call starts it again.
        let again = m
            .backup(request.clone(), Duration::from_millis(1))
            .await
            .unwrap();
        assert!(!again.done);
        let e = m
            .backup(request.clone(), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(e, NodeError::BackupFailed { .. }), "{e}");
        // A request missing what a backup needs starts nothing.
        let mut unnamed = request.clone();
        unnamed.backup.as_mut().unwrap().name.clear();
        let e = m
            .backup(unnamed, Duration::from_millis(1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                NodeError::BadSpec {
                    field: "backup",
                    ..
                }
            ),
            "{e}"
        );
        assert!(m.backup_jobs().is_empty());
    }

    #[tokio::test]
    async fn a_restore_without_a_backup_names_the_missing_source() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path(), "exec sleep 30");
        let e = m.fill_restore(&spec()).await.unwrap_err();
        assert!(
            matches!(
                e,
                NodeError::BadSpec {
                    field: "source",
                    ..
                }
            ),
            "{e}"
        );
        let mut restore = spec();
        restore.from_backup = "file:///backups/v0/b1".into();
        let e = m.fill_restore(&restore).await.unwrap_err();
        assert!(matches!(e, NodeError::NotServing { .. }), "{e}");
        assert!(m.list().is_empty(), "the transient engine is stopped");
        let mut source = spec();
        source.volume = "w".into();
        let e = m.fill_clone(&restore, &source, "").await.unwrap_err();
        assert!(
            matches!(
                e,
                NodeError::BadSpec {
                    field: "source",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_filesystem_of_a_directory_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let (capacity, free) = filesystem_space(dir.path()).unwrap();
        assert!(capacity > 0 && free <= capacity, "{capacity} {free}");
        assert!(filesystem_space(&dir.path().join("missing")).is_err());
    }
}
