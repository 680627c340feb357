//! Generated gRPC code for corral's services (see `proto/corral/v1/`).
//!
//! Nothing hand-written lives here except the metadata key naming a data
//! stream's volume and the message-size limits both sides must agree on.

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
