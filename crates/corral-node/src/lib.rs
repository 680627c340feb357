//! `corral node`: the per-node daemon. It serves everything `corral replica`
//! serves, plus the engine manager (`proto/corral/v1/node.proto`), which
//! runs the engine of each volume attached on this node as a supervised
//! child process and keeps a record so that it brings them back after the
//! daemon itself restarts.
//!
//! - [`daemon`]: configuration, files, and [`serve`] (one listener for the
//!   replica services and the engine manager);
//! - [`service`]: the `EngineManager` gRPC service over [`manager`], which
//!   decides which engines run, hands out [`ports`] and keeps the
//!   [`record`] in step;
//! - [`supervision`]: the pure state machine of one engine's life (restart
//!   with back-off, stop with SIGTERM then SIGKILL); [`supervisor`] is its
//!   async shell and [`process`] the operating-system side;
//! - [`spec`]: a validated engine spec, its addresses and command line;
//! - [`error`]: [`NodeError`] and its gRPC statuses.
//!
//! See docs/node-daemon.md.

pub mod daemon;
pub mod error;
pub mod manager;
pub mod ports;
pub mod process;
pub mod record;
pub mod service;
pub mod spec;
pub mod supervision;
pub mod supervisor;

pub use daemon::{NodeConfig, default_addresses, serve};
pub use error::NodeError;
pub use ports::PortRange;
pub use supervision::RestartPolicy;
