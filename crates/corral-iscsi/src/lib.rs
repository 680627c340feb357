//! iSCSI target for corral (RFC 7143, SBC-4/SPC-5): serves any
//! [`corral_block::BlockDevice`] as LUN 0 of an iSCSI target, so Linux
//! open-iscsi, libiscsi (`iscsi-inq`, `iscsi-test-cu`, fio, qemu) and other
//! initiators can use a corral volume.
//!
//! Layers, quinn-proto style:
//! - [`pdu`]: the PDU codec (BHS, AHS, padding, CRC32C digests).
//! - [`text`]: key=value text parameters.
//! - [`login`]: sans-IO login negotiation ([`LoginNegotiation`]), CHAP in [`chap`].
//! - [`connection`]: sans-IO full feature phase ([`FullFeature`]): CmdSN
//!   window, R2T/Data-Out, Data-In/status, NOP, TMF, text, logout.
//! - [`scsi`]: the SCSI block device ([`ScsiLun`]) over a `BlockDevice`,
//!   with [`sense`] data and [`reservation`]s.
//! - [`session`]: sans-IO session-level decisions: reinstatement, task
//!   management, NOP-In keepalive.
//! - [`server`]: the thin tokio server ([`serve`], [`IscsiServer`]).
//!
//! ```no_run
//! # async fn demo(dev: std::sync::Arc<corral_block::FileDevice>) -> Result<(), corral_iscsi::IscsiError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3260").await?;
//! let target = std::sync::Arc::new(corral_iscsi::IscsiTarget::for_volume("vol0", dev));
//! let stop = corral_block::accept::Shutdown::new();
//! let server = tokio::spawn(corral_iscsi::serve(listener, target, stop.clone()));
//! // ... later:
//! stop.cancel();
//! server.await.expect("server task")?;
//! # Ok(()) }
//! ```
//!
//! See `docs/iscsi.md` for what is supported.

pub mod chap;
pub mod connection;
pub mod login;
pub mod pdu;
pub mod reservation;
pub mod scsi;
pub mod sense;
pub mod server;
pub mod session;
pub mod text;

pub use connection::FullFeature;
pub use login::{ChapConfig, Limits, LoginNegotiation};
pub use pdu::{Pdu, PduCodec, PduError};
pub use scsi::ScsiLun;
pub use server::{IscsiError, IscsiServer, IscsiTarget, ServerConfig, serve, target_name};
