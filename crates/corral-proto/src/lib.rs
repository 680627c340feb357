//! Generated gRPC code for corral's services (see `proto/corral/v1/`).
//!
//! Nothing hand-written lives here except what both sides must agree on:
//! the metadata key naming a data stream's volume, the one marking a
//! fenced caller, and the message-size limits.

#![allow(clippy::all, missing_docs)]

/// corral.v1: replica control + data stream, engine control.
pub mod v1 {
    tonic::include_proto!("corral.v1");
}

/// A replica mode on the wire.
impl From<corral_types::ReplicaMode> for v1::ReplicaMode {
    fn from(mode: corral_types::ReplicaMode) -> Self {
        match mode {
            corral_types::ReplicaMode::Rw => v1::ReplicaMode::Rw,
            corral_types::ReplicaMode::Wo => v1::ReplicaMode::Wo,
            corral_types::ReplicaMode::Err => v1::ReplicaMode::Err,
        }
    }
}

/// A replica mode from the wire (`None`: unspecified or unknown).
pub fn replica_mode(wire: i32) -> Option<corral_types::ReplicaMode> {
    match v1::ReplicaMode::try_from(wire).ok()? {
        v1::ReplicaMode::Rw => Some(corral_types::ReplicaMode::Rw),
        v1::ReplicaMode::Wo => Some(corral_types::ReplicaMode::Wo),
        v1::ReplicaMode::Err => Some(corral_types::ReplicaMode::Err),
        v1::ReplicaMode::Unspecified => None,
    }
}

/// gRPC metadata key carrying the volume name of a data stream.
pub const VOLUME_METADATA_KEY: &str = "corral-volume";

/// Largest gRPC message either side accepts (a batch of requests or replies).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Cap the engine's batcher keeps below `MAX_MESSAGE_BYTES`.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Most requests the engine packs into one batch.
pub const MAX_BATCH_REQUESTS: usize = 32;

/// The unit of integrity on the data stream: a replica stores, checks and
/// reports (`ChecksumsOp`) one CRC32C per block of this many bytes.
pub const CHECKSUM_BLOCK: u64 = 4096;

/// The CRC32C of [`CHECKSUM_BLOCK`] zero bytes: what a replica reports for a
/// block that reads as zeroes, whether it was written with zeroes, never
/// written, or discarded — so replicas compare by content, not history.
pub const ZERO_BLOCK_CRC: u32 = 0x98f9_4189;

/// gRPC metadata key a replica daemon sets on a `FAILED_PRECONDITION` that
/// means "a newer engine owns this volume" (value [`FENCED`]), so that
/// callers tell fencing from any other refusal without reading messages.
pub const ERROR_METADATA_KEY: &str = "corral-error";
/// The value of [`ERROR_METADATA_KEY`] for a fenced caller.
pub const FENCED: &str = "fenced";

/// Whether `status` says the caller has been fenced by a newer engine.
pub fn is_fenced(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(ERROR_METADATA_KEY)
            .is_some_and(|v| v.as_bytes() == FENCED.as_bytes())
}

/// A `FAILED_PRECONDITION` marked as fencing the caller.
pub fn fenced_status(message: impl Into<String>) -> tonic::Status {
    let mut status = tonic::Status::failed_precondition(message);
    status.metadata_mut().insert(
        ERROR_METADATA_KEY,
        tonic::metadata::MetadataValue::from_static(FENCED),
    );
    status
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_zero_block_crc_is_the_crc32c_of_a_zero_block() {
        let zeroes = vec![0u8; super::CHECKSUM_BLOCK as usize];
        assert_eq!(crc32c::crc32c(&zeroes), super::ZERO_BLOCK_CRC);
    }
}
