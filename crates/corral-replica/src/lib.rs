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
//! builds the listener (the one place TLS would be added).

pub mod control;
pub mod data;
pub mod error;
pub mod metrics;
pub mod registry;
pub mod server;

pub use error::ReplicaError;
pub use registry::ReplicaRegistry;
pub use server::{ReplicaServerConfig, serve, serve_listener, serve_with_metrics};
