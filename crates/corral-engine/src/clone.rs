//! Clones: a new volume that serves I/O at once while its data is filled
//! in, behind it, from a snapshot of another volume (docs/snapshots.md,
//! "Clones").
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
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use corral_client::EngineControl;
use corral_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::chunk::{ChunkBitmap, ChunkMap};
use crate::config::CloneSource;
use crate::members::Epoch;
use crate::volume::Volume;

/// Largest piece read from the source engine in one call.
const SOURCE_READ: u64 = 1 << 20;

/// How often (in filled bytes) the filler flushes and records its progress.
const RECORD_EVERY: u64 = 64 << 20;

/// Why a clone could not be set up, or a piece of it filled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloneError {
    #[error("clone source {engine}: {why}")]
    Source { engine: String, why: String },
    #[error("{0}")]
    Config(String),
}

/// The name of the snapshot a clone of a whole volume takes of its source.
pub fn auto_snapshot_name(clone_volume: &str) -> String {
    format!("clone-{clone_volume}")
}

/// A clone's fill: where its data comes from and what is filled so far.
pub struct CloneFill {
    volume: String,
    source: EngineControl,
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
            .field("source", &self.source.addr())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CloneFill {
    /// Connect to the source engine of `record` (at `address` if given: an
    /// engine may have moved since the record was written).
    pub async fn resume(
        volume: &str,
        record: pb::CloneRecord,
        address: Option<&str>,
        chunks: ChunkMap,
        timeout: Duration,
    ) -> Result<Self, CloneError> {
        let engine = address.unwrap_or(&record.source_engine).to_string();
        let source = EngineControl::connect(&engine, timeout)
            .await
            .map_err(|e| CloneError::Source {
                engine: engine.clone(),
                why: e.to_string(),
            })?;
        let source_chunks = record.source_size.div_ceil(chunks.chunk_size());
        let mut filled = ChunkBitmap::new(source_chunks);
        let below = record.filled_below / chunks.chunk_size();
        for c in 0..below.min(source_chunks) {
            filled.insert(c);
        }
        let mut record = record;
        record.source_engine = engine;
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
            engine: source.engine.clone(),
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
        };
        Self::resume(volume, record, None, chunks, timeout).await
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
        let mut out = BytesMut::with_capacity((end - start) as usize);
        let mut at = start;
        while at < end {
            let n = (end - at).min(SOURCE_READ);
            match self.source.read_snapshot(&snapshot, at, n as u32).await {
                Ok(data) => out.extend_from_slice(&data),
                Err(e) => {
                    let err = CloneError::Source {
                        engine: self.source.addr().to_string(),
                        why: format!("reading snapshot {snapshot} at {at}: {e}"),
                    };
                    *lock(&self.last_error) = Some(err.to_string());
                    return Err(err);
                }
            }
            at += n;
        }
        Ok(Some((start, out.freeze())))
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

    pub fn source(&self) -> &EngineControl {
        &self.source
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
    info!(volume = %volume.name(), source = %fill.source().addr(),
        snapshot = %fill.record().snapshot, bytes = fill.record().source_size, "clone fill started");
    let mut unrecorded = 0u64;
    // Below the recorded mark everything is filled and durable already.
    let mut chunk = (fill.record().filled_below / chunk_size).min(total);
    while chunk < total {
        if stop.is_cancelled() {
            return;
        }
        match volume.fill_chunks(&[chunk]).await {
            Ok(()) => {
                chunk += 1;
                unrecorded += chunk_size;
            }
            Err(e) => {
                warn!(volume = %volume.name(), chunk, error = %e, "clone fill: retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        }
        if unrecorded >= RECORD_EVERY || chunk == total {
            let done = chunk == total;
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
    info!(volume = %volume.name(), bytes = record.source_size, "clone fill done: the clone no longer needs its source");
    if record.auto_snapshot {
        match fill.source().delete_clone_snapshot(&record.snapshot).await {
            Ok(_) => {
                info!(volume = %volume.name(), snapshot = %record.snapshot, "deleted the snapshot taken for the clone")
            }
            Err(e) => {
                warn!(volume = %volume.name(), snapshot = %record.snapshot, error = %e, "could not delete the snapshot taken for the clone; delete it by hand")
            }
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
