//! Rebuild: bringing a replica in WO mode up to date by copying chunks from
//! a healthy (RW) replica, while it already takes every new write.
//!
//! This module owns the copier ([`run`]): the walk over the chunks to catch
//! up, its pacing (`--rebuild-bandwidth`), its progress counters
//! ([`RebuildProgress`], kept in [`crate::progress`]). Deciding *which* chunks to
//! walk and whether the target is new is the supervisor's job.
//!
//! The copier takes the chunks a few at a time (a group of up to
//! [`GROUP_CHUNKS`], consecutive in a full rebuild) and holds their locks
//! exclusively — in ascending stripe order, as writers do — for the whole
//! copy, so a client write to them happens entirely before or entirely
//! after it and a copy never carries old data over a newer write. Every
//! request concerns one chunk and goes on that chunk's data stream, so it is
//! ordered with the writes to that chunk; the requests of a group are queued
//! back to back and awaited together, which packs them into few messages.
//! Per group:
//!
//! - **target known empty** (a replica created for this rebuild): one
//!   checksum request per chunk to the source, then the runs of blocks the
//!   source holds data in are read from it and written to the target. Blocks
//!   the source reports unwritten (or all zeroes) are not sent: they read as
//!   zeroes on a new replica too. The target is not asked anything: blocks
//!   written since it joined in WO mode hold the same data on both, and
//!   copying them again is harmless under the lock.
//! - **otherwise**: the source's and the target's stored per-block CRC32Cs
//!   are fetched together and only the runs that differ are copied, so
//!   chunks that are already identical cost two small requests and no data.
//!
//! The group's reads all complete before anything is written, so when a
//! source fails the next RW replica takes over with the target untouched.
//! Several groups are in flight (`--rebuild-concurrency` chunks in all).
//! Each group copied is reported to the replica set, which keeps the chunks
//! still to copy: if the target fails, that is what it may differ in, and
//! its next rebuild resumes there. (An engine that restarts mid-rebuild
//! compares every chunk instead: chunks already copied cost a checksum
//! comparison, not a copy.) When every chunk is done the target is flushed
//! and turns RW (a recorded membership change), which the replica set
//! refuses while any chunk of the plan is left.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral_proto::v1::{self as pb, data_request::Op};
use futures::StreamExt;
use futures::future::join_all;
use tracing::{info, warn};

use crate::client::{DataOutcome, ReplicaClient};
use crate::error::ReplicaIoError;
use crate::members::{CatchUpPlan, Epoch};
use crate::progress::RebuildProgress;
use crate::replica_set::SlotId;
use crate::volume::Volume;

/// Most chunks copied under one set of locks, their requests queued together.
pub const GROUP_CHUNKS: usize = 4;

/// The replicas' checksum granularity: one stored CRC32C per 4 KiB block.
const BLOCK: u64 = corral_proto::CHECKSUM_BLOCK;

/// How the copier runs.
#[derive(Clone, Debug)]
pub struct RebuildSettings {
    /// Chunks copied at once, in groups of up to [`GROUP_CHUNKS`].
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

/// Why a rebuild (or one group of it) failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RebuildError {
    /// The target failed: the rebuild stops.
    #[error("target failed: {0}")]
    Target(ReplicaIoError),
    /// No RW replica could serve as the source.
    #[error("no source replica: {0}")]
    NoSource(String),
    #[error("engine fenced")]
    Fenced,
    /// The walk is done but the target may not turn RW (see
    /// [`crate::members::Members::finish_rebuild`]).
    #[error(transparent)]
    Membership(#[from] crate::members::MembershipError),
}

/// One chunk of a group: its index and byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkRange {
    pub chunk: u64,
    pub offset: u64,
    pub len: u64,
}

/// Consecutive blocks to copy, inside one chunk (byte offset and length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub chunk: u64,
    pub offset: u64,
    pub len: u64,
}

/// Runs of consecutive indices in `0..n` for which `copy` holds: (first, count).
fn runs_where(n: usize, copy: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < n {
        if !copy(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && copy(i) {
            i += 1;
        }
        runs.push((start, i - start));
    }
    runs
}

/// Runs of consecutive blocks whose checksums differ.
fn differing_runs(a: &[u32], b: &[u32]) -> Vec<(usize, usize)> {
    runs_where(a.len().max(b.len()), |i| a.get(i) != b.get(i))
}

/// Runs of consecutive blocks that hold data (do not read as zeroes).
fn written_runs(sums: &[u32]) -> Vec<(usize, usize)> {
    runs_where(sums.len(), |i| sums[i] != corral_proto::ZERO_BLOCK_CRC)
}

/// The runs of `group` to copy, given the source's checksums per chunk and,
/// unless the target is known empty, the target's.
pub(crate) fn runs_to_copy(
    group: &[ChunkRange],
    source: &[Vec<u32>],
    target: Option<&[Vec<u32>]>,
) -> Vec<Run> {
    let blocks: Vec<Vec<(usize, usize)>> = match target {
        None => source.iter().map(|s| written_runs(s)).collect(),
        Some(target) => source
            .iter()
            .zip(target)
            .map(|(s, t)| differing_runs(s, t))
            .collect(),
    };
    group
        .iter()
        .zip(blocks)
        .flat_map(|(range, blocks)| {
            blocks.into_iter().map(move |(first, count)| Run {
                chunk: range.chunk,
                offset: range.offset + first as u64 * BLOCK,
                len: count as u64 * BLOCK,
            })
        })
        .collect()
}

fn wrong_shape(client: &ReplicaClient, what: &str) -> ReplicaIoError {
    ReplicaIoError::Io(format!(
        "{}: {what} reply of the wrong shape",
        client.addr()
    ))
}

/// The stored block checksums of every chunk of `group` on `client`, of
/// `snapshot`'s view (empty: the head's): one request per chunk, on that
/// chunk's stream, all queued back to back.
pub(crate) async fn group_checksums(
    client: &ReplicaClient,
    epoch: Epoch,
    group: &[ChunkRange],
    snapshot: &str,
) -> Result<Vec<Vec<u32>>, ReplicaIoError> {
    let calls = group.iter().map(|c| {
        let op = Op::Checksums(pb::ChecksumsOp {
            offset: c.offset,
            length: c.len,
            snapshot: snapshot.to_string(),
        });
        client.call(c.chunk, epoch, op)
    });
    let replies = join_all(calls).await;
    group
        .iter()
        .zip(replies)
        .map(|(c, reply)| match reply? {
            DataOutcome::Checksums(sums) if sums.len() as u64 == c.len / BLOCK => Ok(sums),
            _ => Err(wrong_shape(client, "checksum")),
        })
        .collect()
}

/// Read every run from `source` (of `snapshot`'s view; empty: the head's),
/// each on its chunk's stream, all queued back to back.
pub(crate) async fn read_runs(
    source: &ReplicaClient,
    epoch: Epoch,
    runs: &[Run],
    snapshot: &str,
) -> Result<Vec<Bytes>, ReplicaIoError> {
    let calls = runs.iter().map(|r| {
        let op = Op::Read(pb::ReadOp {
            offset: r.offset,
            // A run lies inside one chunk, and chunk sizes are u32.
            length: r.len as u32,
            snapshot: snapshot.to_string(),
        });
        source.call(r.chunk, epoch, op)
    });
    let replies = join_all(calls).await;
    runs.iter()
        .zip(replies)
        .map(|(r, reply)| match reply? {
            DataOutcome::Read(data) if data.len() as u64 == r.len => Ok(data),
            _ => Err(wrong_shape(source, "read")),
        })
        .collect()
}

/// Write `data[i]` at `runs[i]` on `target`, each on its chunk's stream, all
/// queued back to back; waits for every reply.
pub(crate) async fn write_runs(
    target: &ReplicaClient,
    epoch: Epoch,
    runs: &[Run],
    data: Vec<Bytes>,
) -> Result<(), ReplicaIoError> {
    let calls = runs.iter().zip(data).map(|(r, data)| {
        let crc32c = crc32c::crc32c(&data);
        let op = Op::Write(pb::WriteOp {
            offset: r.offset,
            data,
            crc32c,
            fua: false,
            ..Default::default()
        });
        target.call(r.chunk, epoch, op)
    });
    match join_all(calls).await.into_iter().find_map(Result::err) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Make `target`'s copy of every chunk of `group` equal to an RW replica's.
/// The caller holds the chunks' exclusive locks. Returns (bytes copied,
/// bytes skipped).
async fn copy_group(
    volume: &Volume,
    target: &ReplicaClient,
    target_id: SlotId,
    group: &[u64],
    target_empty: bool,
) -> Result<(u64, u64), RebuildError> {
    let set = volume.replica_set();
    let epoch = set.epoch();
    let ranges: Vec<ChunkRange> = group
        .iter()
        .map(|&chunk| {
            let (offset, len) = volume.chunk_range(chunk);
            ChunkRange { chunk, offset, len }
        })
        .collect();
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    // Fetched along with the first source's: nothing changes them while we
    // hold the locks, and nothing is written before a source has served
    // every read, so they stay valid if that source fails.
    let mut target_sums: Option<Vec<Vec<u32>>> = None;
    let mut last = String::from("no RW replica");
    for (source_id, source) in set.read_targets() {
        if source_id == target_id {
            continue;
        }
        let source_sums = if target_empty || target_sums.is_some() {
            group_checksums(&source, epoch, &ranges, "").await
        } else {
            let (s, t) = futures::join!(
                group_checksums(&source, epoch, &ranges, ""),
                group_checksums(target, epoch, &ranges, "")
            );
            target_sums = Some(t.map_err(RebuildError::Target)?);
            s
        };
        let fetched = async {
            let runs = runs_to_copy(&ranges, &source_sums?, target_sums.as_deref());
            let data = read_runs(&source, epoch, &runs, "").await?;
            Ok::<_, ReplicaIoError>((runs, data))
        }
        .await;
        let (runs, data) = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                last = e.to_string();
                let _ = set.handle_failure(source_id, &e, &[]).await;
                continue;
            }
        };
        write_runs(target, epoch, &runs, data)
            .await
            .map_err(RebuildError::Target)?;
        let copied: u64 = runs.iter().map(|r| r.len).sum();
        return Ok((copied, total - copied));
    }
    Err(RebuildError::NoSource(last))
}

/// Walk `plan.chunks` into the WO member `plan.ticket.member`, then turn it RW.
pub async fn run(
    volume: Arc<Volume>,
    target: Arc<ReplicaClient>,
    plan: CatchUpPlan,
    progress: Arc<RebuildProgress>,
    settings: RebuildSettings,
) -> Result<(), RebuildError> {
    let CatchUpPlan {
        chunks,
        target_empty,
        ticket,
        ..
    } = plan;
    let id = ticket.member;
    let set = Arc::clone(volume.replica_set());
    let total: u64 = chunks.iter().map(|c| volume.chunk_range(*c).1).sum();
    progress.total_bytes.store(total, Ordering::Relaxed);
    info!(volume = %volume.name(), replica = %target.addr(), kind = progress.kind.as_str(),
        chunks = chunks.len(), bytes = total, target_empty, "rebuild started");
    let started = Instant::now();
    // `concurrency` chunks at once: groups of up to GROUP_CHUNKS.
    let group_size = settings.concurrency.clamp(1, GROUP_CHUNKS);
    let groups_in_flight = (settings.concurrency / group_size).max(1);
    let result: Result<(), RebuildError> = async {
        // Up to `groups_in_flight` groups at once, reported in order.
        let copies = futures::stream::iter(chunks.chunks(group_size).map(<[u64]>::to_vec))
            .map(|group| {
                let volume = &volume;
                let target = &target;
                let progress = &progress;
                let set = &set;
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
                    let _locks = volume.chunk_locks().exclusive_many(&group).await;
                    // A clone still filling: fill the chunks first, and
                    // compare rather than trust the source's zeroes
                    // (crate::clone explains why).
                    let filling = volume.clone_filling().is_some();
                    let outcome = match volume.fill_locked(&group).await {
                        Ok(()) => {
                            copy_group(volume, target, id, &group, target_empty && !filling).await
                        }
                        Err(e) => Err(RebuildError::NoSource(format!("clone fill: {e}"))),
                    };
                    if outcome.is_ok() {
                        // Under the locks: from here on writes to these
                        // chunks reach the target as well.
                        set.copied(ticket, &group);
                    }
                    (group, outcome)
                }
            })
            .buffered(groups_in_flight);
        futures::pin_mut!(copies);
        while let Some((group, outcome)) = copies.next().await {
            if set.is_fenced() {
                return Err(RebuildError::Fenced);
            }
            match outcome {
                Ok((copied, skipped)) => {
                    let walked: u64 = group.iter().map(|c| volume.chunk_range(*c).1).sum();
                    progress.copied_bytes.fetch_add(copied, Ordering::Relaxed);
                    progress.skipped_bytes.fetch_add(skipped, Ordering::Relaxed);
                    progress.done_bytes.fetch_add(walked, Ordering::Relaxed);
                }
                Err(e) => {
                    if let RebuildError::Target(cause) = &e {
                        let _ = set.handle_failure(id, cause, &[]).await;
                    }
                    return Err(e);
                }
            }
        }
        target
            .call(0, set.epoch(), Op::Flush(pb::FlushOp {}))
            .await
            .map_err(RebuildError::Target)?;
        Ok(set.finish_rebuild(ticket).await?)
    }
    .await;
    match &result {
        Ok(()) => info!(volume = %volume.name(), replica = %target.addr(),
            copied = progress.copied_bytes.load(Ordering::Relaxed),
            skipped = progress.skipped_bytes.load(Ordering::Relaxed),
            secs = started.elapsed().as_secs_f64(), "rebuild complete: replica is RW"),
        Err(e) => {
            warn!(volume = %volume.name(), replica = %target.addr(), error = %e, "rebuild failed");
            // A target still in WO leaves the write set (no-op if already
            // ERR); what it had not been sent yet stays noted as missed.
            let _ = set
                .handle_failure(id, &ReplicaIoError::Io(format!("rebuild failed: {e}")), &[])
                .await;
        }
    }
    progress.finish(result.clone().map_err(|e| e.to_string()));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_differences() {
        assert_eq!(differing_runs(&[1, 2, 3], &[1, 2, 3]), vec![]);
        assert_eq!(
            differing_runs(&[1, 2, 3, 4], &[0, 2, 9, 9]),
            vec![(0, 1), (2, 2)]
        );
        assert_eq!(differing_runs(&[1, 2], &[]), vec![(0, 2)]);
    }

    #[test]
    fn zero_blocks_are_not_written_runs() {
        let z = corral_proto::ZERO_BLOCK_CRC;
        assert_eq!(written_runs(&[z, z]), vec![]);
        assert_eq!(written_runs(&[1, z, 2, 3, z]), vec![(0, 1), (2, 2)]);
        assert_eq!(written_runs(&[1, 2]), vec![(0, 2)]);
    }

    #[test]
    fn runs_to_copy_per_chunk() {
        let z = corral_proto::ZERO_BLOCK_CRC;
        let group = [
            ChunkRange {
                chunk: 3,
                offset: 3 * 16384,
                len: 16384,
            },
            ChunkRange {
                chunk: 4,
                offset: 4 * 16384,
                len: 16384,
            },
        ];
        let source = vec![vec![z, 7, 7, z], vec![5, 5, 5, 5]];
        let run = |chunk: u64, block: u64, count: u64| Run {
            chunk,
            offset: chunk * 16384 + block * BLOCK,
            len: count * BLOCK,
        };
        // Empty target: whatever holds data on the source.
        assert_eq!(
            runs_to_copy(&group, &source, None),
            vec![run(3, 1, 2), run(4, 0, 4)]
        );
        // Otherwise: whatever differs, zero blocks included.
        let target = vec![vec![1, 7, 7, z], vec![5, 5, z, 5]];
        assert_eq!(
            runs_to_copy(&group, &source, Some(&target)),
            vec![run(3, 0, 1), run(4, 2, 1)]
        );
    }
}
