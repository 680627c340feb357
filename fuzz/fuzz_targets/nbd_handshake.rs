//! Fuzz target: the NBD fixed newstyle handshake (`corral_nbd::handshake`).
//! Owns the checks that any client byte stream never panics the sans-IO
//! state machine, that delivering the same bytes in arbitrary pieces gives
//! the same outcome, output and leftover as delivering them at once
//! (check-then-parse), that the output is a well-framed sequence of option
//! replies, and that a negotiated export is one that was offered.
//!
//! Input: one config byte (bit 0 structured replies allowed, bits 1-2 how
//! many exports), four piece sizes, then the client's byte stream.
#![no_main]

use bytes::{Bytes, BytesMut};
use corral_fuzz::{Input, pieces};
use corral_nbd::proto::{GREETING_LEN, REPLY_MAGIC};
use corral_nbd::{ExportInfo, Handshake, HandshakeConfig, HandshakeStatus, ProtocolError};
use libfuzzer_sys::fuzz_target;

struct Run {
    result: Result<HandshakeStatus, ProtocolError>,
    output: Vec<u8>,
    leftover: Vec<u8>,
}

fn exports(n: u8) -> Vec<ExportInfo> {
    (0..n)
        .map(|i| ExportInfo {
            name: format!("vol{i}"),
            description: if i == 1 {
                String::new()
            } else {
                format!("volume {i}")
            },
            size: (1u64 << 20) << i,
            block_size: if i == 2 { 4096 } else { 512 },
        })
        .collect()
}

fn run(exports: Vec<ExportInfo>, config: &HandshakeConfig, stream: &[&[u8]]) -> Run {
    let mut hs = Handshake::new(exports, config.clone());
    let mut output = hs.take_output().to_vec();
    let mut buf = BytesMut::new();
    let mut result = Ok(HandshakeStatus::NeedMore);
    let mut fed = 0;
    for piece in stream {
        buf.extend_from_slice(piece);
        fed += 1;
        result = hs.receive(&mut buf);
        output.extend_from_slice(&hs.take_output());
        if result != Ok(HandshakeStatus::NeedMore) {
            assert!(hs.is_over(), "{result:?} but the handshake goes on");
            break;
        }
    }
    let mut leftover = buf.to_vec();
    for piece in &stream[fed..] {
        leftover.extend_from_slice(piece);
    }
    Run {
        result,
        output,
        leftover,
    }
}

/// Check the output's framing: the greeting, option replies, and at most
/// one final `NBD_OPT_EXPORT_NAME` answer (size, flags, maybe 124 zeroes).
fn check_output(out: &[u8], transmission: bool) {
    assert!(out.len() >= GREETING_LEN);
    let mut rest = Bytes::copy_from_slice(&out[GREETING_LEN..]);
    while rest.len() >= 8 && rest[..8] == REPLY_MAGIC.to_be_bytes() {
        assert!(rest.len() >= 20, "truncated option reply");
        let len = u32::from_be_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
        assert!(rest.len() >= 20 + len, "option reply overruns the output");
        rest = rest.slice(20 + len..);
    }
    if !rest.is_empty() {
        assert!(transmission, "stray output: {rest:?}");
        assert!(
            rest.len() == 10 || rest.len() == 134,
            "export-name reply of {}",
            rest.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let sizes = input.bytes(4).to_vec();
    let stream = input.rest();
    let config = HandshakeConfig {
        structured_replies: flags & 1 != 0,
        ..HandshakeConfig::default()
    };
    let n = (flags >> 1) & 3;
    let whole = run(exports(n), &config, &[stream]);
    let split = run(exports(n), &config, &pieces(stream, &sizes));
    assert_eq!(whole.result, split.result);
    assert_eq!(whole.output, split.output);
    assert_eq!(whole.leftover, split.leftover);
    let transmission = matches!(whole.result, Ok(HandshakeStatus::Transmission(_)));
    if let Ok(HandshakeStatus::Transmission(neg)) = &whole.result {
        let offered = exports(n);
        let e = offered
            .get(neg.export)
            .expect("a negotiated export was offered");
        assert_eq!(neg.size, e.size);
    }
    check_output(&whole.output, transmission);
});
