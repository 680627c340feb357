//! Tests of the member state machine: its single decisions, and a
//! model-based property test of the catch-up invariant.
//!
//! The property test runs the engine's decision code — [`Members`], and the
//! election and member setup of [`crate::open`] — against a model of three
//! replica daemons that holds what each replica actually stores: per chunk
//! the version of the last write it applied, what of that is durable, its
//! write-intent bits, its membership record and epoch.
//! A random sequence of steps — writes (some failing on one replica),
//! flushes, replica kills (with and without losing the page cache), wiped
//! disks, restarts, pauses (a daemon that stops answering: requests to it
//! time out, stay queued on its side and land when it wakes — or never, if
//! it is killed first), supervisor ticks that notice failures and bring
//! replicas back, rebuild progress, the stale-replica timeout passing, and
//! engine crashes (with a write half applied) — is applied, and after
//! every step:
//!
//! - every RW member holds exactly the acknowledged data;
//! - every other member differs from it only in chunks its divergence
//!   covers (plus its own write-intent bits, which the engine adds when it
//!   returns) — the record of what may differ is never short;
//! - a member that turns RW holds exactly the acknowledged data.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use corral_proto::v1::{self as pb, ReplicaInfo};
use proptest::prelude::*;

use super::*;
use crate::config::{EngineConfig, WritePolicy};

fn opened(address: &str, state: OpenedState) -> OpenedMember {
    OpenedMember {
        address: address.into(),
        instance_id: format!("{address}-1"),
        state,
    }
}

fn three(policy: WritePolicy) -> Members {
    Members::after_open(
        policy,
        16,
        Generation(1),
        vec![
            opened("a", OpenedState::UpToDate),
            opened("b", OpenedState::UpToDate),
            opened("c", OpenedState::UpToDate),
        ],
        Instant::now(),
    )
}

fn rebuild(admission: Result<Admission, MembershipError>) -> CatchUpPlan {
    match admission {
        Ok(Admission::Rebuild(plan)) => plan,
        other => panic!("expected a rebuild, got {other:?}"),
    }
}

fn facts(instance: &str) -> ReturnFacts {
    ReturnFacts {
        instance_id: instance.into(),
        ..Default::default()
    }
}

#[test]
fn a_timeout_never_drops_the_last_rw_members_the_policy_needs() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Quorum);
    assert_eq!(
        m.fail(1, FailureKind::Timeout, &[], "slow", now),
        FailDecision::Moved { previous: Mode::Rw }
    );
    assert_eq!(
        m.fail(2, FailureKind::Timeout, &[], "slow", now),
        FailDecision::Kept { rw: 2 }
    );
    assert_eq!(m.rw_count(), 2);
    // A lost connection is no timeout: it goes.
    assert_eq!(
        m.fail(2, FailureKind::Lost, &[], "gone", now),
        FailDecision::Moved { previous: Mode::Rw }
    );
    assert_eq!(m.rw_count(), 1);
}

#[test]
fn an_expansion_is_a_membership_change_and_writes_past_the_old_end_are_noted() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Quorum);
    // b is out before the volume grows from 16 to 40 chunks.
    m.fail(2, FailureKind::Lost, &[3], "gone", now);
    let before = m.generation();
    m.expand(40);
    assert_eq!(m.chunk_count(), 40);
    assert!(m.generation() > before);
    // A smaller count changes no chunk count (still a recorded change).
    m.expand(20);
    assert_eq!(m.chunk_count(), 40);
    // Chunks in the new range written while b is away are caught up too.
    m.note_written(&[17, 39, 40]);
    assert!(m.claim(2));
    let plan = rebuild(m.join(2, facts("b-1")));
    assert_eq!(plan.kind, RebuildKind::Partial);
    assert_eq!(plan.chunks, vec![3, 17, 39]);
    // A replica rebuilt in full walks every chunk of the grown volume.
    m.fail(3, FailureKind::Lost, &[], "gone", now);
    assert!(m.claim(3));
    let full = rebuild(m.join(3, facts("c-2")));
    assert_eq!(full.kind, RebuildKind::Full);
    assert_eq!(full.chunks.len(), 40);
}

#[test]
fn a_member_that_fails_mid_rebuild_keeps_what_was_not_copied_and_what_it_missed() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Quorum);
    m.fail(2, FailureKind::Lost, &[3], "gone", now);
    m.note_written(&[5]);
    assert!(m.claim(2));
    let plan = rebuild(m.join(2, facts("b-1")));
    assert_eq!(plan.kind, RebuildKind::Partial);
    assert_eq!(plan.chunks, vec![3, 5]);
    m.copied(plan.ticket, &[3]);
    // It dies before chunk 5 is copied; chunk 9 is written while it is away.
    m.fail(2, FailureKind::Lost, &[], "gone again", now);
    m.note_written(&[9]);
    m.release(2, ReturnFailure::Refused, "gone", Duration::ZERO, now);
    assert!(m.claim(2));
    let again = rebuild(m.join(2, facts("b-1")));
    assert_eq!(again.kind, RebuildKind::Resumed);
    assert_eq!(again.chunks, vec![5, 9]);
    // The first rebuild's late progress counts for nothing now.
    m.copied(plan.ticket, &[5, 9]);
    assert_eq!(
        m.finish_rebuild(again.ticket),
        Err(MembershipError::RebuildIncomplete { remaining: 2 })
    );
    assert_eq!(
        m.finish_rebuild(plan.ticket),
        Err(MembershipError::StaleRebuild)
    );
    m.copied(again.ticket, &[5, 9]);
    m.finish_rebuild(again.ticket).unwrap();
    assert_eq!(m.rw_count(), 3);
}

#[test]
fn a_returning_member_is_caught_up_by_what_is_known_of_it() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Quorum);
    m.fail(3, FailureKind::Lost, &[1], "gone", now);
    // Its own write-intent bits are added.
    let with_dirty = ReturnFacts {
        dirty_chunks: vec![7],
        ..facts("c-1")
    };
    assert_eq!(
        m.plan(3, &with_dirty).unwrap(),
        (RebuildKind::Partial, vec![1, 7], false)
    );
    // Another instance at its address: everything, compared.
    assert_eq!(
        m.plan(3, &facts("c-2")).unwrap(),
        (RebuildKind::Full, (0..16).collect(), false)
    );
    // Created just now: everything, into an empty target.
    let created = ReturnFacts {
        created: true,
        ..facts("c-3")
    };
    assert_eq!(
        m.plan(3, &created).unwrap(),
        (RebuildKind::Full, (0..16).collect(), true)
    );
    // Past the stale timeout: forgotten.
    assert_eq!(
        m.expire_stale(Duration::from_secs(1), now + Duration::from_secs(2)),
        vec!["c".to_string()]
    );
    assert_eq!(
        m.plan(3, &facts("c-1")).unwrap(),
        (RebuildKind::Full, (0..16).collect(), false)
    );
}

#[test]
fn a_member_rebuilding_when_the_engine_opened_is_compared_in_full() {
    let now = Instant::now();
    let mut m = Members::after_open(
        WritePolicy::Quorum,
        16,
        Generation(5),
        vec![
            opened("a", OpenedState::UpToDate),
            opened("b", OpenedState::UpToDate),
            opened(
                "c",
                OpenedState::Rebuilding {
                    reason: "interrupted".into(),
                },
            ),
        ],
        now,
    );
    assert!(m.note_written(&[0]));
    assert_eq!(
        m.plan(3, &facts("c-1")).unwrap(),
        (RebuildKind::Resumed, (0..16).collect(), false)
    );
}

#[test]
fn a_daemon_that_does_not_answer_is_retried_at_once_one_that_fails_after_answering_backs_off() {
    let now = Instant::now();
    let interval = Duration::from_secs(1);
    let mut m = three(WritePolicy::Quorum);
    m.fail(1, FailureKind::Lost, &[], "gone", now);
    for _ in 0..10 {
        assert!(m.claim(1));
        m.release(1, ReturnFailure::Unreachable, "down", interval, now);
        assert_eq!(m.returnable(now).len(), 1, "retried at the next tick");
    }
    let mut waits = Vec::new();
    for _ in 0..8 {
        assert!(m.claim(1));
        m.release(1, ReturnFailure::Refused, "disk full", interval, now);
        waits.push(m.get(1).unwrap().retry_at.unwrap() - now);
        assert!(m.returnable(now).is_empty());
    }
    let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    // Once it has served again, the back-off starts over.
    let later = now + Duration::from_secs(61);
    assert!(m.claim(1));
    let plan = rebuild(m.join(1, facts("a-1")));
    m.copied(plan.ticket, &plan.chunks);
    m.finish_rebuild(plan.ticket).unwrap();
    m.fail(1, FailureKind::Lost, &[], "gone", later);
    assert!(m.claim(1));
    m.release(1, ReturnFailure::Refused, "again", interval, later);
    assert_eq!(m.get(1).unwrap().retry_at.unwrap() - later, interval);
}

#[test]
fn with_no_rw_member_left_one_that_holds_every_acknowledged_write_returns_as_rw() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Available);
    m.fail(1, FailureKind::Lost, &[], "gone", now);
    assert!(m.note_written(&[2]), "acknowledged on two");
    assert!(m.claim(1));
    let plan = rebuild(m.join(1, facts("a-1")));
    // Member 2 fails on a write that member 3 acknowledges alone.
    m.fail(2, FailureKind::Lost, &[4], "gone", now);
    assert!(m.note_written(&[4]));
    // The last RW member dies on a write nobody acknowledges: the rebuild
    // into 1 has no source left and stops.
    m.fail(3, FailureKind::Lost, &[6], "gone", now);
    assert!(!m.note_written(&[6]));
    assert_eq!(m.rw_count(), 0);
    assert_eq!(m.get(1).unwrap().mode, Mode::Err);
    m.copied(plan.ticket, &plan.chunks);
    m.release(1, ReturnFailure::Refused, "no source", Duration::ZERO, now);
    // Member 2 missed an acknowledged write: it cannot serve.
    assert!(m.claim(2));
    assert_eq!(
        m.join(2, facts("b-1")).unwrap_err(),
        MembershipError::NoSource
    );
    m.release(2, ReturnFailure::Unreachable, "", Duration::ZERO, now);
    // Member 3 holds every acknowledged write. It comes back having lost
    // chunk 9 from its cache: RW at once, and the others will be given its
    // copy of what it missed (6) and may have lost (9).
    assert!(m.claim(3));
    let back = ReturnFacts {
        dirty_chunks: vec![9],
        ..facts("c-1")
    };
    assert!(matches!(m.join(3, back), Ok(Admission::Readmitted)));
    assert_eq!(m.rw_count(), 1);
    assert!(m.claim(2));
    assert_eq!(rebuild(m.join(2, facts("b-1"))).chunks, vec![4, 6, 9]);
    // Member 1 was being rebuilt when the last RW member died (it took
    // chunk 4 as a WO member); it resumes with what it had not been sent
    // and what the returning member may differ in.
    assert!(m.claim(1));
    let again = rebuild(m.join(1, facts("a-1")));
    assert_eq!(again.kind, RebuildKind::Resumed);
    assert_eq!(again.chunks, vec![2, 6, 9]);
}

#[test]
fn a_record_counts_once_a_member_of_the_previous_rw_set_has_it() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Available);
    // Members 2 and 3 are out; 1 is the recorded RW set.
    m.fail(2, FailureKind::Lost, &[], "gone", now);
    m.fail(3, FailureKind::Lost, &[], "gone", now);
    assert!(m.recorded(&[1], &[1], &[2, 3]));
    assert_eq!(m.recorded_rw(), &[1]);
    // 3 returns and is rebuilt; as it turns RW, member 1 dies and only 3
    // takes the record: it does not count, and writes wait.
    assert!(m.claim(3));
    let plan = rebuild(m.join(3, facts("c-1")));
    m.copied(plan.ticket, &plan.chunks);
    m.finish_rebuild(plan.ticket).unwrap();
    assert_eq!(m.record_targets(), (vec![1], vec![3]));
    assert!(!m.recorded(&[1, 3], &[3], &[2]));
    assert!(m.writable(), "1 is still RW and recorded");
    m.fail(1, FailureKind::Lost, &[], "gone", now);
    assert!(!m.writable(), "3 alone is RW but in no effective record");
    assert!(!m.recorded(&[3], &[3], &[1, 2]));
    assert!(!m.writable());
    // Under quorum, a record on a majority counts by itself.
    let mut q = three(WritePolicy::Quorum);
    assert!(q.recorded(&[1, 2], &[1, 2], &[3]));
    assert!(!q.recorded(&[3], &[3], &[]), "one of three is no majority");
}

#[test]
fn removal_keeps_the_policy_floor_and_spares_rebuilding_members() {
    let now = Instant::now();
    let mut m = three(WritePolicy::Quorum);
    m.fail(1, FailureKind::Lost, &[], "gone", now);
    assert!(matches!(
        m.remove("b"),
        Err(MembershipError::PolicyFloor { .. })
    ));
    assert!(m.claim(1));
    assert!(matches!(m.remove("a"), Err(MembershipError::Busy { .. })));
    m.release(1, ReturnFailure::Unreachable, "", Duration::ZERO, now);
    let before = m.generation();
    assert_eq!(m.remove("a").unwrap().address, "a");
    assert_eq!((m.total(), m.generation()), (2, before.next()));
}

// ---------------------------------------------------------------------------
// The model-based property test.

const N: usize = 3;
const CHUNKS: u64 = 12;
const CHUNK: u64 = 4096;
const STALE: Duration = Duration::from_secs(60);
const VOLUME: &str = "v";

#[derive(Clone, Debug)]
enum Step {
    /// A client write of one chunk; `fail_on` names a replica whose write
    /// fails (an I/O error): it goes to ERR.
    Write { chunk: u64, fail_on: Option<usize> },
    /// A client flush: every write target that answers makes its data
    /// durable, and (at the most eager) clears its write-intent bits.
    Flush,
    /// A replica daemon dies; with `power_loss` it loses what it had not
    /// made durable (its write-intent bits survive).
    Kill { replica: usize, power_loss: bool },
    /// A replica's disk is replaced: the daemon dies and its data is gone.
    Wipe { replica: usize },
    /// A stopped replica daemon starts again.
    Restart { replica: usize },
    /// A replica daemon stops answering (SIGSTOP): requests to it time out
    /// and wait in its socket.
    Pause { replica: usize },
    /// A paused daemon runs again: what waited for it is applied first.
    Resume { replica: usize },
    /// The supervisor: pings (noticing dead members), then tries to bring
    /// back every returnable member.
    Tick,
    /// Running rebuilds copy up to `groups` groups of chunks.
    Copy { groups: usize },
    /// The stale-replica timeout passes.
    Stale,
    /// The engine dies — with a write to `chunk` applied on the write
    /// targets picked by `mask` and never acknowledged — and restarts.
    EngineCrash { in_flight: Option<(u64, u8)> },
}

fn step() -> impl Strategy<Value = Step> {
    let replica = 0..N;
    prop_oneof![
        6 => (0..CHUNKS, prop::option::weighted(0.15, 0..N))
            .prop_map(|(chunk, fail_on)| Step::Write { chunk, fail_on }),
        2 => Just(Step::Flush),
        2 => (replica.clone(), any::<bool>())
            .prop_map(|(replica, power_loss)| Step::Kill { replica, power_loss }),
        1 => replica.clone().prop_map(|replica| Step::Wipe { replica }),
        3 => replica.clone().prop_map(|replica| Step::Restart { replica }),
        1 => replica.clone().prop_map(|replica| Step::Pause { replica }),
        2 => replica.prop_map(|replica| Step::Resume { replica }),
        3 => Just(Step::Tick),
        3 => (1..3usize).prop_map(|groups| Step::Copy { groups }),
        1 => Just(Step::Stale),
        1 => prop::option::of((0..CHUNKS, any::<u8>()))
            .prop_map(|in_flight| Step::EngineCrash { in_flight }),
    ]
}

/// What a replica daemon stores for the volume.
#[derive(Clone, Debug)]
struct Store {
    instance: String,
    /// Per chunk, the version of the last write applied (0: never written).
    data: Vec<u64>,
    /// What survives a power loss.
    durable: Vec<u64>,
    /// Write-intent bits (durable).
    dirty: BTreeSet<u64>,
    record: Option<pb::Membership>,
    epoch: u64,
}

impl Store {
    fn new(instance: String) -> Self {
        Store {
            instance,
            data: vec![0; CHUNKS as usize],
            durable: vec![0; CHUNKS as usize],
            dirty: BTreeSet::new(),
            record: None,
            epoch: 0,
        }
    }

    fn write(&mut self, chunk: u64, version: u64) {
        self.dirty.insert(chunk);
        self.data[chunk as usize] = version;
    }

    fn flush(&mut self) {
        self.durable.clone_from(&self.data);
        self.dirty.clear();
    }

    fn info(&self) -> ReplicaInfo {
        ReplicaInfo {
            volume: VOLUME.into(),
            size: CHUNKS * CHUNK,
            block_size: 512,
            chunk_size: CHUNK as u32,
            instance_id: self.instance.clone(),
            epoch: self.epoch,
            membership: self.record.clone(),
            clean_shutdown: false,
            dirty_regions: self.dirty.iter().map(|c| c * CHUNK).collect(),
            region_size: CHUNK,
            open: true,
            reservations: None,
            open_session: 0,
            clone: None,
        }
    }
}

/// The member kept RW through a write's timeout, with its join session: it
/// owes the engine the write's late reply.
type Owed = Option<(MemberId, u64)>;

/// A request waiting in a paused daemon's socket, sent at `epoch`.
#[derive(Clone, Copy, Debug)]
enum Queued {
    /// `owed`: the member (and its join session) that was kept RW through
    /// this write's timeout, and owes the engine its late reply.
    Write {
        chunk: u64,
        version: u64,
        epoch: u64,
        owed: Owed,
    },
    Flush {
        epoch: u64,
    },
}

/// One replica daemon.
#[derive(Clone, Debug, Default)]
struct Daemon {
    up: bool,
    store: Option<Store>,
    /// Bumped whenever the daemon dies: connections made before are broken.
    incarnation: u64,
    /// Stopped: it answers nothing until resumed.
    paused: bool,
    /// Requests sent to it while paused, in order.
    queued: Vec<Queued>,
}

impl Daemon {
    /// It dies: what waited in its socket is gone with it.
    fn die(&mut self) {
        if self.up {
            self.incarnation += 1;
        }
        self.up = false;
        self.paused = false;
        self.queued.clear();
    }

    /// It runs again and serves what waited, if still at the requests'
    /// epoch; returns the writes it applied: (chunk, version, owed).
    fn resume(&mut self) -> Vec<(u64, u64, Owed)> {
        self.paused = false;
        let mut applied = Vec::new();
        let Some(store) = self.store.as_mut() else {
            self.queued.clear();
            return applied;
        };
        for q in self.queued.drain(..) {
            match q {
                Queued::Write {
                    chunk,
                    version,
                    epoch,
                    owed,
                } if epoch == store.epoch => {
                    store.write(chunk, version);
                    applied.push((chunk, version, owed));
                }
                Queued::Flush { epoch } if epoch == store.epoch => store.flush(),
                _ => {}
            }
        }
        applied
    }
}

/// A rebuild the engine runs.
#[derive(Debug)]
struct Rebuild {
    ticket: RebuildTicket,
    target: usize,
    chunks: Vec<u64>,
    next: usize,
}

/// The engine while it serves.
#[derive(Debug)]
struct Engine {
    members: Members,
    epoch: u64,
    /// The incarnation of each replica's daemon the engine is connected to.
    connected: [Option<u64>; N],
    rebuilds: Vec<Rebuild>,
}

struct World {
    cfg: EngineConfig,
    addrs: Vec<String>,
    daemons: [Daemon; N],
    engine: Option<Engine>,
    /// Per chunk, the acknowledged version: what every RW member must hold.
    truth: Vec<u64>,
    /// Per chunk, the version last acknowledged to the client.
    acked: Vec<u64>,
    /// Writes whose outcome the client does not know (failed, or in
    /// flight when the engine died), newer than the last acknowledged one
    /// of their chunk: (chunk, version).
    unknown: Vec<(u64, u64)>,
    /// Per chunk, every version the RW members have held (acknowledged, or
    /// served by an engine that adopted it).
    history: Vec<Vec<u64>>,
    /// Per chunk, the acknowledged version at the last flush.
    flushed: Vec<u64>,
    /// A replica lost its page cache at some point: across an engine
    /// restart, only flushed writes are certain (as on any disk).
    power_lost: bool,
    next_version: u64,
    next_instance: u64,
    now: Instant,
    log: Vec<String>,
}

fn index_of(addrs: &[String], address: &str) -> usize {
    addrs
        .iter()
        .position(|a| a == address)
        .expect("members are the model's replicas")
}

impl World {
    fn new(policy: WritePolicy) -> Self {
        let addrs: Vec<String> = (0..N).map(|i| format!("r{i}")).collect();
        let mut cfg = EngineConfig::new(VOLUME, CHUNKS * CHUNK, addrs.clone());
        cfg.chunk_size = CHUNK as u32;
        cfg.write_policy = policy;
        let mut world = World {
            cfg,
            addrs,
            daemons: Default::default(),
            engine: None,
            truth: vec![0; CHUNKS as usize],
            acked: vec![0; CHUNKS as usize],
            unknown: Vec::new(),
            history: vec![Vec::new(); CHUNKS as usize],
            flushed: vec![0; CHUNKS as usize],
            power_lost: false,
            next_version: 1,
            next_instance: 1,
            now: Instant::now(),
            log: Vec::new(),
        };
        for d in 0..N {
            let instance = world.instance();
            world.daemons[d] = Daemon {
                up: true,
                store: Some(Store::new(instance)),
                incarnation: 0,
                ..Daemon::default()
            };
        }
        world.try_open();
        assert!(world.engine.is_some(), "a new volume opens");
        world
    }

    fn instance(&mut self) -> String {
        self.next_instance += 1;
        format!("i{}", self.next_instance)
    }

    /// Does replica `d` answer the engine now (connected and not paused)?
    fn answers(&self, d: usize) -> bool {
        self.reachable(d) && !self.daemons[d].paused
    }

    /// Is the engine's connection to replica `d` alive?
    fn reachable(&self, d: usize) -> bool {
        let Some(engine) = &self.engine else {
            return false;
        };
        self.daemons[d].up
            && self.daemons[d].store.is_some()
            && engine.connected[d] == Some(self.daemons[d].incarnation)
    }

    /// A request to member `id` failed: move it out, record if needed.
    fn fail(&mut self, id: MemberId, chunks: &[u64], why: &str) {
        self.fail_as(id, FailureKind::Lost, chunks, why);
    }

    /// A request to member `id` failed in the way `kind` says; returns
    /// whether it was kept RW (a timeout the write policy cannot afford).
    fn fail_as(&mut self, id: MemberId, kind: FailureKind, chunks: &[u64], why: &str) -> bool {
        let now = self.now;
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        match engine.members.fail(id, kind, chunks, why, now) {
            FailDecision::Moved { .. } => {
                self.record();
                false
            }
            FailDecision::Kept { .. } => true,
            FailDecision::NotMember | FailDecision::AlreadyOut => false,
        }
    }

    /// Member `id` (replica `d`, paused) did not answer a request: it
    /// waits in its socket, and the request times out.
    fn time_out(&mut self, id: MemberId, d: usize, request: Queued, chunks: &[u64]) -> bool {
        self.daemons[d].queued.push(request);
        self.fail_as(id, FailureKind::Timeout, chunks, "timed out")
    }

    /// The engine's membership record now.
    fn current_record(engine: &Engine) -> pb::Membership {
        crate::replica_set::membership_record(&engine.members, Epoch(engine.epoch))
    }

    /// Write the membership record to every RW member (the shell's loop).
    fn record(&mut self) {
        loop {
            let Some(engine) = self.engine.as_ref() else {
                return;
            };
            let record = Self::current_record(engine);
            let (rw, out) = (
                engine.members.ids_in(Mode::Rw),
                engine.members.ids_in(Mode::Err),
            );
            let (first, then) = engine.members.record_targets();
            let quorum = engine.members.policy() == WritePolicy::Quorum;
            if first.is_empty() && then.is_empty() {
                return;
            }
            let (mut accepted, mut failed) = self.write_record(&record, &first);
            if !accepted.is_empty() || quorum {
                let (a, f) = self.write_record(&record, &then);
                accepted.extend(a);
                failed.extend(f);
            }
            if let Some(engine) = self.engine.as_mut() {
                engine.members.recorded(&rw, &accepted, &out);
            }
            if failed.is_empty() {
                return;
            }
            let now = self.now;
            let engine = self.engine.as_mut().expect("checked above");
            for id in failed {
                engine
                    .members
                    .fail(id, FailureKind::Lost, &[], "recording", now);
            }
        }
    }

    /// Write `record` to members `ids`: (accepted, failed).
    fn write_record(
        &mut self,
        record: &pb::Membership,
        ids: &[MemberId],
    ) -> (Vec<MemberId>, Vec<MemberId>) {
        let Some(engine) = self.engine.as_ref() else {
            return (Vec::new(), Vec::new());
        };
        let targets: Vec<(MemberId, usize)> = ids
            .iter()
            .filter_map(|id| engine.members.get(*id))
            .map(|m| (m.id, index_of(&self.addrs, &m.address)))
            .collect();
        let (mut accepted, mut failed) = (Vec::new(), Vec::new());
        for (id, d) in targets {
            if self.answers(d)
                && let Some(store) = self.daemons[d].store.as_mut()
            {
                store.record = Some(record.clone());
                accepted.push(id);
            } else {
                failed.push(id);
            }
        }
        (accepted, failed)
    }

    /// An engine starts: probe, elect, fence, resync, set up its members
    /// and record them — what `open::open_volume` does, on the model.
    fn try_open(&mut self) {
        let infos: Vec<Option<ReplicaInfo>> = self
            .daemons
            .iter()
            .map(|d| {
                d.store
                    .as_ref()
                    .filter(|_| d.up && !d.paused)
                    .map(Store::info)
            })
            .collect();
        let problems: Vec<String> = self
            .daemons
            .iter()
            .map(|d| match (d.up, d.paused) {
                (true, false) => String::new(),
                (true, true) => "timed out".into(),
                (false, _) => "down".into(),
            })
            .collect();
        let (up_to_date, max_generation) =
            match crate::open::elect(&self.cfg, &self.addrs, &infos, None) {
                Ok(elected) => elected,
                Err(e) => {
                    self.log.push(format!("open: cannot serve yet: {e}"));
                    return;
                }
            };
        let epoch = infos.iter().flatten().map(|i| i.epoch).max().unwrap_or(0) + 1;
        let mut connected = [None; N];
        for (daemon, connection) in self.daemons.iter_mut().zip(connected.iter_mut()) {
            if let (true, false, Some(store)) = (daemon.up, daemon.paused, daemon.store.as_mut()) {
                store.epoch = epoch;
                *connection = Some(daemon.incarnation);
            }
        }
        // Resync what may have been in flight among the up-to-date ones,
        // from the first of them; they flush.
        let live: Vec<usize> = (0..N).filter(|d| up_to_date[*d]).collect();
        let mut regions = BTreeSet::new();
        for d in &live {
            if let Some(store) = &self.daemons[*d].store {
                regions.extend(store.dirty.iter().copied());
            }
        }
        let source = self.daemons[live[0]].store.clone().expect("up to date");
        for d in &live[1..] {
            let store = self.daemons[*d].store.as_mut().expect("up to date");
            for c in &regions {
                if store.data[*c as usize] != source.data[*c as usize] {
                    store.write(*c, source.data[*c as usize]);
                }
            }
            store.flush();
        }
        if let Some(store) = self.daemons[live[0]].store.as_mut() {
            store.flush();
        }
        // What the new engine serves is what the up-to-date replicas hold.
        self.adopt(live[0]);
        let members = crate::open::members_after_open(
            &self.cfg,
            CHUNKS,
            &self.addrs,
            &infos,
            &problems,
            &up_to_date,
            None,
            Generation(max_generation + 1),
            self.now,
        );
        self.log.push(format!(
            "open: epoch {epoch}, up to date {up_to_date:?}, members {:?}",
            members
                .all()
                .iter()
                .map(|m| (m.mode, m.divergence.tracked_len()))
                .collect::<Vec<_>>()
        ));
        // Connections only to the up-to-date members; others reconnect when
        // they return.
        for (d, c) in connected.iter_mut().enumerate() {
            if !up_to_date[d] {
                *c = None;
            }
        }
        self.engine = Some(Engine {
            members,
            epoch,
            connected,
            rebuilds: Vec::new(),
        });
        self.record();
    }

    fn apply(&mut self, step: &Step) {
        self.log.push(format!("{step:?}"));
        if self.engine.is_none() {
            self.try_open();
        }
        match *step {
            Step::Write { chunk, fail_on } => self.write(chunk, fail_on),
            Step::Flush => self.flush(),
            Step::Kill {
                replica,
                power_loss,
            } => {
                let d = &mut self.daemons[replica];
                if d.up {
                    d.die();
                    if power_loss && let Some(store) = d.store.as_mut() {
                        store.data.clone_from(&store.durable);
                        self.power_lost = true;
                    }
                }
            }
            Step::Wipe { replica } => {
                // One disk at a time — only while every other member is RW
                // — so never the last copy of the acknowledged data (losing
                // every copy, or a quorum of them, is no failure the engine
                // can handle by itself).
                let Some(engine) = self.engine.as_ref() else {
                    return;
                };
                let others_keep = engine.members.all().iter().any(|m| {
                    let d = index_of(&self.addrs, &m.address);
                    m.mode == Mode::Rw && d != replica && self.daemons[d].store.is_some()
                });
                let one_at_a_time = engine.members.all().iter().all(|m| {
                    let d = index_of(&self.addrs, &m.address);
                    d == replica || (m.mode == Mode::Rw && self.daemons[d].store.is_some())
                });
                // Under `available` a new engine waits for every RW member
                // of the newest record (an operator's salvage ends that): a
                // disk is lost only once the engine has recorded it ERR.
                let recorded_out = engine.members.policy() == WritePolicy::Quorum
                    || engine.members.all().iter().any(|m| {
                        m.address == self.addrs[replica]
                            && m.mode == Mode::Err
                            && !engine.members.recorded_rw().contains(&m.id)
                    });
                if !others_keep || !one_at_a_time || !recorded_out {
                    self.log.push("  (skipped: the last copy)".into());
                    return;
                }
                let d = &mut self.daemons[replica];
                d.die();
                d.store = None;
            }
            Step::Restart { replica } => self.daemons[replica].up = true,
            Step::Pause { replica } => {
                let d = &mut self.daemons[replica];
                d.paused = d.up;
            }
            Step::Resume { replica } => self.resume(replica),
            Step::Tick => self.tick(),
            Step::Copy { groups } => self.copy(groups),
            Step::Stale => {
                self.now += STALE + Duration::from_secs(1);
                if let Some(engine) = self.engine.as_mut() {
                    engine.members.expire_stale(STALE, self.now);
                }
            }
            Step::EngineCrash { in_flight } => {
                if let (Some((chunk, mask)), Some(engine)) = (in_flight, self.engine.as_ref()) {
                    let targets: Vec<usize> = engine
                        .members
                        .all()
                        .iter()
                        .filter(|m| m.mode != Mode::Err)
                        .map(|m| index_of(&self.addrs, &m.address))
                        .collect();
                    let version = self.next_version;
                    self.next_version += 1;
                    let epoch = self.engine.as_ref().map_or(0, |e| e.epoch);
                    for d in targets {
                        if mask & (1 << d) == 0 || !self.reachable(d) {
                            continue;
                        }
                        if self.daemons[d].paused {
                            self.daemons[d].queued.push(Queued::Write {
                                chunk,
                                version,
                                epoch,
                                owed: None,
                            });
                        } else if let Some(store) = self.daemons[d].store.as_mut() {
                            store.write(chunk, version);
                        }
                    }
                    self.unknown.push((chunk, version));
                }
                self.engine = None;
                self.try_open();
            }
        }
        self.check();
    }

    /// A paused daemon runs again. The writes that waited for it land; on
    /// an RW member (kept through its timeouts) they become the volume's
    /// data — never acknowledged, so the client may see either version.
    fn resume(&mut self, d: usize) {
        let applied = self.daemons[d].resume();
        let reachable = self.reachable(d);
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        // The late replies reach the engine that is still connected.
        if reachable {
            for (chunk, _, owed) in &applied {
                if let Some((id, session)) = owed {
                    engine.members.confirmed(*id, *session, &[*chunk]);
                }
            }
        }
        let rw = engine
            .members
            .all()
            .iter()
            .any(|m| m.mode == Mode::Rw && m.address == self.addrs[d]);
        if !(rw && reachable) {
            return;
        }
        for (chunk, version, _) in applied {
            let c = chunk as usize;
            if self.truth[c] != version {
                self.truth[c] = version;
                self.history[c].push(version);
            }
        }
    }

    /// Replica `d` now defines the volume's data (an engine opened on it,
    /// or it came back as the last RW member): it must hold every
    /// acknowledged write — or, after a lost page cache, at least every
    /// flushed one — or a later attempted one. (Until a later write to a
    /// chunk is acknowledged, any attempted version of it may be served:
    /// the client was told the outcome is unknown.)
    fn adopt(&mut self, d: usize) {
        let served = self.daemons[d]
            .store
            .as_ref()
            .expect("adopted")
            .data
            .clone();
        for (c, &version) in served.iter().enumerate() {
            let attempted = self
                .unknown
                .iter()
                .any(|(chunk, v)| *chunk as usize == c && *v == version);
            let unflushed = self.power_lost
                && version >= self.flushed[c]
                && (version == 0 || self.history[c].contains(&version));
            assert!(
                version == self.acked[c] || attempted || unflushed,
                "chunk {c}: r{d} serves version {version}, but {} was acknowledged\n{}",
                self.acked[c],
                self.log.join("\n")
            );
            if self.truth[c] != version {
                self.truth[c] = version;
                self.history[c].push(version);
            }
        }
    }

    fn write(&mut self, chunk: u64, fail_on: Option<usize>) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        let members = &engine.members;
        if !members.writable() {
            return; // the client gets an error; nothing is sent
        }
        let targets: Vec<(MemberId, usize, Mode)> = members
            .all()
            .iter()
            .filter(|m| m.mode != Mode::Err)
            .map(|m| (m.id, index_of(&self.addrs, &m.address), m.mode))
            .collect();
        let version = self.next_version;
        self.next_version += 1;
        let epoch = engine.epoch;
        let mut failed = Vec::new();
        let mut timed_out = Vec::new();
        let mut landed_on_rw = false;
        for (id, d, mode) in targets {
            if self.answers(d) && fail_on != Some(d) {
                if let Some(store) = self.daemons[d].store.as_mut() {
                    store.write(chunk, version);
                }
                landed_on_rw |= mode == Mode::Rw;
            } else if self.reachable(d) && self.daemons[d].paused {
                timed_out.push((id, d));
            } else {
                failed.push(id);
            }
        }
        let mut kept = false;
        for (id, d) in timed_out {
            let session = self.engine.as_ref().and_then(|e| e.members.session_of(id));
            let request = Queued::Write {
                chunk,
                version,
                epoch,
                owed: session.map(|s| (id, s)),
            };
            kept |= self.time_out(id, d, request, &[chunk]);
        }
        for id in failed {
            self.fail(id, &[chunk], "write failed");
        }
        let writable = self
            .engine
            .as_mut()
            .is_some_and(|e| e.members.note_written(&[chunk]));
        if landed_on_rw {
            // Every member still RW took it (the others are ERR now).
            self.truth[chunk as usize] = version;
            self.history[chunk as usize].push(version);
        }
        if landed_on_rw && writable && !kept {
            self.acked[chunk as usize] = version;
            self.unknown.retain(|(c, _)| *c != chunk);
        } else {
            // The client gets an error: the write may or may not be there.
            self.unknown.push((chunk, version));
        }
    }

    fn flush(&mut self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        if !engine.members.writable() || engine.members.unconfirmed_writes().is_some() {
            return; // refused, like a write
        }
        let epoch = engine.epoch;
        let targets: Vec<(MemberId, usize)> = engine
            .members
            .all()
            .iter()
            .filter(|m| m.mode != Mode::Err)
            .map(|m| (m.id, index_of(&self.addrs, &m.address)))
            .collect();
        let mut kept = false;
        for (id, d) in targets {
            if self.answers(d) {
                if let Some(store) = self.daemons[d].store.as_mut() {
                    store.flush();
                }
            } else if self.reachable(d) && self.daemons[d].paused {
                kept |= self.time_out(id, d, Queued::Flush { epoch }, &[]);
            } else {
                self.fail(id, &[], "flush failed");
            }
        }
        // The flush succeeds if no member still RW timed out and the volume
        // is still writable: every member still RW has made the
        // acknowledged data durable.
        if let Some(engine) = self.engine.as_mut()
            && engine.members.writable()
            && !kept
        {
            engine.members.note_flushed();
            self.flushed.clone_from(&self.truth);
        }
    }

    fn tick(&mut self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        // Pings: a dead daemon is lost, a paused one times out.
        let silent: Vec<(MemberId, bool)> = engine
            .members
            .all()
            .iter()
            .filter(|m| m.mode != Mode::Err)
            .map(|m| (m.id, index_of(&self.addrs, &m.address)))
            .filter(|(_, d)| !self.answers(*d))
            .map(|(id, d)| (id, self.reachable(d)))
            .collect();
        for (id, paused) in silent {
            let kind = if paused {
                FailureKind::Timeout
            } else {
                FailureKind::Lost
            };
            self.fail_as(id, kind, &[], "ping failed");
        }
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        for (id, address) in engine.members.returnable(self.now) {
            self.bring_back(id, index_of(&self.addrs, &address));
        }
    }

    /// What `supervisor::bring_back` does, on the model.
    fn bring_back(&mut self, id: MemberId, d: usize) {
        let now = self.now;
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        if !engine.members.claim(id) {
            return;
        }
        if !self.daemons[d].up || self.daemons[d].paused {
            engine
                .members
                .release(id, ReturnFailure::Unreachable, "down", Duration::ZERO, now);
            return;
        }
        let created = self.daemons[d].store.is_none();
        if created {
            self.next_instance += 1;
            self.daemons[d].store = Some(Store::new(format!("i{}", self.next_instance)));
        }
        let engine = self.engine.as_mut().expect("checked above");
        let store = self.daemons[d].store.as_mut().expect("created above");
        store.epoch = engine.epoch;
        engine.connected[d] = Some(self.daemons[d].incarnation);
        let facts = ReturnFacts {
            instance_id: store.instance.clone(),
            created,
            dirty_chunks: store.dirty.iter().copied().collect(),
        };
        // The current record (naming it ERR) is written to it before it is
        // recorded WO, if it is the effective one.
        if engine.members.record_settled() && engine.members.rw_count() > 0 {
            store.record = Some(Self::current_record(engine));
            let (rw, out) = (
                engine.members.ids_in(Mode::Rw),
                engine.members.ids_in(Mode::Err),
            );
            engine.members.recorded(&rw, &[id], &out);
        }
        let plan = match engine.members.join(id, facts) {
            Ok(Admission::Rebuild(plan)) => plan,
            Ok(Admission::Readmitted) => {
                self.log
                    .push(format!("  r{d} is back as the last RW member"));
                self.adopt(d);
                self.record();
                return;
            }
            Err(MembershipError::NoSource) => {
                engine.members.release(
                    id,
                    ReturnFailure::Unreachable,
                    "no source",
                    Duration::ZERO,
                    now,
                );
                return;
            }
            Err(e) => panic!("join refused: {e}\n{}", self.log.join("\n")),
        };
        self.log.push(format!(
            "  r{d} joins WO: {:?} {:?}",
            plan.kind, plan.chunks
        ));
        engine.rebuilds.retain(|r| r.target != d);
        engine.rebuilds.push(Rebuild {
            ticket: plan.ticket,
            target: d,
            chunks: plan.chunks,
            next: 0,
        });
        self.record();
    }

    fn copy(&mut self, groups: usize) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let rebuilds = std::mem::take(&mut engine.rebuilds);
        let mut kept = Vec::new();
        for mut r in rebuilds {
            match self.copy_some(&mut r, groups) {
                Ok(true) => kept.push(r),
                Ok(false) => {}
                Err(why) => {
                    // The copier gives up: the target leaves the write set
                    // (keeping what it had not been sent), and backs off.
                    self.fail(r.ticket.member, &[], &why);
                    let now = self.now;
                    if let Some(engine) = self.engine.as_mut() {
                        engine.members.release(
                            r.ticket.member,
                            ReturnFailure::Refused,
                            &why,
                            Duration::ZERO,
                            now,
                        );
                    }
                }
            }
            if self.engine.is_none() {
                return;
            }
        }
        if let Some(engine) = self.engine.as_mut() {
            kept.append(&mut engine.rebuilds);
            engine.rebuilds = kept;
        }
    }

    /// Ok(true): still running; Ok(false): finished; Err: failed.
    fn copy_some(&mut self, r: &mut Rebuild, groups: usize) -> Result<bool, String> {
        let engine = self.engine.as_ref().ok_or("no engine")?;
        match engine.members.get(r.ticket.member) {
            Some(m) if m.mode == Mode::Wo => {}
            _ => return Err("target no longer WO".into()),
        }
        if !self.answers(r.target) {
            return Err("target unreachable".into());
        }
        for _ in 0..groups {
            if r.next >= r.chunks.len() {
                break;
            }
            // A source: the first RW member that answers; those that do
            // not are moved out.
            let engine = self.engine.as_ref().ok_or("no engine")?;
            let rw: Vec<(MemberId, usize)> = engine
                .members
                .all()
                .iter()
                .filter(|m| m.mode == Mode::Rw)
                .map(|m| (m.id, index_of(&self.addrs, &m.address)))
                .collect();
            let mut source = None;
            for (id, d) in rw {
                if self.answers(d) {
                    source = Some(d);
                    break;
                }
                let kind = if self.reachable(d) {
                    FailureKind::Timeout
                } else {
                    FailureKind::Lost
                };
                self.fail_as(id, kind, &[], "source failed");
                if self.engine.is_none() {
                    return Err("no engine".into());
                }
            }
            let Some(source) = source else {
                return Err("no source".into());
            };
            let end = (r.next + 4).min(r.chunks.len());
            let group: Vec<u64> = r.chunks[r.next..end].to_vec();
            let from = self.daemons[source].store.clone().expect("reachable");
            let to = self.daemons[r.target].store.as_mut().expect("reachable");
            for c in &group {
                if to.data[*c as usize] != from.data[*c as usize] {
                    to.write(*c, from.data[*c as usize]);
                }
            }
            r.next = end;
            let engine = self.engine.as_mut().ok_or("no engine")?;
            engine.members.copied(r.ticket, &group);
        }
        if r.next < r.chunks.len() {
            return Ok(true);
        }
        let to = self.daemons[r.target].store.as_mut().expect("reachable");
        to.flush();
        let engine = self.engine.as_mut().ok_or("no engine")?;
        if let Err(e) = engine.members.finish_rebuild(r.ticket) {
            panic!(
                "a finished rebuild was refused: {e}\n{}",
                self.log.join("\n")
            );
        }
        let data = &self.daemons[r.target]
            .store
            .as_ref()
            .expect("reachable")
            .data;
        let in_flight = self.in_flight_to_rw();
        let mut adopted = Vec::new();
        for (c, held) in data.iter().enumerate() {
            assert!(
                *held == self.truth[c] || in_flight.contains(&(c as u64, *held)),
                "r{} turned RW without the acknowledged data: chunk {c} holds v{held}, acknowledged v{}\n{}",
                r.target,
                self.truth[c],
                self.log.join("\n")
            );
            if *held != self.truth[c] {
                adopted.push((c, *held));
            }
        }
        // It took a write still on its way to a paused RW member: that
        // write is the RW set's data now (never acknowledged either way).
        for (c, held) in adopted {
            self.truth[c] = held;
            self.history[c].push(held);
        }
        self.log.push(format!("  r{} is RW", r.target));
        self.record();
        Ok(false)
    }

    /// Writes on their way to an RW member, (chunk, version): waiting in a
    /// paused RW member's socket (the RW set's data once it wakes), or of
    /// unknown outcome in a chunk where an RW member owes a write that timed
    /// out (it may have died with it; then the others' version is the
    /// data). Another member that holds one is not behind.
    fn in_flight_to_rw(&self) -> BTreeSet<(u64, u64)> {
        let Some(engine) = &self.engine else {
            return BTreeSet::new();
        };
        let rw: Vec<&Member> = engine
            .members
            .all()
            .iter()
            .filter(|m| m.mode == Mode::Rw)
            .collect();
        let queued = rw
            .iter()
            .flat_map(|m| &self.daemons[index_of(&self.addrs, &m.address)].queued)
            .filter_map(|q| match *q {
                Queued::Write { chunk, version, .. } => Some((chunk, version)),
                Queued::Flush { .. } => None,
            });
        let owed = self
            .unknown
            .iter()
            .filter(|(chunk, _)| rw.iter().any(|m| m.unconfirmed.contains_key(chunk)))
            .copied();
        queued.chain(owed).collect()
    }

    /// The invariant, after every step.
    fn check(&self) {
        let Some(engine) = &self.engine else { return };
        let in_flight = self.in_flight_to_rw();
        for m in engine.members.all() {
            let d = index_of(&self.addrs, &m.address);
            let Some(store) = &self.daemons[d].store else {
                continue;
            };
            if m.mode == Mode::Rw {
                if self.answers(d) && self.daemons[d].queued.is_empty() {
                    for (c, held) in store.data.iter().enumerate() {
                        assert!(
                            *held == self.truth[c] || in_flight.contains(&(c as u64, *held)),
                            "RW member r{d} does not hold the acknowledged data: chunk {c} holds v{held}, acknowledged v{}\n{}",
                            self.truth[c],
                            self.log.join("\n")
                        );
                    }
                }
                continue;
            }
            if store.instance != m.instance_id {
                continue; // another replica now: it will be rebuilt in full
            }
            if engine.members.rw_count() == 0 {
                // No RW member: the data is whatever the member readmitted
                // first holds, and its readmission extends every other
                // member's divergence (checked once it has happened).
                continue;
            }
            for c in 0..CHUNKS {
                let held = store.data[c as usize];
                if held == self.truth[c as usize]
                    || store.dirty.contains(&c)
                    || in_flight.contains(&(c, held))
                {
                    continue;
                }
                let covered = match &m.divergence {
                    Divergence::InSync => false,
                    Divergence::Chunks(set) => set.contains(c),
                    Divergence::Unknown => true,
                };
                assert!(
                    covered,
                    "r{d} ({:?}) differs in chunk {c} (holds v{}, acknowledged v{}), which its divergence {:?} does not cover (in flight {in_flight:?}, queues {:?})\n{}",
                    m.mode,
                    store.data[c as usize],
                    self.truth[c as usize],
                    m.divergence,
                    self.daemons
                        .iter()
                        .map(|d| d.queued.clone())
                        .collect::<Vec<_>>(),
                    self.log.join("\n")
                );
            }
        }
    }
}

fn run_model(policy: WritePolicy, steps: &[Step]) {
    let mut world = World::new(policy);
    for s in steps {
        world.apply(s);
    }
    // Heal: every daemon up, until every member is RW.
    for d in 0..N {
        world.apply(&Step::Resume { replica: d });
        world.apply(&Step::Restart { replica: d });
    }
    for _ in 0..4 * CHUNKS {
        world.apply(&Step::Tick);
        world.apply(&Step::Copy { groups: 4 });
        if world
            .engine
            .as_ref()
            .is_some_and(|e| e.members.rw_count() == N)
        {
            break;
        }
    }
    let Some(engine) = world.engine.as_ref() else {
        panic!("not serving after healing\n{}", world.log.join("\n"));
    };
    assert_eq!(
        engine.members.rw_count(),
        N,
        "every member RW after healing\n{}",
        world.log.join("\n")
    );
    for d in 0..N {
        assert_eq!(
            world.daemons[d].store.as_ref().map(|s| &s.data),
            Some(&world.truth),
            "r{d} after healing\n{}",
            world.log.join("\n")
        );
    }
}

proptest! {
    // CORRAL_MODEL_CASES=N runs more sequences (a long hunt).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("CORRAL_MODEL_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2048),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_member_turns_rw_without_every_chunk_it_may_have_missed(
        quorum in any::<bool>(),
        steps in prop::collection::vec(step(), 1..160),
    ) {
        let policy = if quorum { WritePolicy::Quorum } else { WritePolicy::Available };
        run_model(policy, &steps);
    }
}

/// The campaign's finding, shrunk: a replica kept RW through a write's
/// timeout (the policy needed it) dies before that write reaches it; the
/// write's chunk must be caught up when it returns.
#[test]
fn a_kept_replica_that_dies_owes_the_writes_that_timed_out_on_it() {
    use Step::*;
    run_model(
        WritePolicy::Quorum,
        &[
            Write {
                chunk: 0,
                fail_on: Some(2),
            },
            Pause { replica: 1 },
            Write {
                chunk: 1,
                fail_on: None,
            },
            Kill {
                replica: 1,
                power_loss: false,
            },
            Tick,
            Restart { replica: 1 },
            Tick,
            Copy { groups: 4 },
        ],
    );
}

/// A flush while a kept replica owes a write would let the others clear
/// its write-intent bit; after an engine crash and the owing replica's
/// death, nothing would show that the RW replicas differ there.
#[test]
fn no_flush_while_a_kept_replica_owes_a_write() {
    use Step::*;
    run_model(
        WritePolicy::Quorum,
        &[
            Wipe { replica: 0 },
            Write {
                chunk: 3,
                fail_on: None,
            },
            Pause { replica: 1 },
            Write {
                chunk: 1,
                fail_on: None,
            },
            Flush,
            EngineCrash { in_flight: None },
            Kill {
                replica: 1,
                power_loss: false,
            },
        ],
    );
}

/// A rebuild finishes while the only other RW replica, kept through a
/// write's timeout, has died with that write: the rebuilt one took the
/// write (never acknowledged) and serves it; the dead one catches up there.
#[test]
fn a_rebuilt_replica_may_hold_the_write_a_dead_kept_replica_owed() {
    use Step::*;
    run_model(
        WritePolicy::Available,
        &[
            Kill {
                replica: 0,
                power_loss: false,
            },
            Restart { replica: 0 },
            Tick,
            Kill {
                replica: 1,
                power_loss: false,
            },
            Write {
                chunk: 0,
                fail_on: None,
            },
            Pause { replica: 2 },
            Write {
                chunk: 0,
                fail_on: None,
            },
            Kill {
                replica: 2,
                power_loss: false,
            },
            Copy { groups: 1 },
        ],
    );
}
