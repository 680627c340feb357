//! Session-level decisions, sans-IO: state and events in, actions out, no
//! sockets and no timers of their own (the caller passes the time).
//!
//! - [`registry`]: which live session a new login reinstates, and TSIHs.
//! - [`tasks`]: the commands a connection runs and what task management
//!   functions (ABORT TASK, LUN RESET, ...) do to them.
//! - [`keepalive`]: NOP-In pings of an idle initiator, and when to give up.
//!
//! The tokio server ([`crate::server`]) feeds them what happens on the
//! socket and carries out what they decide.

pub mod keepalive;
pub mod registry;
pub mod tasks;

pub use keepalive::{Keepalive, KeepaliveStep};
pub use registry::{Registered, SessionRegistry};
pub use tasks::{Finished, TaskSet, TmfDone};
