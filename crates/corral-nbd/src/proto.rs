//! Wire constants of the NBD protocol (fixed newstyle handshake and
//! transmission phase), named as in the protocol document
//! (`NetworkBlockDevice/nbd`, `doc/proto.md`) without the `NBD_` prefix.
//!
//! Every multi-byte field on the wire is big-endian.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic that starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic that starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of an option header (`IHAVEOPT`, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;

/// Handshake flags (16 bits, server to client).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client to server).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_RESIZE` (experimental).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies in transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit request/reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// The option succeeded / the list is complete.
    pub const ACK: u32 = 1;
    /// One export in a list.
    pub const SERVER: u32 = 2;
    /// One item of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// The client must ask for block sizes first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types in `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect after the in-flight requests.
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// Discard a range.
    pub const TRIM: u16 = 4;
    /// Prefetch (not supported).
    pub const CACHE: u16 = 5;
    /// Write zeroes over a range.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status (not supported).
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize (not supported).
    pub const RESIZE: u16 = 8;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// Do not punch a hole for `WRITE_ZEROES`.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// One extent only (block status).
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail `WRITE_ZEROES` unless it is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Payload length in the header (extended headers).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and flags.
pub mod reply_type {
    /// Flag on the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// Generic error.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// The error values allowed in a transmission reply. The numbers are fixed by
/// the protocol (they match Linux errno values) and independent of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted.
    Eperm = 1,
    /// Input/output error.
    Eio = 5,
    /// Cannot allocate memory.
    Enomem = 12,
    /// Invalid argument.
    Einval = 22,
    /// No space left on device.
    Enospc = 28,
    /// Value too large.
    Eoverflow = 75,
    /// Operation not supported.
    Enotsup = 95,
    /// Server is shutting down.
    Eshutdown = 108,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Map a host (Linux) errno onto the closest NBD error value; anything
    /// the protocol does not define becomes `EIO`.
    pub fn from_host_errno(errno: i32) -> Errno {
        match errno {
            1 => Errno::Eperm,
            12 => Errno::Enomem,
            22 => Errno::Einval,
            // ENOSPC, EDQUOT (122) and EFBIG (27) all mean "no space" to a client.
            28 | 27 | 122 => Errno::Enospc,
            75 => Errno::Eoverflow,
            95 => Errno::Enotsup,
            108 => Errno::Eshutdown,
            _ => Errno::Eio,
        }
    }

    /// The NBD error for a failed device operation.
    pub fn from_block_error(err: &corral_block::BlockError) -> Errno {
        Errno::from_host_errno(err.errno())
    }
}

/// The largest payload (READ or WRITE length) this server accepts: 32 MiB, the
/// size every client is told to stay under when no limit is advertised.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The preferred block size advertised with `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// The largest option (header excluded) the handshake accepts.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// The longest string (export name, description) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// The transmission flags this server advertises for every export.
pub fn server_transmission_flags(structured_replies: bool) -> u16 {
    use transmission_flags::*;
    let mut flags =
        HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN;
    if structured_replies {
        // Every read is answered with one data chunk, so "don't fragment" is free.
        flags |= SEND_DF;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn host_errnos_map_to_protocol_values() {
        assert_eq!(Errno::from_host_errno(22), Errno::Einval);
        assert_eq!(Errno::from_host_errno(28), Errno::Enospc);
        assert_eq!(Errno::from_host_errno(5), Errno::Eio);
        assert_eq!(Errno::from_host_errno(13), Errno::Eio);
        assert_eq!(Errno::Eshutdown.code(), 108);
        let e = corral_block::BlockError::OutOfRange {
            offset: 1,
            len: 2,
            size: 2,
        };
        assert_eq!(Errno::from_block_error(&e), Errno::Einval);
        let e = corral_block::BlockError::Unavailable("fenced".into());
        assert_eq!(Errno::from_block_error(&e), Errno::Eio);
    }
}
