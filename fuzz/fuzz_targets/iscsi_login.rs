//! Fuzz target: iSCSI login negotiation (`corral_iscsi::login`). Owns the
//! checks that a stream of Login Request PDUs never panics the state
//! machine, that every response is a Login Response whose text is
//! well-formed (no repeated keys), that a login completes into a CHAP
//! target only after a correct CHAP response, that mutual CHAP answers
//! are correct, and that negotiated parameters stay within our limits and
//! match what the target declared.
//!
//! Input: one byte picking the CHAP seed, then the initiator's byte stream
//! (decoded with the login phase's PDU codec). A `CHAP_R=auto` key is
//! replaced with the right answer to the target's last challenge, so the
//! fuzzer reaches the operational stage of CHAP targets.
#![no_main]

use bytes::{Bytes, BytesMut};
use corral_fuzz::{Input, login};
use corral_iscsi::chap;
use corral_iscsi::login::{LoginNegotiation, LoginStep, SessionType};
use corral_iscsi::pdu::{PduCodec, PduError, op};
use corral_iscsi::text::TextParams;
use libfuzzer_sys::fuzz_target;

/// A CHAP_I value as RFC 7143 numbers are written: decimal or `0x` hex.
fn number(v: &str) -> Option<u8> {
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => v.parse::<u64>().ok()?,
    };
    u8::try_from(n).ok()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let seed = u64::from(input.u8()) * 0x0123_4567_89ab;
    let config = login::config();
    let mut neg = LoginNegotiation::new(config.clone(), seed);
    let codec = PduCodec::new(64 << 10);
    let mut buf = BytesMut::from(input.rest());
    // The target's last challenge (CHAP_I, CHAP_C), and whether the
    // initiator has given a right answer to one.
    let mut challenge: Option<(u8, Vec<u8>)> = None;
    let mut answered = false;
    // The MaxRecvDataSegmentLength the target declared, if it did.
    let mut declared: Option<u32> = None;
    loop {
        let mut pdu = match codec.decode(&mut buf) {
            Ok(Some(pdu)) => pdu,
            Ok(None) => break,
            Err(PduError::DataDigest { .. }) => continue,
            Err(_) => break,
        };
        // The initiator's own challenge, for checking a mutual answer.
        let mut mutual_challenge: Option<(u8, Vec<u8>)> = None;
        if pdu.opcode() == op::LOGIN_REQUEST
            && let Ok(mut text) = TextParams::parse(&pdu.data)
        {
            if text.get("CHAP_R") == Some(login::AUTO_RESPONSE)
                && let Some((id, c)) = &challenge
            {
                let r = chap::chap_response(*id, login::CHAP_SECRET.as_bytes(), c);
                for (k, v) in &mut text.pairs {
                    if k == "CHAP_R" {
                        *v = chap::to_hex(&r);
                    }
                }
                pdu.data = Bytes::from(text.encode());
                answered |= text.get("CHAP_N") == Some(login::CHAP_USER);
            }
            if let (Some(i), Some(c)) = (text.get("CHAP_I"), text.get("CHAP_C"))
                && let (Some(i), Some(c)) = (number(i), chap::decode_binary(c))
            {
                mutual_challenge = Some((i, c));
            }
        }
        let step = neg.receive(&pdu);
        let (resp, outcome, over) = match step {
            LoginStep::Continue(resp) => (resp, None, false),
            LoginStep::Complete(resp, outcome) => (resp, Some(outcome), true),
            LoginStep::Failed(resp) => (resp, None, true),
        };
        assert_eq!(resp.opcode(), op::LOGIN_RESPONSE);
        let reply = match TextParams::parse(&resp.data) {
            Ok(reply) => reply,
            Err(e) => panic!("login response text is malformed: {e}: {:?}", resp.data),
        };
        // A challenge comes with CHAP_A (in the operational stage, CHAP
        // keys are answered NotUnderstood instead).
        if reply.get("CHAP_A").is_some_and(|a| a != "NotUnderstood") {
            let i = reply.get("CHAP_I").and_then(number);
            let c = reply.get("CHAP_C").and_then(chap::decode_binary);
            challenge = Some((i.expect("CHAP_I is a number"), c.expect("CHAP_C is hex")));
        }
        // (A security-stage answer to the initiator's is NotUnderstood.)
        if let Some(Ok(m)) = reply.get("MaxRecvDataSegmentLength").map(str::parse) {
            declared = Some(m);
        }
        if let Some(r) = reply.get("CHAP_R").filter(|r| *r != "NotUnderstood") {
            let (i, c) = mutual_challenge.expect("CHAP_R only answers a challenge");
            let want = chap::chap_response(i, login::MUTUAL_SECRET.as_bytes(), &c);
            assert_eq!(chap::decode_binary(r), Some(want.to_vec()));
            assert_eq!(reply.get("CHAP_N"), Some(login::MUTUAL_USER));
        }
        if let Some(outcome) = outcome {
            assert_eq!(
                resp.flags() & 0x83,
                0x83,
                "a final response transits to FFP"
            );
            let p = outcome.params;
            assert!(p.first_burst <= p.max_burst);
            assert!(p.max_burst <= config.limits.max_burst);
            assert!(p.max_outstanding_r2t <= config.limits.max_outstanding_r2t);
            // What the target receives with is what it declared (or the
            // RFC 7143 default), and within its limit.
            assert_eq!(p.target_max_recv_data_segment, declared.unwrap_or(8192));
            assert!(p.target_max_recv_data_segment <= config.limits.max_recv_data_segment);
            assert!((512..=0x00ff_ffff).contains(&p.initiator_max_recv_data_segment));
            assert!(!outcome.initiator_name.is_empty());
            match outcome.session_type {
                SessionType::Discovery => assert_eq!(outcome.target, None),
                SessionType::Normal => {
                    let t = outcome.target.expect("a normal session names its target");
                    if config.targets[t].chap.is_some() {
                        assert!(answered, "logged into a CHAP target without answering");
                    }
                }
            }
        }
        if over {
            break;
        }
    }
});
