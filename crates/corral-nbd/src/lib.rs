//! NBD (Network Block Device) server for corral: serves any
//! [`corral_block::BlockDevice`] to NBD clients (`nbdinfo`, `nbdcopy`,
//! `nbdfuse`, `fio --ioengine=nbd`, qemu, the Linux `nbd-client`).
//!
//! Layers, quinn-proto style:
//! - [`proto`]: wire constants and the protocol's error values.
//! - [`handshake`]: sans-IO fixed newstyle negotiation ([`Handshake`]).
//! - [`transmission`]: sans-IO request decoding/validation and reply
//!   encoding ([`RequestDecoder`], [`ReplyEncoder`]).
//! - [`export`]: the named devices a server offers ([`Exports`]).
//! - [`server`]: the thin tokio server ([`serve`], [`NbdServer`]), with
//!   optional TLS ([`NbdTls`]: `NBD_OPT_STARTTLS`, client certificates).
//!
//! Typical use:
//!
//! ```no_run
//! # async fn demo(dev: std::sync::Arc<corral_block::FileDevice>) -> Result<(), corral_nbd::NbdError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! let exports = std::sync::Arc::new(corral_nbd::Exports::single("vol0", dev));
//! let stop = corral_block::accept::Shutdown::new();
//! let server = tokio::spawn(corral_nbd::serve(listener, exports, stop.clone()));
//! // ... later:
//! stop.cancel();
//! server.await.expect("server task")?;
//! # Ok(()) }
//! ```
//!
//! See `docs/nbd.md` for what is supported.

pub mod error;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

pub use error::{NbdError, ProtocolError};
pub use export::{Export, Exports};
pub use handshake::{ExportInfo, Handshake, HandshakeConfig, HandshakeStatus, Negotiated, TlsMode};
pub use proto::Errno;
pub use server::{NbdServer, NbdTls, ServerConfig, serve};
pub use transmission::{
    Command, Decoded, Reply, ReplyEncoder, Request, RequestDecoder, RequestHeader,
};
