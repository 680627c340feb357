//! The replica daemon (`corral replica`).
//!
//! One daemon per node hosts many replicas, one directory each under its data
//! dir, and serves two gRPC services over them:
//! - [`control`]: create, open (takes the engine's epoch: fencing), info,
//!   list, delete, and recording the volume's membership;
//! - [`data`]: the bidirectional data stream of pipelined block requests.
//!
//! The daemon knows nothing about other replicas; the engine owns the
//! replication protocol. [`registry`] holds the hosted replicas; [`server`]
//! builds the listeners (the one place TLS is added); [`unix`] owns the
//! optional unix socket engines on the same node connect to.

pub mod control;
pub mod data;
pub mod error;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod unix;

pub use error::ReplicaError;
pub use registry::ReplicaRegistry;
pub use server::{ReplicaServerConfig, serve, serve_listener, serve_with_metrics, serve_with_tls};

// The store's checksum block is the one the data stream reports.
const _: () = assert!(corral_store::BLOCK == corral_proto::CHECKSUM_BLOCK);

#[cfg(test)]
mod contract {
    #[test]
    fn the_store_reports_zero_blocks_as_the_data_stream_says() {
        assert_eq!(corral_store::zero_block_crc(), corral_proto::ZERO_BLOCK_CRC);
    }
}
