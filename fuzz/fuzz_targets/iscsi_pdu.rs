//! Fuzz target: the iSCSI PDU codec (`corral_iscsi::pdu`). Owns the checks
//! that decoding arbitrary bytes never panics, consumes nothing until a
//! whole PDU is buffered, consumes exactly `wire_len` bytes per PDU, and
//! that every decoded PDU re-encodes to bytes that decode to the same PDU;
//! text data segments must round-trip through `TextParams` too.
//!
//! Input: one config byte (bit 0 HeaderDigest, bit 1 DataDigest, bits 2-3
//! the receive limit), then the byte stream an initiator sends.
#![no_main]

use bytes::BytesMut;
use corral_fuzz::Input;
use corral_iscsi::pdu::{Digests, PduCodec, PduError};
use corral_iscsi::text::TextParams;
use libfuzzer_sys::fuzz_target;

const LIMITS: [u32; 4] = [512, 8192, 256 << 10, 0x00ff_ffff];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let config = input.u8();
    let mut codec = PduCodec::new(LIMITS[usize::from(config >> 2) & 3]);
    codec.digests = Digests {
        header: config & 1 != 0,
        data: config & 2 != 0,
    };
    let mut buf = BytesMut::from(input.rest());
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                break;
            }
            Ok(Some(pdu)) => {
                assert_eq!(before - buf.len(), pdu.wire_len(codec.digests));
                assert_eq!(pdu.data_segment_len() as usize, pdu.data.len());
                assert_eq!(pdu.total_ahs_len(), pdu.ahs.len());
                let mut wire = BytesMut::new();
                codec.encode(&pdu, &mut wire);
                assert_eq!(wire.len(), pdu.wire_len(codec.digests));
                let again = codec
                    .decode(&mut wire)
                    .expect("a re-encoded PDU decodes")
                    .expect("a re-encoded PDU is complete");
                assert!(wire.is_empty());
                assert_eq!(again, pdu);
                if let Ok(text) = TextParams::parse(&pdu.data) {
                    assert_eq!(TextParams::parse(&text.encode()), Ok(text));
                }
            }
            // Its bytes are consumed; the connection answers with a Reject.
            Err(PduError::DataDigest { .. }) => assert!(buf.len() < before),
            // The connection closes.
            Err(_) => break,
        }
    }
});
