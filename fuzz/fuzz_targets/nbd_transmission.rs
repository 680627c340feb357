//! Fuzz target: the NBD transmission phase (`corral_nbd::transmission`).
//! Owns the checks that any request stream never panics the sans-IO
//! decoder, that pieces decode exactly as the whole (check-then-parse),
//! that every request it lets through is in range and within the payload
//! cap, that request headers round-trip, and that the reply encoder frames
//! every reply (including long, non-ASCII error messages) correctly.
//!
//! Input: one config byte (bit 0 structured replies, bits 1-2 the export
//! size, bit 3 a 64 KiB payload cap instead of 32 MiB), four piece sizes,
//! then the client's byte stream.
#![no_main]

use bytes::BytesMut;
use corral_fuzz::{Input, pieces};
use corral_nbd::proto::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use corral_nbd::{
    Command, Decoded, ProtocolError, Reply, ReplyEncoder, RequestDecoder, RequestHeader,
};
use libfuzzer_sys::fuzz_target;

const SIZES: [u64; 4] = [0, 4096, 1 << 20, (1 << 62) + 512];

#[derive(Debug, PartialEq)]
struct Run {
    items: Vec<Decoded>,
    error: Option<ProtocolError>,
    leftover: Vec<u8>,
}

/// Decode like the server: until more input is needed, an error, a
/// disconnect, or a reject that closes the connection.
fn run(decoder: &RequestDecoder, stream: &[&[u8]]) -> Run {
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut fed = 0;
    'feed: for piece in stream {
        buf.extend_from_slice(piece);
        fed += 1;
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Ok(Some(item)) => {
                    assert!(buf.len() < before, "an item consumed nothing");
                    let stop = matches!(
                        item,
                        Decoded::Disconnect | Decoded::Reject { close: true, .. }
                    );
                    items.push(item);
                    if stop {
                        break 'feed;
                    }
                }
                Err(e) => {
                    let mut leftover = buf.to_vec();
                    for piece in &stream[fed..] {
                        leftover.extend_from_slice(piece);
                    }
                    return Run {
                        items,
                        error: Some(e),
                        leftover,
                    };
                }
            }
        }
    }
    let mut leftover = buf.to_vec();
    for piece in &stream[fed..] {
        leftover.extend_from_slice(piece);
    }
    Run {
        items,
        error: None,
        leftover,
    }
}

fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let config = input.u8();
    let structured = config & 1 != 0;
    let size = SIZES[usize::from(config >> 1) & 3];
    let mut decoder = RequestDecoder::new(size, structured);
    if config & 8 != 0 {
        decoder = decoder.with_max_payload(64 << 10);
    }
    let cap = decoder.max_payload();
    let sizes = input.bytes(4).to_vec();
    let stream = input.rest();

    if let Ok(Some(h)) = RequestHeader::parse(stream) {
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(RequestHeader::parse(&b), Ok(Some(h)));
        assert_eq!(&b[..], &stream[..b.len()]);
    }

    let whole = run(&decoder, &[stream]);
    let split = run(&decoder, &pieces(stream, &sizes));
    assert_eq!(whole, split);

    let encoder = ReplyEncoder::new(structured);
    for item in &whole.items {
        let reply = match item {
            Decoded::Request(req) => match &req.command {
                Command::Read { offset, len } => {
                    assert!(*len <= cap);
                    assert!(in_range(*offset, u64::from(*len), size));
                    Reply::Data {
                        cookie: req.cookie,
                        offset: *offset,
                        data: vec![0xa5; (*len).min(4096) as usize].into(),
                    }
                }
                Command::Write { offset, data, .. } => {
                    assert!(data.len() as u64 <= u64::from(cap));
                    assert!(in_range(*offset, data.len() as u64, size));
                    Reply::Done { cookie: req.cookie }
                }
                Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
                    assert!(in_range(*offset, u64::from(*len), size));
                    Reply::Done { cookie: req.cookie }
                }
                Command::Flush => Reply::Done { cookie: req.cookie },
            },
            Decoded::Reject {
                cookie,
                errno,
                read,
                reason,
                ..
            } => Reply::Error {
                cookie: *cookie,
                errno: *errno,
                read: *read,
                // Long and multi-byte: the encoder must cut on a char boundary.
                message: format!("{reason} é").repeat((*cookie % 512) as usize),
            },
            Decoded::Disconnect => continue,
        };
        let mut out = BytesMut::new();
        let payload = encoder.encode(&reply, &mut out);
        let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
        if magic == SIMPLE_REPLY_MAGIC {
            assert_eq!(out.len(), 16);
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            assert!(structured);
            let len = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
            let extra = payload.as_ref().map_or(0, |p| p.len());
            assert_eq!(out.len() - 20 + extra, len, "chunk length field");
            if let Reply::Error { .. } = reply {
                let msg_len = usize::from(u16::from_be_bytes([out[24], out[25]]));
                assert_eq!(msg_len, len - 6);
                assert!(std::str::from_utf8(&out[26..]).is_ok());
            }
        }
    }
});
