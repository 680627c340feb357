//! The members of a volume as the engine sees them, as a pure state
//! machine: each member's mode (RW / WO / ERR), the membership generation,
//! and — for every member that is not RW — which chunks may differ between
//! it and the RW set. Events go in (a request to a member failed, chunks
//! were written, a replica answered again, a rebuild copied chunks, time
//! passed); decisions come out (move it to ERR and record the membership,
//! keep it and fail the request, how to catch it up). No I/O and no clock
//! of its own: `replica_set::ReplicaSet` is the async shell that
//! feeds it, records its memberships on the replicas and runs the copier.
//!
//! The rule it keeps (docs/failure-handling.md, "The catch-up invariant"):
//! **a member turns RW only when every chunk that may differ between it and
//! the RW set has been copied or compared since it was last identical.**
//! What "may differ" is lives in [`Divergence`]:
//!
//! - RW → ERR: the chunks of the request that failed, the chunks of every
//!   write that timed out on it while it was kept RW (the write policy
//!   needed it: the write may still be queued on its side, and lost if it
//!   dies), and from then on every chunk written without it;
//! - WO → ERR: the chunks its rebuild had not copied yet, the failed
//!   request's, and every chunk written from then on;
//! - past the stale-replica timeout: forgotten — every chunk is compared;
//! - after an engine restart, every member that is not up to date may
//!   differ anywhere: what the previous engine knew is gone, and a rebuild
//!   it had under way is resumed by comparing every chunk (those already
//!   copied cost a checksum comparison, not a copy).
//!
//! When a member returns, its own write-intent bitmap is added (writes it
//! acknowledged but may have lost with an unflushed cache). While it is WO
//! the copier removes each chunk it has copied; [`Members::finish_rebuild`]
//! refuses to turn it RW while any is left. A member that left RW and has
//! missed no acknowledged write since may return as RW directly when no RW
//! member is left ([`Members::join`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::chunk::ChunkBitmap;
use crate::config::WritePolicy;

/// Stable identity of a member while this engine runs (indices would shift
/// when a member is removed).
pub type MemberId = u64;

/// A member's mode in the volume (the one replica-mode type of corral).
pub use corral_types::ReplicaMode as Mode;
pub use corral_types::{Epoch, Generation};

/// Which chunks may differ between a member and the RW set.
#[derive(Clone, Debug)]
pub enum Divergence {
    /// None: an RW member.
    InSync,
    /// Only these. For a WO member: the chunks its rebuild has yet to copy.
    Chunks(ChunkBitmap),
    /// Any chunk: every one is compared.
    Unknown,
}

impl Divergence {
    /// Add `chunks` to a tracked set (nothing to do for the other kinds).
    fn note(&mut self, chunks: &[u64]) {
        if let Divergence::Chunks(set) = self {
            for c in chunks {
                set.insert(*c);
            }
        }
    }

    /// Whether writes must be noted here (a set is being kept).
    pub fn is_tracked(&self) -> bool {
        matches!(self, Divergence::Chunks(_))
    }

    /// The tracked chunks (None: every chunk, or from a cursor on).
    pub fn tracked_len(&self) -> Option<u64> {
        match self {
            Divergence::InSync => Some(0),
            Divergence::Chunks(set) => Some(set.len()),
            Divergence::Unknown => None,
        }
    }
}

/// How a returning member is caught up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildKind {
    /// Only the chunks it missed while away (same instance, in time).
    Partial,
    /// The rest of a rebuild that was cut short, plus what it missed since.
    Resumed,
    /// Every chunk (a new or unknown replica, or one back too late).
    Full,
}

impl RebuildKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RebuildKind::Partial => "partial",
            RebuildKind::Resumed => "resumed",
            RebuildKind::Full => "full",
        }
    }
}

/// One member of the volume.
#[derive(Clone, Debug)]
pub struct Member {
    pub id: MemberId,
    pub address: String,
    /// The replica's identity; a wiped and recreated replica has a new one.
    pub instance_id: String,
    pub mode: Mode,
    pub divergence: Divergence,
    /// Its last rebuild was cut short (it failed while WO, or was WO in the
    /// record this engine opened with): its next catch-up is a resumption.
    pub interrupted: bool,
    pub last_error: String,
    /// When it went to ERR.
    pub failed_at: Option<Instant>,
    /// Claimed by the supervisor: a return attempt or a rebuild is running.
    pub busy: bool,
    /// Return attempts that failed after the replica had answered, in a row.
    pub attempts: u32,
    /// No return attempt before this.
    pub retry_at: Option<Instant>,
    /// It left the RW set, its leaving is in no effective record, and no
    /// write has been acknowledged (nor flush completed) since: it holds
    /// every acknowledged write (durably as far as any copy does), and the
    /// newest effective record still names it RW. When no RW member is left, such a
    /// member may return as RW without a rebuild (there is no source for
    /// one anyway).
    pub holds_every_ack: bool,
    /// Writes that timed out on it while it was kept RW (the write policy
    /// needed it), per chunk, until their late replies confirm them: such a
    /// write may still land — or never, if it dies first — so these chunks
    /// join its divergence when it leaves RW, and no flush is sent while
    /// any is left (another replica's flush would clear the write-intent
    /// bits that let a new engine find the difference).
    pub unconfirmed: BTreeMap<u64, u32>,
    /// Snapshots deleted while it was out of the write set (it may still
    /// hold them, or hold an older snapshot of the same name); None: not
    /// known (it was out when this engine started, or was added by address).
    pub missed_deletes: Option<BTreeSet<String>>,
    /// Changes at every join: a rebuild's progress counts only in its own.
    session: u64,
}

/// Why a request to a member failed, as far as the membership cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No answer within the replica timeout: it may only be slow.
    Timeout,
    /// It is gone or broken: connection lost, I/O error, disk full.
    Lost,
}

/// What [`Members::fail`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailDecision {
    /// Not a member (removed meanwhile).
    NotMember,
    /// Already ERR: the request's chunks were added to what it may miss.
    AlreadyOut,
    /// A timeout on one of the last RW members the write policy needs: it
    /// stays RW and the request fails instead.
    Kept { rw: usize },
    /// Moved to ERR: record the membership before acknowledging anything.
    Moved { previous: Mode },
}

/// What the engine learns from a returning replica's daemon.
#[derive(Clone, Debug, Default)]
pub struct ReturnFacts {
    /// The instance id of the replica the daemon holds now.
    pub instance_id: String,
    /// The daemon had none and the engine has just created it (empty).
    pub created: bool,
    /// Chunks of the write-intent regions its store marks dirty.
    pub dirty_chunks: Vec<u64>,
}

/// How a returning member is admitted.
#[derive(Clone, Debug)]
pub enum Admission {
    /// WO, to be caught up by this plan.
    Rebuild(CatchUpPlan),
    /// RW at once: it was the last RW member and no write could be
    /// acknowledged since; the other members are caught up from it.
    Readmitted,
}

/// How to catch a member up; it is WO once this is returned.
#[derive(Clone, Debug)]
pub struct CatchUpPlan {
    pub kind: RebuildKind,
    /// The chunks to walk, ascending.
    pub chunks: Vec<u64>,
    /// The target is known to hold nothing (created for this rebuild).
    pub target_empty: bool,
    pub ticket: RebuildTicket,
}

/// Names one rebuild of one member: progress reported with a stale ticket
/// (the member failed and was joined again meanwhile) is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RebuildTicket {
    pub member: MemberId,
    session: u64,
}

/// How a return attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnFailure {
    /// Its daemon did not answer: try again at the next retry.
    Unreachable,
    /// It answered, then failed (refused to open, its rebuild failed): back off.
    Refused,
}

/// Why a membership change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("not a member")]
    NotMember,
    #[error("member is {actual}, not {expected}")]
    WrongMode {
        expected: &'static str,
        actual: &'static str,
    },
    #[error("no RW member to rebuild it from")]
    NoSource,
    #[error("the rebuild was superseded (the member failed and returned meanwhile)")]
    StaleRebuild,
    #[error("{remaining} chunk(s) that may differ have not been copied yet")]
    RebuildIncomplete { remaining: u64 },
    #[error("{address} is being rebuilt; try again when it is done")]
    Busy { address: String },
    #[error(
        "removing {address} would leave {rw_after} RW replica(s); the write policy {policy} needs {needed}"
    )]
    PolicyFloor {
        address: String,
        rw_after: usize,
        policy: &'static str,
        needed: usize,
    },
}

/// A member as the open procedure found it.
#[derive(Clone, Debug)]
pub struct OpenedMember {
    pub address: String,
    /// Known from its daemon, or from the newest record when unreachable.
    pub instance_id: String,
    pub state: OpenedState,
}

/// What the election decided about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenedState {
    /// RW and holding the newest record: serves at once.
    UpToDate,
    /// WO in the newest record: a rebuild into it was under way (it is
    /// compared in full; its catch-up is reported as resumed).
    Rebuilding { reason: String },
    /// Anything else: unreachable, older, ERR in the record, unknown.
    Behind { reason: String },
}

/// Most a failing member's return waits between attempts.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

/// The members of one volume.
#[derive(Clone, Debug)]
pub struct Members {
    policy: WritePolicy,
    chunk_count: u64,
    generation: Generation,
    members: Vec<Member>,
    /// The RW set of the newest *effective* record: one that reached a
    /// member of the previous effective RW set (so an engine that finds an
    /// older record on such a member is led to it), or the record written
    /// at open. Writes are acknowledged only by RW members in it.
    recorded_rw: Vec<MemberId>,
    next_id: MemberId,
    next_session: u64,
}

impl Members {
    /// The members as the open procedure left them; `generation` is the
    /// record it is about to write.
    pub fn after_open(
        policy: WritePolicy,
        chunk_count: u64,
        generation: Generation,
        opened: Vec<OpenedMember>,
        now: Instant,
    ) -> Self {
        let mut members = Members {
            policy,
            chunk_count,
            generation,
            members: Vec::with_capacity(opened.len()),
            recorded_rw: Vec::new(),
            next_id: 1,
            next_session: 1,
        };
        for m in opened {
            let (mode, divergence, interrupted, reason) = match m.state {
                OpenedState::UpToDate => (Mode::Rw, Divergence::InSync, false, String::new()),
                OpenedState::Rebuilding { reason } => {
                    (Mode::Err, Divergence::Unknown, true, reason)
                }
                OpenedState::Behind { reason } => (Mode::Err, Divergence::Unknown, false, reason),
            };
            let id = members.next_id;
            members.next_id += 1;
            if mode == Mode::Rw {
                members.recorded_rw.push(id);
            }
            members.members.push(Member {
                id,
                address: m.address,
                instance_id: m.instance_id,
                mode,
                divergence,
                interrupted,
                last_error: reason,
                failed_at: (mode == Mode::Err).then_some(now),
                busy: false,
                attempts: 0,
                retry_at: None,
                holds_every_ack: false,
                unconfirmed: BTreeMap::new(),
                missed_deletes: (mode == Mode::Rw).then(BTreeSet::new),
                session: 0,
            });
        }
        members
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn policy(&self) -> WritePolicy {
        self.policy
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    pub fn all(&self) -> &[Member] {
        &self.members
    }

    pub fn get(&self, id: MemberId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn get_mut(&mut self, id: MemberId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// The ids of the members in `mode`.
    pub fn ids_in(&self, mode: Mode) -> Vec<MemberId> {
        self.members
            .iter()
            .filter(|m| m.mode == mode)
            .map(|m| m.id)
            .collect()
    }

    pub fn total(&self) -> usize {
        self.members.len()
    }

    pub fn rw_count(&self) -> usize {
        self.members.iter().filter(|m| m.mode == Mode::Rw).count()
    }

    /// Fewest RW members with which writes are still acknowledged.
    pub fn min_rw(&self) -> usize {
        self.policy.min_rw(self.members.len())
    }

    /// RW members that acknowledge writes: those of the newest effective
    /// record (a member just turned RW counts once that is recorded).
    pub fn acknowledging(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Rw && self.recorded_rw.contains(&m.id))
            .count()
    }

    /// The RW set of the newest effective record.
    pub fn recorded_rw(&self) -> &[MemberId] {
        &self.recorded_rw
    }

    /// Whether writes may be acknowledged: enough acknowledging members.
    pub fn writable(&self) -> bool {
        let n = self.acknowledging();
        n > 0 && n >= self.min_rw()
    }

    /// ERR members whose missed chunks are being noted.
    pub fn tracking(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Err && m.divergence.is_tracked())
            .count()
    }

    /// A request to member `id` failed; `chunks` are the chunks it would
    /// have written (empty for reads, pings, flushes).
    pub fn fail(
        &mut self,
        id: MemberId,
        kind: FailureKind,
        chunks: &[u64],
        why: &str,
        now: Instant,
    ) -> FailDecision {
        let rw = self.rw_count();
        let floor = self.min_rw().max(1);
        let chunk_count = self.chunk_count;
        let Some(m) = self.get_mut(id) else {
            return FailDecision::NotMember;
        };
        match m.mode {
            Mode::Err => {
                // A request in flight when it failed still adds to what it missed.
                m.divergence.note(chunks);
                FailDecision::AlreadyOut
            }
            Mode::Rw if kind == FailureKind::Timeout && rw <= floor => {
                // The request may still land — or never, if it dies first.
                m.last_error = why.to_string();
                for c in chunks {
                    *m.unconfirmed.entry(*c).or_default() += 1;
                }
                FailDecision::Kept { rw }
            }
            previous => {
                m.mode = Mode::Err;
                m.last_error = why.to_string();
                m.failed_at = Some(now);
                if previous == Mode::Rw {
                    m.missed_deletes = Some(BTreeSet::new());
                    let mut missed = ChunkBitmap::new(chunk_count);
                    for c in std::mem::take(&mut m.unconfirmed).into_keys() {
                        missed.insert(c);
                    }
                    m.divergence = Divergence::Chunks(missed);
                } else {
                    // WO: its divergence is what the rebuild had not copied yet.
                    m.interrupted = true;
                }
                m.divergence.note(chunks);
                m.holds_every_ack = previous == Mode::Rw;
                self.generation = self.generation.next();
                if previous == Mode::Rw && rw == 1 {
                    self.lost_last_rw(now);
                }
                FailDecision::Moved { previous }
            }
        }
    }

    /// Which join of member `id` is current (see [`Members::confirmed`]).
    pub fn session_of(&self, id: MemberId) -> Option<u64> {
        self.get(id).map(|m| m.session)
    }

    /// A write to `chunks` that timed out on member `id` while it was kept
    /// RW (in its join `session`) has landed there after all.
    pub fn confirmed(&mut self, id: MemberId, session: u64, chunks: &[u64]) {
        let Some(m) = self.get_mut(id) else { return };
        if m.mode != Mode::Rw || m.session != session {
            return; // it left RW since: the chunks went to its divergence
        }
        for c in chunks {
            if let Some(n) = m.unconfirmed.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    m.unconfirmed.remove(c);
                }
            }
        }
    }

    /// An RW member with writes that timed out and are not confirmed yet,
    /// and how many chunks they cover: no flush may be sent meanwhile.
    pub fn unconfirmed_writes(&self) -> Option<(&str, usize)> {
        self.members
            .iter()
            .find(|m| m.mode == Mode::Rw && !m.unconfirmed.is_empty())
            .map(|m| (m.address.as_str(), m.unconfirmed.len()))
    }

    /// The last RW member left: rebuilds have no source any more, so their
    /// targets leave the write set too (a write in flight may have reached
    /// them and not it). Members that still hold every acknowledged write
    /// may return as RW ([`Members::join`]).
    fn lost_last_rw(&mut self, now: Instant) {
        for m in self.members.iter_mut().filter(|m| m.mode == Mode::Wo) {
            m.mode = Mode::Err;
            m.interrupted = true;
            m.holds_every_ack = false;
            m.failed_at = Some(now);
            m.last_error = "no RW replica left to rebuild from".into();
        }
    }

    /// `chunks` were written (or were being written) while some members
    /// were out: each ERR member may now differ there too. Returns whether
    /// the write may be acknowledged (enough RW members took it); if so, no
    /// ERR member holds every acknowledged write any more.
    pub fn note_written(&mut self, chunks: &[u64]) -> bool {
        let acknowledged = self.writable();
        for m in self.members.iter_mut().filter(|m| m.mode == Mode::Err) {
            m.divergence.note(chunks);
            if acknowledged {
                m.holds_every_ack = false;
            }
        }
        acknowledged
    }

    /// A flush succeeded on every RW member: what they hold is durable. An
    /// ERR member took no part in it, so it may not hold that durably (a
    /// power loss can take what it had not flushed): it no longer counts
    /// as holding every acknowledged write.
    pub fn note_flushed(&mut self) {
        for m in self.members.iter_mut().filter(|m| m.mode == Mode::Err) {
            m.holds_every_ack = false;
        }
    }

    /// A snapshot was taken on the RW members: no ERR member holds the
    /// volume's whole state any more (it lacks the snapshot), so none may
    /// return as RW without being caught up (see [`Member::holds_every_ack`]).
    pub fn note_snapshot_created(&mut self) {
        for m in self.members.iter_mut().filter(|m| m.mode == Mode::Err) {
            m.holds_every_ack = false;
        }
    }

    /// Snapshot `name` was deleted on the RW and WO members: every ERR
    /// member may still hold it (or an older snapshot of that name), which
    /// its return deletes; and none holds the volume's whole state any more.
    pub fn note_snapshot_deleted(&mut self, name: &str) {
        for m in self.members.iter_mut().filter(|m| m.mode == Mode::Err) {
            m.holds_every_ack = false;
            if let Some(missed) = &mut m.missed_deletes {
                missed.insert(name.to_string());
            }
        }
    }

    /// The snapshots deleted while member `id` was out (see
    /// [`Member::missed_deletes`]); None: not known.
    pub fn missed_deletes(&self, id: MemberId) -> Option<BTreeSet<String>> {
        self.get(id).and_then(|m| m.missed_deletes.clone())
    }

    /// The volume grew to `chunk_count` chunks (a smaller count changes no
    /// chunk count). What each member may differ in is kept, with room for
    /// the new chunks: they hold zeroes on every replica until written —
    /// a replica that missed the expansion is grown before it returns — and
    /// a write to them is noted like any other. A membership change: the
    /// caller records the next generation.
    pub fn expand(&mut self, chunk_count: u64) {
        if chunk_count > self.chunk_count {
            self.chunk_count = chunk_count;
            for m in &mut self.members {
                if let Divergence::Chunks(set) = &mut m.divergence {
                    set.grow(chunk_count);
                }
            }
        }
        self.generation = self.generation.next();
    }

    /// Whom to write the current record to: first the RW members of the
    /// newest effective record, then — once one of those has taken it, or
    /// always under `quorum`, where a majority suffices — the other RW
    /// members (just turned RW). Under `available` a record that reached
    /// only the latter would name an RW set no older record leads to.
    pub fn record_targets(&self) -> (Vec<MemberId>, Vec<MemberId>) {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Rw)
            .map(|m| m.id)
            .partition(|id| self.recorded_rw.contains(id))
    }

    /// The current RW set is the newest effective record's: every RW member
    /// acknowledges writes.
    pub fn record_settled(&self) -> bool {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Rw)
            .all(|m| self.recorded_rw.contains(&m.id))
    }

    /// A membership record whose RW set is `rw` and which names `out` ERR
    /// was accepted by the members `accepted`. It is effective if one of
    /// them was RW in the previous effective record: then any engine that
    /// finds an older record is led to a newer one, and this record's RW
    /// set acknowledges writes from now on, while the members it names ERR
    /// no longer count as holding every acknowledged write. A record that
    /// reached only members new to the RW set (the old ones failed to take
    /// it) changes nothing — unless, under `quorum`, it reached a majority:
    /// writes wait. Returns whether it was effective.
    pub fn recorded(&mut self, rw: &[MemberId], accepted: &[MemberId], out: &[MemberId]) -> bool {
        // Under `quorum` a record on a majority is found by any engine that
        // fences a majority, whatever came before.
        let majority =
            self.policy == WritePolicy::Quorum && accepted.len() > self.members.len() / 2;
        let effective = majority || accepted.iter().any(|id| self.recorded_rw.contains(id));
        if effective {
            self.recorded_rw = rw.to_vec();
            for m in self.members.iter_mut().filter(|m| out.contains(&m.id)) {
                m.holds_every_ack = false;
            }
        }
        effective
    }

    /// ERR members that hold every acknowledged write (see [`Member::holds_every_ack`]).
    pub fn authorities(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Err && m.holds_every_ack)
            .count()
    }

    /// Forget what ERR members missed once they have been away longer than
    /// `stale`: they will be compared in full. Returns the addresses.
    pub fn expire_stale(&mut self, stale: Duration, now: Instant) -> Vec<String> {
        let mut expired = Vec::new();
        for m in self.members.iter_mut() {
            if m.mode == Mode::Err
                && m.divergence.is_tracked()
                && m.failed_at
                    .is_some_and(|t| now.saturating_duration_since(t) > stale)
            {
                m.divergence = Divergence::Unknown;
                m.last_error = format!("stale (away longer than {stale:?}): {}", m.last_error);
                expired.push(m.address.clone());
            }
        }
        expired
    }

    /// ERR members nobody is bringing back, whose retry time has come.
    pub fn returnable(&self, now: Instant) -> Vec<(MemberId, String)> {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Err && !m.busy)
            .filter(|m| m.retry_at.is_none_or(|t| t <= now))
            .map(|m| (m.id, m.address.clone()))
            .collect()
    }

    /// Claim an ERR member for a return attempt; false if not possible.
    pub fn claim(&mut self, id: MemberId) -> bool {
        match self.get_mut(id) {
            Some(m) if m.mode == Mode::Err && !m.busy => {
                m.busy = true;
                true
            }
            _ => false,
        }
    }

    /// A return attempt (or the rebuild after it) failed. A daemon that did
    /// not answer is tried again at the next retry; one that answered and
    /// then failed waits `retry_interval`, doubling with every such failure
    /// in a row (at most [`MAX_RETRY_BACKOFF`]), until it has served again.
    pub fn release(
        &mut self,
        id: MemberId,
        failure: ReturnFailure,
        why: &str,
        retry_interval: Duration,
        now: Instant,
    ) {
        let Some(m) = self.get_mut(id) else { return };
        m.busy = false;
        if !why.is_empty() {
            m.last_error = why.to_string();
        }
        match failure {
            ReturnFailure::Unreachable => m.retry_at = None,
            ReturnFailure::Refused => {
                m.attempts = m.attempts.saturating_add(1);
                let factor = 1u32 << (m.attempts - 1).min(16);
                let wait = retry_interval
                    .saturating_mul(factor)
                    .min(MAX_RETRY_BACKOFF.max(retry_interval));
                m.retry_at = Some(now + wait);
            }
        }
    }

    /// How member `id` would be caught up given `facts` (no change).
    pub fn plan(&self, id: MemberId, facts: &ReturnFacts) -> Option<(RebuildKind, Vec<u64>, bool)> {
        let m = self.get(id)?;
        let all = || (0..self.chunk_count).collect::<Vec<_>>();
        let same = !m.instance_id.is_empty() && m.instance_id == facts.instance_id;
        if facts.created || !same {
            return Some((RebuildKind::Full, all(), facts.created));
        }
        let kind = if m.interrupted {
            RebuildKind::Resumed
        } else {
            RebuildKind::Partial
        };
        let mut set = match &m.divergence {
            Divergence::Chunks(set) => set.clone(),
            Divergence::Unknown | Divergence::InSync => {
                let kind = if m.interrupted {
                    RebuildKind::Resumed
                } else {
                    RebuildKind::Full
                };
                return Some((kind, all(), false));
            }
        };
        for c in &facts.dirty_chunks {
            set.insert(*c);
        }
        Some((kind, set.iter().collect(), false))
    }

    /// A claimed ERR member answered again: it joins the write set in WO
    /// mode, and the returned plan says which chunks its rebuild walks — or,
    /// when no RW member is left and it holds every acknowledged write, it
    /// is RW again at once. With no RW member and not the last one, it must wait
    /// ([`MembershipError::NoSource`]). The caller has made sure no write
    /// that left it out is still in flight, and records the membership
    /// before the next write is acknowledged.
    pub fn join(&mut self, id: MemberId, facts: ReturnFacts) -> Result<Admission, MembershipError> {
        let m = self.get(id).ok_or(MembershipError::NotMember)?;
        if m.mode != Mode::Err {
            return Err(MembershipError::WrongMode {
                expected: "ERR",
                actual: m.mode.as_str(),
            });
        }
        if self.rw_count() == 0 {
            let same = !m.instance_id.is_empty() && m.instance_id == facts.instance_id;
            if !(m.holds_every_ack && same && !facts.created) {
                return Err(MembershipError::NoSource);
            }
            // It defines the data now. Where it may differ from what the
            // others were last compared with — what it missed, what it may
            // have lost from an unflushed cache — they are caught up from it.
            let theirs = match &m.divergence {
                Divergence::Chunks(set) => {
                    let mut chunks: Vec<u64> = set.iter().collect();
                    chunks.extend(&facts.dirty_chunks);
                    Some(chunks)
                }
                _ => None,
            };
            for other in self.members.iter_mut().filter(|o| o.id != id) {
                match &theirs {
                    Some(chunks) => other.divergence.note(chunks),
                    None => other.divergence = Divergence::Unknown,
                }
                other.holds_every_ack = false;
            }
            let m = self.get_mut(id).ok_or(MembershipError::NotMember)?;
            m.mode = Mode::Rw;
            m.divergence = Divergence::InSync;
            m.interrupted = false;
            m.holds_every_ack = false;
            m.missed_deletes = Some(BTreeSet::new());
            m.unconfirmed.clear();
            m.last_error = String::new();
            m.failed_at = None;
            m.busy = false;
            m.attempts = 0;
            m.retry_at = None;
            self.generation = self.generation.next();
            return Ok(Admission::Readmitted);
        }
        let (kind, chunks, target_empty) =
            self.plan(id, &facts).ok_or(MembershipError::NotMember)?;
        let session = self.next_session;
        self.next_session += 1;
        let chunk_count = self.chunk_count;
        let m = self.get_mut(id).ok_or(MembershipError::NotMember)?;
        let mut pending = ChunkBitmap::new(chunk_count);
        for c in &chunks {
            pending.insert(*c);
        }
        m.mode = Mode::Wo;
        m.instance_id = facts.instance_id;
        // Its chain was made the RW set's before it joined (see
        // `crate::chain_sync`); from now on deletes reach it too.
        m.missed_deletes = Some(BTreeSet::new());
        m.divergence = Divergence::Chunks(pending);
        m.unconfirmed.clear();
        m.last_error = String::new();
        m.failed_at = None;
        m.holds_every_ack = false;
        m.session = session;
        self.generation = self.generation.next();
        Ok(Admission::Rebuild(CatchUpPlan {
            kind,
            chunks,
            target_empty,
            ticket: RebuildTicket {
                member: id,
                session,
            },
        }))
    }

    /// The rebuild of `ticket` has copied `chunks` to its target (which
    /// takes every write to them from now on). Ignored unless the target is
    /// still WO in that rebuild.
    pub fn copied(&mut self, ticket: RebuildTicket, chunks: &[u64]) {
        if let Some(m) = self.get_mut(ticket.member)
            && m.mode == Mode::Wo
            && m.session == ticket.session
            && let Divergence::Chunks(pending) = &mut m.divergence
        {
            for c in chunks {
                pending.remove(*c);
            }
        }
    }

    /// The rebuild of `ticket` is done: WO → RW, if nothing it had to copy
    /// is left. The caller records the membership.
    pub fn finish_rebuild(&mut self, ticket: RebuildTicket) -> Result<(), MembershipError> {
        let m = self
            .get_mut(ticket.member)
            .ok_or(MembershipError::NotMember)?;
        if m.mode != Mode::Wo {
            return Err(MembershipError::WrongMode {
                expected: "WO",
                actual: m.mode.as_str(),
            });
        }
        if m.session != ticket.session {
            return Err(MembershipError::StaleRebuild);
        }
        match &m.divergence {
            Divergence::Chunks(pending) if pending.is_empty() => {}
            Divergence::Chunks(pending) => {
                return Err(MembershipError::RebuildIncomplete {
                    remaining: pending.len(),
                });
            }
            _ => {
                return Err(MembershipError::RebuildIncomplete {
                    remaining: u64::MAX,
                });
            }
        }
        m.mode = Mode::Rw;
        m.divergence = Divergence::InSync;
        m.interrupted = false;
        m.busy = false;
        m.attempts = 0;
        m.retry_at = None;
        self.generation = self.generation.next();
        Ok(())
    }

    /// Add a member at `address` (ERR until it is rebuilt in full). Returns
    /// its id and whether anything changed (an existing member is kept).
    pub fn add(&mut self, address: &str, now: Instant) -> (MemberId, bool) {
        if let Some(m) = self.members.iter().find(|m| m.address == address) {
            return (m.id, false);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.members.push(Member {
            id,
            address: address.to_string(),
            instance_id: String::new(),
            mode: Mode::Err,
            divergence: Divergence::Unknown,
            interrupted: false,
            last_error: "added: waiting to be rebuilt".into(),
            failed_at: Some(now),
            busy: false,
            attempts: 0,
            retry_at: None,
            holds_every_ack: false,
            unconfirmed: BTreeMap::new(),
            missed_deletes: None,
            session: 0,
        });
        self.generation = self.generation.next();
        (id, true)
    }

    /// Remove the member at `address`. Refused while it is being rebuilt,
    /// or if fewer RW members than the write policy needs would be left.
    pub fn remove(&mut self, address: &str) -> Result<Member, MembershipError> {
        let pos = self
            .members
            .iter()
            .position(|m| m.address == address)
            .ok_or(MembershipError::NotMember)?;
        let m = &self.members[pos];
        if m.busy || m.mode == Mode::Wo {
            return Err(MembershipError::Busy {
                address: address.to_string(),
            });
        }
        let rw_after = self.rw_count() - usize::from(m.mode == Mode::Rw);
        let needed = self.policy.min_rw(self.members.len() - 1).max(1);
        if rw_after < needed {
            return Err(MembershipError::PolicyFloor {
                address: address.to_string(),
                rw_after,
                policy: self.policy.as_str(),
                needed,
            });
        }
        self.generation = self.generation.next();
        Ok(self.members.remove(pos))
    }
}

#[cfg(test)]
mod tests;
