//! The replicas hosted by one daemon: one [`ReplicaStore`] per volume, each
//! in `<data-dir>/<volume>/`, plus the epoch gate that fences old engines.

use corral_block::inline_io::InlineGate;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use corral_store::{CreateParams, Epoch, ReplicaStore, StoreError};
use tracing::{debug, info, warn};

use crate::error::ReplicaError;

/// How a replica is open for an engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenState {
    /// The epoch it was last opened at (0 = not opened since the daemon
    /// started). Data requests must carry exactly this epoch.
    pub epoch: Epoch,
    /// Bumped at every open, even at the same epoch. A data stream serves
    /// only while the session it started in lasts: an engine that opens a
    /// replica again (it is bringing it back after a failure) cuts off the
    /// streams of its earlier connection, so that no request still queued
    /// in one of them — a write sent before the failure, delivered late —
    /// lands after the rebuild has compared or copied its chunk.
    pub session: u64,
    /// The engine that opened it at `epoch` (0: unnamed, or not known since
    /// the daemon started).
    pub engine_id: u64,
}

/// One hosted replica.
pub struct HostedReplica {
    pub volume: String,
    pub store: ReplicaStore,
    /// How it is open now. Data requests hold the read side while they
    /// execute, so an `open` waits for them and no request of an earlier
    /// engine or connection lands after it.
    pub open_state: RwLock<OpenState>,
    /// Whether data batches may run inline on the stream's task now.
    pub inline_io: InlineGate,
    /// Data batches executed so far; the background flusher reads it to
    /// tell a busy replica from an idle one.
    pub batches: AtomicU64,
    /// A thread is merging deleted snapshots away.
    merging: AtomicBool,
    /// The replica is closing or deleted: no merge thread may run.
    merge_stopped: AtomicBool,
    /// Why the merge is stuck, until a step succeeds.
    merge_error: Mutex<Option<String>>,
}

/// Pause before the first retry of a failed merge step.
pub const MERGE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between retries of a failed merge step.
pub const MERGE_RETRY_MAX: Duration = Duration::from_secs(5);

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The merge thread's body: steps until no merge is left, retrying a failed
/// step after a growing pause. Holds the replica only during a step, so a
/// replica dropped meanwhile ends it.
fn merge_loop(weak: Weak<HostedReplica>) {
    let mut pause = MERGE_RETRY_FIRST;
    loop {
        let Some(me) = weak.upgrade() else { return };
        if me.merge_stopped.load(Ordering::Acquire) {
            me.merging.store(false, Ordering::Release);
            return;
        }
        match me.store.merge_step() {
            Ok(more) => {
                if lock_ignoring_poison(&me.merge_error).take().is_some() {
                    info!(volume = %me.volume, "snapshot merge resumed");
                }
                pause = MERGE_RETRY_FIRST;
                if more {
                    continue;
                }
                info!(volume = %me.volume, "deleted snapshots merged away");
                me.merging.store(false, Ordering::Release);
                // A delete that came after the last step but saw this
                // thread still running left its merge to it: take it on.
                if me.merge_stopped.load(Ordering::Acquire)
                    || !me.store.merge_pending()
                    || me.merging.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
            Err(e) => {
                let error = e.to_string();
                let repeated = {
                    let mut last = lock_ignoring_poison(&me.merge_error);
                    let repeated = last.as_deref() == Some(error.as_str());
                    *last = Some(error);
                    repeated
                };
                if repeated {
                    debug!(volume = %me.volume, error = %e, retry_in_ms = pause.as_millis() as u64, "snapshot merge still stuck");
                } else {
                    warn!(volume = %me.volume, error = %e, retry_in_ms = pause.as_millis() as u64, "snapshot merge stuck; the deleted snapshot stays until it can go on, and the step is retried");
                }
                drop(me);
                let until = Instant::now() + pause;
                while Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50).min(pause));
                    match weak.upgrade() {
                        Some(me) if !me.merge_stopped.load(Ordering::Acquire) => {}
                        Some(me) => {
                            me.merging.store(false, Ordering::Release);
                            return;
                        }
                        None => return,
                    }
                }
                pause = (pause * 2).min(MERGE_RETRY_MAX);
            }
        }
    }
}

/// All replicas of this daemon.
pub struct ReplicaRegistry {
    data_dir: PathBuf,
    replicas: Mutex<BTreeMap<String, Arc<HostedReplica>>>,
}

/// Volume names become directory names: keep them boring.
pub fn validate_volume_name(name: &str) -> Result<(), ReplicaError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReplicaError::BadVolumeName(name.to_string()))
    }
}

/// How long [`ReplicaRegistry::close_all`] waits, in all, for draining
/// streams to drop their hold on replicas before flushing those still held
/// instead of closing them.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl ReplicaRegistry {
    /// Open the data dir (creating it) and every replica found in it,
    /// recovering those that were not stopped cleanly.
    pub fn open(data_dir: &Path) -> Result<Self, ReplicaError> {
        let dir_err = |source| ReplicaError::DataDir {
            path: data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(dir_err)?;
        let mut replicas = BTreeMap::new();
        for entry in std::fs::read_dir(data_dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_volume_name(&name).is_err() || !ReplicaStore::exists(&entry.path()) {
                continue;
            }
            match ReplicaStore::open(&entry.path()) {
                Ok(store) => {
                    let meta = store.meta();
                    info!(
                        volume = %name,
                        size = meta.size,
                        epoch = %meta.epoch,
                        generation = %meta.membership.generation,
                        clean = meta.clean_shutdown,
                        "opened replica"
                    );
                    let hosted = Arc::new(HostedReplica::new(name.clone(), store));
                    hosted.start_merging();
                    replicas.insert(name, hosted);
                }
                Err(e) => warn!(volume = %name, error = %e, "cannot open replica; leaving it out"),
            }
        }
        Ok(ReplicaRegistry {
            data_dir: data_dir.to_path_buf(),
            replicas: Mutex::new(replicas),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<HostedReplica>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (inserts and removes are single operations), so recover from poison.
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replica of `volume`, if hosted here.
    pub fn get(&self, volume: &str) -> Result<Arc<HostedReplica>, ReplicaError> {
        validate_volume_name(volume)?;
        self.lock()
            .get(volume)
            .cloned()
            .ok_or_else(|| ReplicaError::NotFound(volume.to_string()))
    }

    /// Every hosted replica.
    pub fn all(&self) -> Vec<Arc<HostedReplica>> {
        self.lock().values().cloned().collect()
    }

    /// Create a new replica.
    pub fn create(&self, params: CreateParams) -> Result<Arc<HostedReplica>, ReplicaError> {
        validate_volume_name(&params.volume)?;
        let volume = params.volume.clone();
        let mut map = self.lock();
        if map.contains_key(&volume) {
            return Err(ReplicaError::AlreadyExists(volume));
        }
        let dir = self.data_dir.join(&volume);
        let store = ReplicaStore::create(&dir, params).map_err(|source| match source {
            StoreError::AlreadyExists(_) => ReplicaError::AlreadyExists(volume.clone()),
            source => ReplicaError::Store {
                volume: volume.clone(),
                source,
            },
        })?;
        let hosted = Arc::new(HostedReplica::new(volume.clone(), store));
        map.insert(volume.clone(), Arc::clone(&hosted));
        info!(volume = %volume, "created replica");
        Ok(hosted)
    }

    /// Delete a replica and its data.
    pub fn delete(&self, volume: &str) -> Result<(), ReplicaError> {
        validate_volume_name(volume)?;
        let removed = self
            .lock()
            .remove(volume)
            .ok_or_else(|| ReplicaError::NotFound(volume.to_string()))?;
        // Fence whatever engine still streams to it before the files go.
        removed.stop_merging();
        removed
            .open_state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .epoch = Epoch(u64::MAX);
        drop(removed);
        let dir = self.data_dir.join(volume);
        std::fs::remove_dir_all(&dir).map_err(|source| ReplicaError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        info!(volume = %volume, "deleted replica");
        Ok(())
    }

    /// Close every replica cleanly (daemon shutdown).
    pub fn close_all(&self) {
        let replicas = std::mem::take(&mut *self.lock());
        // One deadline for all: shutdown waits CLOSE_WAIT at most, however
        // many replicas the daemon holds.
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        for (volume, hosted) in replicas {
            hosted.stop_merging();
            // A stream whose client just went may still be finishing a batch
            // on a blocking thread: give it a moment to let go, so the store
            // closes (and releases its metadata lock) before the daemon
            // returns and, in-process, is started again on the same directory.
            while Arc::strong_count(&hosted) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            match Arc::try_unwrap(hosted) {
                Ok(hosted) => {
                    if let Err(e) = hosted.store.close() {
                        warn!(volume = %volume, error = %e, "clean close failed");
                    }
                }
                Err(hosted) => {
                    // Still referenced by a draining stream: flush what we can;
                    // the next open recovers the dirty regions.
                    if let Err(e) = hosted.store.flush() {
                        warn!(volume = %volume, error = %e, "flush at shutdown failed");
                    }
                }
            }
        }
    }
}

impl HostedReplica {
    fn new(volume: String, store: ReplicaStore) -> Self {
        HostedReplica {
            volume,
            store,
            open_state: RwLock::new(OpenState::default()),
            inline_io: InlineGate::default(),
            batches: AtomicU64::new(0),
            merging: AtomicBool::new(false),
            merge_stopped: AtomicBool::new(false),
            merge_error: Mutex::new(None),
        }
    }

    /// Merges deleted snapshots away in the background, one granule at a
    /// time, unless a merge thread already runs. Called after a delete and
    /// when the daemon opens a replica with a merge left by a crash. A step
    /// that fails (a full disk, an I/O error) changes nothing the volume
    /// shows: the thread records why ([`HostedReplica::merge_error`], logged
    /// once per distinct error) and tries the step again after a pause that
    /// doubles from [`MERGE_RETRY_FIRST`] to [`MERGE_RETRY_MAX`], so a merge
    /// stuck on a full disk resumes by itself once space is freed, without
    /// spinning meanwhile. It ends when no merge is left or the replica is
    /// closed or deleted ([`HostedReplica::stop_merging`]).
    pub fn start_merging(self: &Arc<Self>) {
        if self.merge_stopped.load(Ordering::Acquire)
            || !self.store.merge_pending()
            || self.merging.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("merge-{}", self.volume))
            .spawn(move || merge_loop(me));
        if let Err(e) = spawned {
            warn!(volume = %self.volume, error = %e, "cannot start the snapshot merge thread");
            self.merging.store(false, Ordering::Release);
        }
    }

    /// Why the background merge is stuck: the last failed step's error,
    /// until a step succeeds. None while a merge goes on or none is pending.
    pub fn merge_error(&self) -> Option<String> {
        lock_ignoring_poison(&self.merge_error).clone()
    }

    /// Ends the merge thread (closing or deleting the replica) and waits,
    /// up to a few seconds, for the step it runs to end. A merge left
    /// pending resumes at its cursor when the replica is opened again.
    pub fn stop_merging(&self) {
        self.merge_stopped.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.merging.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Open for an engine at `epoch`: persists the epoch (refusing a lower
    /// one), and from now on only requests tagged with it, on streams opened
    /// from now on, are served. Returns the new open session.
    pub fn open_at(&self, epoch: Epoch, engine_id: u64) -> Result<u64, ReplicaError> {
        let mut open = self.open_state.write().unwrap_or_else(|p| p.into_inner());
        if open.epoch == Epoch(u64::MAX) {
            return Err(ReplicaError::NotFound(self.volume.clone()));
        }
        // An epoch is one engine's: the same engine may open again at it
        // (bringing this replica back), another may not — two engines that
        // picked the same epoch at once would otherwise both serve.
        if epoch == open.epoch
            && engine_id != 0
            && open.engine_id != 0
            && engine_id != open.engine_id
        {
            return Err(ReplicaError::EpochTaken {
                volume: self.volume.clone(),
                epoch,
            });
        }
        self.store
            .set_epoch(epoch)
            .map_err(|source| ReplicaError::Store {
                volume: self.volume.clone(),
                source,
            })?;
        if epoch > open.epoch || open.engine_id == 0 {
            open.engine_id = engine_id;
        }
        open.epoch = epoch;
        open.session += 1;
        Ok(open.session)
    }

    /// How it is open now.
    pub fn current_open(&self) -> OpenState {
        *self.open_state.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_checked() {
        assert!(validate_volume_name("pvc-1234_a.b").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "x y", &"a".repeat(65)] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }
}
