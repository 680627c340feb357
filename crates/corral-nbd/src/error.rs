//! Typed errors of the NBD crate.
//!
//! [`ProtocolError`] is what the sans-IO layers report: the peer broke the
//! protocol in a way that ends its connection (and only its connection).
//! Recoverable request errors never surface here; they become error replies
//! ([`crate::proto::Errno`], `NBD_REP_ERR_*`). [`NbdError`] is what the
//! server returns.

/// A violation by the client that ends the connection.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The client flags carry bits this server does not know.
    #[error("client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option does not start with `IHAVEOPT`.
    #[error("option does not start with IHAVEOPT (got {0:#018x})")]
    BadOptionMagic(u64),
    /// An option is longer than the server accepts.
    #[error("option {option} carries {len} bytes, more than the {cap}-byte cap")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// Its announced data length.
        len: u32,
        /// The server's cap.
        cap: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; the protocol
    /// has no way to report it other than closing the connection.
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    /// The handshake was driven after it finished or failed.
    #[error("the handshake is already over")]
    HandshakeOver,
    /// A transmission request does not start with the request magic.
    #[error("request does not start with the request magic (got {0:#010x})")]
    BadRequestMagic(u32),
    /// The server requires TLS and the client went without it.
    #[error("TLS is required: {0}")]
    TlsRequired(&'static str),
    /// The client sent bytes in plaintext after `NBD_OPT_STARTTLS`, before
    /// the server's acknowledgement.
    #[error("client sent {0} plaintext bytes after NBD_OPT_STARTTLS, before the TLS handshake")]
    DataAfterStartTls(usize),
    /// A write announced a payload too large to read and skip safely.
    #[error("write of {len} bytes exceeds the {max}-byte payload cap")]
    PayloadTooLarge {
        /// The announced length.
        len: u32,
        /// The cap.
        max: u32,
    },
}

/// Errors returned by the server entry points.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A socket operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The export set cannot be served (empty, duplicate or invalid names).
    #[error("invalid exports: {0}")]
    InvalidExports(String),
    /// The client did not finish the handshake in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The client closed the connection in the middle of a message.
    #[error("connection closed by the peer in the middle of a message")]
    UnexpectedEof,
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (a client
    /// certificate the CA did not sign, none at all, an expired one, no
    /// common protocol version...) or did not finish in time.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
}
