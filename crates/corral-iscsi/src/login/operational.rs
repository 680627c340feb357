//! The operational stage of a login (RFC 7143 §6.2, §13): our answer to
//! each session and connection key the initiator offers, within our
//! [`Limits`], and the [`SessionParams`] that result.

use super::{Limits, SessionParams, login_status, parse_bool, parse_num, yes_no};
use crate::text::TextParams;

/// Answer the operational keys of one Login Request into `reply`, updating
/// the negotiated `p`. The declarative keys of the leading PDU
/// (InitiatorName, SessionType, TargetName) are the caller's; unknown keys
/// get `NotUnderstood`. Discovery sessions go through the same negotiation
/// (they carry only text, so only the digests matter to them).
///
/// An invalid MaxRecvDataSegmentLength fails the login (`Err` with the
/// status): it is a declaration, which cannot be answered `Reject` — the
/// reply already carries the same key for our own declaration.
pub(super) fn negotiate(
    keys: &TextParams,
    lim: Limits,
    p: &mut SessionParams,
    reply: &mut TextParams,
) -> Result<(), (u8, u8)> {
    p.target_max_recv_data_segment = lim.max_recv_data_segment;
    for (k, v) in &keys.pairs {
        let v = v.as_str();
        match k.as_str() {
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => {}
            "HeaderDigest" | "DataDigest" => {
                let choice = v.split(',').find(|c| *c == "CRC32C" || *c == "None");
                match choice {
                    Some(c) => {
                        let on = c == "CRC32C";
                        if k == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        reply.push(k, c);
                    }
                    None => reply.push(k, "Reject"),
                }
            }
            "MaxConnections" => match parse_num(v, 1, 65535) {
                Some(_) => {
                    p.max_connections = 1;
                    reply.push(k, "1");
                }
                None => reply.push(k, "Reject"),
            },
            "InitialR2T" => match parse_bool(v) {
                Some(b) => {
                    p.initial_r2t = b || !lim.allow_unsolicited;
                    reply.push(k, yes_no(!lim.allow_unsolicited || b));
                }
                None => reply.push(k, "Reject"),
            },
            "ImmediateData" => match parse_bool(v) {
                Some(b) => {
                    p.immediate_data = b;
                    reply.push(k, yes_no(b));
                }
                None => reply.push(k, "Reject"),
            },
            "MaxRecvDataSegmentLength" => match parse_num(v, 512, 0x00ff_ffff) {
                Some(n) => p.initiator_max_recv_data_segment = n,
                None => return Err(login_status::INITIATOR_ERROR),
            },
            "MaxBurstLength" => match parse_num(v, 512, 0x00ff_ffff) {
                Some(n) => {
                    p.max_burst = n.min(lim.max_burst);
                    reply.push(k, p.max_burst.to_string());
                }
                None => reply.push(k, "Reject"),
            },
            "FirstBurstLength" => match parse_num(v, 512, 0x00ff_ffff) {
                Some(n) => {
                    p.first_burst = n.min(lim.first_burst);
                    reply.push(k, p.first_burst.to_string());
                }
                None => reply.push(k, "Reject"),
            },
            "DefaultTime2Wait" => match parse_num(v, 0, 3600) {
                Some(n) => {
                    p.default_time2wait = n.max(2);
                    reply.push(k, p.default_time2wait.to_string());
                }
                None => reply.push(k, "Reject"),
            },
            "DefaultTime2Retain" => match parse_num(v, 0, 3600) {
                Some(n) => {
                    p.default_time2retain = n.min(20);
                    reply.push(k, p.default_time2retain.to_string());
                }
                None => reply.push(k, "Reject"),
            },
            "MaxOutstandingR2T" => match parse_num(v, 1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = n.min(lim.max_outstanding_r2t);
                    reply.push(k, p.max_outstanding_r2t.to_string());
                }
                None => reply.push(k, "Reject"),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                Some(_) => {
                    // OR: we always say Yes, so the result is Yes.
                    reply.push(k, "Yes");
                }
                None => reply.push(k, "Reject"),
            },
            "ErrorRecoveryLevel" => match parse_num(v, 0, 2) {
                Some(_) => {
                    p.error_recovery_level = 0;
                    reply.push(k, "0");
                }
                None => reply.push(k, "Reject"),
            },
            "IFMarker" | "OFMarker" => reply.push(k, "No"),
            "IFMarkInt" | "OFMarkInt" => reply.push(k, "Irrelevant"),
            "AuthMethod" => reply.push(k, "None"),
            "TaskReporting" => reply.push(k, "RFC3720"),
            "iSCSIProtocolLevel" => reply.push(k, "0"),
            _ => reply.push(k, "NotUnderstood"),
        }
    }
    if p.first_burst > p.max_burst {
        p.first_burst = p.max_burst;
    }
    Ok(())
}
