//! The replicated volume: the engine's data path, served to the frontends
//! as a [`BlockDevice`].
//!
//! - writes are split at chunk boundaries and sent to every RW and WO
//!   replica at once, holding each chunk's lock shared; success once every
//!   replica still RW has acknowledged every piece (the failing ones are
//!   moved to ERR, and that is recorded, before the acknowledgement); chunks
//!   written while some replica is in ERR are remembered for its catch-up;
//! - reads go to one RW replica per piece, round robin, failing over to the
//!   next on error; a block that fails its checksum on one replica is read
//!   from another and rewritten on the bad one (repair on read);
//! - flush (and FUA) reach stable storage on every RW replica; a client
//!   that flushes after each write has its writes sent FUA and its flushes
//!   answered without a round ([`crate::write_through`], decision 76);
//! - [`Volume::verify`] compares the RW replicas chunk by chunk by checksum.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use corral_block::{BlockDevice, BlockError, BlockResult, check_range};
use corral_proto::v1::{self as pb, data_request::Op};
use futures::future::join_all;
use tracing::{info, warn};

use crate::chunk::{ChunkMap, Segment};
use crate::client::{DataOutcome, ReplicaClient};
use crate::clone::CloneFill;
use crate::error::ReplicaIoError;
use crate::locks::ChunkLocks;
use crate::replica_set::{ReplicaSet, SlotId};
use crate::write_through::{PendingWrite, WriteThrough};

/// The unit of the replicas' checksums, and of a repair.
const BLOCK: u64 = corral_proto::CHECKSUM_BLOCK;

/// Most chunk pieces one write round queues per replica (well under the
/// streams' in-flight limits).
const SEGMENTS_PER_ROUND: usize = 32;

/// A replicated volume.
pub struct Volume {
    name: String,
    block_size: u32,
    chunks: ChunkMap,
    set: Arc<ReplicaSet>,
    locks: ChunkLocks,
    repaired: AtomicU64,
    /// Writes (and unmaps, zero writes) begun so far, and those not yet
    /// finished: how the supervisor's idle flusher tells quiet.
    writes_begun: AtomicU64,
    writes_in_flight: AtomicU64,
    /// Flushes asked for so far; the next round covers every one of them.
    flushes_asked: AtomicU64,
    /// One flush round at a time (group commit): the last round's reach and outcome.
    flush_round: tokio::sync::Mutex<FlushRound>,
    /// Whether writes go FUA and flushes need a round (decision 76).
    write_through: WriteThrough,
    /// Wakes the supervisor (a replica was added, or failed).
    pub wake: tokio::sync::Notify,
    /// Set when the volume is a clone (see [`crate::clone`]).
    clone: std::sync::OnceLock<Arc<CloneFill>>,
}

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub replicas: Vec<String>,
    pub chunks_compared: u64,
    /// (offset, length, replicas that differ from the first one)
    pub differences: Vec<(u64, u64, Vec<String>)>,
}

/// The last flush round: the flushes it covered (every one asked for before
/// it began) and how it ended.
#[derive(Default)]
struct FlushRound {
    covered: u64,
    outcome: Option<BlockResult<()>>,
}

/// Counts a write as finished when dropped (also when its future is dropped).
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Volume {
    /// Flush every RW replica: always a round (the idle flusher's, a
    /// clone's progress, an engine's last; replicas clear write-intent
    /// bits only at these).
    pub async fn flush_replicas(&self) -> BlockResult<()> {
        self.flush_grouped().await
    }

    /// A frontend's FLUSH (or empty FUA write): a round, unless every write
    /// finished so far is durable on every replica already (decision 76).
    async fn flush_frontend(&self) -> BlockResult<()> {
        let flush = self
            .write_through
            .flush_begins(self.clone_filling().is_some());
        if flush.needs_round {
            return self.flush_grouped().await;
        }
        self.set.check_writable()?;
        // As after a round: an ERR member took no part in making these
        // writes durable.
        self.set.note_flushed();
        Ok(())
    }

    /// Turn write-through (decision 76) on or off.
    pub fn set_write_through(&self, enabled: bool) {
        self.write_through.set_enabled(enabled);
    }

    /// Frontend flushes answered without a round to the replicas.
    pub fn flushes_without_round(&self) -> u64 {
        self.write_through.flushes_answered_without_round()
    }

    /// Group commit: flushes asked for while a round is under way share the
    /// next one. A round covers every flush asked for before it began, so
    /// every write those callers completed before asking; one that finds a
    /// round begun after its ask has already ended takes that round's outcome.
    async fn flush_grouped(&self) -> BlockResult<()> {
        let ticket = self.flushes_asked.fetch_add(1, Ordering::SeqCst) + 1;
        let mut round = self.flush_round.lock().await;
        if round.covered >= ticket
            && let Some(outcome) = &round.outcome
        {
            return outcome.clone();
        }
        let covers = self.flushes_asked.load(Ordering::SeqCst);
        let mark = self.write_through.round_begins();
        let outcome = self.flush_all().await;
        if outcome.is_ok() {
            self.write_through.round_succeeded(mark);
        }
        round.covered = covers;
        round.outcome = Some(outcome.clone());
        outcome
    }

    /// (writes begun so far, writes in flight now).
    pub fn write_activity(&self) -> (u64, u64) {
        (
            self.writes_begun.load(Ordering::Relaxed),
            self.writes_in_flight.load(Ordering::Relaxed),
        )
    }

    /// A volume over `set`, whose size it takes (see [`ReplicaSet::size`]).
    pub fn new(name: String, block_size: u32, chunks: ChunkMap, set: Arc<ReplicaSet>) -> Self {
        Volume {
            name,
            block_size,
            chunks,
            set,
            locks: ChunkLocks::default(),
            repaired: AtomicU64::new(0),
            writes_begun: AtomicU64::new(0),
            writes_in_flight: AtomicU64::new(0),
            flushes_asked: AtomicU64::new(0),
            flush_round: tokio::sync::Mutex::new(FlushRound::default()),
            write_through: WriteThrough::default(),
            wake: tokio::sync::Notify::new(),
            clone: std::sync::OnceLock::new(),
        }
    }

    /// Make this volume a clone filling from `fill` (once).
    pub fn set_clone_fill(&self, fill: Arc<CloneFill>) {
        let _ = self.clone.set(fill);
    }

    /// The clone's fill, while it is not done.
    pub fn clone_filling(&self) -> Option<&Arc<CloneFill>> {
        self.clone.get().filter(|f| !f.is_done())
    }

    /// The clone's fill progress (None: not a clone).
    pub fn clone_status(&self) -> Option<pb::CloneStatus> {
        self.clone.get().map(|f| f.status())
    }

    /// Fill `chunks` from the clone's source where not filled yet, taking
    /// their exclusive locks.
    pub async fn fill_chunks(&self, chunks: &[u64]) -> BlockResult<()> {
        let Some(fill) = self.clone_filling() else {
            return Ok(());
        };
        let open: Vec<u64> = chunks
            .iter()
            .copied()
            .filter(|c| !fill.is_filled(*c))
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let _locks = self.locks.exclusive_many(&open).await;
        self.fill_locked(&open).await
    }

    /// [`Volume::fill_chunks`] for a caller that holds the chunks' exclusive
    /// locks already (a rebuild).
    pub async fn fill_locked(&self, chunks: &[u64]) -> BlockResult<()> {
        let Some(fill) = self.clone_filling() else {
            return Ok(());
        };
        for &chunk in chunks {
            if fill.is_filled(chunk) {
                continue;
            }
            let source = fill.read_source(chunk).await.map_err(|e| {
                BlockError::Unavailable(format!(
                    "volume {} is a clone still filling from its source: {e}",
                    self.name
                ))
            })?;
            self.write_fill(fill, chunk, source).await?;
        }
        Ok(())
    }

    /// Fill `chunk` with `data` (its source's data from the chunk's start,
    /// read already; None: nothing to write), unless it is filled.
    pub async fn fill_chunk_with(&self, chunk: u64, data: Option<Bytes>) -> BlockResult<()> {
        let Some(fill) = self.clone_filling() else {
            return Ok(());
        };
        if fill.is_filled(chunk) {
            return Ok(());
        }
        let _lock = self.locks.exclusive_many(&[chunk]).await;
        if fill.is_filled(chunk) {
            return Ok(());
        }
        let offset = chunk * self.chunks.chunk_size();
        self.write_fill(fill, chunk, data.map(|d| (offset, d)))
            .await
    }

    /// Sends a chunk's source data as fill writes (under its exclusive lock)
    /// and marks it filled.
    async fn write_fill(
        &self,
        fill: &CloneFill,
        chunk: u64,
        source: Option<(u64, Bytes)>,
    ) -> BlockResult<()> {
        if let Some((offset, data)) = source {
            let seg = Segment {
                chunk,
                offset,
                len: data.len() as u64,
                request_offset: 0,
            };
            self.set.check_writable()?;
            self.send_round(vec![(seg, CloneFill::fill_op(offset, data))], vec![chunk])
                .await?;
        }
        fill.mark_filled(chunk);
        Ok(())
    }

    /// `len` bytes at `offset` of snapshot `name`'s view, from the first RW
    /// replica that answers (what a clone of this volume fills from).
    pub async fn read_snapshot(&self, name: &str, offset: u64, len: u32) -> BlockResult<Bytes> {
        let size = self.set.size();
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > size)
        {
            return Err(BlockError::OutOfRange {
                offset,
                len: u64::from(len),
                size,
            });
        }
        let epoch = self.set.epoch();
        let chunk = self.chunks.chunk_of(offset);
        let mut last = None;
        for (_, client) in self.set.read_targets() {
            let op = Op::Read(pb::ReadOp {
                offset,
                length: len,
                snapshot: name.to_string(),
            });
            match client.call(chunk, epoch, op).await {
                Ok(DataOutcome::Read(data)) if data.len() == len as usize => return Ok(data),
                Ok(_) => last = Some(format!("{}: read reply of the wrong shape", client.addr())),
                Err(ReplicaIoError::Rejected(m)) => return Err(BlockError::Invalid(m)),
                Err(e) => last = Some(format!("{}: {e}", client.addr())),
            }
        }
        Err(BlockError::Unavailable(format!(
            "volume {}: no replica could read snapshot {name} at {offset}: {}",
            self.name,
            last.unwrap_or_else(|| "no RW replica".into())
        )))
    }

    /// Before a write that covers only part of a 4 KiB block at either end:
    /// fill the chunks of those ends (the replica merges a partial block
    /// with what it holds, which must be the source's data).
    async fn fill_partial_edges(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.clone_filling().is_none() {
            return Ok(());
        }
        let mut edges = Vec::new();
        if !offset.is_multiple_of(BLOCK) {
            edges.push(self.chunks.chunk_of(offset));
        }
        let end = offset + len;
        if !end.is_multiple_of(BLOCK) {
            edges.push(self.chunks.chunk_of(end - 1));
        }
        edges.dedup();
        self.fill_chunks(&edges).await
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn chunk_map(&self) -> ChunkMap {
        self.chunks
    }

    pub fn replica_set(&self) -> &Arc<ReplicaSet> {
        &self.set
    }

    pub fn chunk_locks(&self) -> &ChunkLocks {
        &self.locks
    }

    /// Blocks rewritten by repair on read.
    pub fn repaired_blocks(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    /// Byte range of a chunk, clipped to the volume: (offset, length).
    pub fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let size = self.chunks.chunk_size();
        let volume = self.size();
        let offset = chunk.saturating_mul(size).min(volume);
        (offset, size.min(volume - offset))
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.size().div_ceil(self.chunks.chunk_size())
    }

    /// Grow the volume online to `new_size` bytes: every writable replica,
    /// then the engine, recorded like a membership change (see
    /// [`crate::replica_set::expand`]). The frontends see the new size from
    /// their next command (iSCSI, with a capacity-changed unit attention)
    /// or connection (NBD).
    pub async fn expand(
        &self,
        new_size: u64,
    ) -> Result<crate::replica_set::expand::ExpandReport, crate::replica_set::expand::ExpandError>
    {
        let report = self
            .set
            .expand(new_size, self.block_size, self.chunks)
            .await?;
        self.wake.notify_one();
        Ok(report)
    }

    async fn handle_failure(&self, id: SlotId, err: &ReplicaIoError, chunks: &[u64]) {
        let before = self.set.rw_count();
        let _ = self.set.handle_failure(id, err, chunks).await;
        if self.set.rw_count() != before {
            self.wake.notify_one();
        }
    }

    /// Send one mutating request per segment to every write target; ack when
    /// every target still RW has acknowledged all of them. A request of many
    /// chunks (a large discard) goes in rounds of [`SEGMENTS_PER_ROUND`].
    /// `write`: the frontend write this is (sent FUA or not, counted
    /// durable everywhere once every target acknowledged every piece of a
    /// FUA write, see [`crate::write_through`]).
    async fn fan_out<F>(
        &self,
        offset: u64,
        len: u64,
        mut write: PendingWrite<'_>,
        make_op: F,
    ) -> BlockResult<()>
    where
        F: Fn(&Segment) -> Op,
    {
        self.writes_begun.fetch_add(1, Ordering::Relaxed);
        self.writes_in_flight.fetch_add(1, Ordering::Relaxed);
        let _done = InFlight(&self.writes_in_flight);
        let segments: Vec<Segment> = self.chunks.split(offset, len).collect();
        let mut every_target = true;
        let mut outcome = Ok(());
        for round in segments.chunks(SEGMENTS_PER_ROUND) {
            let ops = round.iter().map(|s| (*s, make_op(s))).collect();
            match self.fan_out_round(ops).await {
                Ok(all) => every_target &= all,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if every_target && outcome.is_ok() {
            write.durable_everywhere();
        }
        outcome
    }

    /// A frontend write begins: whether it goes FUA (`fua`: the client
    /// asked; otherwise write-through decides, decision 76).
    fn begin_write(&self, fua: bool) -> PendingWrite<'_> {
        let mut write = self.write_through.write_begins(fua);
        // A clone's fill is made durable by flush rounds only.
        write.fua &= fua || self.clone_filling().is_none();
        write
    }

    async fn fan_out_round(&self, segments: Vec<(Segment, Op)>) -> BlockResult<bool> {
        self.set.check_writable()?;
        let chunk_ids: Vec<u64> = segments.iter().map(|(s, _)| s.chunk).collect();
        let _gate = self.set.write_gate().await;
        let _locks = self.locks.shared(chunk_ids.iter().copied()).await;
        self.send_round(segments, chunk_ids).await
    }

    /// Send a round to every write target and handle the outcome; the
    /// caller holds the chunks' locks. Ok(true): every target acknowledged
    /// every piece (none failed, none was moved out or kept through a
    /// timeout).
    async fn send_round(
        &self,
        segments: Vec<(Segment, Op)>,
        chunk_ids: Vec<u64>,
    ) -> BlockResult<bool> {
        let targets = self.set.write_targets();
        let epoch = self.set.epoch();
        // Room on every target's streams first (this may wait; a timer
        // only when it must)...
        let reservations = join_all(targets.iter().map(|(_, client, _)| {
            let chunk_ids = &chunk_ids;
            async move {
                if let Some(reserved) = client.try_reserve(chunk_ids) {
                    return reserved;
                }
                match tokio::time::timeout(client.timeout(), client.reserve(chunk_ids)).await {
                    Ok(r) => r,
                    Err(_) => Err(ReplicaIoError::Timeout(client.timeout())),
                }
            }
        }))
        .await;
        // ...then queue every piece on every target in one go, in the same
        // order on every replica for any chunk two writes share...
        let mut queued = Vec::with_capacity(targets.len());
        {
            let _order = self.locks.sequence(&chunk_ids);
            for ((id, client, _), reservation) in targets.iter().zip(reservations) {
                let pending = reservation.and_then(|r| {
                    let replies = segments
                        .iter()
                        .map(|(seg, op)| client.send(seg.chunk, epoch, op.clone()))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((r, replies))
                });
                queued.push((*id, client, pending));
            }
        }
        // ...and wait for the replies, at most the replica timeout.
        let results = join_all(queued.into_iter().map(|(id, client, pending)| async move {
            let (outcome, late) = match pending {
                Err(e) => (Some(e), None),
                Ok((reservation, replies)) => {
                    let mut all = join_all(replies.into_iter().map(|r| r.wait()));
                    let outcome = match tokio::time::timeout(client.timeout(), &mut all).await {
                        Ok(results) => (results.into_iter().find_map(Result::err), None),
                        Err(_) => (Some(ReplicaIoError::Timeout(client.timeout())), Some(all)),
                    };
                    drop(reservation);
                    outcome
                }
            };
            (id, outcome, late)
        }))
        .await;
        let mut rejected = None;
        let mut refused = None;
        let mut every_target = true;
        for (id, err, late) in results {
            if let Some(err) = err {
                every_target = false;
                if let ReplicaIoError::Rejected(_) = err {
                    rejected = Some(err);
                    continue;
                }
                let session = self.set.member_session(id);
                // Record every failure first; the policy check comes after.
                if let Err(e) = self.set.handle_failure(id, &err, &chunk_ids).await {
                    refused = Some(e);
                }
                self.wake.notify_one();
                // A replica kept RW through a timeout still owes the
                // replies: they confirm the write, or fail the replica.
                if let (Some(late), Some(session)) = (late, session) {
                    let set = Arc::clone(&self.set);
                    let chunks = chunk_ids.clone();
                    tokio::spawn(async move {
                        let results = late.await;
                        match results.into_iter().find_map(Result::err) {
                            None => set.confirmed(id, session, &chunks),
                            // Only while the join that owes it lasts: once
                            // the replica has left and joined again, its old
                            // streams' end is no failure of the new join.
                            Some(err) if set.member_session(id) == Some(session) => {
                                let _ = set.handle_failure(id, &err, &chunks).await;
                            }
                            Some(_) => {}
                        }
                    });
                }
            }
        }
        // Every target that failed is now ERR and recorded; what is left RW
        // took everything. Note the chunks for the members that are out, and
        // check the policy once more.
        let writable = self.set.note_written(&chunk_ids);
        if let Some(err) = rejected {
            return Err(err.into());
        }
        if let Some(e) = refused {
            return Err(e);
        }
        writable.map(|()| every_target)
    }

    async fn read_segment(&self, seg: Segment) -> BlockResult<Bytes> {
        self.fill_chunks(&[seg.chunk]).await?;
        let epoch = self.set.epoch();
        let mut last: Option<ReplicaIoError> = None;
        let mut corrupt: Vec<(SlotId, Arc<ReplicaClient>, u64)> = Vec::new();
        for (id, client) in self.set.read_targets() {
            let op = Op::Read(pb::ReadOp {
                offset: seg.offset,
                length: seg.len as u32,
                ..Default::default()
            });
            match client.call(seg.chunk, epoch, op).await {
                Ok(DataOutcome::Read(data)) if data.len() as u64 == seg.len => {
                    for (bad_id, bad, block) in corrupt {
                        self.repair(seg.chunk, bad_id, &bad, &client, block).await;
                    }
                    return Ok(data);
                }
                Ok(_) => {
                    let err = ReplicaIoError::Io(format!(
                        "{}: read reply of the wrong shape",
                        client.addr()
                    ));
                    self.handle_failure(id, &err, &[]).await;
                    last = Some(err);
                }
                Err(ReplicaIoError::Rejected(m)) => return Err(BlockError::Invalid(m)),
                Err(ReplicaIoError::Checksum { offset, message }) => {
                    warn!(volume = %self.name, replica = %client.addr(), offset, "checksum mismatch: reading another copy");
                    corrupt.push((id, Arc::clone(&client), offset));
                    last = Some(ReplicaIoError::Checksum { offset, message });
                }
                Err(err) => {
                    if matches!(err, ReplicaIoError::Fenced(_)) {
                        self.set.mark_fenced(&err.to_string());
                        return Err(err.into());
                    }
                    self.handle_failure(id, &err, &[]).await;
                    last = Some(err);
                }
            }
        }
        Err(match last {
            Some(ReplicaIoError::Checksum { message, .. }) => BlockError::Integrity(format!(
                "volume {}: every RW replica failed the checksum at {}: {message}",
                self.name, seg.offset
            )),
            Some(err) => BlockError::Unavailable(format!(
                "volume {}: no replica could serve a read at {}: last error: {err}",
                self.name, seg.offset
            )),
            None => BlockError::Unavailable(format!("volume {}: no RW replica", self.name)),
        })
    }

    /// Rewrite the 4 KiB blocks of `chunk` that fail their checksum on `bad`
    /// (starting at `block`) with the good replica's copy, under the chunk's
    /// exclusive lock so that no write can land in between.
    async fn repair(
        &self,
        chunk: u64,
        bad_id: SlotId,
        bad: &ReplicaClient,
        good: &ReplicaClient,
        block: u64,
    ) {
        let epoch = self.set.epoch();
        let _lock = self.locks.exclusive(chunk).await;
        let (start, len) = self.chunk_range(chunk);
        let mut next = Some(block - block % BLOCK);
        let mut rounds = 0;
        while let Some(at) = next.take() {
            rounds += 1;
            if rounds > len / BLOCK + 1 || at < start || at >= start + len {
                break;
            }
            let data = match good
                .call(
                    chunk,
                    epoch,
                    Op::Read(pb::ReadOp {
                        offset: at,
                        length: BLOCK as u32,
                        ..Default::default()
                    }),
                )
                .await
            {
                Ok(DataOutcome::Read(d)) => d,
                _ => return,
            };
            let crc = crc32c::crc32c(&data);
            let write = Op::Write(pb::WriteOp {
                offset: at,
                data,
                crc32c: crc,
                fua: true,
                ..Default::default()
            });
            if let Err(e) = bad.call(chunk, epoch, write).await {
                self.handle_failure(bad_id, &e, &[chunk]).await;
                return;
            }
            self.repaired.fetch_add(1, Ordering::Relaxed);
            info!(volume = %self.name, replica = %bad.addr(), offset = at, "repaired a block that failed its checksum");
            // Look for further bad blocks in the same chunk.
            let check = Op::Read(pb::ReadOp {
                offset: start,
                length: len as u32,
                ..Default::default()
            });
            if let Err(ReplicaIoError::Checksum { offset, .. }) =
                bad.call(chunk, epoch, check).await
            {
                next = Some(offset - offset % BLOCK);
            }
        }
    }

    /// Flush every write target; the RW ones must all succeed (or be ERR).
    /// A FUA write waits on a replica for a snapshot's commit, like a flush:
    /// it waits here instead, before it is sent (see `flush_all`).
    async fn fua_gate(&self, fua: bool) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        match fua {
            true => Some(self.set.no_snapshot_commit().await),
            false => None,
        }
    }

    async fn flush_all(&self) -> BlockResult<()> {
        self.set.check_writable()?;
        let epoch = self.set.epoch();
        // After a snapshot's commit on every replica, not during it (see
        // `ReplicaSet::snapshot_create`).
        let _no_snapshot_commit = self.set.no_snapshot_commit().await;
        let results = {
            // A flush lets replicas clear write-intent bits, which are also
            // how a newly elected engine finds where replicas may differ. So
            // it is sent only once every write begun before it has had its
            // outcome handled (those begun meanwhile go on: this round
            // cannot clear their bits, see `crate::drain`), and not while an
            // RW replica owes a write that timed out on it (the others would
            // clear the bits of a write it may never apply)...
            let drained = self.set.writes_drained().await;
            if let Some(why) = self.set.unconfirmed_writes() {
                return Err(BlockError::Unavailable(why));
            }
            // ...nor complete while a membership change is still being
            // recorded (a replica that missed a write, not yet recorded
            // ERR, must not see the bits of that write cleared elsewhere).
            let _settled = self.set.membership_settled().await;
            let targets = self.set.write_targets();
            let sent = join_all(targets.iter().map(|(id, client, _)| async move {
                let reserved =
                    match tokio::time::timeout(client.timeout(), client.reserve(&[0])).await {
                        Ok(r) => r,
                        Err(_) => Err(ReplicaIoError::Timeout(client.timeout())),
                    };
                let sent = reserved
                    .and_then(|r| Ok((r, client.send(0, epoch, Op::Flush(pb::FlushOp {}))?)));
                (*id, Arc::clone(client), sent)
            }))
            .await;
            // Sent: no member joins before this, and the replies may come.
            drop(drained);
            join_all(sent.into_iter().map(|(id, client, sent)| async move {
                let reply = match sent {
                    Ok((_reservation, pending)) => {
                        match tokio::time::timeout(client.timeout(), pending.wait()).await {
                            Ok(reply) => reply,
                            Err(_) => Err(ReplicaIoError::Timeout(client.timeout())),
                        }
                    }
                    Err(e) => Err(e),
                };
                (id, reply)
            }))
            .await
        };
        let mut refused = None;
        for (id, result) in results {
            if let Err(err) = result {
                if let Err(e) = self.set.handle_failure(id, &err, &[]).await {
                    refused = Some(e);
                }
                self.wake.notify_one();
            }
        }
        if let Some(e) = refused {
            return Err(e);
        }
        self.set.check_writable()?;
        self.set.note_flushed();
        Ok(())
    }

    /// All RW replicas' clients (for verification tools).
    pub fn rw_clients(&self) -> Vec<Arc<ReplicaClient>> {
        self.set
            .read_targets()
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    }

    /// Compare the RW replicas chunk by chunk by their stored block checksums,
    /// holding each chunk's lock so no write is half applied while comparing.
    pub async fn verify(&self) -> Result<VerifyReport, BlockError> {
        self.set.check_readable()?;
        let epoch = self.set.epoch();
        let mut targets = self.set.read_targets();
        targets.sort_by_key(|(id, _)| *id);
        let mut report = VerifyReport {
            replicas: targets.iter().map(|(_, c)| c.addr().to_string()).collect(),
            ..Default::default()
        };
        for chunk in 0..self.chunk_count() {
            let (offset, len) = self.chunk_range(chunk);
            let _lock = self.locks.exclusive(chunk).await;
            let op = Op::Checksums(pb::ChecksumsOp {
                offset,
                length: len,
                ..Default::default()
            });
            let sums = join_all(
                targets
                    .iter()
                    .map(|(_, c)| c.call(chunk, epoch, op.clone())),
            )
            .await;
            let mut first: Option<Vec<u32>> = None;
            let mut differ = Vec::new();
            for ((_, client), result) in targets.iter().zip(sums) {
                let sums = match result {
                    Ok(DataOutcome::Checksums(s)) => s,
                    Ok(_) => {
                        return Err(BlockError::Io(format!(
                            "{}: checksum reply of the wrong shape",
                            client.addr()
                        )));
                    }
                    Err(e) => return Err(e.into()),
                };
                match &first {
                    None => first = Some(sums),
                    Some(f) if *f != sums => differ.push(client.addr().to_string()),
                    Some(_) => {}
                }
            }
            report.chunks_compared += 1;
            if !differ.is_empty() {
                report.differences.push((offset, len, differ));
            }
        }
        Ok(report)
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.set.size()
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.size())?;
        self.set.check_readable()?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let segments: Vec<Segment> = self.chunks.split(offset, u64::from(len)).collect();
        if segments.len() == 1 {
            return self.read_segment(segments[0]).await;
        }
        let parts = join_all(segments.iter().map(|s| self.read_segment(*s))).await;
        let mut out = BytesMut::with_capacity(len as usize);
        for part in parts {
            out.extend_from_slice(&part?);
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        check_range(offset, data.len() as u64, self.size())?;
        if data.is_empty() {
            return if fua {
                self.flush_frontend().await
            } else {
                Ok(())
            };
        }
        let write = self.begin_write(fua);
        let fua = write.fua;
        let _no_snapshot_commit = self.fua_gate(fua).await;
        let len = data.len() as u64;
        self.fill_partial_edges(offset, len).await?;
        self.fan_out(offset, len, write, |seg| {
            let start = seg.request_offset as usize;
            let piece = data.slice(start..start + seg.len as usize);
            let crc = crc32c::crc32c(&piece);
            Op::Write(pb::WriteOp {
                offset: seg.offset,
                data: piece,
                crc32c: crc,
                fua,
                ..Default::default()
            })
        })
        .await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.flush_frontend().await
    }

    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        // Never durable without a flush round.
        let mut write = self.begin_write(false);
        write.fua = false;
        self.fill_partial_edges(offset, len).await?;
        self.fan_out(offset, len, write, |seg| {
            Op::Unmap(pb::UnmapOp {
                offset: seg.offset,
                length: seg.len,
            })
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let write = self.begin_write(fua);
        let fua = write.fua;
        let _no_snapshot_commit = self.fua_gate(fua).await;
        self.fill_partial_edges(offset, len).await?;
        self.fan_out(offset, len, write, |seg| {
            Op::WriteZeroes(pb::WriteZeroesOp {
                offset: seg.offset,
                length: seg.len,
                fua,
            })
        })
        .await
    }

    async fn load_reservations(&self) -> BlockResult<Option<Bytes>> {
        Ok(self.set.current_reservations().map(|r| r.state))
    }

    async fn save_reservations(&self, state: Bytes) -> BlockResult<()> {
        self.set.save_reservations(state).await
    }
}
