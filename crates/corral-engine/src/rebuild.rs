//! Rebuild: bringing a replica in WO mode up to date by copying chunks from
//! a healthy (RW) replica, while it already takes every new write.
//!
//! For each chunk the copier holds the chunk's lock exclusively (writes to
//! it wait), asks the source and the target for their stored per-block
//! CRC32Cs, and copies only the runs of blocks that differ — so chunks that
//! are already identical cost two small requests and no data. Several
//! chunks are copied at once; an optional bandwidth limit paces the copier.
//! A full rebuild records how far it has come on the target (the rebuild
//! cursor) so that it resumes there after an engine or replica restart.
//! When every chunk is done the target is flushed and turns RW (a recorded
//! membership change).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corral_proto::v1::{self as pb, SetRebuildCursorRequest, data_request::Op};
use futures::StreamExt;
use tracing::{info, warn};

use crate::client::{DataOutcome, ReplicaClient};
use crate::error::ReplicaIoError;
use crate::replica_set::SlotId;
use crate::volume::Volume;

/// How the copier runs.
#[derive(Clone, Debug)]
pub struct RebuildSettings {
    /// Chunks copied at once.
    pub concurrency: usize,
    /// Bytes per second actually copied, at most (None: unlimited).
    pub bandwidth: Option<u64>,
}

impl Default for RebuildSettings {
    fn default() -> Self {
        RebuildSettings {
            concurrency: 8,
            bandwidth: None,
        }
    }
}

/// Progress of one rebuild, shared with the status RPCs.
#[derive(Debug)]
pub struct RebuildProgress {
    pub address: String,
    pub kind: &'static str,
    pub total_bytes: AtomicU64,
    pub done_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
    pub skipped_bytes: AtomicU64,
    started: Instant,
    outcome: Mutex<Option<(Duration, Result<(), String>)>>,
}

impl RebuildProgress {
    pub fn new(address: &str, kind: &'static str) -> Self {
        RebuildProgress {
            address: address.to_string(),
            kind,
            total_bytes: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            skipped_bytes: AtomicU64::new(0),
            started: Instant::now(),
            outcome: Mutex::new(None),
        }
    }

    fn finish(&self, result: Result<(), String>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((self.started.elapsed(), result));
    }

    /// True while the copier runs.
    pub fn running(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// For `corral volume rebuild-status` and `info`.
    pub fn to_pb(&self) -> pb::RebuildStatus {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let total = self.total_bytes.load(Ordering::Relaxed);
        let done = self.done_bytes.load(Ordering::Relaxed);
        let (state, elapsed, error) = match outcome {
            None => ("running", self.started.elapsed(), String::new()),
            Some((d, Ok(()))) => ("done", d, String::new()),
            Some((d, Err(e))) => ("failed", d, e),
        };
        let eta_ms = if state == "running" && done > 0 && total > done {
            let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
            ((total - done) as f64 / rate * 1000.0) as u64
        } else {
            0
        };
        pb::RebuildStatus {
            address: self.address.clone(),
            kind: self.kind.to_string(),
            state: state.to_string(),
            total_bytes: total,
            done_bytes: done,
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
            skipped_bytes: self.skipped_bytes.load(Ordering::Relaxed),
            elapsed_ms: elapsed.as_millis() as u64,
            eta_ms,
            error,
        }
    }
}

enum CopyError {
    /// The target failed: the rebuild stops.
    Target(ReplicaIoError),
    /// No RW replica could serve as the source.
    NoSource(String),
}

/// Runs of consecutive differing blocks: (first block, count).
fn differing_runs(a: &[u32], b: &[u32]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    let n = a.len().max(b.len());
    while i < n {
        if a.get(i) == b.get(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && a.get(i) != b.get(i) {
            i += 1;
        }
        runs.push((start, i - start));
    }
    runs
}

async fn checksums(
    client: &ReplicaClient,
    chunk: u64,
    epoch: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<u32>, ReplicaIoError> {
    let op = Op::Checksums(pb::ChecksumsOp {
        offset,
        length: len,
    });
    match client.call(chunk, epoch, op).await? {
        DataOutcome::Checksums(c) => Ok(c),
        _ => Err(ReplicaIoError::Io(format!(
            "{}: checksum reply of the wrong shape",
            client.addr()
        ))),
    }
}

/// Make `target`'s copy of `chunk` equal to an RW replica's. The caller
/// holds the chunk's exclusive lock. Returns (bytes copied, bytes skipped).
async fn sync_chunk(
    volume: &Volume,
    target: &ReplicaClient,
    target_id: SlotId,
    chunk: u64,
) -> Result<(u64, u64), CopyError> {
    let set = volume.replica_set();
    let epoch = set.epoch();
    let (offset, len) = volume.chunk_range(chunk);
    let mut last = String::from("no RW replica");
    for (source_id, source) in set.read_targets() {
        if source_id == target_id {
            continue;
        }
        let src = match checksums(&source, chunk, epoch, offset, len).await {
            Ok(s) => s,
            Err(e) => {
                last = e.to_string();
                let _ = set.handle_failure(source_id, &e, &[]).await;
                continue;
            }
        };
        let dst = checksums(target, chunk, epoch, offset, len)
            .await
            .map_err(CopyError::Target)?;
        let runs = differing_runs(&src, &dst);
        let mut copied = 0;
        let mut source_failed = false;
        for (first, count) in runs {
            let at = offset + first as u64 * 4096;
            let n = (count as u64 * 4096).min(offset + len - at);
            let read = Op::Read(pb::ReadOp {
                offset: at,
                length: n as u32,
            });
            let data = match source.call(chunk, epoch, read).await {
                Ok(DataOutcome::Read(d)) => d,
                Ok(_) => {
                    last = "read reply of the wrong shape".into();
                    source_failed = true;
                    break;
                }
                Err(e) => {
                    last = e.to_string();
                    let _ = set.handle_failure(source_id, &e, &[]).await;
                    source_failed = true;
                    break;
                }
            };
            let crc = crc32c::crc32c(&data);
            let write = Op::Write(pb::WriteOp {
                offset: at,
                data,
                crc32c: crc,
                fua: false,
            });
            target
                .call(chunk, epoch, write)
                .await
                .map_err(CopyError::Target)?;
            copied += n;
        }
        if source_failed {
            continue;
        }
        return Ok((copied, len - copied));
    }
    Err(CopyError::NoSource(last))
}

async fn set_cursor(volume: &Volume, target: &ReplicaClient, cursor: Option<u64>) {
    let mut control = target.control();
    let request = SetRebuildCursorRequest {
        volume: volume.name().to_string(),
        epoch: volume.replica_set().epoch(),
        cursor,
    };
    let timeout = volume.replica_set().timeout();
    if let Err(e) = tokio::time::timeout(timeout, control.set_rebuild_cursor(request)).await {
        warn!(replica = %target.addr(), error = %e, "cannot record the rebuild cursor");
    }
}

/// Copy `chunks` (ascending) into the WO member `id`, then turn it RW.
pub async fn run(
    volume: Arc<Volume>,
    id: SlotId,
    target: Arc<ReplicaClient>,
    chunks: Vec<u64>,
    record_cursor: bool,
    progress: Arc<RebuildProgress>,
    settings: RebuildSettings,
) -> Result<(), String> {
    let set = Arc::clone(volume.replica_set());
    let total: u64 = chunks.iter().map(|c| volume.chunk_range(*c).1).sum();
    progress.total_bytes.store(total, Ordering::Relaxed);
    info!(volume = %volume.name(), replica = %target.addr(), kind = progress.kind,
        chunks = chunks.len(), bytes = total, "rebuild started");
    let started = Instant::now();
    if record_cursor && let Some(first) = chunks.first() {
        set_cursor(&volume, &target, Some(volume.chunk_range(*first).0)).await;
    }
    let mut last_cursor = Instant::now();
    let result: Result<(), String> = async {
        // Up to `concurrency` chunks in flight; results come back in order,
        // so when a chunk is reported every chunk before it is done too.
        let copies = futures::stream::iter(chunks.iter().copied())
            .map(|chunk| {
                let volume = &volume;
                let target = &target;
                let progress = &progress;
                let bandwidth = settings.bandwidth.filter(|b| *b > 0);
                async move {
                    if let Some(bw) = bandwidth {
                        let copied = progress.copied_bytes.load(Ordering::Relaxed);
                        let due = Duration::from_secs_f64(copied as f64 / bw as f64);
                        let spent = started.elapsed();
                        if due > spent {
                            tokio::time::sleep(due - spent).await;
                        }
                    }
                    let _lock = volume.chunk_locks().exclusive(chunk).await;
                    (chunk, sync_chunk(volume, target, id, chunk).await)
                }
            })
            .buffered(settings.concurrency.max(1));
        futures::pin_mut!(copies);
        while let Some((chunk, outcome)) = copies.next().await {
            if set.is_fenced() {
                return Err("engine fenced".to_string());
            }
            match outcome {
                Ok((copied, skipped)) => {
                    progress.copied_bytes.fetch_add(copied, Ordering::Relaxed);
                    progress.skipped_bytes.fetch_add(skipped, Ordering::Relaxed);
                    progress
                        .done_bytes
                        .fetch_add(volume.chunk_range(chunk).1, Ordering::Relaxed);
                }
                Err(CopyError::Target(e)) => {
                    let _ = set.handle_failure(id, &e, &[]).await;
                    return Err(format!("target failed: {e}"));
                }
                Err(CopyError::NoSource(why)) => {
                    return Err(format!("no source replica: {why}"));
                }
            }
            if record_cursor && last_cursor.elapsed() > Duration::from_secs(1) {
                // The cursor claims everything before it is copied: make that
                // durable on the target first.
                target
                    .call(chunk, set.epoch(), Op::Flush(pb::FlushOp {}))
                    .await
                    .map_err(|e| format!("flushing the target: {e}"))?;
                let (off, len) = volume.chunk_range(chunk);
                set_cursor(&volume, &target, Some(off + len)).await;
                last_cursor = Instant::now();
            }
        }
        target
            .call(0, set.epoch(), Op::Flush(pb::FlushOp {}))
            .await
            .map_err(|e| format!("flushing the target: {e}"))?;
        if record_cursor {
            set_cursor(&volume, &target, None).await;
        }
        set.finish_rebuild(id).await
    }
    .await;
    match &result {
        Ok(()) => info!(volume = %volume.name(), replica = %target.addr(),
            copied = progress.copied_bytes.load(Ordering::Relaxed),
            skipped = progress.skipped_bytes.load(Ordering::Relaxed),
            secs = started.elapsed().as_secs_f64(), "rebuild complete: replica is RW"),
        Err(e) => {
            warn!(volume = %volume.name(), replica = %target.addr(), error = %e, "rebuild failed");
            // A target still in WO leaves the write set (no-op if already ERR).
            let _ = set
                .handle_failure(id, &ReplicaIoError::Io(format!("rebuild failed: {e}")), &[])
                .await;
            set.release(id, &format!("rebuild failed: {e}"));
        }
    }
    progress.finish(result.clone());
    result
}

#[cfg(test)]
mod tests {
    use super::differing_runs;

    #[test]
    fn runs_of_differences() {
        assert_eq!(differing_runs(&[1, 2, 3], &[1, 2, 3]), vec![]);
        assert_eq!(
            differing_runs(&[1, 2, 3, 4], &[0, 2, 9, 9]),
            vec![(0, 1), (2, 2)]
        );
        assert_eq!(differing_runs(&[1, 2], &[]), vec![(0, 2)]);
    }
}
