//! `corral csi`: the CSI plugin (spec v1.12) — Identity, Controller and Node
//! services over the node daemons, served on a unix socket.

pub mod attach;
pub mod host;
pub mod mounts;
pub mod params;
pub mod placement;
pub mod staging;
