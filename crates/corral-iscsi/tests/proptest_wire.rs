//! Property tests (bounded case counts) of everything that parses bytes
//! from the network: the PDU codec, text parameters, the login
//! negotiation and the full feature phase. Arbitrary input must give a
//! typed error or a well-formed answer, never a panic.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use corral_iscsi::connection::{Action, FullFeature};
use corral_iscsi::login::{
    Limits, LoginConfig, LoginNegotiation, LoginStep, SessionParams, SessionType, TargetEntry,
};
use corral_iscsi::pdu::{BHS_LEN, Digests, Pdu, PduCodec, op};
use corral_iscsi::text::TextParams;
use proptest::prelude::*;

fn config() -> Arc<LoginConfig> {
    Arc::new(LoginConfig {
        targets: vec![TargetEntry {
            name: "iqn.2026-11.io.corral:p".into(),
            alias: None,
            chap: None,
        }],
        limits: Limits::default(),
        portal_group: 1,
    })
}

fn arb_pdu() -> impl Strategy<Value = Pdu> {
    (
        prop::sample::select(vec![0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10]),
        prop::collection::vec(any::<u8>(), BHS_LEN),
        prop::collection::vec(any::<u8>(), 0..3).prop_map(|v| v.len() * 4),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(opcode, raw, ahs_len, data)| {
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&raw);
            bhs[0] = (bhs[0] & 0x40) | opcode;
            Pdu {
                bhs,
                ahs: Bytes::from(vec![0x5a; ahs_len]),
                data: Bytes::from(data),
            }
        })
}

const KEYS: &[&str] = &[
    "InitiatorName",
    "TargetName",
    "SessionType",
    "AuthMethod",
    "HeaderDigest",
    "DataDigest",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "InitialR2T",
    "ImmediateData",
    "MaxOutstandingR2T",
    "ErrorRecoveryLevel",
    "MaxConnections",
    "DefaultTime2Wait",
    "CHAP_A",
    "CHAP_R",
    "X-weird",
];
const VALUES: &[&str] = &[
    "iqn.2026-11.io.corral:p",
    "Normal",
    "Discovery",
    "None",
    "CHAP",
    "CRC32C,None",
    "Yes",
    "No",
    "0",
    "1",
    "512",
    "262144",
    "99999999999",
    "0x10",
    "",
    "garbage",
];

fn arb_login() -> impl Strategy<Value = Pdu> {
    (
        any::<u8>(),
        any::<u16>(),
        prop::collection::vec(
            (prop::sample::select(KEYS), prop::sample::select(VALUES)),
            0..8,
        ),
    )
        .prop_map(|(flags, tsih, keys)| {
            let mut p = Pdu::new(op::LOGIN_REQUEST);
            p.set_immediate(true);
            p.bhs[1] = flags;
            p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
            p.set_u16(14, if tsih % 8 == 0 { tsih } else { 0 });
            let mut text = Vec::new();
            for (k, v) in keys {
                text.extend_from_slice(format!("{k}={v}\0").as_bytes());
            }
            p.data = Bytes::from(text);
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        header in any::<bool>(),
        data in any::<bool>(),
    ) {
        let mut codec = PduCodec::new(8192);
        codec.digests = Digests { header, data };
        let mut buf = BytesMut::from(&bytes[..]);
        // Decode until need-more or an error; each step consumes or stops.
        for _ in 0..64 {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn encode_then_decode_round_trips_in_any_split(
        pdu in arb_pdu(),
        header in any::<bool>(),
        data in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut codec = PduCodec::new(1 << 20);
        codec.digests = Digests { header, data };
        let mut wire = BytesMut::new();
        codec.encode(&pdu, &mut wire);
        prop_assert_eq!(wire.len(), pdu.wire_len(codec.digests));
        let at = cut.index(wire.len());
        let mut part = BytesMut::from(&wire[..at]);
        prop_assert_eq!(codec.decode(&mut part), Ok(None));
        let mut whole = wire.clone();
        let got = codec.decode(&mut whole).unwrap().unwrap();
        prop_assert!(whole.is_empty());
        prop_assert_eq!(&got.data, &pdu.data);
        prop_assert_eq!(&got.ahs[..], &pdu.ahs[..]);
        prop_assert_eq!(&got.bhs[8..], &pdu.bhs[8..]);
    }

    #[test]
    fn text_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(t) = TextParams::parse(&bytes) {
            prop_assert_eq!(TextParams::parse(&t.encode()).unwrap(), t);
        }
    }

    #[test]
    fn login_negotiation_answers_every_request(reqs in prop::collection::vec(arb_login(), 1..6)) {
        let mut n = LoginNegotiation::new(config(), 42);
        for r in &reqs {
            let resp = match n.receive(r) {
                LoginStep::Continue(p) => p,
                LoginStep::Complete(p, outcome) => {
                    prop_assert!(outcome.params.first_burst <= outcome.params.max_burst);
                    prop_assert_eq!(outcome.params.error_recovery_level, 0);
                    prop_assert_eq!(p.flags() & 0x83, 0x83);
                    break;
                }
                LoginStep::Failed(p) => {
                    prop_assert!(p.bhs[36] >= 2, "a failure has an error class");
                    break;
                }
            };
            prop_assert_eq!(resp.opcode(), op::LOGIN_RESPONSE);
            prop_assert_eq!(resp.bhs[36], 0);
            prop_assert!(TextParams::parse(&resp.data).is_ok());
        }
    }

    #[test]
    fn full_feature_phase_survives_arbitrary_pdus(pdus in prop::collection::vec(arb_pdu(), 1..24)) {
        let params = SessionParams { initial_r2t: false, ..SessionParams::default() };
        let mut ff = FullFeature::new(params, SessionType::Normal, 0, 16, vec![], None);
        for p in pdus {
            for a in ff.receive(p) {
                match a {
                    Action::Execute(cmd) => {
                        prop_assert!(cmd.data.len() as u64 <= u64::from(cmd.edtl));
                    }
                    Action::FailWrite(itt) => {
                        let r = ff.fail_write(itt);
                        prop_assert!(r.len() <= 1);
                    }
                    _ => {}
                }
            }
        }
    }
}
