//! Sans-IO server side of the fixed newstyle handshake.
//!
//! [`Handshake`] owns no socket. The caller writes [`Handshake::take_output`]
//! to the client, appends whatever the client sent to a `BytesMut` and calls
//! [`Handshake::receive`], which consumes every complete message it finds
//! (check-then-parse: a message is only consumed once all of it is present)
//! and reports [`HandshakeStatus::NeedMore`], the start of transmission, or
//! the client's abort. Any bytes after the final option stay in the buffer:
//! they belong to the transmission phase.
//!
//! Supported options: `EXPORT_NAME`, `GO`, `INFO` (`NBD_INFO_EXPORT`,
//! `NBD_INFO_BLOCK_SIZE` always; `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`
//! on request), `LIST`, `ABORT`, `STRUCTURED_REPLY` (unless disabled in
//! [`HandshakeConfig`]) and `STARTTLS` (per [`TlsMode`]). Every other option
//! is answered `NBD_REP_ERR_UNSUP`.
//!
//! TLS follows the spec's three server modes: [`TlsMode::Off`] is NOTLS
//! (`STARTTLS` gets `NBD_REP_ERR_POLICY`), [`TlsMode::Allowed`] is
//! SELECTIVETLS with no TLS-only export (the client upgrades if it wants to)
//! and [`TlsMode::Required`] is FORCEDTLS (every option but `STARTTLS` and
//! `ABORT` gets `NBD_REP_ERR_TLS_REQD` until the upgrade, and
//! `EXPORT_NAME`, which cannot be answered with an error, ends the
//! connection). When the client's `STARTTLS` is accepted the reply is
//! `NBD_REP_ACK` and [`Handshake::receive`] returns
//! [`HandshakeStatus::StartTls`]: the caller sends the pending output, runs
//! the TLS handshake (as the server) on the same socket and keeps feeding
//! `receive` with what arrives over TLS. Negotiation starts again from a
//! clean slate (structured replies negotiated in plaintext are forgotten,
//! as nbdkit and qemu do); a second `STARTTLS` gets `NBD_REP_ERR_INVALID`.
//! Bytes the client sent in plaintext after its `STARTTLS`, before it could
//! have seen the `ACK`, end the connection: they would otherwise be
//! injected into the TLS session's negotiation.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::proto::{
    self, GREETING_LEN, IHAVEOPT, NBDMAGIC, OPTION_HEADER_LEN, REPLY_MAGIC, client_flags,
    handshake_flags, info, opt, rep,
};

/// What the handshake needs to know about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name a client selects the export by.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// The device's logical block size (512 or 4096); the preferred block size
    /// advertised is the larger of this and 4096.
    pub block_size: u32,
}

/// Whether the server offers TLS (`NBD_OPT_STARTTLS`), and insists on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS (the spec's NOTLS): `STARTTLS` is answered
    /// `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// The client may upgrade with `STARTTLS`, or carry on in plaintext (the
    /// spec's SELECTIVETLS, with no TLS-only export).
    Allowed,
    /// The client must upgrade before anything else (the spec's FORCEDTLS):
    /// other options get `NBD_REP_ERR_TLS_REQD`, `EXPORT_NAME` and a client
    /// without fixed newstyle negotiation are disconnected.
    Required,
}

/// Tunables of the handshake.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// Accept `NBD_OPT_STRUCTURED_REPLY` (otherwise answer `NBD_REP_ERR_UNSUP`).
    pub structured_replies: bool,
    /// Largest option data length accepted; a longer option ends the connection.
    pub max_option_len: u32,
    /// Whether `NBD_OPT_STARTTLS` is accepted, and required.
    pub tls: TlsMode,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            structured_replies: true,
            max_option_len: proto::MAX_OPTION_LEN,
            tls: TlsMode::Off,
        }
    }
}

/// The outcome of a successful negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in the list given to [`Handshake::new`].
    pub export: usize,
    /// Size of the export as advertised.
    pub size: u64,
    /// Transmission flags as advertised.
    pub transmission_flags: u16,
    /// Whether read replies must be structured.
    pub structured_replies: bool,
}

/// Progress reported by [`Handshake::receive`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// Every complete message was consumed; more input is needed.
    NeedMore,
    /// Transmission starts now (after the pending output is sent).
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`; send the pending output and close.
    Aborted,
    /// The client's `NBD_OPT_STARTTLS` was accepted: send the pending output
    /// (the `NBD_REP_ACK`), then run the TLS handshake as the server on the
    /// same socket, and go on calling [`Handshake::receive`] with the bytes
    /// that arrive over TLS. If the TLS handshake fails the connection must
    /// be closed: there is no going back to plaintext.
    StartTls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Over,
}

/// Server-side fixed newstyle negotiation. See the module documentation.
#[derive(Debug)]
pub struct Handshake {
    exports: Vec<ExportInfo>,
    config: HandshakeConfig,
    state: State,
    no_zeroes: bool,
    /// The client set `NBD_FLAG_C_FIXED_NEWSTYLE` (TLS needs it).
    fixed: bool,
    /// `STARTTLS` was accepted: everything since came over TLS.
    tls_active: bool,
    /// An option was refused because TLS is required and not yet active.
    tls_refused: bool,
    structured: bool,
    out: BytesMut,
}

/// The 18-byte greeting the server sends first.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    let flags = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    g[16..].copy_from_slice(&flags.to_be_bytes());
    g
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Handshake {
    /// Start a negotiation offering `exports` (the first one is the default
    /// export, selected by an empty name). The greeting is queued as output.
    pub fn new(exports: Vec<ExportInfo>, config: HandshakeConfig) -> Self {
        let mut out = BytesMut::with_capacity(256);
        out.extend_from_slice(&greeting());
        Handshake {
            exports,
            config,
            state: State::ClientFlags,
            no_zeroes: false,
            fixed: false,
            tls_active: false,
            tls_refused: false,
            structured: false,
            out,
        }
    }

    /// Whether the client upgraded to TLS (its `STARTTLS` was accepted).
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether an option was refused (`NBD_REP_ERR_TLS_REQD`) because TLS is
    /// required and the client had not started it: a client that then
    /// leaves was turned away for want of TLS.
    pub fn refused_for_tls(&self) -> bool {
        self.tls_refused
    }

    /// Whether there are bytes waiting to be sent to the client.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Take the bytes to send to the client (possibly empty).
    pub fn take_output(&mut self) -> Bytes {
        self.out.split().freeze()
    }

    /// Whether the negotiation is over (transmission, abort or failure).
    pub fn is_over(&self) -> bool {
        self.state == State::Over
    }

    /// Consume complete client messages from `input`. On error the
    /// connection must be closed (after sending any pending output, which may
    /// hold a final error reply).
    pub fn receive(&mut self, input: &mut BytesMut) -> Result<HandshakeStatus, ProtocolError> {
        loop {
            match self.state {
                State::Over => return Err(ProtocolError::HandshakeOver),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(HandshakeStatus::NeedMore);
                    }
                    let flags = input.get_u32();
                    if flags & !client_flags::KNOWN != 0 {
                        return self.fail(ProtocolError::UnknownClientFlags(flags));
                    }
                    // A client without FIXED_NEWSTYLE gets fixed newstyle anyway
                    // (the spec allows it); it only ever sends EXPORT_NAME.
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.fixed = flags & client_flags::FIXED_NEWSTYLE != 0;
                    // Such a client can never start TLS (the spec puts the
                    // server in NOTLS mode with it), so it cannot be served.
                    if !self.fixed && self.config.tls == TlsMode::Required {
                        return self.fail(ProtocolError::TlsRequired(
                            "the client does not use fixed newstyle negotiation, \
                             so it cannot start TLS",
                        ));
                    }
                    self.state = State::Options;
                }
                State::Options => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(HandshakeStatus::NeedMore);
                    }
                    let magic = be_u64(input, 0);
                    if magic != IHAVEOPT {
                        return self.fail(ProtocolError::BadOptionMagic(magic));
                    }
                    let option = be_u32(input, 8);
                    let len = be_u32(input, 12);
                    if len > self.config.max_option_len {
                        if option != opt::EXPORT_NAME {
                            self.reply(option, rep::ERR_TOO_BIG, b"option too long");
                        }
                        return self.fail(ProtocolError::OptionTooLong {
                            option,
                            len,
                            cap: self.config.max_option_len,
                        });
                    }
                    let total = OPTION_HEADER_LEN + len as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Ok(HandshakeStatus::NeedMore);
                    }
                    input.advance(OPTION_HEADER_LEN);
                    let data = input.split_to(len as usize);
                    let replied_before = self.out.len();
                    match self.option(option, &data) {
                        Ok(None) => {}
                        Ok(Some(HandshakeStatus::StartTls)) => {
                            // The client may not send anything until it has
                            // seen the ACK; whatever it did send came in
                            // plaintext and must not be taken as if it had
                            // come over TLS. Only the ACK is withdrawn: the
                            // greeting and earlier replies stand.
                            if !input.is_empty() {
                                self.out.truncate(replied_before);
                                return self.fail(ProtocolError::DataAfterStartTls(input.len()));
                            }
                            return Ok(HandshakeStatus::StartTls);
                        }
                        Ok(Some(status)) => {
                            self.state = State::Over;
                            return Ok(status);
                        }
                        Err(e) => return self.fail(e),
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: ProtocolError) -> Result<HandshakeStatus, ProtocolError> {
        self.state = State::Over;
        Err(e)
    }

    fn reply(&mut self, option: u32, typ: u32, data: &[u8]) {
        self.out.reserve(20 + data.len());
        self.out.put_u64(REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(typ);
        self.out.put_u32(data.len() as u32);
        self.out.extend_from_slice(data);
    }

    fn lookup(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return if self.exports.is_empty() {
                None
            } else {
                Some(0)
            };
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    fn transmission_flags(&self) -> u16 {
        proto::server_transmission_flags(self.structured)
    }

    fn negotiated(&self, export: usize) -> Negotiated {
        Negotiated {
            export,
            size: self.exports[export].size,
            transmission_flags: self.transmission_flags(),
            structured_replies: self.structured,
        }
    }

    /// The effective TLS mode: a client without fixed newstyle negotiation
    /// gets NOTLS (the spec's rule).
    fn tls_mode(&self) -> TlsMode {
        if self.fixed {
            self.config.tls
        } else {
            TlsMode::Off
        }
    }

    fn starttls(&mut self, data: &[u8]) -> Option<HandshakeStatus> {
        let option = opt::STARTTLS;
        if !data.is_empty() {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"NBD_OPT_STARTTLS carries no data",
            );
            return None;
        }
        if self.tls_active {
            self.reply(option, rep::ERR_INVALID, b"TLS is already active");
            return None;
        }
        if self.tls_mode() == TlsMode::Off {
            let msg: &[u8] = if self.config.tls == TlsMode::Off {
                b"TLS is not enabled on this server"
            } else {
                b"TLS needs fixed newstyle negotiation"
            };
            self.reply(option, rep::ERR_POLICY, msg);
            return None;
        }
        self.reply(option, rep::ACK, &[]);
        self.tls_active = true;
        // Nothing negotiated in plaintext carries over into the TLS session.
        self.structured = false;
        Some(HandshakeStatus::StartTls)
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<HandshakeStatus>, ProtocolError> {
        if option == opt::STARTTLS {
            return Ok(self.starttls(data));
        }
        if self.tls_mode() == TlsMode::Required && !self.tls_active {
            match option {
                opt::ABORT => {}
                opt::EXPORT_NAME => {
                    return Err(ProtocolError::TlsRequired(
                        "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS",
                    ));
                }
                _ => {
                    self.tls_refused = true;
                    self.reply(
                        option,
                        rep::ERR_TLS_REQD,
                        b"this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    return Ok(None);
                }
            }
        }
        match option {
            opt::EXPORT_NAME => {
                let Some(idx) = self.lookup(data) else {
                    return Err(ProtocolError::UnknownExport(
                        String::from_utf8_lossy(data).into_owned(),
                    ));
                };
                let n = self.negotiated(idx);
                self.out.put_u64(n.size);
                self.out.put_u16(n.transmission_flags);
                if !self.no_zeroes {
                    self.out.put_bytes(0, 124);
                }
                Ok(Some(HandshakeStatus::Transmission(n)))
            }
            opt::ABORT => {
                // Data, if any, is ignored as the spec recommends.
                self.reply(option, rep::ACK, &[]);
                Ok(Some(HandshakeStatus::Aborted))
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.reply(option, rep::ERR_INVALID, b"NBD_OPT_LIST carries no data");
                    return Ok(None);
                }
                for i in 0..self.exports.len() {
                    let e = &self.exports[i];
                    let mut d = BytesMut::with_capacity(4 + e.name.len() + e.description.len());
                    d.put_u32(e.name.len() as u32);
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    self.reply(option, rep::SERVER, &d);
                }
                self.reply(option, rep::ACK, &[]);
                Ok(None)
            }
            opt::INFO | opt::GO => Ok(self.info_or_go(option, data)),
            opt::STRUCTURED_REPLY => {
                if !self.config.structured_replies {
                    self.reply(option, rep::ERR_UNSUP, b"structured replies are disabled");
                } else if !data.is_empty() {
                    self.reply(
                        option,
                        rep::ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY carries no data",
                    );
                } else if self.structured {
                    self.reply(
                        option,
                        rep::ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]);
                }
                Ok(None)
            }
            _ => {
                self.reply(option, rep::ERR_UNSUP, b"option not supported");
                Ok(None)
            }
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Option<HandshakeStatus> {
        // name length (4), name, count (2), count x info type (2)
        if data.len() < 6 {
            self.reply(option, rep::ERR_INVALID, b"option data too short");
            return None;
        }
        let name_len = be_u32(data, 0) as usize;
        if name_len > data.len() - 6 {
            self.reply(option, rep::ERR_INVALID, b"export name overruns the option");
            return None;
        }
        let name = &data[4..4 + name_len];
        let rest = &data[4 + name_len..];
        let count = be_u16(rest, 0) as usize;
        let requests = &rest[2..];
        if requests.len() != count * 2 {
            self.reply(
                option,
                rep::ERR_INVALID,
                b"information request count does not match the option length",
            );
            return None;
        }
        let Some(idx) = self.lookup(name) else {
            // Echo at most 256 bytes of the name: replies carry short strings.
            let shown = String::from_utf8_lossy(&name[..name.len().min(256)]);
            let msg = format!("no export named {shown:?}");
            self.reply(option, rep::ERR_UNKNOWN, msg.as_bytes());
            return None;
        };
        let wants = |t: u16| requests.chunks_exact(2).any(|c| be_u16(c, 0) == t);
        let (want_name, want_desc) = (wants(info::NAME), wants(info::DESCRIPTION));

        let n = self.negotiated(idx);
        let export = self.exports[idx].clone();

        let mut d = BytesMut::with_capacity(16);
        d.put_u16(info::EXPORT);
        d.put_u64(n.size);
        d.put_u16(n.transmission_flags);
        self.reply(option, rep::INFO, &d);

        // Block sizes are always sent (the spec allows unrequested info); our
        // constraints are the defaults, so clients that ignore them are fine.
        d.clear();
        d.put_u16(info::BLOCK_SIZE);
        d.put_u32(1);
        d.put_u32(export.block_size.max(proto::PREFERRED_BLOCK_SIZE));
        d.put_u32(proto::MAX_PAYLOAD);
        self.reply(option, rep::INFO, &d);

        if want_name {
            d.clear();
            d.put_u16(info::NAME);
            d.extend_from_slice(export.name.as_bytes());
            self.reply(option, rep::INFO, &d);
        }
        if want_desc && !export.description.is_empty() {
            d.clear();
            d.put_u16(info::DESCRIPTION);
            d.extend_from_slice(export.description.as_bytes());
            self.reply(option, rep::INFO, &d);
        }
        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            Some(HandshakeStatus::Transmission(n))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::transmission_flags as tf;
    use proptest::prelude::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo {
                name: "vol0".into(),
                description: "first volume".into(),
                size: 1 << 20,
                block_size: 512,
            },
            ExportInfo {
                name: "vol1".into(),
                description: String::new(),
                size: 8 << 20,
                block_size: 4096,
            },
        ]
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// One parsed option reply: (option, type, data).
    fn parse_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert!(b.len() >= 20, "truncated reply");
            assert_eq!(be_u64(b, 0), REPLY_MAGIC);
            let len = be_u32(b, 16) as usize;
            out.push((be_u32(b, 8), be_u32(b, 12), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    fn started(flags: u32) -> Handshake {
        let mut hs = Handshake::new(exports(), HandshakeConfig::default());
        let g = hs.take_output();
        assert_eq!(&g[..], &greeting()[..]);
        let mut input = BytesMut::from(&flags.to_be_bytes()[..]);
        assert_eq!(hs.receive(&mut input), Ok(HandshakeStatus::NeedMore));
        assert!(input.is_empty());
        hs
    }

    fn feed(hs: &mut Handshake, bytes: &[u8]) -> Result<HandshakeStatus, ProtocolError> {
        let mut input = BytesMut::from(bytes);
        hs.receive(&mut input)
    }

    const BOTH: u32 = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;

    #[test]
    fn greeting_is_byte_exact() {
        let hs = Handshake::new(vec![], HandshakeConfig::default());
        assert!(hs.has_output());
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0x00, 0x03
            ]
        );
    }

    #[test]
    fn unknown_client_flags_end_the_handshake() {
        let mut hs = Handshake::new(exports(), HandshakeConfig::default());
        let r = feed(&mut hs, &4u32.to_be_bytes());
        assert_eq!(r, Err(ProtocolError::UnknownClientFlags(4)));
        assert!(hs.is_over());
        assert_eq!(feed(&mut hs, &[]), Err(ProtocolError::HandshakeOver));
    }

    #[test]
    fn go_with_block_size_enters_transmission() {
        let mut hs = started(BOTH);
        let r = feed(
            &mut hs,
            &option(opt::GO, &go_data("vol1", &[info::BLOCK_SIZE, info::NAME])),
        );
        let flags = tf::HAS_FLAGS
            | tf::SEND_FLUSH
            | tf::SEND_FUA
            | tf::SEND_TRIM
            | tf::SEND_WRITE_ZEROES
            | tf::CAN_MULTI_CONN;
        assert_eq!(
            r,
            Ok(HandshakeStatus::Transmission(Negotiated {
                export: 1,
                size: 8 << 20,
                transmission_flags: flags,
                structured_replies: false,
            }))
        );
        let replies = parse_replies(&hs.take_output());
        assert_eq!(replies.len(), 4);
        let mut export = vec![0, 0];
        export.extend_from_slice(&(8u64 << 20).to_be_bytes());
        export.extend_from_slice(&flags.to_be_bytes());
        assert_eq!(replies[0], (opt::GO, rep::INFO, export));
        let mut bs = vec![0, 3];
        bs.extend_from_slice(&1u32.to_be_bytes());
        bs.extend_from_slice(&4096u32.to_be_bytes());
        bs.extend_from_slice(&(32u32 << 20).to_be_bytes());
        assert_eq!(replies[1], (opt::GO, rep::INFO, bs));
        assert_eq!(replies[2], (opt::GO, rep::INFO, b"\x00\x01vol1".to_vec()));
        assert_eq!(replies[3], (opt::GO, rep::ACK, vec![]));
        assert_eq!(feed(&mut hs, &[]), Err(ProtocolError::HandshakeOver));
    }

    #[test]
    fn info_then_go_default_export_with_structured_replies() {
        let mut hs = started(BOTH);
        assert_eq!(
            feed(&mut hs, &option(opt::STRUCTURED_REPLY, &[])),
            Ok(HandshakeStatus::NeedMore)
        );
        assert_eq!(
            parse_replies(&hs.take_output()),
            vec![(opt::STRUCTURED_REPLY, rep::ACK, vec![])]
        );
        // A second request is refused but harmless.
        feed(&mut hs, &option(opt::STRUCTURED_REPLY, &[])).unwrap();
        assert_eq!(parse_replies(&hs.take_output())[0].1, rep::ERR_INVALID);

        assert_eq!(
            feed(
                &mut hs,
                &option(opt::INFO, &go_data("", &[info::DESCRIPTION]))
            ),
            Ok(HandshakeStatus::NeedMore)
        );
        let replies = parse_replies(&hs.take_output());
        assert_eq!(replies.len(), 4);
        let flags = u16::from_be_bytes([replies[0].2[10], replies[0].2[11]]);
        assert_ne!(flags & tf::SEND_DF, 0);
        assert_eq!(
            replies[2],
            (opt::INFO, rep::INFO, b"\x00\x02first volume".to_vec())
        );
        assert_eq!(replies[3].1, rep::ACK);

        match feed(&mut hs, &option(opt::GO, &go_data("", &[]))) {
            Ok(HandshakeStatus::Transmission(n)) => {
                assert_eq!(n.export, 0);
                assert!(n.structured_replies);
                assert_eq!(n.transmission_flags, flags);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn go_to_unknown_export_is_an_error_reply_not_a_disconnect() {
        let mut hs = started(BOTH);
        assert_eq!(
            feed(&mut hs, &option(opt::GO, &go_data("nope", &[]))),
            Ok(HandshakeStatus::NeedMore)
        );
        let replies = parse_replies(&hs.take_output());
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, rep::ERR_UNKNOWN);
        // Still negotiating.
        assert!(matches!(
            feed(&mut hs, &option(opt::GO, &go_data("vol0", &[]))),
            Ok(HandshakeStatus::Transmission(_))
        ));
    }

    #[test]
    fn malformed_go_gets_err_invalid() {
        let mut hs = started(BOTH);
        // Name length overruns.
        let mut d = go_data("vol0", &[]);
        d[3] = 200;
        feed(&mut hs, &option(opt::GO, &d)).unwrap();
        // Count does not match.
        let mut d = go_data("vol0", &[info::NAME]);
        d.push(0);
        feed(&mut hs, &option(opt::GO, &d)).unwrap();
        // Too short.
        feed(&mut hs, &option(opt::INFO, &[0, 0, 0])).unwrap();
        let types: Vec<u32> = parse_replies(&hs.take_output())
            .iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(types, vec![rep::ERR_INVALID; 3]);
    }

    #[test]
    fn list_names_every_export() {
        let mut hs = started(BOTH);
        feed(&mut hs, &option(opt::LIST, &[])).unwrap();
        let replies = parse_replies(&hs.take_output());
        assert_eq!(
            replies,
            vec![
                (
                    opt::LIST,
                    rep::SERVER,
                    b"\x00\x00\x00\x04vol0first volume".to_vec()
                ),
                (opt::LIST, rep::SERVER, b"\x00\x00\x00\x04vol1".to_vec()),
                (opt::LIST, rep::ACK, vec![]),
            ]
        );
        feed(&mut hs, &option(opt::LIST, b"x")).unwrap();
        assert_eq!(parse_replies(&hs.take_output())[0].1, rep::ERR_INVALID);
    }

    #[test]
    fn abort_is_acked() {
        let mut hs = started(BOTH);
        assert_eq!(
            feed(&mut hs, &option(opt::ABORT, &[])),
            Ok(HandshakeStatus::Aborted)
        );
        assert_eq!(
            parse_replies(&hs.take_output()),
            vec![(opt::ABORT, rep::ACK, vec![])]
        );
    }

    #[test]
    fn unknown_options_are_unsupported() {
        let mut hs = started(BOTH);
        for o in [
            opt::SET_META_CONTEXT,
            opt::LIST_META_CONTEXT,
            opt::EXTENDED_HEADERS,
            999,
        ] {
            feed(&mut hs, &option(o, b"abc")).unwrap();
            let r = parse_replies(&hs.take_output());
            assert_eq!((r[0].0, r[0].1), (o, rep::ERR_UNSUP));
        }
    }

    #[test]
    fn structured_replies_can_be_disabled() {
        let cfg = HandshakeConfig {
            structured_replies: false,
            ..HandshakeConfig::default()
        };
        let mut hs = Handshake::new(exports(), cfg);
        hs.take_output();
        feed(&mut hs, &BOTH.to_be_bytes()).unwrap();
        feed(&mut hs, &option(opt::STRUCTURED_REPLY, &[])).unwrap();
        assert_eq!(parse_replies(&hs.take_output())[0].1, rep::ERR_UNSUP);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, zeroes) in [(BOTH, 0), (client_flags::FIXED_NEWSTYLE, 124), (0, 124)] {
            let mut hs = started(flags);
            let r = feed(&mut hs, &option(opt::EXPORT_NAME, b"vol0"));
            assert!(matches!(r, Ok(HandshakeStatus::Transmission(ref n)) if n.export == 0));
            let out = hs.take_output();
            assert_eq!(out.len(), 10 + zeroes);
            assert_eq!(be_u64(&out, 0), 1 << 20);
            assert!(out[10..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn export_name_unknown_drops() {
        let mut hs = started(BOTH);
        assert_eq!(
            feed(&mut hs, &option(opt::EXPORT_NAME, b"zzz")),
            Err(ProtocolError::UnknownExport("zzz".into()))
        );
        assert!(!hs.has_output());
    }

    #[test]
    fn empty_name_without_exports_is_unknown() {
        let mut hs = Handshake::new(vec![], HandshakeConfig::default());
        hs.take_output();
        feed(&mut hs, &BOTH.to_be_bytes()).unwrap();
        feed(&mut hs, &option(opt::GO, &go_data("", &[]))).unwrap();
        assert_eq!(parse_replies(&hs.take_output())[0].1, rep::ERR_UNKNOWN);
    }

    #[test]
    fn bad_option_magic_and_oversized_options_drop() {
        let mut hs = started(BOTH);
        let mut o = option(opt::LIST, &[]);
        o[0] ^= 1;
        assert!(matches!(
            feed(&mut hs, &o),
            Err(ProtocolError::BadOptionMagic(_))
        ));

        let mut hs = started(BOTH);
        // Only the header is needed to refuse an oversized option.
        let o = option(opt::INFO, &[]);
        let mut header = o[..16].to_vec();
        header[12..16].copy_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(matches!(
            feed(&mut hs, &header),
            Err(ProtocolError::OptionTooLong { len, .. }) if len == 1 << 20
        ));
        assert_eq!(parse_replies(&hs.take_output())[0].1, rep::ERR_TOO_BIG);
    }

    #[test]
    fn bytes_after_go_stay_in_the_buffer() {
        let mut hs = started(BOTH);
        let mut input = BytesMut::new();
        input.extend_from_slice(&option(opt::GO, &go_data("vol0", &[])));
        input.extend_from_slice(b"transmission bytes");
        assert!(matches!(
            hs.receive(&mut input),
            Ok(HandshakeStatus::Transmission(_))
        ));
        assert_eq!(&input[..], b"transmission bytes");
    }

    fn started_tls(flags: u32, tls: TlsMode) -> Handshake {
        let cfg = HandshakeConfig {
            tls,
            ..HandshakeConfig::default()
        };
        let mut hs = Handshake::new(exports(), cfg);
        hs.take_output();
        assert_eq!(
            feed(&mut hs, &flags.to_be_bytes()),
            Ok(HandshakeStatus::NeedMore)
        );
        hs
    }

    /// The reply types to one option.
    fn types_of(hs: &mut Handshake, code: u32, data: &[u8]) -> Vec<u32> {
        feed(hs, &option(code, data)).expect("option is answered");
        parse_replies(&hs.take_output())
            .iter()
            .map(|r| {
                assert_eq!(r.0, code);
                r.1
            })
            .collect()
    }

    #[test]
    fn starttls_without_tls_is_refused_by_policy() {
        let mut hs = started(BOTH);
        assert_eq!(types_of(&mut hs, opt::STARTTLS, &[]), [rep::ERR_POLICY]);
        assert_eq!(types_of(&mut hs, opt::STARTTLS, b"x"), [rep::ERR_INVALID]);
        // Negotiation goes on in plaintext.
        assert!(!hs.tls_active());
        assert!(matches!(
            feed(&mut hs, &option(opt::GO, &go_data("vol0", &[]))),
            Ok(HandshakeStatus::Transmission(_))
        ));
    }

    #[test]
    fn starttls_is_acked_once_and_negotiation_restarts() {
        for mode in [TlsMode::Allowed, TlsMode::Required] {
            let mut hs = started_tls(BOTH, mode);
            if mode == TlsMode::Allowed {
                // Structured replies negotiated in plaintext...
                assert_eq!(types_of(&mut hs, opt::STRUCTURED_REPLY, &[]), [rep::ACK]);
            }
            assert_eq!(types_of(&mut hs, opt::STARTTLS, b"x"), [rep::ERR_INVALID]);
            assert_eq!(
                feed(&mut hs, &option(opt::STARTTLS, &[])),
                Ok(HandshakeStatus::StartTls)
            );
            assert_eq!(
                parse_replies(&hs.take_output()),
                vec![(opt::STARTTLS, rep::ACK, vec![])]
            );
            assert!(hs.tls_active() && !hs.is_over());
            // Over TLS: a second STARTTLS is invalid, nothing is TLS_REQD.
            assert_eq!(types_of(&mut hs, opt::STARTTLS, &[]), [rep::ERR_INVALID]);
            assert_eq!(
                types_of(&mut hs, opt::LIST, &[]),
                [rep::SERVER, rep::SERVER, rep::ACK]
            );
            // ...are forgotten over TLS.
            match feed(&mut hs, &option(opt::GO, &go_data("vol1", &[]))) {
                Ok(HandshakeStatus::Transmission(n)) => {
                    assert_eq!(n.export, 1);
                    assert!(!n.structured_replies);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn tls_allowed_serves_plaintext_clients() {
        let mut hs = started_tls(BOTH, TlsMode::Allowed);
        assert_eq!(
            types_of(&mut hs, opt::LIST, &[]),
            [rep::SERVER, rep::SERVER, rep::ACK]
        );
        assert!(matches!(
            feed(&mut hs, &option(opt::EXPORT_NAME, b"vol0")),
            Ok(HandshakeStatus::Transmission(_))
        ));
        assert!(!hs.tls_active());
    }

    #[test]
    fn tls_required_refuses_every_option_before_starttls() {
        let mut hs = started_tls(BOTH, TlsMode::Required);
        for (code, data) in [
            (opt::LIST, vec![]),
            (opt::INFO, go_data("vol0", &[])),
            (opt::GO, go_data("vol0", &[])),
            (opt::GO, go_data("nope", &[])),
            (opt::STRUCTURED_REPLY, vec![]),
            (opt::SET_META_CONTEXT, b"abc".to_vec()),
            (999, b"junk".to_vec()),
        ] {
            assert_eq!(
                types_of(&mut hs, code, &data),
                [rep::ERR_TLS_REQD],
                "{code}"
            );
        }
        assert!(hs.refused_for_tls());
        // EXPORT_NAME cannot be refused with a reply: the connection ends.
        assert_eq!(
            feed(&mut hs, &option(opt::EXPORT_NAME, b"vol0")),
            Err(ProtocolError::TlsRequired(
                "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS"
            ))
        );
        assert!(!hs.has_output() && hs.is_over());
        // ABORT is still honoured.
        let mut hs = started_tls(BOTH, TlsMode::Required);
        assert_eq!(
            feed(&mut hs, &option(opt::ABORT, &[])),
            Ok(HandshakeStatus::Aborted)
        );
        assert_eq!(parse_replies(&hs.take_output())[0].1, rep::ACK);
    }

    #[test]
    fn tls_needs_fixed_newstyle() {
        // FORCEDTLS cannot serve a client that can never upgrade.
        let mut hs = Handshake::new(
            exports(),
            HandshakeConfig {
                tls: TlsMode::Required,
                ..HandshakeConfig::default()
            },
        );
        hs.take_output();
        assert!(matches!(
            feed(&mut hs, &client_flags::NO_ZEROES.to_be_bytes()),
            Err(ProtocolError::TlsRequired(_))
        ));
        // With TLS optional such a client is in NOTLS mode.
        let mut hs = started_tls(client_flags::NO_ZEROES, TlsMode::Allowed);
        assert_eq!(types_of(&mut hs, opt::STARTTLS, &[]), [rep::ERR_POLICY]);
    }

    #[test]
    fn plaintext_after_starttls_ends_the_connection() {
        let mut hs = started_tls(BOTH, TlsMode::Required);
        let mut input = BytesMut::new();
        input.extend_from_slice(&option(opt::STARTTLS, &[]));
        input.extend_from_slice(&option(opt::GO, &go_data("vol0", &[])));
        let extra = input.len() - OPTION_HEADER_LEN;
        assert_eq!(
            hs.receive(&mut input),
            Err(ProtocolError::DataAfterStartTls(extra))
        );
        // No ACK goes out: the client is not told to start TLS.
        assert!(!hs.has_output() && hs.is_over());
    }

    #[test]
    fn plaintext_after_starttls_withdraws_only_the_ack() {
        // The greeting and an earlier option's reply are still unsent when
        // STARTTLS arrives with plaintext behind it (found by proptest):
        // they stay; only the ACK is taken back.
        let mut hs = Handshake::new(
            exports(),
            HandshakeConfig {
                tls: TlsMode::Allowed,
                ..HandshakeConfig::default()
            },
        );
        let mut input = BytesMut::from(&BOTH.to_be_bytes()[..]);
        input.extend_from_slice(&option(opt::STRUCTURED_REPLY, &[]));
        input.extend_from_slice(&option(opt::STARTTLS, &[]));
        input.extend_from_slice(&option(opt::LIST, &[]));
        assert!(matches!(
            hs.receive(&mut input),
            Err(ProtocolError::DataAfterStartTls(_))
        ));
        let out = hs.take_output();
        assert_eq!(&out[..GREETING_LEN], &greeting()[..]);
        let replies = parse_replies(&out[GREETING_LEN..]);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, rep::ACK);
    }

    /// The whole client side of a session: flags, LIST, INFO, STRUCTURED, GO.
    fn session() -> Vec<u8> {
        let mut v = BOTH.to_be_bytes().to_vec();
        v.extend(option(opt::LIST, &[]));
        v.extend(option(opt::INFO, &go_data("vol1", &[info::BLOCK_SIZE])));
        v.extend(option(opt::STRUCTURED_REPLY, &[]));
        v.extend(option(999, b"junk"));
        v.extend(option(opt::GO, &go_data("vol1", &[])));
        v
    }

    fn run_in_pieces(pieces: &[&[u8]]) -> (Vec<HandshakeStatus>, Vec<u8>) {
        let mut hs = Handshake::new(exports(), HandshakeConfig::default());
        let mut out = hs.take_output().to_vec();
        let mut input = BytesMut::new();
        let mut statuses = Vec::new();
        for p in pieces {
            input.extend_from_slice(p);
            let st = hs.receive(&mut input).expect("valid session");
            out.extend_from_slice(&hs.take_output());
            let done = st != HandshakeStatus::NeedMore;
            statuses.push(st);
            if done {
                break;
            }
        }
        (statuses, out)
    }

    fn arb_option() -> impl Strategy<Value = Vec<u8>> {
        let code = prop_oneof![1u32..12, any::<u32>()];
        let data = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            ("[a-z0-9]{0,6}", proptest::collection::vec(0u16..5, 0..4))
                .prop_map(|(n, i)| go_data(&n, &i)),
        ];
        (code, data, any::<bool>(), any::<u8>()).prop_map(|(code, data, corrupt, at)| {
            let mut o = option(code, &data);
            if corrupt {
                let i = at as usize % o.len();
                o[i] ^= 0x5a;
            }
            o
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300),
                                       cut in any::<usize>()) {
            let mut hs = Handshake::new(exports(), HandshakeConfig::default());
            let mut input = BytesMut::new();
            let cut = cut % (data.len() + 1);
            for piece in [&data[..cut], &data[cut..]] {
                input.extend_from_slice(piece);
                let before = input.len();
                match hs.receive(&mut input) {
                    Ok(HandshakeStatus::NeedMore) => prop_assert!(input.len() <= before),
                    Ok(_) | Err(_) => break,
                }
            }
        }

        #[test]
        fn arbitrary_option_sequences_never_panic(flags in 0u32..4,
                                                  mode in 0usize..3,
                                                  opts in proptest::collection::vec(arb_option(), 0..6)) {
            let tls = [TlsMode::Off, TlsMode::Allowed, TlsMode::Required][mode];
            let cfg = HandshakeConfig { tls, ..HandshakeConfig::default() };
            let mut hs = Handshake::new(exports(), cfg);
            let mut input = BytesMut::from(&flags.to_be_bytes()[..]);
            for o in &opts {
                input.extend_from_slice(o);
            }
            // receive() consumes everything it can in one call (up to a
            // STARTTLS, after which the caller upgrades the stream).
            let status = hs.receive(&mut input);
            match status {
                Ok(HandshakeStatus::NeedMore) => {}
                Ok(HandshakeStatus::StartTls) => {
                    prop_assert!(!hs.is_over());
                    prop_assert!(hs.tls_active());
                    prop_assert!(input.is_empty());
                }
                _ => prop_assert!(hs.is_over()),
            }
            if tls != TlsMode::Required && status.is_ok() {
                // Only FORCEDTLS refuses anything with TLS_REQD.
                let out = hs.take_output();
                if !matches!(status, Ok(HandshakeStatus::Transmission(_))) {
                    prop_assert!(parse_replies(&out[GREETING_LEN..])
                        .iter()
                        .all(|r| r.1 != rep::ERR_TLS_REQD));
                }
                return Ok(());
            }
            // After the greeting, the output is a well-formed sequence of
            // option replies, unless EXPORT_NAME ended the negotiation.
            let out = hs.take_output();
            prop_assert_eq!(&out[..GREETING_LEN], &greeting()[..]);
            if !matches!(status, Ok(HandshakeStatus::Transmission(_))) {
                parse_replies(&out[GREETING_LEN..]);
            }
        }
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let s = session();
        let (whole, whole_out) = run_in_pieces(&[&s]);
        assert!(matches!(
            whole.last(),
            Some(HandshakeStatus::Transmission(n)) if n.export == 1 && n.structured_replies
        ));
        for cut in 0..s.len() {
            let (st, out) = run_in_pieces(&[&s[..cut], &s[cut..]]);
            assert_eq!(st.last(), whole.last(), "cut at {cut}");
            assert_eq!(out, whole_out, "cut at {cut}");
        }
        // And byte by byte.
        let pieces: Vec<&[u8]> = s.chunks(1).collect();
        let (st, out) = run_in_pieces(&pieces);
        assert_eq!(st.last(), whole.last());
        assert_eq!(out, whole_out);
    }
}
