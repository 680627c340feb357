//! Sans-IO transmission phase: request decoding and validation, reply
//! encoding.
//!
//! [`RequestDecoder::decode`] takes the connection's input buffer and either
//! needs more bytes (`Ok(None)`, nothing consumed), yields one validated
//! [`Decoded`] item (its bytes consumed), or reports a [`ProtocolError`]
//! after which the connection must be dropped (bad magic). Requests the
//! server refuses but can answer become [`Decoded::Reject`] with the error to
//! send back; only a `WRITE` whose payload is too large to read and discard
//! asks for the connection to be closed after the reply.
//!
//! [`ReplyEncoder`] writes simple replies, or structured replies for reads
//! when `NBD_OPT_STRUCTURED_REPLY` was negotiated. The header goes into a
//! buffer and the read payload is returned separately, so that large reads
//! are written without a copy.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::proto::{
    Errno, MAX_PAYLOAD, REQUEST_HEADER_LEN, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, cmd, cmd_flags, reply_type,
};

/// The fixed 28-byte request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub command: u16,
    /// Opaque cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (and payload length for `WRITE`).
    pub length: u32,
}

impl RequestHeader {
    /// Parse a header from the start of `buf`: `Ok(None)` when fewer than 28
    /// bytes are present, an error when the magic is wrong.
    pub fn parse(buf: &[u8]) -> Result<Option<RequestHeader>, ProtocolError> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let mut b = &buf[..REQUEST_HEADER_LEN];
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadRequestMagic(magic));
        }
        Ok(Some(RequestHeader {
            flags: b.get_u16(),
            command: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        }))
    }

    /// Append the header to `dst` (what a client sends).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(REQUEST_HEADER_LEN);
        dst.put_u32(REQUEST_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.command);
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        dst.put_u32(self.length);
    }
}

/// A validated command, ready for the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length (at most the payload cap).
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The payload.
        data: Bytes,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Write zeroes over a range (`NO_HOLE` is accepted and ignored).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
}

/// A request: cookie and command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub cookie: u64,
    /// What to do.
    pub command: Command,
}

/// One item taken off the input by [`RequestDecoder::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid request to execute.
    Request(Request),
    /// A request refused without touching the device: reply `errno`.
    Reject {
        /// Echoed in the reply.
        cookie: u64,
        /// The error to send.
        errno: Errno,
        /// It was a read (structured mode answers reads with a chunk).
        read: bool,
        /// Close the connection after the reply (the payload could not be skipped).
        close: bool,
        /// Why, for the structured error message and the log.
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: finish the in-flight requests and close.
    Disconnect,
}

/// Decodes and validates requests for one export. See the module docs.
#[derive(Clone, Debug)]
pub struct RequestDecoder {
    size: u64,
    max_payload: u32,
    structured: bool,
}

impl RequestDecoder {
    /// A decoder for an export of `size` bytes, with the default 32 MiB cap.
    pub fn new(size: u64, structured_replies: bool) -> Self {
        RequestDecoder {
            size,
            max_payload: MAX_PAYLOAD,
            structured: structured_replies,
        }
    }

    /// Change the largest READ/WRITE length accepted.
    pub fn with_max_payload(mut self, max_payload: u32) -> Self {
        self.max_payload = max_payload;
        self
    }

    /// The largest READ/WRITE length accepted.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    fn allowed_flags(&self, command: u16) -> u16 {
        match command {
            cmd::READ if self.structured => cmd_flags::FUA | cmd_flags::DF,
            cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE,
            _ => cmd_flags::FUA,
        }
    }

    fn in_range(&self, offset: u64, len: u32) -> bool {
        offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= self.size)
    }

    /// Take one item off the front of `buf`; `Ok(None)` means more input is
    /// needed and nothing was consumed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Decoded>, ProtocolError> {
        let Some(h) = RequestHeader::parse(buf)? else {
            return Ok(None);
        };
        let reject = |errno, close, reason| {
            Ok(Some(Decoded::Reject {
                cookie: h.cookie,
                errno,
                read: h.command == cmd::READ,
                close,
                reason,
            }))
        };

        if h.command == cmd::WRITE {
            if h.length > self.max_payload {
                // The payload cannot be buffered; skipping it byte by byte
                // would let a client pin the connection. Answer, then close.
                buf.advance(REQUEST_HEADER_LEN);
                return reject(Errno::Einval, true, "write larger than the payload cap");
            }
            let total = REQUEST_HEADER_LEN + h.length as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            buf.advance(REQUEST_HEADER_LEN);
            let data = buf.split_to(h.length as usize).freeze();
            if h.flags & !self.allowed_flags(h.command) != 0 {
                return reject(Errno::Einval, false, "unsupported command flags");
            }
            if !self.in_range(h.offset, h.length) {
                return reject(Errno::Enospc, false, "write beyond the end of the export");
            }
            return Ok(Some(Decoded::Request(Request {
                cookie: h.cookie,
                command: Command::Write {
                    offset: h.offset,
                    data,
                    fua: h.flags & cmd_flags::FUA != 0,
                },
            })));
        }

        buf.advance(REQUEST_HEADER_LEN);
        if h.command == cmd::DISC {
            return Ok(Some(Decoded::Disconnect));
        }
        let known = matches!(
            h.command,
            cmd::READ | cmd::FLUSH | cmd::TRIM | cmd::WRITE_ZEROES
        );
        if !known {
            return reject(Errno::Einval, false, "unsupported command");
        }
        if h.flags & !self.allowed_flags(h.command) != 0 {
            return reject(Errno::Einval, false, "unsupported command flags");
        }
        let fua = h.flags & cmd_flags::FUA != 0;
        let command = match h.command {
            cmd::READ => {
                if h.length > self.max_payload {
                    return reject(Errno::Einval, false, "read larger than the payload cap");
                }
                if !self.in_range(h.offset, h.length) {
                    return reject(Errno::Einval, false, "read beyond the end of the export");
                }
                Command::Read {
                    offset: h.offset,
                    len: h.length,
                }
            }
            // Offset and length of a flush are reserved; ignore them.
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => {
                if !self.in_range(h.offset, h.length) {
                    return reject(Errno::Einval, false, "trim beyond the end of the export");
                }
                Command::Trim {
                    offset: h.offset,
                    len: h.length,
                    fua,
                }
            }
            _ => {
                if !self.in_range(h.offset, h.length) {
                    return reject(
                        Errno::Enospc,
                        false,
                        "write zeroes beyond the end of the export",
                    );
                }
                Command::WriteZeroes {
                    offset: h.offset,
                    len: h.length,
                    fua,
                }
            }
        };
        Ok(Some(Decoded::Request(Request {
            cookie: h.cookie,
            command,
        })))
    }
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Success without payload (write, flush, trim, write zeroes).
    Done {
        /// The request's cookie.
        cookie: u64,
    },
    /// A successful read of `data` at `offset`.
    Data {
        /// The request's cookie.
        cookie: u64,
        /// The read's offset (used by structured replies).
        offset: u64,
        /// Exactly the requested number of bytes.
        data: Bytes,
    },
    /// Failure.
    Error {
        /// The request's cookie.
        cookie: u64,
        /// The error value.
        errno: Errno,
        /// It answers a read (structured mode must use a chunk).
        read: bool,
        /// Human-readable detail, sent with structured errors only.
        message: String,
    },
}

impl Reply {
    /// The cookie this reply answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Done { cookie } | Reply::Data { cookie, .. } | Reply::Error { cookie, .. } => {
                *cookie
            }
        }
    }
}

/// Encodes replies in the mode negotiated for the connection.
#[derive(Clone, Copy, Debug)]
pub struct ReplyEncoder {
    structured: bool,
}

impl ReplyEncoder {
    /// An encoder; `structured_replies` as negotiated.
    pub fn new(structured_replies: bool) -> Self {
        ReplyEncoder {
            structured: structured_replies,
        }
    }

    fn simple(dst: &mut BytesMut, cookie: u64, error: u32) {
        dst.put_u32(SIMPLE_REPLY_MAGIC);
        dst.put_u32(error);
        dst.put_u64(cookie);
    }

    fn chunk(dst: &mut BytesMut, flags: u16, typ: u16, cookie: u64, len: u32) {
        dst.put_u32(STRUCTURED_REPLY_MAGIC);
        dst.put_u16(flags);
        dst.put_u16(typ);
        dst.put_u64(cookie);
        dst.put_u32(len);
    }

    /// Append the reply's header (and any small fields) to `dst`; the returned
    /// payload, if any, must be sent immediately after, before anything else.
    pub fn encode(&self, reply: &Reply, dst: &mut BytesMut) -> Option<Bytes> {
        dst.reserve(32);
        match reply {
            Reply::Done { cookie } => {
                Self::simple(dst, *cookie, 0);
                None
            }
            Reply::Data {
                cookie,
                offset,
                data,
            } => {
                if !self.structured {
                    Self::simple(dst, *cookie, 0);
                } else if data.is_empty() {
                    Self::chunk(dst, reply_type::FLAG_DONE, reply_type::NONE, *cookie, 0);
                } else {
                    Self::chunk(
                        dst,
                        reply_type::FLAG_DONE,
                        reply_type::OFFSET_DATA,
                        *cookie,
                        // A read never exceeds the payload cap, far below 4 GiB.
                        8 + data.len() as u32,
                    );
                    dst.put_u64(*offset);
                }
                (!data.is_empty()).then(|| data.clone())
            }
            Reply::Error {
                cookie,
                errno,
                read,
                message,
            } => {
                if self.structured && *read {
                    let mut end = message.len().min(crate::proto::MAX_STRING_LEN);
                    while !message.is_char_boundary(end) {
                        end -= 1;
                    }
                    let msg = &message.as_bytes()[..end];
                    Self::chunk(
                        dst,
                        reply_type::FLAG_DONE,
                        reply_type::ERROR,
                        *cookie,
                        6 + msg.len() as u32,
                    );
                    dst.put_u32(errno.code());
                    dst.put_u16(msg.len() as u16);
                    dst.extend_from_slice(msg);
                } else {
                    Self::simple(dst, *cookie, errno.code());
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 0xdead_beef_0000_0001,
            offset,
            length,
        }
    }

    fn bytes_of(h: &RequestHeader, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        h.encode(&mut b);
        b.extend_from_slice(payload);
        b
    }

    fn decode_one(h: &RequestHeader, payload: &[u8]) -> Decoded {
        let mut b = bytes_of(h, payload);
        let d = RequestDecoder::new(SIZE, false)
            .decode(&mut b)
            .expect("no protocol error")
            .expect("complete");
        assert!(b.is_empty(), "everything consumed");
        d
    }

    fn rejected(d: &Decoded) -> Option<(Errno, bool)> {
        match d {
            Decoded::Reject { errno, close, .. } => Some((*errno, *close)),
            _ => None,
        }
    }

    #[test]
    fn header_is_byte_exact() {
        let b = bytes_of(&header(cmd::WRITE, cmd_flags::FUA, 0x1122, 0x200), &[]);
        assert_eq!(
            &b[..],
            &[
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0, 0, 0, 0,
                0, 0, 0x11, 0x22, 0, 0, 2, 0
            ]
        );
    }

    #[test]
    fn decodes_every_supported_command() {
        let d = decode_one(&header(cmd::READ, 0, 4096, 512), &[]);
        assert_eq!(
            d,
            Decoded::Request(Request {
                cookie: 0xdead_beef_0000_0001,
                command: Command::Read {
                    offset: 4096,
                    len: 512
                }
            })
        );
        let d = decode_one(&header(cmd::WRITE, cmd_flags::FUA, 0, 3), b"abc");
        assert!(matches!(
            d,
            Decoded::Request(Request { command: Command::Write { fua: true, ref data, .. }, .. })
                if &data[..] == b"abc"
        ));
        let d = decode_one(&header(cmd::FLUSH, 0, 0, 0), &[]);
        assert!(matches!(
            d,
            Decoded::Request(Request {
                command: Command::Flush,
                ..
            })
        ));
        let d = decode_one(&header(cmd::TRIM, 0, 0, 4096), &[]);
        assert!(matches!(
            d,
            Decoded::Request(Request {
                command: Command::Trim { fua: false, .. },
                ..
            })
        ));
        let d = decode_one(
            &header(
                cmd::WRITE_ZEROES,
                cmd_flags::NO_HOLE | cmd_flags::FUA,
                0,
                SIZE as u32,
            ),
            &[],
        );
        assert!(matches!(
            d,
            Decoded::Request(Request {
                command: Command::WriteZeroes { fua: true, .. },
                ..
            })
        ));
        assert_eq!(
            decode_one(&header(cmd::DISC, 0, 0, 0), &[]),
            Decoded::Disconnect
        );
    }

    #[test]
    fn refuses_bad_requests_with_the_right_errno() {
        // Unknown commands and flags.
        for c in [cmd::CACHE, cmd::BLOCK_STATUS, cmd::RESIZE, 77] {
            let d = decode_one(&header(c, 0, 0, 0), &[]);
            assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        }
        let d = decode_one(&header(cmd::READ, cmd_flags::DF, 0, 512), &[]);
        assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        let d = decode_one(&header(cmd::WRITE, cmd_flags::NO_HOLE, 0, 2), b"xy");
        assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        // Out of range.
        let d = decode_one(&header(cmd::READ, 0, SIZE - 511, 512), &[]);
        assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        let d = decode_one(&header(cmd::READ, 0, u64::MAX, 512), &[]);
        assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        let d = decode_one(&header(cmd::WRITE, 0, SIZE, 1), b"z");
        assert_eq!(rejected(&d), Some((Errno::Enospc, false)));
        let d = decode_one(&header(cmd::TRIM, 0, SIZE, 1), &[]);
        assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        let d = decode_one(&header(cmd::WRITE_ZEROES, 0, SIZE - 1, 2), &[]);
        assert_eq!(rejected(&d), Some((Errno::Enospc, false)));
        // Too long: a read is refused, a write is refused and closes.
        let d = decode_one(&header(cmd::READ, 0, 0, MAX_PAYLOAD + 1), &[]);
        assert_eq!(rejected(&d), Some((Errno::Einval, false)));
        let d = decode_one(&header(cmd::WRITE, 0, 0, MAX_PAYLOAD + 1), &[]);
        assert_eq!(rejected(&d), Some((Errno::Einval, true)));
    }

    #[test]
    fn df_is_accepted_with_structured_replies() {
        let mut b = bytes_of(&header(cmd::READ, cmd_flags::DF, 0, 512), &[]);
        let d = RequestDecoder::new(SIZE, true).decode(&mut b).unwrap();
        assert!(matches!(d, Some(Decoded::Request(_))));
    }

    #[test]
    fn bad_magic_is_a_protocol_error() {
        let mut b = bytes_of(&header(cmd::READ, 0, 0, 512), &[]);
        b[0] = 0;
        assert!(matches!(
            RequestDecoder::new(SIZE, false).decode(&mut b),
            Err(ProtocolError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn partial_input_needs_more_at_every_split_point() {
        let h = header(cmd::WRITE, 0, 512, 1000);
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut whole = bytes_of(&h, &payload);
        whole.extend_from_slice(&bytes_of(&header(cmd::READ, 0, 0, 4096), &[]));
        let dec = RequestDecoder::new(SIZE, false);
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = Vec::new();
            while let Some(d) = dec.decode(&mut buf).unwrap() {
                got.push(d);
            }
            let expect = if cut < REQUEST_HEADER_LEN + 1000 {
                0
            } else {
                1
            };
            assert_eq!(got.len(), expect, "cut at {cut}");
            let consumed = cut - buf.len();
            assert_eq!(consumed, if expect == 1 { 1028 } else { 0 });
            buf.extend_from_slice(&whole[cut..]);
            while let Some(d) = dec.decode(&mut buf).unwrap() {
                got.push(d);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn simple_replies_are_byte_exact() {
        let enc = ReplyEncoder::new(false);
        let mut dst = BytesMut::new();
        assert_eq!(enc.encode(&Reply::Done { cookie: 7 }, &mut dst), None);
        let p = enc.encode(
            &Reply::Data {
                cookie: 8,
                offset: 0,
                data: Bytes::from_static(b"hi"),
            },
            &mut dst,
        );
        assert_eq!(p.as_deref(), Some(&b"hi"[..]));
        let p = enc.encode(
            &Reply::Error {
                cookie: 9,
                errno: Errno::Einval,
                read: true,
                message: "x".into(),
            },
            &mut dst,
        );
        assert_eq!(p, None);
        let mut want = Vec::new();
        for (err, cookie) in [(0u32, 7u64), (0, 8), (22, 9)] {
            want.extend_from_slice(&[0x67, 0x44, 0x66, 0x98]);
            want.extend_from_slice(&err.to_be_bytes());
            want.extend_from_slice(&cookie.to_be_bytes());
        }
        assert_eq!(&dst[..], &want[..]);
    }

    #[test]
    fn structured_read_replies() {
        let enc = ReplyEncoder::new(true);
        let mut dst = BytesMut::new();
        let p = enc.encode(
            &Reply::Data {
                cookie: 1,
                offset: 4096,
                data: Bytes::from_static(b"abcd"),
            },
            &mut dst,
        );
        assert_eq!(p.as_deref(), Some(&b"abcd"[..]));
        let mut want = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1];
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(&12u32.to_be_bytes());
        want.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(&dst[..], &want[..]);

        dst.clear();
        enc.encode(
            &Reply::Error {
                cookie: 2,
                errno: Errno::Eio,
                read: true,
                message: "bad".into(),
            },
            &mut dst,
        );
        let mut want = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1];
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(&9u32.to_be_bytes());
        want.extend_from_slice(&5u32.to_be_bytes());
        want.extend_from_slice(&3u16.to_be_bytes());
        want.extend_from_slice(b"bad");
        assert_eq!(&dst[..], &want[..]);

        // Empty read: a NONE chunk. Non-read errors: simple replies.
        dst.clear();
        let p = enc.encode(
            &Reply::Data {
                cookie: 3,
                offset: 0,
                data: Bytes::new(),
            },
            &mut dst,
        );
        assert_eq!(p, None);
        assert_eq!(&dst[4..8], &[0, 1, 0, 0]);
        dst.clear();
        enc.encode(
            &Reply::Error {
                cookie: 4,
                errno: Errno::Enospc,
                read: false,
                message: String::new(),
            },
            &mut dst,
        );
        assert_eq!(&dst[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28]);
    }

    fn arb_header() -> impl Strategy<Value = RequestHeader> {
        (
            any::<u16>(),
            prop_oneof![0u16..10, any::<u16>()],
            any::<u64>(),
            prop_oneof![0u64..SIZE + 10, any::<u64>()],
            prop_oneof![0u32..5000, any::<u32>()],
        )
            .prop_map(|(flags, command, cookie, offset, length)| RequestHeader {
                flags,
                command,
                cookie,
                offset,
                length,
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600),
                                       structured in any::<bool>()) {
            let dec = RequestDecoder::new(SIZE, structured).with_max_payload(4096);
            let mut buf = BytesMut::from(&data[..]);
            loop {
                let before = buf.len();
                match dec.decode(&mut buf) {
                    Ok(None) => { prop_assert_eq!(buf.len(), before); break }
                    Ok(Some(_)) => prop_assert!(buf.len() < before),
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn valid_magic_with_arbitrary_fields_never_panics(h in arb_header(),
                                                          tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let dec = RequestDecoder::new(SIZE, false).with_max_payload(4096);
            let mut buf = bytes_of(&h, &tail);
            let r = dec.decode(&mut buf);
            prop_assert!(r.is_ok());
        }

        #[test]
        fn header_round_trips(h in arb_header()) {
            let b = bytes_of(&h, &[]);
            prop_assert_eq!(RequestHeader::parse(&b), Ok(Some(h)));
            prop_assert_eq!(RequestHeader::parse(&b[..27]), Ok(None));
        }

        #[test]
        fn valid_requests_round_trip(offset in 0u64..SIZE, len in 0u32..4096, fua in any::<bool>(),
                                     kind in 0u8..5, cookie in any::<u64>()) {
            let len = len.min((SIZE - offset) as u32);
            let flags = if fua { cmd_flags::FUA } else { 0 };
            let payload = vec![0xa5u8; len as usize];
            let (h, p, want) = match kind {
                0 => (header(cmd::READ, flags, offset, len), &[][..], Command::Read { offset, len }),
                1 => (header(cmd::WRITE, flags, offset, len), &payload[..],
                      Command::Write { offset, data: Bytes::from(payload.clone()), fua }),
                2 => (header(cmd::FLUSH, flags, 0, 0), &[][..], Command::Flush),
                3 => (header(cmd::TRIM, flags, offset, len), &[][..], Command::Trim { offset, len, fua }),
                _ => (header(cmd::WRITE_ZEROES, flags, offset, len), &[][..],
                      Command::WriteZeroes { offset, len, fua }),
            };
            let h = RequestHeader { cookie, ..h };
            let mut buf = bytes_of(&h, p);
            let got = RequestDecoder::new(SIZE, false).decode(&mut buf);
            prop_assert_eq!(got, Ok(Some(Decoded::Request(Request { cookie, command: want }))));
            prop_assert!(buf.is_empty());
        }
    }
}
