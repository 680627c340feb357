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

/// gRPC metadata key carrying the volume name of a data stream.
pub const VOLUME_METADATA_KEY: &str = "corral-volume";

/// Largest gRPC message either side accepts (a batch of requests or replies).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Cap the engine's batcher keeps below `MAX_MESSAGE_BYTES`.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Most requests the engine packs into one batch.
pub const MAX_BATCH_REQUESTS: usize = 32;

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
