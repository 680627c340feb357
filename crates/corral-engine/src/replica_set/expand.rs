//! Online expansion: the volume grows on every writable replica and in the
//! engine in one step, recorded like a membership change (DESIGN.md,
//! "Snapshots, clones, expansion"; docs/snapshots.md, "Online expansion").
//!
//! With every write drained and none starting (`io_gate` held exclusively):
//! 1. every RW and WO replica is grown (`ExpandReplica`, fenced by epoch;
//!    durable when it answers);
//! 2. a replica that failed is treated like one that failed a write: ERR,
//!    recorded, and grown when it returns (the supervisor grows a returning
//!    replica smaller than the volume before it joins). If no RW replica
//!    grew, nothing is recorded and the volume keeps its size;
//! 3. the next membership generation is recorded on the RW replicas, and
//!    only then does the volume's size change, before any write resumes.
//!
//! A replica may be larger than the volume (an expansion cut short before
//! step 3, or one that failed everywhere else): the part past the volume's
//! size was never written, and a later expansion leaves such a replica as
//! it is. An engine opening the volume serves the smallest size among the
//! up-to-date replicas, all of which took every expansion recorded before.

use std::sync::atomic::Ordering;

use corral_block::BlockError;
use corral_client::ClientError;
use futures::future::join_all;
use tracing::{info, warn};

use super::{Generation, Mode, ReplicaSet, SlotId};
use crate::chunk::ChunkMap;
use crate::error::ReplicaIoError;

/// The unit every volume size is a multiple of (the replicas' checksum block).
pub const SIZE_UNIT: u64 = corral_proto::CHECKSUM_BLOCK;

/// Most chunks a volume may have: every ERR member keeps a bitmap of one
/// bit per chunk (this many: 8 MiB).
pub const MAX_CHUNKS: u64 = 1 << 26;

/// Largest volume of any geometry (1 PiB).
pub const MAX_SIZE: u64 = 1 << 50;

/// Why an expansion was refused or failed. Every refusal changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error(
        "cannot shrink volume {volume} from {current} to {requested} bytes: a volume only grows"
    )]
    Shrink {
        volume: String,
        current: u64,
        requested: u64,
    },
    #[error(
        "size {requested} bytes is not a multiple of {unit} bytes (4096 and the block size {block_size})"
    )]
    Unaligned {
        requested: u64,
        unit: u64,
        block_size: u32,
    },
    #[error(
        "size {requested} bytes is larger than volume {volume} can grow: at most {max} bytes ({chunk_size}-byte chunks)"
    )]
    TooLarge {
        volume: String,
        requested: u64,
        max: u64,
        chunk_size: u64,
    },
    /// The replicas could not all take it; the message says what changed.
    #[error("{0}")]
    Failed(String),
}

impl ExpandError {
    /// A refusal of the request itself (as opposed to a failure to carry it out).
    pub fn is_invalid(&self) -> bool {
        !matches!(self, ExpandError::Failed(_))
    }
}

impl From<BlockError> for ExpandError {
    fn from(e: BlockError) -> Self {
        ExpandError::Failed(e.to_string())
    }
}

/// Largest size a volume of this geometry may grow to.
pub fn max_size(chunks: ChunkMap) -> u64 {
    MAX_SIZE.min(chunks.chunk_size().saturating_mul(MAX_CHUNKS))
}

/// Check a request to grow volume `volume` from `current` to `requested`
/// bytes: Ok(false) for the same size (nothing to do), Ok(true) to grow.
pub fn check(
    volume: &str,
    current: u64,
    requested: u64,
    block_size: u32,
    chunks: ChunkMap,
) -> Result<bool, ExpandError> {
    if requested < current {
        return Err(ExpandError::Shrink {
            volume: volume.to_string(),
            current,
            requested,
        });
    }
    let unit = SIZE_UNIT.max(u64::from(block_size));
    if !requested.is_multiple_of(unit) {
        return Err(ExpandError::Unaligned {
            requested,
            unit,
            block_size,
        });
    }
    let max = max_size(chunks);
    if requested > max {
        return Err(ExpandError::TooLarge {
            volume: volume.to_string(),
            requested,
            max,
            chunk_size: chunks.chunk_size(),
        });
    }
    Ok(requested > current)
}

/// What an expansion did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpandReport {
    pub old_size: u64,
    pub new_size: u64,
    /// The membership generation that records it (the current one when
    /// nothing changed).
    pub generation: Generation,
    /// Replicas grown.
    pub grown: Vec<String>,
    /// Replicas that could not grow ("address: why"), now ERR.
    pub failed: Vec<String>,
}

impl ReplicaSet {
    /// Grow the volume to `new_size` bytes of `chunks` geometry and block
    /// size `block_size` (see the module documentation). The size is checked
    /// again once every write has drained, so concurrent expansions are
    /// ordered and a shrink is never carried out.
    pub async fn expand(
        &self,
        new_size: u64,
        block_size: u32,
        chunks: ChunkMap,
    ) -> Result<ExpandReport, ExpandError> {
        check(&self.volume, self.size(), new_size, block_size, chunks)?;
        self.check_writable()?;
        let _gate = self.io_gate.write().await;
        let old_size = self.size();
        let mut report = ExpandReport {
            old_size,
            new_size,
            ..Default::default()
        };
        if !check(&self.volume, old_size, new_size, block_size, chunks)? {
            report.generation = self.generation();
            return Ok(report);
        }
        self.check_writable()?;
        let targets = self.write_targets();
        let calls = targets.iter().map(|(id, client, mode)| async move {
            let result = client
                .control()
                .expand(&self.volume, self.epoch, new_size)
                .await;
            (*id, client.addr().to_string(), *mode, result)
        });
        let mut failed: Vec<(SlotId, String, ReplicaIoError)> = Vec::new();
        let mut rw_grown = 0usize;
        for (id, address, mode, result) in join_all(calls).await {
            let err = match result {
                Ok(info) if info.size >= new_size => {
                    rw_grown += usize::from(mode == Mode::Rw);
                    report.grown.push(address);
                    continue;
                }
                Ok(info) => ReplicaIoError::Io(format!(
                    "expand: the replica reports {} bytes after growing",
                    info.size
                )),
                Err(e @ ClientError::Fenced { .. }) => {
                    self.mark_fenced(&e.to_string());
                    return Err(ExpandError::Failed(format!(
                        "volume {}: {e}; nothing changed",
                        self.volume
                    )));
                }
                Err(ClientError::TimedOut { after, .. }) => ReplicaIoError::Timeout(after),
                Err(e) => ReplicaIoError::Unreachable(format!("expand: {e}")),
            };
            failed.push((id, address, err));
        }
        report.failed = failed
            .iter()
            .map(|(_, address, err)| format!("{address}: {err}"))
            .collect();
        if rw_grown == 0 {
            return Err(ExpandError::Failed(format!(
                "volume {}: no RW replica could grow to {new_size} bytes; the volume keeps its {old_size} bytes ({})",
                self.volume,
                report.failed.join("; ")
            )));
        }
        // Like a failed write: out of the I/O path, and recorded.
        for (id, address, err) in &failed {
            warn!(volume = %self.volume, replica = %address, error = %err,
                "replica could not grow: moving it to ERR");
            self.handle_failure(*id, err, &[]).await.map_err(|e| {
                ExpandError::Failed(format!(
                    "volume {}: {e}; the volume keeps its {old_size} bytes",
                    self.volume
                ))
            })?;
        }
        self.check_writable().map_err(|e| {
            ExpandError::Failed(format!(
                "volume {}: {e}; the volume keeps its {old_size} bytes",
                self.volume
            ))
        })?;
        {
            let _change = self.change.lock().await;
            let chunk_count = new_size.div_ceil(chunks.chunk_size());
            self.with_members(|m| m.expand(chunk_count));
            self.record_membership().await;
            // Every write target holds the new size, the record is written:
            // the frontends may see it (no write runs until `_gate` drops).
            self.size.store(new_size, Ordering::Release);
        }
        report.generation = self.generation();
        info!(volume = %self.volume, old_size, new_size, generation = %report.generation,
            grown = report.grown.len(), failed = report.failed.len(), "volume expanded");
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ChunkMap {
        ChunkMap::new(256 << 10).unwrap()
    }

    #[test]
    fn sizes_are_checked_before_anything_changes() {
        let m = map();
        assert_eq!(check("v", 1 << 30, 1 << 30, 512, m), Ok(false));
        assert_eq!(check("v", 1 << 30, 2 << 30, 512, m), Ok(true));
        assert!(matches!(
            check("v", 1 << 30, 1 << 29, 512, m),
            Err(ExpandError::Shrink { .. })
        ));
        let shrink = check("v", 1 << 30, 1 << 29, 512, m).unwrap_err();
        assert!(shrink.to_string().contains("cannot shrink"), "{shrink}");
        assert!(matches!(
            check("v", 1 << 30, 0, 512, m),
            Err(ExpandError::Shrink { .. })
        ));
        for bad in [(1 << 30) + 512, (2 << 30) + 100] {
            assert!(
                matches!(
                    check("v", 1 << 30, bad, 512, m),
                    Err(ExpandError::Unaligned { unit: 4096, .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            check("v", 1 << 30, u64::MAX - 4095, 512, m),
            Err(ExpandError::TooLarge { .. })
        ));
        // 64 Mi chunks of 256 KiB: 16 TiB.
        assert_eq!(max_size(m), 16 << 40);
        assert_eq!(check("v", 1 << 30, 16 << 40, 4096, m), Ok(true));
        assert!(check("v", 1 << 30, (16 << 40) + 4096, 4096, m).is_err());
    }
}
