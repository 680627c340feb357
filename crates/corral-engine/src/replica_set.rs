//! The replica set: each replica's mode (RW / WO / ERR), the membership
//! generation, and how every change is recorded before any further write is
//! acknowledged.
//!
//! Rules (DESIGN.md, "Consistency protocol"; docs/failure-handling.md):
//! - a replica that errors goes to ERR, and the new membership (the next
//!   generation) is written to the remaining RW replicas before the failing
//!   write — or any later one — is acknowledged;
//! - a timeout never shrinks the RW set below what the write policy needs
//!   (never below one): the error goes to the client instead, since a slow
//!   replica may be the only one with the newest data;
//! - while a replica is in ERR and within the stale-replica timeout, the
//!   chunks written without it are remembered, so that it can be caught up
//!   by copying only those;
//! - a replica that rejects our epoch means a newer engine owns the volume:
//!   this engine is fenced and serves nothing from then on.
//!
//! Members are addressed by a slot id that never changes while the engine
//! runs (indices would shift when a member is removed).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use corral_block::BlockError;
use corral_proto::v1::{self as pb, SetMembershipRequest};
use tracing::{error, info, warn};

use crate::chunk::ChunkBitmap;
use crate::client::ReplicaClient;
use crate::config::WritePolicy;
use crate::error::ReplicaIoError;
use crate::rebuild::RebuildProgress;

/// A replica's mode in the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Up to date: serves reads, takes writes.
    Rw,
    /// Rebuilding: takes writes, serves no reads.
    Wo,
    /// Out of the I/O path.
    Err,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Rw => "RW",
            Mode::Wo => "WO",
            Mode::Err => "ERR",
        }
    }

    pub fn to_pb(self) -> pb::ReplicaMode {
        match self {
            Mode::Rw => pb::ReplicaMode::Rw,
            Mode::Wo => pb::ReplicaMode::Wo,
            Mode::Err => pb::ReplicaMode::Err,
        }
    }
}

/// Stable identity of a member while this engine runs.
pub type SlotId = u64;

/// One member of the set.
pub struct ReplicaSlot {
    pub id: SlotId,
    pub address: String,
    pub instance_id: String,
    pub mode: Mode,
    pub client: Option<Arc<ReplicaClient>>,
    pub last_error: String,
    /// When it went to ERR.
    pub failed_at: Option<Instant>,
    /// Chunks written while it was in ERR; `None`: unknown (it must be
    /// rebuilt in full, comparing every chunk).
    pub missed: Option<ChunkBitmap>,
    /// Where an interrupted full rebuild into it had got to (from its metadata).
    pub resume_cursor: Option<u64>,
    /// The latest rebuild into it.
    pub rebuild: Option<Arc<RebuildProgress>>,
    /// A supervisor task is bringing it back (connect, rebuild).
    pub busy: bool,
    /// Failed attempts to bring it back in a row, and when the next may start.
    pub attempts: u32,
    pub retry_at: Option<Instant>,
}

impl ReplicaSlot {
    /// A member as the open procedure decided it.
    pub fn new(address: String, instance_id: String, mode: Mode) -> Self {
        ReplicaSlot {
            id: 0,
            address,
            instance_id,
            mode,
            client: None,
            last_error: String::new(),
            failed_at: None,
            missed: None,
            resume_cursor: None,
            rebuild: None,
            busy: false,
            attempts: 0,
            retry_at: None,
        }
    }
}

/// A snapshot of one member, for status output.
#[derive(Clone, Debug)]
pub struct SlotStatus {
    pub id: SlotId,
    pub address: String,
    pub instance_id: String,
    pub mode: Mode,
    pub last_error: String,
    pub failed_for: Option<Duration>,
    pub missed_chunks: Option<u64>,
    pub rebuild: Option<Arc<RebuildProgress>>,
    pub busy: bool,
}

/// How a returning replica is to be caught up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// Copy only the chunks written while it was away.
    Partial,
    /// Compare every chunk (from `start` bytes on) and copy those that differ.
    Full { start: u64 },
}

struct SetState {
    slots: Vec<ReplicaSlot>,
    generation: u64,
}

/// The replicas of one volume and their membership record.
pub struct ReplicaSet {
    volume: String,
    epoch: u64,
    policy: WritePolicy,
    timeout: Duration,
    chunks: u64,
    chunk_size: u64,
    state: RwLock<SetState>,
    /// Serialises membership changes (and their recording on the replicas).
    change: tokio::sync::Mutex<()>,
    /// Writes hold this shared while in flight; a replica joining the write
    /// set takes it exclusively, so no write that left it out is still in
    /// flight (and unrecorded in its missed set) when it joins.
    io_gate: tokio::sync::RwLock<()>,
    fenced: AtomicBool,
    next_read: AtomicUsize,
    next_id: AtomicU64,
    /// Slots in ERR that track missed chunks (skip the bookkeeping when 0).
    tracking: AtomicUsize,
    /// Replicas moved to ERR since the engine started.
    failures: AtomicU64,
}

fn rw_of(state: &SetState) -> usize {
    state.slots.iter().filter(|s| s.mode == Mode::Rw).count()
}

impl ReplicaSet {
    /// A set as decided by the open procedure; `generation` is already recorded.
    pub fn new(
        cfg: &crate::config::EngineConfig,
        epoch: u64,
        generation: u64,
        mut slots: Vec<ReplicaSlot>,
    ) -> Self {
        let chunk_size = u64::from(cfg.chunk_size).max(1);
        let chunks = cfg.size.div_ceil(chunk_size);
        for (i, s) in slots.iter_mut().enumerate() {
            s.id = i as SlotId + 1;
        }
        let next = slots.len() as u64 + 1;
        ReplicaSet {
            volume: cfg.volume.clone(),
            epoch,
            policy: cfg.write_policy,
            timeout: cfg.replica_timeout,
            chunks,
            chunk_size,
            state: RwLock::new(SetState { slots, generation }),
            change: tokio::sync::Mutex::new(()),
            io_gate: tokio::sync::RwLock::new(()),
            fenced: AtomicBool::new(false),
            next_read: AtomicUsize::new(0),
            next_id: AtomicU64::new(next),
            tracking: AtomicUsize::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SetState> {
        // Updates to the state are single assignments: a poisoned lock still holds a valid state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, SetState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn update_tracking(&self, state: &SetState) {
        let n = state
            .slots
            .iter()
            .filter(|s| s.mode == Mode::Err && s.missed.is_some())
            .count();
        self.tracking.store(n, Ordering::Relaxed);
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn generation(&self) -> u64 {
        self.read_state().generation
    }

    pub fn policy(&self) -> WritePolicy {
        self.policy
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks
    }

    /// Replicas moved to ERR since the engine started.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Held shared by every write while it is in flight.
    pub async fn write_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.io_gate.read().await
    }

    /// Replicas that take writes (RW and WO).
    pub fn write_targets(&self) -> Vec<(SlotId, Arc<ReplicaClient>, Mode)> {
        self.read_state()
            .slots
            .iter()
            .filter(|s| s.mode != Mode::Err)
            .filter_map(|s| s.client.clone().map(|c| (s.id, c, s.mode)))
            .collect()
    }

    /// RW replicas, rotated so that reads spread round robin.
    pub fn read_targets(&self) -> Vec<(SlotId, Arc<ReplicaClient>)> {
        let mut rw: Vec<_> = self
            .read_state()
            .slots
            .iter()
            .filter(|s| s.mode == Mode::Rw)
            .filter_map(|s| s.client.clone().map(|c| (s.id, c)))
            .collect();
        if !rw.is_empty() {
            let start = self.next_read.fetch_add(1, Ordering::Relaxed) % rw.len();
            rw.rotate_left(start);
        }
        rw
    }

    pub fn total(&self) -> usize {
        self.read_state().slots.len()
    }

    pub fn rw_count(&self) -> usize {
        rw_of(&self.read_state())
    }

    /// Fewest RW replicas with which writes are still acknowledged.
    pub fn min_rw(&self) -> usize {
        self.policy.min_rw(self.total())
    }

    /// Whether reads may be served now.
    pub fn check_readable(&self) -> Result<(), BlockError> {
        if self.is_fenced() {
            return Err(BlockError::Unavailable(format!(
                "volume {} is fenced: a newer engine (epoch > {}) owns it",
                self.volume, self.epoch
            )));
        }
        if self.rw_count() == 0 {
            return Err(BlockError::Unavailable(format!(
                "volume {}: no RW replica left",
                self.volume
            )));
        }
        Ok(())
    }

    /// Whether writes may be acknowledged now.
    pub fn check_writable(&self) -> Result<(), BlockError> {
        self.check_readable()?;
        let rw = self.rw_count();
        let min = self.min_rw();
        if rw < min {
            return Err(BlockError::Unavailable(format!(
                "volume {}: {rw} RW replica(s) left, write policy {} needs {min}",
                self.volume,
                self.policy.as_str()
            )));
        }
        Ok(())
    }

    /// Status of every member.
    pub fn status(&self) -> Vec<SlotStatus> {
        self.read_state()
            .slots
            .iter()
            .map(|s| SlotStatus {
                id: s.id,
                address: s.address.clone(),
                instance_id: s.instance_id.clone(),
                mode: s.mode,
                last_error: s.last_error.clone(),
                failed_for: s.failed_at.map(|t| t.elapsed()),
                missed_chunks: s.missed.as_ref().map(ChunkBitmap::len),
                rebuild: s.rebuild.clone(),
                busy: s.busy,
            })
            .collect()
    }

    fn membership_of(&self, state: &SetState) -> pb::Membership {
        pb::Membership {
            generation: state.generation,
            epoch: self.epoch,
            members: state
                .slots
                .iter()
                .map(|s| pb::Member {
                    address: s.address.clone(),
                    instance_id: s.instance_id.clone(),
                    mode: s.mode.to_pb() as i32,
                })
                .collect(),
        }
    }

    /// The current membership record.
    pub fn membership(&self) -> pb::Membership {
        self.membership_of(&self.read_state())
    }

    /// Mark this engine fenced: a replica saw a newer epoch.
    pub fn mark_fenced(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::Relaxed) {
            error!(volume = %self.volume, epoch = self.epoch, reason = %why,
                "fenced by a newer engine: no longer serving I/O");
        }
    }

    /// Remember that `chunks` were written while some replicas were in ERR.
    pub fn mark_missed(&self, chunks: &[u64]) {
        if self.tracking.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut state = self.write_state();
        for slot in state.slots.iter_mut() {
            if slot.mode == Mode::Err
                && let Some(missed) = slot.missed.as_mut()
            {
                for c in chunks {
                    missed.insert(*c);
                }
            }
        }
    }

    /// Handle a failed request to slot `id`; `chunks` are the chunks that the
    /// failed request would have written (empty for reads).
    ///
    /// Errors that are not the replica's fault (fencing, a bad request, a
    /// checksum mismatch the caller repairs) change nothing else. A timeout
    /// that would leave fewer RW replicas than the write policy needs changes
    /// nothing either (the caller's request fails). Otherwise the replica goes
    /// to ERR and the new membership is recorded on the remaining RW replicas
    /// before this returns. Returns whether writes may still be acknowledged.
    pub async fn handle_failure(
        &self,
        id: SlotId,
        err: &ReplicaIoError,
        chunks: &[u64],
    ) -> Result<(), BlockError> {
        if let ReplicaIoError::Fenced(m) = err {
            self.mark_fenced(m);
            return self.check_writable();
        }
        if !err.fails_replica() {
            return self.check_writable();
        }
        let _change = self.change.lock().await;
        let changed = {
            let mut state = self.write_state();
            let rw = rw_of(&state);
            let min = self.policy.min_rw(state.slots.len()).max(1);
            let Some(slot) = state.slots.iter_mut().find(|s| s.id == id) else {
                return self.check_writable();
            };
            match slot.mode {
                Mode::Err => {
                    // Already out; a request that was in flight when it failed
                    // still adds to what it missed.
                    if let Some(missed) = slot.missed.as_mut() {
                        for c in chunks {
                            missed.insert(*c);
                        }
                    }
                    false
                }
                Mode::Rw if matches!(err, ReplicaIoError::Timeout(_)) && rw <= min => {
                    warn!(volume = %self.volume, replica = %slot.address, error = %err,
                        "replica timed out, but it is one of the last {rw} RW replicas the write policy needs: keeping it, failing the request");
                    slot.last_error = err.to_string();
                    return Err(BlockError::Unavailable(format!(
                        "volume {}: replica {} timed out and the write policy {} cannot drop it (RW replicas: {rw})",
                        self.volume,
                        slot.address,
                        self.policy.as_str()
                    )));
                }
                previous => {
                    warn!(volume = %self.volume, replica = %slot.address, error = %err,
                        mode = previous.as_str(), "replica failed: moving it to ERR");
                    slot.mode = Mode::Err;
                    slot.last_error = err.to_string();
                    slot.failed_at = Some(Instant::now());
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    // A replica that fails mid-rebuild has a gap we do not
                    // track: it will be compared chunk by chunk.
                    slot.missed = if previous == Mode::Rw {
                        let mut m = ChunkBitmap::new(self.chunks);
                        for c in chunks {
                            m.insert(*c);
                        }
                        Some(m)
                    } else {
                        None
                    };
                    if let Some(client) = slot.client.take() {
                        client.shutdown();
                    }
                    state.generation += 1;
                    self.update_tracking(&state);
                    true
                }
            }
        };
        if changed {
            self.record_membership().await;
        }
        self.check_writable()
    }

    /// Write the current membership to every RW replica; a replica that
    /// cannot take it goes to ERR too (and the record is written again).
    /// Callers hold `change`.
    async fn record_membership(&self) {
        loop {
            let (record, targets) = {
                let state = self.read_state();
                let record = self.membership_of(&state);
                let targets: Vec<_> = state
                    .slots
                    .iter()
                    .filter(|s| s.mode == Mode::Rw)
                    .filter_map(|s| s.client.clone().map(|c| (s.id, c)))
                    .collect();
                (record, targets)
            };
            if targets.is_empty() {
                error!(volume = %self.volume, "no RW replica left to record the membership on");
                return;
            }
            let calls = targets.iter().map(|(id, client)| {
                let mut control = client.control();
                let request = SetMembershipRequest {
                    volume: self.volume.clone(),
                    epoch: self.epoch,
                    membership: Some(record.clone()),
                };
                async move {
                    let result =
                        tokio::time::timeout(self.timeout, control.set_membership(request)).await;
                    (*id, result)
                }
            });
            let results = futures::future::join_all(calls).await;
            let mut failed = Vec::new();
            for (id, result) in results {
                match result {
                    Ok(Ok(_)) => {}
                    Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                        self.mark_fenced(status.message());
                        return;
                    }
                    Ok(Err(status)) => failed.push((id, status.to_string())),
                    Err(_) => failed.push((id, format!("timed out after {:?}", self.timeout))),
                }
            }
            if failed.is_empty() {
                info!(volume = %self.volume, generation = record.generation,
                    rw = self.rw_count(), "membership recorded");
                return;
            }
            let mut state = self.write_state();
            for (id, why) in failed {
                if let Some(slot) = state.slots.iter_mut().find(|s| s.id == id) {
                    warn!(volume = %self.volume, replica = %slot.address, error = %why,
                        "cannot record membership: moving replica to ERR");
                    slot.mode = Mode::Err;
                    slot.last_error = format!("recording membership: {why}");
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    slot.failed_at = Some(Instant::now());
                    slot.missed = Some(ChunkBitmap::new(self.chunks));
                    if let Some(client) = slot.client.take() {
                        client.shutdown();
                    }
                }
            }
            state.generation += 1;
            self.update_tracking(&state);
        }
    }

    /// ERR members that nobody is bringing back yet: (id, address).
    pub fn returnable(&self) -> Vec<(SlotId, String)> {
        let now = Instant::now();
        self.read_state()
            .slots
            .iter()
            .filter(|s| s.mode == Mode::Err && !s.busy)
            .filter(|s| s.retry_at.is_none_or(|t| t <= now))
            .map(|s| (s.id, s.address.clone()))
            .collect()
    }

    /// Claim an ERR member for a return attempt; false if someone else has it.
    pub fn claim(&self, id: SlotId) -> bool {
        let mut state = self.write_state();
        match state.slots.iter_mut().find(|s| s.id == id) {
            Some(s) if s.mode == Mode::Err && !s.busy => {
                s.busy = true;
                true
            }
            _ => false,
        }
    }

    /// Release a claim after a failed return attempt. Attempts back off
    /// exponentially (from `base`, at most a minute), so that a replica
    /// that keeps failing — a full disk — does not churn the membership.
    pub fn release(&self, id: SlotId, why: &str) {
        self.release_with_backoff(id, why, Duration::from_millis(500));
    }

    pub fn release_with_backoff(&self, id: SlotId, why: &str, base: Duration) {
        let mut state = self.write_state();
        if let Some(s) = state.slots.iter_mut().find(|s| s.id == id) {
            s.busy = false;
            s.attempts = s.attempts.saturating_add(1);
            let factor = 1u32 << s.attempts.min(7);
            let wait = (base * factor).min(Duration::from_secs(60));
            s.retry_at = Some(Instant::now() + wait);
            if !why.is_empty() {
                s.last_error = why.to_string();
            }
        }
    }

    /// What we know about an ERR member for deciding how to catch it up:
    /// (instance id, missed set is known, failed for, resume cursor).
    pub fn catch_up_facts(&self, id: SlotId) -> Option<(String, bool, Duration, Option<u64>)> {
        let state = self.read_state();
        state.slots.iter().find(|s| s.id == id).map(|s| {
            (
                s.instance_id.clone(),
                s.missed.is_some(),
                s.failed_at.map(|t| t.elapsed()).unwrap_or(Duration::MAX),
                s.resume_cursor,
            )
        })
    }

    /// Forget what ERR members missed once they are past `stale`: they will be
    /// rebuilt in full if they return.
    pub fn expire_stale(&self, stale: Duration) {
        let mut state = self.write_state();
        let mut changed = false;
        for s in state.slots.iter_mut() {
            if s.mode == Mode::Err
                && s.missed.is_some()
                && s.failed_at.is_some_and(|t| t.elapsed() > stale)
            {
                info!(volume = %self.volume, replica = %s.address,
                    "replica is past the stale-replica timeout: it will be rebuilt in full");
                s.missed = None;
                s.last_error = format!("stale (away longer than {stale:?}): {}", s.last_error);
                changed = true;
            }
        }
        if changed {
            self.update_tracking(&state);
        }
    }

    /// Bring a returning replica into the write set in WO mode and record
    /// that. Returns the chunks the copier must walk. Waits for every write in
    /// flight, so none that left the replica out is still unaccounted for.
    pub async fn join_write_set(
        &self,
        id: SlotId,
        client: Arc<ReplicaClient>,
        instance_id: String,
        catch_up: CatchUp,
        progress: Arc<RebuildProgress>,
    ) -> Result<Vec<u64>, String> {
        let _gate = self.io_gate.write().await;
        let _change = self.change.lock().await;
        let chunks = {
            let mut state = self.write_state();
            let total_chunks = self.chunks;
            let Some(slot) = state.slots.iter_mut().find(|s| s.id == id) else {
                return Err("member was removed".into());
            };
            if slot.mode != Mode::Err {
                return Err(format!("member is {}, not ERR", slot.mode.as_str()));
            }
            let chunks: Vec<u64> = match (catch_up, slot.missed.as_ref()) {
                (CatchUp::Partial, Some(missed)) => missed.iter().collect(),
                (CatchUp::Partial, None) => (0..total_chunks).collect(),
                (CatchUp::Full { start }, _) => {
                    let first = start / self.chunk_size;
                    (first.min(total_chunks)..total_chunks).collect()
                }
            };
            slot.mode = Mode::Wo;
            slot.client = Some(client);
            slot.instance_id = instance_id;
            slot.last_error = String::new();
            slot.failed_at = None;
            slot.missed = None;
            slot.resume_cursor = None;
            slot.rebuild = Some(progress);
            state.generation += 1;
            self.update_tracking(&state);
            chunks
        };
        self.record_membership().await;
        Ok(chunks)
    }

    /// A finished rebuild: WO → RW, recorded.
    pub async fn finish_rebuild(&self, id: SlotId) -> Result<(), String> {
        let _change = self.change.lock().await;
        {
            let mut state = self.write_state();
            let Some(slot) = state.slots.iter_mut().find(|s| s.id == id) else {
                return Err("member was removed".into());
            };
            if slot.mode != Mode::Wo {
                return Err(format!("member is {}, not WO", slot.mode.as_str()));
            }
            slot.mode = Mode::Rw;
            slot.busy = false;
            slot.attempts = 0;
            slot.retry_at = None;
            state.generation += 1;
        }
        self.record_membership().await;
        Ok(())
    }

    /// Add a member (ERR until it is rebuilt); returns its slot id.
    pub async fn add_member(&self, address: &str) -> Result<SlotId, String> {
        let _change = self.change.lock().await;
        let id = {
            let mut state = self.write_state();
            if let Some(s) = state.slots.iter().find(|s| s.address == address) {
                return Ok(s.id);
            }
            let mut slot = ReplicaSlot::new(address.to_string(), String::new(), Mode::Err);
            slot.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            slot.last_error = "added: waiting to be rebuilt".into();
            slot.failed_at = Some(Instant::now());
            let id = slot.id;
            state.slots.push(slot);
            state.generation += 1;
            id
        };
        self.record_membership().await;
        info!(volume = %self.volume, replica = %address, "member added");
        Ok(id)
    }

    /// Remove a member. Refused if it would leave fewer RW replicas than the
    /// write policy needs, or while it is being rebuilt.
    pub async fn remove_member(&self, address: &str) -> Result<(), String> {
        let _change = self.change.lock().await;
        {
            let mut state = self.write_state();
            let Some(pos) = state.slots.iter().position(|s| s.address == address) else {
                return Err(format!(
                    "{address} is not a member of volume {}",
                    self.volume
                ));
            };
            let slot = &state.slots[pos];
            if slot.busy || slot.mode == Mode::Wo {
                return Err(format!(
                    "{address} is being rebuilt; try again when it is done"
                ));
            }
            let rw_after = rw_of(&state) - usize::from(slot.mode == Mode::Rw);
            let min_after = self.policy.min_rw(state.slots.len() - 1).max(1);
            if rw_after < min_after {
                return Err(format!(
                    "removing {address} would leave {rw_after} RW replica(s); the write policy {} needs {min_after}",
                    self.policy.as_str()
                ));
            }
            let slot = state.slots.remove(pos);
            if let Some(client) = slot.client {
                client.shutdown();
            }
            state.generation += 1;
            self.update_tracking(&state);
        }
        self.record_membership().await;
        info!(volume = %self.volume, replica = %address, "member removed");
        Ok(())
    }

    /// Drop every client (engine shutdown).
    pub fn shutdown(&self) {
        for slot in self.write_state().slots.iter_mut() {
            if let Some(client) = slot.client.take() {
                client.shutdown();
            }
        }
    }
}
