//! Clones and restores: a new volume that serves I/O at once while its
//! data is filled in, behind it, from a snapshot of another volume
//! (docs/snapshots.md, "Clones") or from a backup on an object store
//! (docs/backups.md, "Restore"). Both fill the same way; only where a
//! chunk's data is read from differs ([`FillSource`]).
//!
//! This module owns the fill's state ([`CloneFill`]: the source, which
//! chunks are filled, the record kept on the replicas) and the background
//! filler ([`run_filler`]). The rules that keep it correct:
//!
//! - A fill write (`WriteOp.fill`) only lands on blocks no layer of the
//!   replica has ever written or discarded: a block the clone has written
//!   keeps the clone's data whatever the order, and a fill repeated after a
//!   restart changes nothing the clone wrote.
//! - A chunk is filled under its exclusive lock, by reading the source's
//!   view of it and sending it as fill writes to every write target. Until
//!   then a read of the chunk fills it first (copy on read), as does a write
//!   that covers only part of a 4 KiB block (the replica would otherwise
//!   merge it with zeroes). Whole-block writes and discards need no fill.
//! - Before two replicas' copies of a chunk are compared or copied (rebuild,
//!   the resync at open) the chunk is filled on both: a never-written block
//!   and a written block of zeroes have the same checksum, and only the
//!   first takes a later fill.
//! - Progress is recorded on the replicas ([`pb::CloneRecord`]): every byte
//!   below `filled_below` is filled and flushed; an engine that restarts
//!   fills the rest again (harmless, see the first rule). Once every chunk is
//!   filled and flushed the record says `done` and the source is no longer
//!   needed; a snapshot taken for the clone is then deleted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use corral_backup::lease::{HeldLease, LEASE_TTL, LeaseKind};
use corral_backup::target::{S3Settings, Target, TargetError};
use corral_backup::transfer::TransferError;
use corral_backup::{BackupReader, BackupUrl};
use corral_block::BlockResult;
use corral_client::EngineControl;
use corral_proto::v1 as pb;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::chunk::{ChunkBitmap, ChunkMap};
use crate::config::{CloneSource, RestoreSource};
use crate::members::Epoch;
use crate::volume::Volume;

/// Largest piece read from the source engine in one call.
const SOURCE_READ: u64 = 1 << 20;

/// How often (in filled bytes) the filler flushes and records its progress.
const RECORD_EVERY: u64 = 64 << 20;

/// A restore's filler reads this much of the backup at once (a few ranged
/// GETs of neighbouring blocks)...
const RESTORE_WINDOW: u64 = 8 << 20;
/// ... and keeps this many such reads in flight ahead of its writes (64 MiB:
/// enough that the reads go on through a progress flush, decision 68)...
const RESTORE_READ_AHEAD: usize = 8;
/// ... and keeps this many chunk fills in flight, across windows: the
/// filler waits for all of them only to record its progress (every
/// [`RECORD_EVERY`]), not at each window's end.
const RESTORE_FILLS: usize = 8;

/// Why a clone could not be set up, or a piece of it filled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloneError {
    #[error("clone source {from}: {why}")]
    Source { from: String, why: String },
    #[error("{0}")]
    Config(String),
}

/// Where a clone's data comes from.
enum FillSource {
    /// A snapshot of another volume, read through that volume's engine.
    Engine(Box<EngineControl>),
    /// A backup, read from its target (every block checked), under a lease
    /// that keeps garbage collection off it until the fill is done.
    Backup(Arc<BackupReader>, Mutex<Option<HeldLease>>),
}

impl FillSource {
    fn name(&self, record: &pb::CloneRecord) -> String {
        match self {
            FillSource::Engine(c) => c.addr().to_string(),
            FillSource::Backup(..) => record.backup.clone(),
        }
    }
}

/// Opens the backup a restore fills from. The keys are the engine's own
/// (`settings`, or its environment); the endpoint is the one recorded.
async fn open_backup(
    record: &pb::CloneRecord,
    settings: Option<&S3Settings>,
    leased: bool,
) -> Result<(BackupReader, Option<HeldLease>), CloneError> {
    let src = |why: String| CloneError::Source {
        from: record.backup.clone(),
        why,
    };
    let url = BackupUrl::parse(&record.backup).map_err(|e| CloneError::Config(e.to_string()))?;
    let mut s3 = settings.cloned().unwrap_or_default();
    if s3.endpoint.is_none() && !record.s3_endpoint.is_empty() {
        s3.endpoint = Some(record.s3_endpoint.clone());
    }
    let target = Target::open(&url.target, &s3).map_err(|e| CloneError::Config(e.to_string()))?;
    // The lease first: garbage collection that starts after it leaves the
    // backup's data alone, even if the backup is removed meanwhile.
    let lease = if leased {
        let lease = HeldLease::take(
            &target,
            &url.volume,
            LeaseKind::Restore,
            &url.backup,
            LEASE_TTL,
        )
        .await
        .map_err(|e| src(format!("taking a lease: {e}")))?;
        Some(lease)
    } else {
        None
    };
    // A backup that is not there, or not readable as one, will not become
    // so by waiting: a clear error at once. Anything else (the store
    // unreachable, a timeout) is waited out like an unreachable engine.
    match BackupReader::open(target, &url.volume, &url.backup).await {
        Ok(reader) => Ok((reader, lease)),
        Err(e) => {
            if let Some(lease) = lease {
                let _ = lease.release().await;
            }
            Err(match e {
                TransferError::Target(
                    TargetError::NotFound { .. }
                    | TargetError::AccessDenied { .. }
                    | TargetError::NoBucket { .. },
                )
                | TransferError::Format(_) => {
                    CloneError::Config(format!("--from-backup {}: {e}", record.backup))
                }
                other => src(other.to_string()),
            })
        }
    }
}

/// The name of the snapshot a clone of a whole volume takes of its source.
pub fn auto_snapshot_name(clone_volume: &str) -> String {
    format!("clone-{clone_volume}")
}

/// A clone's fill: where its data comes from and what is filled so far.
pub struct CloneFill {
    volume: String,
    source: FillSource,
    chunks: ChunkMap,
    record: Mutex<pb::CloneRecord>,
    /// Chunks filled (those below the record's `filled_below` from the start).
    filled: Mutex<ChunkBitmap>,
    /// Chunks of the source (beyond them there is nothing to fill).
    source_chunks: u64,
    filled_count: AtomicU64,
    done: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for CloneFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneFill")
            .field("volume", &self.volume)
            .field("source", &self.source_name())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CloneFill {
    /// Connect to the source of `record`: its backup (with `s3`'s keys if
    /// given), or its source engine (at `address` if given: an engine may
    /// have moved since the record was written).
    pub async fn resume(
        volume: &str,
        record: pb::CloneRecord,
        address: Option<&str>,
        s3: Option<&S3Settings>,
        chunks: ChunkMap,
        timeout: Duration,
    ) -> Result<Self, CloneError> {
        let mut record = record;
        let source = if record.backup.is_empty() {
            let engine = address.unwrap_or(&record.source_engine).to_string();
            let control = EngineControl::connect(&engine, timeout)
                .await
                .map_err(|e| CloneError::Source {
                    from: engine.clone(),
                    why: e.to_string(),
                })?;
            record.source_engine = engine;
            FillSource::Engine(Box::new(control))
        } else {
            let (reader, lease) = open_backup(&record, s3, true).await?;
            if reader.size() != record.source_size {
                return Err(CloneError::Config(format!(
                    "backup {} holds {} bytes where the restore recorded {}",
                    record.backup,
                    reader.size(),
                    record.source_size
                )));
            }
            FillSource::Backup(Arc::new(reader), Mutex::new(lease))
        };
        let source_chunks = record.source_size.div_ceil(chunks.chunk_size());
        let mut filled = ChunkBitmap::new(source_chunks);
        let below = record.filled_below / chunks.chunk_size();
        for c in 0..below.min(source_chunks) {
            filled.insert(c);
        }
        Ok(CloneFill {
            volume: volume.to_string(),
            source,
            chunks,
            filled_count: AtomicU64::new(filled.len()),
            filled: Mutex::new(filled),
            source_chunks,
            done: AtomicBool::new(record.done),
            record: Mutex::new(record),
            last_error: Mutex::new(None),
        })
    }

    /// Set up a new clone of `source` for volume `volume` of `size` bytes:
    /// take the source snapshot if none is named, check it fits.
    pub async fn start(
        volume: &str,
        size: u64,
        source: &CloneSource,
        chunks: ChunkMap,
        timeout: Duration,
    ) -> Result<Self, CloneError> {
        let src = |why: String| CloneError::Source {
            from: source.engine.clone(),
            why,
        };
        let control = EngineControl::connect(&source.engine, timeout)
            .await
            .map_err(|e| src(e.to_string()))?;
        let (snapshot, auto) = match &source.snapshot {
            Some(name) => (name.clone(), false),
            None => {
                let name = auto_snapshot_name(volume);
                control
                    .create_snapshot(&name)
                    .await
                    .map_err(|e| src(format!("taking snapshot {name}: {e}")))?;
                (name, true)
            }
        };
        let listed = control
            .list_snapshots()
            .await
            .map_err(|e| src(format!("listing snapshots: {e}")))?;
        let Some(info) = listed.snapshots.iter().find(|s| s.name == snapshot) else {
            return Err(CloneError::Config(format!(
                "clone source {}: it has no snapshot named {snapshot:?}",
                source.engine
            )));
        };
        if info.size > size {
            return Err(CloneError::Config(format!(
                "the clone ({size} bytes) is smaller than snapshot {snapshot} of {} ({} bytes): give a --size of at least {}",
                source.engine, info.size, info.size
            )));
        }
        let record = pb::CloneRecord {
            source_engine: source.engine.clone(),
            snapshot,
            auto_snapshot: auto,
            source_size: info.size,
            filled_below: 0,
            done: false,
            ..Default::default()
        };
        Self::resume(volume, record, None, None, chunks, timeout).await
    }

    /// Set up a new restore of backup `source` into volume `volume` of
    /// `size` bytes: check the backup exists and fits.
    pub async fn start_restore(
        volume: &str,
        size: u64,
        source: &RestoreSource,
        chunks: ChunkMap,
        timeout: Duration,
    ) -> Result<Self, CloneError> {
        let url =
            BackupUrl::parse(&source.backup).map_err(|e| CloneError::Config(e.to_string()))?;
        let mut record = pb::CloneRecord {
            backup: url.to_string(),
            s3_endpoint: source.s3.endpoint.clone().unwrap_or_default(),
            snapshot: url.backup.clone(),
            ..Default::default()
        };
        let (reader, _) = open_backup(&record, Some(&source.s3), false).await?;
        if reader.size() > size {
            return Err(CloneError::Config(format!(
                "the volume ({size} bytes) is smaller than backup {url} ({} bytes): give a --size of at least {}",
                reader.size(),
                reader.size()
            )));
        }
        record.source_size = reader.size();
        Self::resume(volume, record, None, Some(&source.s3), chunks, timeout).await
    }

    /// True when this fill restores a backup (not a clone of an engine).
    pub fn is_restore(&self) -> bool {
        matches!(self.source, FillSource::Backup(..))
    }

    /// The source engine's address or the backup's URL.
    pub fn source_name(&self) -> String {
        self.source.name(&lock(&self.record))
    }

    /// The record to keep on the replicas now.
    pub fn record(&self) -> pb::CloneRecord {
        lock(&self.record).clone()
    }

    /// True once every chunk is filled and that is recorded.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Whether `chunk` needs no fill (any more).
    pub fn is_filled(&self, chunk: u64) -> bool {
        self.is_done() || chunk >= self.source_chunks || lock(&self.filled).contains(chunk)
    }

    pub(crate) fn mark_filled(&self, chunk: u64) {
        let mut filled = lock(&self.filled);
        if !filled.contains(chunk) {
            filled.insert(chunk);
            self.filled_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What `corral volume info` shows.
    pub fn status(&self) -> pb::CloneStatus {
        let record = self.record();
        let chunk = self.chunks.chunk_size();
        let filled = if self.is_done() {
            record.source_size
        } else {
            (self.filled_count.load(Ordering::Relaxed) * chunk).min(record.source_size)
        };
        pb::CloneStatus {
            backup: record.backup,
            source_engine: record.source_engine,
            snapshot: record.snapshot,
            filled_bytes: filled,
            total_bytes: record.source_size,
            done: self.is_done(),
            error: lock(&self.last_error).clone().unwrap_or_default(),
        }
    }

    /// The source's data for `chunk` (the part of it inside the source), or
    /// None when the chunk lies beyond the source.
    pub async fn read_source(&self, chunk: u64) -> Result<Option<(u64, Bytes)>, CloneError> {
        let (snapshot, source_size) = {
            let r = lock(&self.record);
            (r.snapshot.clone(), r.source_size)
        };
        let start = chunk * self.chunks.chunk_size();
        if start >= source_size {
            return Ok(None);
        }
        let end = (start + self.chunks.chunk_size()).min(source_size);
        let source = match &self.source {
            FillSource::Engine(control) => control,
            FillSource::Backup(reader, _) => {
                return match reader.read(start, end - start).await {
                    Ok(data) => Ok(data.map(|d| (start, d))),
                    Err(e) => Err(self.failed(format!("reading at {start}: {e}"))),
                };
            }
        };
        let mut out = BytesMut::with_capacity((end - start) as usize);
        let mut at = start;
        while at < end {
            let n = (end - at).min(SOURCE_READ);
            match source.read_snapshot(&snapshot, at, n as u32).await {
                Ok(data) => out.extend_from_slice(&data),
                Err(e) => {
                    return Err(self.failed(format!("reading snapshot {snapshot} at {at}: {e}")));
                }
            }
            at += n;
        }
        Ok(Some((start, out.freeze())))
    }

    /// A source error, kept for `status`.
    fn failed(&self, why: String) -> CloneError {
        let err = CloneError::Source {
            from: self.source_name(),
            why,
        };
        *lock(&self.last_error) = Some(err.to_string());
        err
    }

    /// For a restore: the backup's data for the chunks `first..first + n`
    /// (each the part of it inside the backup; None: all zeroes), read
    /// together. None for a clone of an engine.
    async fn read_window(
        &self,
        first: u64,
        n: u64,
    ) -> Option<Result<Vec<Option<Bytes>>, CloneError>> {
        let FillSource::Backup(reader, _) = &self.source else {
            return None;
        };
        let chunk = self.chunks.chunk_size();
        let size = reader.size();
        let start = (first * chunk).min(size);
        let end = ((first + n) * chunk).min(size);
        let data = match reader.read(start, end - start).await {
            Ok(d) => d,
            Err(e) => return Some(Err(self.failed(format!("reading at {start}: {e}")))),
        };
        let Some(data) = data else {
            return Some(Ok(vec![None; n as usize]));
        };
        Some(Ok((0..n)
            .map(|i| {
                let from = ((first + i) * chunk).min(end) - start;
                let to = ((first + i + 1) * chunk).min(end) - start;
                let piece = data.slice(from as usize..to as usize);
                (!piece.is_empty() && piece.iter().any(|b| *b != 0)).then_some(piece)
            })
            .collect()))
    }

    /// The fill write ops for `chunk`'s source data, one per replica request.
    pub fn fill_op(offset: u64, data: Bytes) -> pb::data_request::Op {
        let crc = crc32c::crc32c(&data);
        pb::data_request::Op::Write(pb::WriteOp {
            offset,
            data,
            crc32c: crc,
            fua: false,
            fill: true,
        })
    }

    /// Record progress: `filled_below` bytes are filled and flushed.
    fn advance(&self, filled_below: u64, done: bool) -> pb::CloneRecord {
        let mut r = lock(&self.record);
        r.filled_below = r.filled_below.max(filled_below.min(r.source_size));
        r.done |= done;
        r.clone()
    }

    fn set_done(&self) {
        self.done.store(true, Ordering::Release);
        *lock(&self.last_error) = None;
    }

    pub fn source_chunks(&self) -> u64 {
        self.source_chunks
    }
}

/// Fill every chunk in order, flushing and recording progress as it goes;
/// then mark the clone done and delete a snapshot taken for it. Retries a
/// failing chunk every `retry` until `stop`.
pub async fn run_filler(
    volume: Arc<Volume>,
    fill: Arc<CloneFill>,
    retry: Duration,
    stop: CancellationToken,
) {
    if fill.is_done() {
        return;
    }
    let chunk_size = volume.chunk_map().chunk_size();
    let total = fill.source_chunks();
    info!(volume = %volume.name(), source = %fill.source_name(),
        snapshot = %fill.record().snapshot, bytes = fill.record().source_size, "clone fill started");
    let mut unrecorded = 0u64;
    // Below the recorded mark everything is filled and durable already.
    let mut chunk = (fill.record().filled_below / chunk_size).min(total);
    let mut ahead = ReadAhead::new(&fill, chunk_size, total);
    let mut timing = FillTiming::default();
    while chunk < total {
        if stop.is_cancelled() {
            return;
        }
        // A restore fills up to its next progress record at a time, several
        // chunks in flight; a clone, one chunk (each read from its source
        // engine under the chunk's lock).
        let filled = if fill.is_restore() {
            let run = RECORD_EVERY
                .saturating_sub(unrecorded)
                .div_ceil(chunk_size)
                .max(1);
            let end = (chunk + run).min(total);
            let (n, failed) =
                fill_restore_run(&volume, &mut ahead, chunk..end, &stop, &mut timing).await;
            match failed {
                // What was filled before the failure counts; the failing
                // chunk is retried next time round.
                Some(e) if n == 0 => Err(e),
                _ => Ok(n),
            }
        } else {
            let writing = Instant::now();
            let filled = volume
                .fill_chunks(&[chunk])
                .await
                .map(|()| 1)
                .map_err(|e| e.to_string());
            timing.writing += writing.elapsed();
            filled
        };
        match filled {
            Ok(n) => {
                chunk += n;
                unrecorded += n * chunk_size;
                if lock(&fill.last_error).is_some() {
                    *lock(&fill.last_error) = None;
                }
            }
            Err(e) => {
                warn!(volume = %volume.name(), chunk, error = %e, "clone fill: retrying");
                // Shown by `clone status` until the fill moves on.
                *lock(&fill.last_error) =
                    Some(format!("filling at byte {}: {e}", chunk * chunk_size));
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        }
        if unrecorded >= RECORD_EVERY || chunk == total {
            let done = chunk == total;
            let recording = Instant::now();
            loop {
                match record_progress(&volume, &fill, chunk * chunk_size, done).await {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(volume = %volume.name(), error = %e, "clone fill: recording progress failed: retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(retry) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            }
            timing.recording += recording.elapsed();
            unrecorded = 0;
        }
    }
    // Nothing was left to fill (an empty source, or an engine that stopped
    // just after its last progress record): record it done.
    if !fill.record().done
        && let Err(e) = record_progress(&volume, &fill, total * chunk_size, true).await
    {
        warn!(volume = %volume.name(), error = %e, "clone fill: recording done failed");
        return;
    }
    fill.set_done();
    let record = fill.record();
    info!(volume = %volume.name(), bytes = record.source_size,
        waiting_for_source_ms = timing.reading.as_millis() as u64,
        writing_ms = timing.writing.as_millis() as u64,
        flushing_and_recording_ms = timing.recording.as_millis() as u64,
        "clone fill done: the clone no longer needs its source");
    if let FillSource::Backup(_, lease) = &fill.source {
        let held = lock(lease).take();
        if let Some(held) = held
            && let Err(e) = held.release().await
        {
            warn!(volume = %volume.name(), error = %e, "could not delete the restore's lease on the backup target: it expires on its own");
        }
    }
    if let FillSource::Engine(source) = &fill.source
        && record.auto_snapshot
    {
        match source.delete_clone_snapshot(&record.snapshot).await {
            Ok(_) => {
                info!(volume = %volume.name(), snapshot = %record.snapshot, "deleted the snapshot taken for the clone")
            }
            Err(e) => {
                warn!(volume = %volume.name(), snapshot = %record.snapshot, error = %e, "could not delete the snapshot taken for the clone; delete it by hand")
            }
        }
    }
}

/// Where a filler's time went, for its closing log line.
#[derive(Default)]
struct FillTiming {
    /// Waiting for a restore's reads of the backup.
    reading: Duration,
    /// Writing chunks to the replicas (for a clone of an engine, reading
    /// each from the source engine too).
    writing: Duration,
    /// Flushing the replicas and recording progress on them.
    recording: Duration,
}

/// The chunks a restore run has filled, in order: the run so far and where
/// it stopped.
#[derive(Default)]
struct RunProgress {
    filled: u64,
    failure: Option<String>,
    /// Whether the fills still coming back extend the filled run (not
    /// after one failed: they are waited for, not counted).
    broken: bool,
}

impl RunProgress {
    fn fill_done(&mut self, result: BlockResult<()>) {
        match result {
            Ok(()) if !self.broken => self.filled += 1,
            Ok(()) => {}
            Err(e) => {
                if !self.broken {
                    self.failure = Some(e.to_string());
                }
                self.broken = true;
            }
        }
    }
}

/// Fills `chunks` of a restore in order from the read-ahead, up to
/// [`RESTORE_FILLS`] at a time with no pause between windows (the fills
/// in flight keep going, and their chunks' locks are let go, while it
/// waits for the next window). At the first failure (or `stop`) it starts
/// no more fills and waits for those in flight (none is dropped
/// half-sent). Returns how many chunks from the first are filled, and the
/// failure if there was one.
async fn fill_restore_run(
    volume: &Volume,
    ahead: &mut ReadAhead,
    chunks: std::ops::Range<u64>,
    stop: &CancellationToken,
    timing: &mut FillTiming,
) -> (u64, Option<String>) {
    let started = Instant::now();
    let reading_before = timing.reading;
    let mut next = chunks.start;
    let mut pieces: std::collections::VecDeque<(u64, Option<Bytes>)> = Default::default();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut run = RunProgress::default();
    loop {
        while run.failure.is_none()
            && !stop.is_cancelled()
            && in_flight.len() < RESTORE_FILLS
            && next < chunks.end
        {
            if pieces.is_empty() {
                let asked = Instant::now();
                let window = {
                    let read = ahead.window(next);
                    tokio::pin!(read);
                    loop {
                        tokio::select! {
                            window = &mut read => break window,
                            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                                run.fill_done(done);
                            }
                        }
                    }
                };
                timing.reading += asked.elapsed();
                match window {
                    // The pieces run from this chunk on, one per chunk.
                    Ok(got)
                        if got
                            .iter()
                            .enumerate()
                            .all(|(i, (c, _))| *c == next + i as u64)
                            && !got.is_empty() =>
                    {
                        pieces.extend(got)
                    }
                    Ok(_) => {
                        run.failure.get_or_insert(format!(
                            "the backup's read-ahead had nothing for chunk {next}"
                        ));
                        break;
                    }
                    Err(e) => {
                        run.failure.get_or_insert(e.to_string());
                        break;
                    }
                }
            }
            let Some((c, data)) = pieces.pop_front() else {
                break;
            };
            in_flight.push_back(volume.fill_chunk_with(c, data));
            next += 1;
        }
        let Some(done) = in_flight.next().await else {
            break;
        };
        run.fill_done(done);
    }
    timing.writing += started
        .elapsed()
        .saturating_sub(timing.reading - reading_before);
    (run.filled, run.failure)
}

type WindowRead = tokio::task::JoinHandle<Option<Result<Vec<Option<Bytes>>, CloneError>>>;

/// A restore's reads of the backup ahead of its filler: up to
/// [`RESTORE_READ_AHEAD`] windows of [`RESTORE_WINDOW`] in flight, so the
/// object store and the replicated writes work at the same time. The
/// reads still running are stopped when it is dropped.
struct ReadAhead {
    fill: Arc<CloneFill>,
    window_chunks: u64,
    total: u64,
    /// The window read last: its first chunk and its chunks' data.
    current: Option<(u64, Vec<Option<Bytes>>)>,
    /// Reads in flight, by first chunk, in order.
    pending: std::collections::VecDeque<(u64, WindowRead)>,
}

impl ReadAhead {
    fn new(fill: &Arc<CloneFill>, chunk_size: u64, total: u64) -> Self {
        ReadAhead {
            fill: Arc::clone(fill),
            window_chunks: (RESTORE_WINDOW / chunk_size).max(1),
            total,
            current: None,
            pending: Default::default(),
        }
    }

    /// The chunks from `chunk` to the end of its window, each with its data
    /// (None: nothing to write), reading ahead from it.
    async fn window(&mut self, chunk: u64) -> Result<Vec<(u64, Option<Bytes>)>, CloneError> {
        let first = chunk - chunk % self.window_chunks;
        let pieces = |at: u64, data: &[Option<Bytes>]| -> Vec<(u64, Option<Bytes>)> {
            data.iter()
                .enumerate()
                .map(|(i, d)| (at + i as u64, d.clone()))
                .filter(|(c, _)| *c >= chunk)
                .collect()
        };
        if let Some((at, data)) = &self.current
            && *at == first
        {
            return Ok(pieces(*at, data));
        }
        self.current = None;
        // Reads for windows behind this one are of no use now.
        while self.pending.front().is_some_and(|(at, _)| *at < first) {
            if let Some((_, h)) = self.pending.pop_front() {
                h.abort();
            }
        }
        // This window's read failed last time (and was dropped), or was
        // never started: read it again, first in line.
        if first < self.total && self.pending.front().is_none_or(|(at, _)| *at != first) {
            let read = self.spawn_read(first);
            self.pending.push_front((first, read));
        }
        let mut next = self
            .pending
            .back()
            .map_or(first, |(at, _)| at + self.window_chunks);
        while self.pending.len() < RESTORE_READ_AHEAD && next < self.total {
            let read = self.spawn_read(next);
            self.pending.push_back((next, read));
            next += self.window_chunks;
        }
        let Some((at, read)) = self.pending.pop_front() else {
            return Ok(Vec::new());
        };
        debug_assert_eq!(at, first, "the read popped is this window's");
        let data = match read.await {
            Ok(Some(result)) => result?,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => {
                return Err(CloneError::Source {
                    from: self.fill.source_name(),
                    why: format!("the read stopped: {e}"),
                });
            }
        };
        let out = pieces(at, &data);
        self.current = Some((at, data));
        Ok(out)
    }
}

impl ReadAhead {
    fn spawn_read(&self, at: u64) -> WindowRead {
        let fill = Arc::clone(&self.fill);
        let n = self.window_chunks.min(self.total - at);
        tokio::spawn(async move { fill.read_window(at, n).await })
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        for (_, h) in &self.pending {
            h.abort();
        }
    }
}

/// Flush every replica, then record the progress on every write target
/// (at least one must take it).
async fn record_progress(
    volume: &Volume,
    fill: &CloneFill,
    filled_below: u64,
    done: bool,
) -> Result<(), String> {
    volume
        .flush_replicas()
        .await
        .map_err(|e| format!("flush: {e}"))?;
    let record = fill.advance(filled_below, done);
    let set = volume.replica_set();
    let epoch: Epoch = set.epoch();
    let mut recorded = 0;
    let mut last = String::new();
    for (_, client, _) in set.write_targets() {
        match client
            .control()
            .set_clone(set.volume(), epoch, record.clone())
            .await
        {
            Ok(_) => recorded += 1,
            Err(e) => last = format!("{}: {e}", client.addr()),
        }
    }
    if recorded == 0 {
        return Err(format!("no replica recorded it: {last}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_block::BlockError;

    #[test]
    fn a_restore_run_counts_only_the_chunks_filled_before_its_first_failure() {
        let mut run = RunProgress::default();
        run.fill_done(Ok(()));
        run.fill_done(Ok(()));
        run.fill_done(Err(BlockError::NoSpace("replica r1".into())));
        // Fills in flight behind the failing one are waited for, not counted.
        run.fill_done(Ok(()));
        run.fill_done(Err(BlockError::Unavailable("later".into())));
        assert_eq!(run.filled, 2);
        let failure = run.failure.unwrap_or_default();
        assert!(failure.contains("replica r1"), "{failure}");
    }
}
