//! The replica set: the async shell around [`Members`], the pure record of
//! each member's mode and of what it may have missed. This module holds the
//! members' connections and does the I/O the decisions call for: every
//! membership change is written to the remaining RW replicas before any
//! further write is acknowledged, and a replica that cannot take the record
//! goes to ERR too.
//!
//! Rules (DESIGN.md, "Consistency protocol"; docs/failure-handling.md):
//! - a replica that errors goes to ERR, and the new membership (the next
//!   generation) is recorded before the failing write — or any later one —
//!   is acknowledged;
//! - a timeout never shrinks the RW set below what the write policy needs
//!   (never below one): the error goes to the client instead, since a slow
//!   replica may be the only one with the newest data;
//! - whatever an ERR member may have missed is noted ([`Members`]), so that
//!   it can be caught up by copying only that;
//! - a replica that rejects our epoch means a newer engine owns the volume:
//!   this engine is fenced and serves nothing from then on.
//!
//! Lock order: `snapshot_commit` (flushes shared, a snapshot create
//! exclusive), then `io_gate` (writes shared, a joining member exclusive), then
//! `change` (one membership change at a time — or one flush, which must not
//! complete while a change is unrecorded), then the short `state` lock,
//! never held across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use corral_block::BlockError;
use corral_client::ClientError;
use corral_proto::v1 as pb;
use tracing::{error, info, warn};

use crate::client::ReplicaClient;
use crate::config::WritePolicy;
use crate::drain::{InFlightWrite, WriteDrain};
use crate::error::ReplicaIoError;
use crate::members::{
    Admission, CatchUpPlan, FailDecision, FailureKind, Members, MembershipError, RebuildTicket,
    ReturnFacts, ReturnFailure,
};
pub use crate::members::{Epoch, Generation, MemberId, Mode};
use crate::progress::{RebuildProgress, ReplayProgress};

pub mod expand;
pub mod snapshot;

/// The id of a member (see [`MemberId`]).
pub type SlotId = MemberId;

/// The membership record of `members`, as written by the engine of `epoch`.
pub fn membership_record(members: &Members, epoch: Epoch) -> pb::Membership {
    pb::Membership {
        generation: members.generation().0,
        epoch: epoch.0,
        members: members
            .all()
            .iter()
            .map(|m| pb::Member {
                address: m.address.clone(),
                instance_id: m.instance_id.clone(),
                mode: pb::ReplicaMode::from(m.mode) as i32,
            })
            .collect(),
    }
}

/// Why a returning replica could not join the write set.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("recording the membership on it: {0}")]
    Record(String),
    /// The volume grew while it was being brought back: grow it again.
    #[error("its replica has {replica} bytes, the volume grew to {volume} meanwhile")]
    TooSmall { replica: u64, volume: u64 },
    /// A snapshot was created or deleted after its chain was reconciled
    /// (see [`crate::chain_sync`]): reconcile it again.
    #[error("the snapshot chain changed while it was being reconciled")]
    ChainChanged,
}

/// See [`ReplicaSet::chain_change`].
struct ChainChange<'a> {
    version: &'a AtomicU64,
    under_way: &'a AtomicUsize,
}

impl Drop for ChainChange<'_> {
    fn drop(&mut self) {
        // The version first: a reader that then finds none under way has
        // read a version this change can no longer leave unchanged.
        self.version.fetch_add(1, Ordering::SeqCst);
        self.under_way.fetch_sub(1, Ordering::SeqCst);
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
    /// Chunks it may differ in, when a set is kept (None: unknown or all).
    pub missed_chunks: Option<u64>,
    pub rebuild: Option<Arc<RebuildProgress>>,
    pub busy: bool,
}

struct SetState {
    members: Members,
    clients: HashMap<SlotId, Arc<ReplicaClient>>,
    rebuilds: HashMap<SlotId, Arc<RebuildProgress>>,
    /// Snapshot replays under way into returning replicas (before they
    /// join), shown with the rebuilds.
    replays: Vec<Arc<ReplayProgress>>,
}

/// Keeps a snapshot replay listed ([`ReplicaSet::show_replay`]) until it
/// drops.
pub struct ReplayShown<'a> {
    set: &'a ReplicaSet,
    progress: Arc<ReplayProgress>,
}

impl ReplayShown<'_> {
    pub fn progress(&self) -> &ReplayProgress {
        &self.progress
    }
}

impl Drop for ReplayShown<'_> {
    fn drop(&mut self) {
        self.set
            .write_state()
            .replays
            .retain(|p| !Arc::ptr_eq(p, &self.progress));
    }
}

/// What a write holds while in flight (see [`ReplicaSet::write_gate`]).
pub struct WriteGate<'a> {
    _in_flight: InFlightWrite<'a>,
    _gate: tokio::sync::RwLockReadGuard<'a, ()>,
}

/// The replicas of one volume and their membership record.
pub struct ReplicaSet {
    volume: String,
    epoch: Epoch,
    /// The volume's size in bytes: changed only by an expansion, which
    /// holds `io_gate` exclusively and `change` (see [`expand`]).
    size: AtomicU64,
    timeout: Duration,
    state: RwLock<SetState>,
    /// Serialises membership changes (and their recording on the replicas).
    change: tokio::sync::Mutex<()>,
    /// Writes hold this shared while in flight; a replica joining the write
    /// set takes it exclusively, so no write that left it out is still in
    /// flight (and unnoted in what it missed) when it joins.
    io_gate: tokio::sync::RwLock<()>,
    /// Writes in flight by generation, for flush rounds to wait on.
    writes: WriteDrain,
    /// Flushes hold this shared; a snapshot create holds it exclusively from
    /// before it holds writes until every replica has recorded the snapshot.
    /// A replica's flush waits for its snapshot commit (a sync of what the
    /// frozen head holds), which may take longer than the replica timeout
    /// under load: flushes wait here instead, untimed.
    snapshot_commit: tokio::sync::RwLock<()>,
    fenced: AtomicBool,
    next_read: AtomicUsize,
    /// ERR members whose missed chunks are noted, and ERR members that hold
    /// every acknowledged write: writes skip the bookkeeping when both are 0.
    tracking: AtomicUsize,
    authorities: AtomicUsize,
    /// Replicas moved to ERR since the engine started.
    failures: AtomicU64,
    /// Bumped at the start and end of every snapshot create (under
    /// `io_gate` held exclusively) and delete (under `io_gate` held shared,
    /// which joins exclude): a returning replica whose chain was reconciled
    /// at one version joins only at that version.
    chain_version: AtomicU64,
    /// Snapshot creates and deletes under way: while one is, the replicas'
    /// chains may differ (some have taken it, some not yet), so none is
    /// compared or joined ([`Self::quiet_chain_version`]).
    chain_changes_under_way: AtomicUsize,
    /// The reservation record in force, and the last sequence sent. A short
    /// lock, never held across an await.
    reservations: Mutex<ReservationState>,
    /// Serialises saves of the reservation record; taken before `io_gate`.
    reservation_turn: tokio::sync::Mutex<()>,
}

/// The reservation record in force — the newest found at open, then the
/// last one saved — and the highest sequence ever sent. A failed save may
/// still have reached some replicas; every later record (a save, or the
/// copy a joining replica is given) takes a sequence past it, so that the
/// state in force is what the next engine finds newest.
#[derive(Debug, Default)]
struct ReservationState {
    in_force: Option<pb::ReservationRecord>,
    last_sequence: u64,
}

impl ReservationState {
    /// A new record of `state` from the engine of `epoch`, its sequence
    /// taken.
    fn next_record(&mut self, epoch: Epoch, state: bytes::Bytes) -> pb::ReservationRecord {
        self.last_sequence = self.last_sequence.saturating_add(1);
        pb::ReservationRecord {
            epoch: epoch.0,
            sequence: self.last_sequence,
            state,
        }
    }
}

fn kind_of(err: &ReplicaIoError) -> FailureKind {
    match err {
        ReplicaIoError::Timeout(_) => FailureKind::Timeout,
        _ => FailureKind::Lost,
    }
}

impl ReplicaSet {
    /// A set as the open procedure decided it; `members.generation()` is
    /// already recorded. `clients`: the connected members (the RW ones).
    pub fn new(
        cfg: &crate::config::EngineConfig,
        epoch: Epoch,
        size: u64,
        members: Members,
        clients: Vec<(SlotId, Arc<ReplicaClient>)>,
        reservations: Option<pb::ReservationRecord>,
    ) -> Self {
        let tracking = members.tracking();
        ReplicaSet {
            volume: cfg.volume.clone(),
            epoch,
            size: AtomicU64::new(size),
            timeout: cfg.replica_timeout,
            state: RwLock::new(SetState {
                members,
                clients: clients.into_iter().collect(),
                rebuilds: HashMap::new(),
                replays: Vec::new(),
            }),
            change: tokio::sync::Mutex::new(()),
            io_gate: tokio::sync::RwLock::new(()),
            writes: WriteDrain::default(),
            snapshot_commit: tokio::sync::RwLock::new(()),
            fenced: AtomicBool::new(false),
            next_read: AtomicUsize::new(0),
            tracking: AtomicUsize::new(tracking),
            authorities: AtomicUsize::new(0),
            failures: AtomicU64::new(0),
            chain_version: AtomicU64::new(0),
            chain_changes_under_way: AtomicUsize::new(0),
            reservations: Mutex::new(ReservationState {
                last_sequence: reservations.as_ref().map_or(0, |r| r.sequence),
                in_force: reservations,
            }),
            reservation_turn: tokio::sync::Mutex::new(()),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SetState> {
        // Every update keeps the state valid between statements: a poisoned lock still holds one.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, SetState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the members, then refresh the tracking count.
    fn with_members<T>(&self, f: impl FnOnce(&mut Members) -> T) -> T {
        let mut state = self.write_state();
        let out = f(&mut state.members);
        self.refresh_counts(&state.members);
        out
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The volume's size in bytes (it only grows, see [`expand`]).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn generation(&self) -> Generation {
        self.read_state().members.generation()
    }

    pub fn policy(&self) -> WritePolicy {
        self.read_state().members.policy()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn chunk_count(&self) -> u64 {
        self.read_state().members.chunk_count()
    }

    /// Replicas moved to ERR since the engine started.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// How many snapshot creates and deletes this engine has begun (see
    /// [`Self::join_write_set`]).
    pub fn chain_version(&self) -> u64 {
        self.chain_version.load(Ordering::Acquire)
    }

    /// [`Self::chain_version`] if no snapshot create or delete is under
    /// way; None while one is. Chains listed after this returned `Some(v)`
    /// are those of one moment if the version is still `v` once they are
    /// all listed: a change that began after this call bumped it, and none
    /// was under way before.
    pub fn quiet_chain_version(&self) -> Option<u64> {
        let version = self.chain_version.load(Ordering::SeqCst);
        (self.chain_changes_under_way.load(Ordering::SeqCst) == 0).then_some(version)
    }

    /// Marks a snapshot create or delete under way: the chain version is
    /// bumped now and again when the guard drops, so a replica whose chain
    /// was read at any point in between does not join at that version, and
    /// [`Self::quiet_chain_version`] is None until the guard drops.
    fn chain_change(&self) -> ChainChange<'_> {
        self.chain_changes_under_way.fetch_add(1, Ordering::SeqCst);
        self.chain_version.fetch_add(1, Ordering::SeqCst);
        ChainChange {
            version: &self.chain_version,
            under_way: &self.chain_changes_under_way,
        }
    }

    /// The chunks in which ERR member `id`'s head may differ from the RW
    /// set's, were it to return with `facts`, and whether it is known
    /// empty (see [`Members::plan`]); None if it is not a member.
    pub fn catch_up_preview(&self, id: SlotId, facts: &ReturnFacts) -> Option<(Vec<u64>, bool)> {
        self.read_state()
            .members
            .plan(id, facts)
            .map(|(_, chunks, empty)| (chunks, empty))
    }

    /// Snapshots deleted while member `id` was out (None: not known).
    pub fn missed_deletes(&self, id: SlotId) -> Option<std::collections::BTreeSet<String>> {
        self.read_state().members.missed_deletes(id)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Held by every write while it is in flight: `io_gate` shared, and a
    /// place among the writes a flush round waits for.
    pub async fn write_gate(&self) -> WriteGate<'_> {
        let gate = self.io_gate.read().await;
        WriteGate {
            _in_flight: self.writes.enter(),
            _gate: gate,
        }
    }

    /// Held by a flush from before it drains writes until its replies are
    /// in: no snapshot is being recorded on the replicas meanwhile.
    pub async fn no_snapshot_commit(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.snapshot_commit.read().await
    }

    /// Held by a flush while it sends: every write begun before it has had
    /// its outcome handled (a timeout kept or moved its replica). Writes
    /// begun after it go on (see [`crate::drain`]); `io_gate` is held
    /// shared, so no member joins and no snapshot is created meanwhile.
    pub async fn writes_drained(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        let gate = self.io_gate.read().await;
        self.writes.wait_for_begun().await;
        gate
    }

    /// Which join of member `id` is current (for [`Self::confirmed`]).
    pub fn member_session(&self, id: SlotId) -> Option<u64> {
        self.read_state().members.session_of(id)
    }

    /// A write to `chunks` that timed out on member `id` (in its join
    /// `session`) was applied there after all: its late reply came.
    pub fn confirmed(&self, id: SlotId, session: u64, chunks: &[u64]) {
        self.write_state().members.confirmed(id, session, chunks);
    }

    /// Why no flush may be sent now: an RW replica has not confirmed
    /// writes that timed out on it.
    pub fn unconfirmed_writes(&self) -> Option<String> {
        let state = self.read_state();
        state.members.unconfirmed_writes().map(|(address, chunks)| {
            format!(
                "volume {}: replica {address} has not confirmed writes to {chunks} chunk(s) that timed out on it; flushes wait for it",
                self.volume
            )
        })
    }

    /// Held by a flush while it runs: no membership change is being
    /// recorded meanwhile (changes wait for the flush, and it for them).
    pub async fn membership_settled(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.change.lock().await
    }

    /// Replicas that take writes (RW and WO).
    pub fn write_targets(&self) -> Vec<(SlotId, Arc<ReplicaClient>, Mode)> {
        let state = self.read_state();
        state
            .members
            .all()
            .iter()
            .filter(|m| m.mode != Mode::Err)
            .filter_map(|m| {
                state
                    .clients
                    .get(&m.id)
                    .map(|c| (m.id, Arc::clone(c), m.mode))
            })
            .collect()
    }

    /// RW replicas in the order reads try them: those on this node first
    /// (reached over their daemon's unix socket), then the others; each
    /// group rotated so that reads spread round robin within it. A read
    /// goes to the first and falls back to the next on failure.
    pub fn read_targets(&self) -> Vec<(SlotId, Arc<ReplicaClient>)> {
        let mut rw: Vec<_> = {
            let state = self.read_state();
            state
                .members
                .all()
                .iter()
                .filter(|m| m.mode == Mode::Rw)
                .filter_map(|m| state.clients.get(&m.id).map(|c| (m.id, Arc::clone(c))))
                .collect()
        };
        let turn = self.next_read.fetch_add(1, Ordering::Relaxed);
        local_first(&mut rw, turn, |(_, c)| c.is_local());
        rw
    }

    pub fn total(&self) -> usize {
        self.read_state().members.total()
    }

    pub fn rw_count(&self) -> usize {
        self.read_state().members.rw_count()
    }

    /// Fewest RW replicas with which writes are still acknowledged.
    pub fn min_rw(&self) -> usize {
        self.read_state().members.min_rw()
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
        let (writable, acknowledging, min, policy) = {
            let state = self.read_state();
            (
                state.members.writable(),
                state.members.acknowledging(),
                state.members.min_rw(),
                state.members.policy(),
            )
        };
        if !writable {
            return Err(BlockError::Unavailable(format!(
                "volume {}: {acknowledging} RW replica(s) recorded, write policy {} needs {}",
                self.volume,
                policy.as_str(),
                min.max(1)
            )));
        }
        Ok(())
    }

    /// Lists a replay of `snapshots` snapshots into the replica at
    /// `address` with the rebuilds ([`Self::replays`]) until the returned
    /// guard drops.
    pub fn show_replay(&self, address: &str, snapshots: usize) -> ReplayShown<'_> {
        let progress = Arc::new(ReplayProgress::new(address, snapshots));
        self.write_state().replays.push(Arc::clone(&progress));
        ReplayShown {
            set: self,
            progress,
        }
    }

    /// The snapshot replays under way, for the rebuild status.
    pub fn replays(&self) -> Vec<pb::RebuildStatus> {
        self.read_state()
            .replays
            .iter()
            .map(|p| p.to_pb())
            .collect()
    }

    /// Status of every member.
    pub fn status(&self) -> Vec<SlotStatus> {
        let now = Instant::now();
        let state = self.read_state();
        state
            .members
            .all()
            .iter()
            .map(|m| SlotStatus {
                id: m.id,
                address: m.address.clone(),
                instance_id: m.instance_id.clone(),
                mode: m.mode,
                last_error: m.last_error.clone(),
                failed_for: m.failed_at.map(|t| now.saturating_duration_since(t)),
                missed_chunks: m.divergence.tracked_len(),
                rebuild: state.rebuilds.get(&m.id).cloned(),
                busy: m.busy,
            })
            .collect()
    }

    /// The current membership record.
    pub fn membership(&self) -> pb::Membership {
        membership_record(&self.read_state().members, self.epoch)
    }

    /// Mark this engine fenced: a replica saw a newer epoch.
    pub fn mark_fenced(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::Relaxed) {
            error!(volume = %self.volume, epoch = %self.epoch, reason = %why,
                "fenced by a newer engine: no longer serving I/O");
        }
    }

    /// Note that `chunks` were written (or were being written): members in
    /// ERR may differ there now. Returns whether the write may be
    /// acknowledged (the volume is still writable).
    pub fn note_written(&self, chunks: &[u64]) -> Result<(), BlockError> {
        if self.tracking.load(Ordering::Relaxed) == 0
            && self.authorities.load(Ordering::Relaxed) == 0
        {
            return self.check_writable();
        }
        let acknowledged = {
            let mut state = self.write_state();
            let acknowledged = state.members.note_written(chunks);
            self.refresh_counts(&state.members);
            acknowledged
        };
        if !acknowledged {
            // Decided under the lock: a member that still counts as holding
            // every acknowledged write must not miss this one.
            return Err(self.check_writable().err().unwrap_or_else(|| {
                BlockError::Unavailable(format!(
                    "volume {}: too few RW replicas took the write",
                    self.volume
                ))
            }));
        }
        self.check_readable()
    }

    /// A flush succeeded on every RW member (see [`Members::note_flushed`]).
    pub fn note_flushed(&self) {
        if self.authorities.load(Ordering::Relaxed) > 0 {
            let mut state = self.write_state();
            state.members.note_flushed();
            self.refresh_counts(&state.members);
        }
    }

    fn refresh_counts(&self, members: &Members) {
        self.tracking.store(members.tracking(), Ordering::Relaxed);
        self.authorities
            .store(members.authorities(), Ordering::Relaxed);
    }

    /// Stop and drop the clients of members that left the I/O path.
    fn drop_clients_of_failed(state: &mut SetState) {
        let out: Vec<SlotId> = state
            .members
            .all()
            .iter()
            .filter(|m| m.mode == Mode::Err)
            .map(|m| m.id)
            .collect();
        for id in out {
            if let Some(client) = state.clients.remove(&id) {
                client.shutdown();
            }
        }
    }

    /// Handle a failed request to member `id`; `chunks` are the chunks that
    /// the failed request would have written (empty for reads).
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
        let why = err.to_string();
        let (decision, address) = {
            let mut state = self.write_state();
            let decision = state
                .members
                .fail(id, kind_of(err), chunks, &why, Instant::now());
            if matches!(decision, FailDecision::Moved { .. }) {
                Self::drop_clients_of_failed(&mut state);
            }
            self.refresh_counts(&state.members);
            let address = state
                .members
                .get(id)
                .map(|m| m.address.clone())
                .unwrap_or_default();
            (decision, address)
        };
        match decision {
            FailDecision::NotMember | FailDecision::AlreadyOut => {}
            FailDecision::Kept { rw } => {
                let policy = self.policy();
                warn!(volume = %self.volume, replica = %address, error = %err,
                    "replica timed out, but it is one of the last {rw} RW replicas the write policy needs: keeping it, failing the request");
                return Err(BlockError::Unavailable(format!(
                    "volume {}: replica {address} timed out and the write policy {} cannot drop it (RW replicas: {rw})",
                    self.volume,
                    policy.as_str()
                )));
            }
            FailDecision::Moved { previous } => {
                warn!(volume = %self.volume, replica = %address, error = %err,
                    mode = previous.as_str(), "replica failed: moving it to ERR");
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.record_membership().await;
            }
        }
        self.check_writable()
    }

    /// Write `record` to the members `ids` (those with a client); returns
    /// (accepted, failed with why). A replica that says a newer engine owns
    /// the volume fences this one: None.
    async fn write_record(
        &self,
        record: &pb::Membership,
        ids: &[SlotId],
    ) -> Option<(Vec<SlotId>, Vec<(SlotId, String)>)> {
        let targets: Vec<(SlotId, Arc<ReplicaClient>)> = {
            let state = self.read_state();
            ids.iter()
                .filter_map(|id| state.clients.get(id).map(|c| (*id, Arc::clone(c))))
                .collect()
        };
        let calls = targets.iter().map(|(id, client)| {
            let record = record.clone();
            async move {
                let result = client
                    .control()
                    .set_membership(&self.volume, self.epoch, record)
                    .await;
                (*id, result)
            }
        });
        let mut accepted = Vec::new();
        let mut failed = Vec::new();
        for (id, result) in futures::future::join_all(calls).await {
            match result {
                Ok(_) => accepted.push(id),
                Err(e @ ClientError::Fenced { .. }) => {
                    self.mark_fenced(&e.to_string());
                    return None;
                }
                Err(e) => failed.push((id, e.to_string())),
            }
        }
        // A member without a client cannot take it either.
        for id in ids {
            if !targets.iter().any(|(t, _)| t == id) {
                failed.push((*id, "not connected".into()));
            }
        }
        Some((accepted, failed))
    }

    /// Record the current membership on the RW replicas — first on those of
    /// the newest effective record, then, once one of them has taken it, on
    /// the others (see [`Members::record_targets`]). A replica that cannot
    /// take it goes to ERR too, and the record is written again. Callers
    /// hold `change`.
    async fn record_membership(&self) {
        loop {
            let (record, first, then, rw, out) = {
                let members = &self.read_state().members;
                let (first, then) = members.record_targets();
                (
                    membership_record(members, self.epoch),
                    first,
                    then,
                    members.ids_in(Mode::Rw),
                    members.ids_in(Mode::Err),
                )
            };
            if first.is_empty() && then.is_empty() {
                error!(volume = %self.volume, "no RW replica left to record the membership on");
                return;
            }
            let Some((mut accepted, mut failed)) = self.write_record(&record, &first).await else {
                return;
            };
            if !accepted.is_empty() || self.policy() == WritePolicy::Quorum {
                let Some((accepted_then, failed_then)) = self.write_record(&record, &then).await
                else {
                    return;
                };
                accepted.extend(accepted_then);
                failed.extend(failed_then);
            }
            if !self.with_members(|m| m.recorded(&rw, &accepted, &out)) {
                warn!(volume = %self.volume, generation = record.generation,
                    "the membership record reached no replica of the recorded RW set: writes wait until one returns");
                if failed.is_empty() {
                    return;
                }
            }
            if failed.is_empty() {
                info!(volume = %self.volume, generation = record.generation,
                    rw = self.rw_count(), "membership recorded");
                return;
            }
            let now = Instant::now();
            let mut state = self.write_state();
            for (id, why) in failed {
                let why = format!("recording membership: {why}");
                let decision = state.members.fail(id, FailureKind::Lost, &[], &why, now);
                if matches!(decision, FailDecision::Moved { .. }) {
                    if let Some(m) = state.members.get(id) {
                        warn!(volume = %self.volume, replica = %m.address, error = %why,
                            "cannot record membership: moving replica to ERR");
                    }
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    Self::drop_clients_of_failed(&mut state);
                }
            }
            self.refresh_counts(&state.members);
        }
    }

    /// ERR members nobody is bringing back yet, whose retry time has come.
    pub fn returnable(&self) -> Vec<(SlotId, String)> {
        self.read_state().members.returnable(Instant::now())
    }

    /// Claim an ERR member for a return attempt; false if someone else has it.
    pub fn claim(&self, id: SlotId) -> bool {
        self.write_state().members.claim(id)
    }

    /// Release a claim after a failed return attempt (see [`Members::release`]).
    pub fn release(&self, id: SlotId, failure: ReturnFailure, why: &str, retry_interval: Duration) {
        self.write_state()
            .members
            .release(id, failure, why, retry_interval, Instant::now());
    }

    /// The instance id this engine knows member `id` by (empty: unknown).
    pub fn instance_of(&self, id: SlotId) -> Option<String> {
        self.read_state()
            .members
            .get(id)
            .map(|m| m.instance_id.clone())
    }

    /// Forget what ERR members missed once they are past `stale`: they will be
    /// rebuilt in full if they return.
    pub fn expire_stale(&self, stale: Duration) {
        for address in self.with_members(|m| m.expire_stale(stale, Instant::now())) {
            info!(volume = %self.volume, replica = %address,
                "replica is past the stale-replica timeout: it will be rebuilt in full");
        }
    }

    /// Bring a returning replica into the write set — in WO mode with a plan
    /// to catch it up, or RW at once if it holds every acknowledged write
    /// and no RW replica is left (see [`Members::join`]) — and record that.
    /// Waits for every write in flight, so none that left the replica out
    /// is still unnoted.
    ///
    /// Before a replica joins in WO mode, the current record — which names
    /// it ERR — is written to it too. Its rebuild changes its data; without
    /// that record, an engine elected later from an older record that
    /// still names it RW would take it for up to date.
    ///
    /// `replica_size` is the size its replica has (grown to the volume's
    /// before this call): if the volume grew meanwhile, it is refused
    /// ([`JoinError::TooSmall`]) and tried again. `chain_version` is
    /// [`Self::chain_version`] as it was before its snapshot chain was made
    /// the RW set's ([`crate::chain_sync`]): if a snapshot was created or
    /// deleted since, it is refused ([`JoinError::ChainChanged`]). From
    /// the join on, every delete reaches it and every create puts it out.
    #[allow(clippy::too_many_arguments)]
    pub async fn join_write_set(
        &self,
        id: SlotId,
        client: Arc<ReplicaClient>,
        facts: ReturnFacts,
        replica_size: u64,
        chain_version: u64,
        progress: impl FnOnce(&CatchUpPlan) -> Arc<RebuildProgress>,
    ) -> Result<Admission, JoinError> {
        let _gate = self.io_gate.write().await;
        let _change = self.change.lock().await;
        if replica_size < self.size() {
            return Err(JoinError::TooSmall {
                replica: replica_size,
                volume: self.size(),
            });
        }
        if self.quiet_chain_version() != Some(chain_version) {
            return Err(JoinError::ChainChanged);
        }
        let (record, settled, rw, out) = {
            let members = &self.read_state().members;
            (
                membership_record(members, self.epoch),
                members.record_settled(),
                members.ids_in(Mode::Rw),
                members.ids_in(Mode::Err),
            )
        };
        if settled && !rw.is_empty() {
            client
                .control()
                .set_membership(&self.volume, self.epoch, record)
                .await
                .map_err(|e| JoinError::Record(e.to_string()))?;
            self.with_members(|m| m.recorded(&rw, &[id], &out));
        }
        // The reservation state in force, as a new record (see
        // `ReservationState`); saves from now on keep it up to date (it
        // joins the write targets below, and no save is under way while
        // this holds `io_gate`).
        let reservations = {
            let mut r = self.lock_reservations();
            r.in_force
                .clone()
                .map(|current| r.next_record(self.epoch, current.state))
        };
        if let Some(record) = reservations {
            client
                .control()
                .set_reservations(&self.volume, self.epoch, record)
                .await
                .map_err(|e| JoinError::Record(format!("reservations: {e}")))?;
        }
        let admission = {
            let mut state = self.write_state();
            let admission = state.members.join(id, facts)?;
            state.clients.insert(id, client);
            if let Admission::Rebuild(plan) = &admission {
                state.rebuilds.insert(id, progress(plan));
            }
            self.refresh_counts(&state.members);
            admission
        };
        self.record_membership().await;
        Ok(admission)
    }

    /// The rebuild of `ticket` has copied `chunks` to its target.
    pub fn copied(&self, ticket: RebuildTicket, chunks: &[u64]) {
        self.write_state().members.copied(ticket, chunks);
    }

    /// A finished rebuild: WO → RW, recorded. Not while a snapshot is
    /// being taken (`io_gate`, shared as writes take it): a create puts
    /// every WO member out, so none turns RW without it.
    pub async fn finish_rebuild(&self, ticket: RebuildTicket) -> Result<(), MembershipError> {
        let _gate = self.io_gate.read().await;
        let _change = self.change.lock().await;
        self.with_members(|m| m.finish_rebuild(ticket))?;
        self.record_membership().await;
        Ok(())
    }

    /// Add a member (ERR until it is rebuilt); returns its id.
    pub async fn add_member(&self, address: &str) -> SlotId {
        let _change = self.change.lock().await;
        let (id, added) = self.with_members(|m| m.add(address, Instant::now()));
        if added {
            self.record_membership().await;
            info!(volume = %self.volume, replica = %address, "member added");
        }
        id
    }

    /// Remove a member. Refused if it would leave fewer RW replicas than the
    /// write policy needs, or while it is being rebuilt.
    pub async fn remove_member(&self, address: &str) -> Result<(), MembershipError> {
        let _change = self.change.lock().await;
        {
            let mut state = self.write_state();
            let removed = state.members.remove(address)?;
            if let Some(client) = state.clients.remove(&removed.id) {
                client.shutdown();
            }
            state.rebuilds.remove(&removed.id);
            self.refresh_counts(&state.members);
        }
        self.record_membership().await;
        info!(volume = %self.volume, replica = %address, "member removed");
        Ok(())
    }

    fn lock_reservations(&self) -> std::sync::MutexGuard<'_, ReservationState> {
        self.reservations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reservation record in force (None: never saved).
    pub fn current_reservations(&self) -> Option<pb::ReservationRecord> {
        self.lock_reservations().in_force.clone()
    }

    /// Save a frontend's reservation state on every writable replica, as
    /// the next record (this engine's epoch, the next sequence). A replica
    /// that cannot take it goes to ERR (and is given the state in force when
    /// it joins); the save succeeds if what is left may still acknowledge
    /// writes, like a write, and only then is the state in force. Saves take
    /// turns.
    pub async fn save_reservations(&self, state: bytes::Bytes) -> Result<(), BlockError> {
        let _turn = self.reservation_turn.lock().await;
        self.check_writable()?;
        let _gate = self.write_gate().await;
        let record = self.lock_reservations().next_record(self.epoch, state);
        let targets = self.write_targets();
        let calls = targets.iter().map(|(id, client, _)| {
            let record = record.clone();
            async move {
                let result = client
                    .control()
                    .set_reservations(&self.volume, self.epoch, record)
                    .await;
                (*id, result)
            }
        });
        let mut refused = None;
        for (id, result) in futures::future::join_all(calls).await {
            match result {
                Ok(_) => {}
                Err(e @ ClientError::Fenced { .. }) => {
                    self.mark_fenced(&e.to_string());
                    return Err(BlockError::Unavailable(format!(
                        "volume {}: saving reservations: {e}",
                        self.volume
                    )));
                }
                Err(e) => {
                    let err = ReplicaIoError::Unreachable(format!("saving reservations: {e}"));
                    if let Err(e) = self.handle_failure(id, &err, &[]).await {
                        refused = Some(e);
                    }
                }
            }
        }
        if let Some(e) = refused {
            return Err(e);
        }
        self.check_writable()?;
        self.lock_reservations().in_force = Some(record);
        Ok(())
    }

    /// Drop every client (engine shutdown).
    pub fn shutdown(&self) {
        let mut state = self.write_state();
        for (_, client) in state.clients.drain() {
            client.shutdown();
        }
    }
}

/// Order `targets` for reads at turn `turn`: the local ones (`is_local`)
/// first, then the rest, each group rotated by `turn` (round robin within
/// the group, the relative order kept).
fn local_first<T>(targets: &mut Vec<T>, turn: usize, is_local: impl Fn(&T) -> bool) {
    let (mut local, mut remote): (Vec<T>, Vec<T>) = targets.drain(..).partition(|t| is_local(t));
    for group in [&mut local, &mut remote] {
        if !group.is_empty() {
            let start = turn % group.len();
            group.rotate_left(start);
        }
    }
    targets.extend(local);
    targets.extend(remote);
}

#[cfg(test)]
mod tests {
    use super::local_first;

    fn order(targets: &[(&'static str, bool)], turn: usize) -> Vec<&'static str> {
        let mut t = targets.to_vec();
        local_first(&mut t, turn, |(_, local)| *local);
        t.into_iter().map(|(name, _)| name).collect()
    }

    #[test]
    fn reads_go_to_the_local_replica_first_and_fall_back_round_robin() {
        let set = [("a", false), ("b", true), ("c", false)];
        for turn in 0..6 {
            let o = order(&set, turn);
            assert_eq!(o[0], "b", "turn {turn}: {o:?}");
            assert_eq!(o.len(), 3);
        }
        // The others still take turns behind it.
        assert_eq!(order(&set, 0), ["b", "a", "c"]);
        assert_eq!(order(&set, 1), ["b", "c", "a"]);
    }

    #[test]
    fn without_a_local_replica_reads_rotate_over_all() {
        let set = [("a", false), ("b", false), ("c", false)];
        assert_eq!(order(&set, 0), ["a", "b", "c"]);
        assert_eq!(order(&set, 1), ["b", "c", "a"]);
        assert_eq!(order(&set, 5), ["c", "a", "b"]);
        assert!(order(&[], 3).is_empty());
    }
}
