//! The replicated volume: the engine's data path, served to the frontends
//! as a [`BlockDevice`].
//!
//! - writes are split at chunk boundaries and sent to every RW and WO
//!   replica at once; success once every replica still RW has acknowledged
//!   every piece (the failing ones are moved to ERR, and that is recorded,
//!   before the acknowledgement);
//! - reads go to one RW replica per piece, round robin, failing over to the
//!   next on error;
//! - flush (and FUA) reach stable storage on every RW replica.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use corral_block::{BlockDevice, BlockError, BlockResult, check_range};
use corral_proto::v1::{self as pb, data_request::Op};
use futures::future::join_all;

use crate::chunk::{ChunkMap, Segment};
use crate::client::{DataOutcome, ReplicaClient};
use crate::error::ReplicaIoError;
use crate::replica_set::ReplicaSet;

/// A replicated volume.
pub struct Volume {
    name: String,
    size: u64,
    block_size: u32,
    chunks: ChunkMap,
    set: Arc<ReplicaSet>,
}

impl Volume {
    pub fn new(
        name: String,
        size: u64,
        block_size: u32,
        chunks: ChunkMap,
        set: Arc<ReplicaSet>,
    ) -> Self {
        Volume {
            name,
            size,
            block_size,
            chunks,
            set,
        }
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

    /// Send one mutating request per segment to every write target; ack when
    /// every target still RW has acknowledged all of them.
    async fn fan_out<F>(&self, offset: u64, len: u64, make_op: F) -> BlockResult<()>
    where
        F: Fn(&Segment) -> Op,
    {
        self.set.check_writable()?;
        let segments: Vec<(Segment, Op)> = self
            .chunks
            .split(offset, len)
            .map(|s| {
                let op = make_op(&s);
                (s, op)
            })
            .collect();
        let targets = self.set.write_targets();
        let epoch = self.set.epoch();
        let per_target = targets.iter().map(|(idx, client, _mode)| {
            let segments = &segments;
            async move {
                let calls = segments
                    .iter()
                    .map(|(seg, op)| client.call(seg.chunk, epoch, op.clone()));
                let results = join_all(calls).await;
                (*idx, results.into_iter().find_map(Result::err))
            }
        });
        let results = join_all(per_target).await;
        let mut rejected = None;
        for (idx, err) in results {
            if let Some(err) = err {
                if let ReplicaIoError::Rejected(_) = err {
                    rejected = Some(err);
                    continue;
                }
                // Record every failure first; the policy check comes after.
                let _ = self.set.handle_failure(idx, &err).await;
            }
        }
        if let Some(err) = rejected {
            return Err(err.into());
        }
        // Every target that failed is now ERR and recorded; what is left RW
        // acknowledged everything. Check the policy once more.
        self.set.check_writable()
    }

    async fn read_segment(&self, seg: Segment) -> BlockResult<Bytes> {
        let epoch = self.set.epoch();
        let mut last: Option<ReplicaIoError> = None;
        for (idx, client) in self.set.read_targets() {
            let op = Op::Read(pb::ReadOp {
                offset: seg.offset,
                length: seg.len as u32,
            });
            match client.call(seg.chunk, epoch, op).await {
                Ok(DataOutcome::Read(data)) if data.len() as u64 == seg.len => return Ok(data),
                Ok(_) => {
                    let err = ReplicaIoError::Io(format!(
                        "{}: read reply of the wrong shape",
                        client.addr()
                    ));
                    let _ = self.set.handle_failure(idx, &err).await;
                    last = Some(err);
                }
                Err(ReplicaIoError::Rejected(m)) => return Err(BlockError::Invalid(m)),
                Err(err) => {
                    if matches!(err, ReplicaIoError::Fenced(_)) {
                        self.set.mark_fenced(&err.to_string());
                        return Err(err.into());
                    }
                    // A checksum mismatch leaves the replica RW: try the next copy.
                    let _ = self.set.handle_failure(idx, &err).await;
                    last = Some(err);
                }
            }
        }
        Err(match last {
            Some(err) => BlockError::Unavailable(format!(
                "volume {}: no replica could serve a read at {}: last error: {err}",
                self.name, seg.offset
            )),
            None => BlockError::Unavailable(format!("volume {}: no RW replica", self.name)),
        })
    }

    /// Flush every write target; the RW ones must all succeed (or be ERR).
    async fn flush_all(&self) -> BlockResult<()> {
        self.set.check_writable()?;
        let epoch = self.set.epoch();
        let targets = self.set.write_targets();
        let calls = targets.iter().map(|(idx, client, _)| async move {
            (*idx, client.call(0, epoch, Op::Flush(pb::FlushOp {})).await)
        });
        for (idx, result) in join_all(calls).await {
            if let Err(err) = result {
                let _ = self.set.handle_failure(idx, &err).await;
            }
        }
        self.set.check_writable()
    }

    /// All RW replicas' clients (for verification tools).
    pub fn rw_clients(&self) -> Vec<Arc<ReplicaClient>> {
        self.set
            .read_targets()
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.size)?;
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
        check_range(offset, data.len() as u64, self.size)?;
        if data.is_empty() {
            return if fua { self.flush_all().await } else { Ok(()) };
        }
        let len = data.len() as u64;
        self.fan_out(offset, len, |seg| {
            let start = seg.request_offset as usize;
            let piece = data.slice(start..start + seg.len as usize);
            let crc = crc32c::crc32c(&piece);
            Op::Write(pb::WriteOp {
                offset: seg.offset,
                data: piece,
                crc32c: crc,
                fua,
            })
        })
        .await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.flush_all().await
    }

    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.fan_out(offset, len, |seg| {
            Op::Unmap(pb::UnmapOp {
                offset: seg.offset,
                length: seg.len,
            })
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.fan_out(offset, len, |seg| {
            Op::WriteZeroes(pb::WriteZeroesOp {
                offset: seg.offset,
                length: seg.len,
                fua,
            })
        })
        .await
    }
}
