//! `corral csi`: the CSI plugin (spec v1.12) — Identity, Controller and Node
//! services over the node daemons, served on a unix socket.

pub mod attach;
pub mod capabilities;
pub mod controller;
pub mod daemons;
pub mod host;
pub mod identity;
pub mod ids;
pub mod mounts;
pub mod node;
pub mod params;
pub mod placement;
pub mod reconcile;
pub mod server;
pub mod snapshots;
pub mod staging;
pub mod status;

pub use server::{CsiConfig, CsiError, serve, serve_on_host};
