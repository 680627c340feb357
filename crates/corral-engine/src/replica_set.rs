//! The replica set: each replica's mode (RW / WO / ERR), the membership
//! generation, and how a failure is recorded before any further write is
//! acknowledged.
//!
//! Rules (DESIGN.md, "Consistency protocol"):
//! - a replica that errors or times out goes to ERR, and the new membership
//!   (generation + 1) is written to the remaining RW replicas before the
//!   failing write — or any later one — is acknowledged;
//! - the write policy says how few RW replicas may remain: below that,
//!   writes fail with an error instead of being acknowledged;
//! - a replica that rejects our epoch means a newer engine owns the volume:
//!   this engine is fenced and serves nothing from then on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use corral_block::BlockError;
use corral_proto::v1::{self as pb, SetMembershipRequest};
use tracing::{error, info, warn};

use crate::client::ReplicaClient;
use crate::config::WritePolicy;
use crate::error::ReplicaIoError;

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

/// One member of the set.
pub struct ReplicaSlot {
    pub address: String,
    pub instance_id: String,
    pub mode: Mode,
    pub client: Option<Arc<ReplicaClient>>,
    pub last_error: String,
}

/// A snapshot of one member, for status output.
#[derive(Clone, Debug)]
pub struct SlotStatus {
    pub address: String,
    pub instance_id: String,
    pub mode: Mode,
    pub last_error: String,
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
    state: RwLock<SetState>,
    /// Serialises membership changes (and their recording on the replicas).
    change: tokio::sync::Mutex<()>,
    fenced: AtomicBool,
    next_read: AtomicUsize,
}

impl ReplicaSet {
    /// A set as decided by the open procedure; `generation` is already recorded.
    pub fn new(
        volume: String,
        epoch: u64,
        generation: u64,
        policy: WritePolicy,
        timeout: Duration,
        slots: Vec<ReplicaSlot>,
    ) -> Self {
        ReplicaSet {
            volume,
            epoch,
            policy,
            timeout,
            state: RwLock::new(SetState { slots, generation }),
            change: tokio::sync::Mutex::new(()),
            fenced: AtomicBool::new(false),
            next_read: AtomicUsize::new(0),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SetState> {
        // Updates to the state are single assignments: a poisoned lock still holds a valid state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, SetState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
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

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Replicas that take writes (RW and WO), with their index.
    pub fn write_targets(&self) -> Vec<(usize, Arc<ReplicaClient>, Mode)> {
        self.read_state()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mode != Mode::Err)
            .filter_map(|(i, s)| s.client.clone().map(|c| (i, c, s.mode)))
            .collect()
    }

    /// RW replicas, rotated so that reads spread round robin.
    pub fn read_targets(&self) -> Vec<(usize, Arc<ReplicaClient>)> {
        let mut rw: Vec<_> = self
            .read_state()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mode == Mode::Rw)
            .filter_map(|(i, s)| s.client.clone().map(|c| (i, c)))
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
        self.read_state()
            .slots
            .iter()
            .filter(|s| s.mode == Mode::Rw)
            .count()
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
                address: s.address.clone(),
                instance_id: s.instance_id.clone(),
                mode: s.mode,
                last_error: s.last_error.clone(),
            })
            .collect()
    }

    fn membership_of(state: &SetState) -> pb::Membership {
        pb::Membership {
            generation: state.generation,
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
        Self::membership_of(&self.read_state())
    }

    /// Mark this engine fenced: a replica saw a newer epoch.
    pub fn mark_fenced(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::Relaxed) {
            error!(volume = %self.volume, epoch = self.epoch, reason = %why,
                "fenced by a newer engine: no longer serving I/O");
        }
    }

    /// Handle a failed request to replica `idx`.
    ///
    /// Errors that are not the replica's fault (fencing, a bad request, a
    /// checksum mismatch the caller repairs) change nothing else. Otherwise the
    /// replica goes to ERR and the new membership is recorded on the remaining
    /// RW replicas before this returns. Returns whether writes may still be
    /// acknowledged.
    pub async fn handle_failure(&self, idx: usize, err: &ReplicaIoError) -> Result<(), BlockError> {
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
            match state.slots.get_mut(idx) {
                Some(slot) if slot.mode != Mode::Err => {
                    warn!(volume = %self.volume, replica = %slot.address, error = %err,
                        "replica failed: moving it to ERR");
                    slot.mode = Mode::Err;
                    slot.last_error = err.to_string();
                    if let Some(client) = slot.client.take() {
                        client.shutdown();
                    }
                    state.generation += 1;
                    true
                }
                _ => false,
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
                let record = Self::membership_of(&state);
                let targets: Vec<_> = state
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.mode == Mode::Rw)
                    .filter_map(|(i, s)| s.client.clone().map(|c| (i, c)))
                    .collect();
                (record, targets)
            };
            if targets.is_empty() {
                error!(volume = %self.volume, "no RW replica left to record the membership on");
                return;
            }
            let calls = targets.iter().map(|(idx, client)| {
                let mut control = client.control();
                let request = SetMembershipRequest {
                    volume: self.volume.clone(),
                    epoch: self.epoch,
                    membership: Some(record.clone()),
                };
                async move {
                    let result =
                        tokio::time::timeout(self.timeout, control.set_membership(request)).await;
                    (*idx, result)
                }
            });
            let results = futures::future::join_all(calls).await;
            let mut failed = Vec::new();
            for (idx, result) in results {
                match result {
                    Ok(Ok(_)) => {}
                    Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                        self.mark_fenced(status.message());
                        return;
                    }
                    Ok(Err(status)) => failed.push((idx, status.to_string())),
                    Err(_) => failed.push((idx, format!("timed out after {:?}", self.timeout))),
                }
            }
            if failed.is_empty() {
                info!(volume = %self.volume, generation = record.generation,
                    rw = self.rw_count(), "membership recorded");
                return;
            }
            let mut state = self.write_state();
            for (idx, why) in failed {
                if let Some(slot) = state.slots.get_mut(idx) {
                    warn!(volume = %self.volume, replica = %slot.address, error = %why,
                        "cannot record membership: moving replica to ERR");
                    slot.mode = Mode::Err;
                    slot.last_error = format!("recording membership: {why}");
                    if let Some(client) = slot.client.take() {
                        client.shutdown();
                    }
                }
            }
            state.generation += 1;
        }
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
