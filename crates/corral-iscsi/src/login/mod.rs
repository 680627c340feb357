//! The login phase (RFC 7143 §6.3, §11.12–11.13), sans-IO: feed each Login
//! Request PDU to [`LoginNegotiation::receive`], send back the PDU it
//! returns, until it reports [`LoginStep::Complete`] or [`LoginStep::Failed`].
//!
//! Covers the security stage (AuthMethod None or CHAP, one-way or mutual,
//! per target), the operational stage (every RFC 7143 session and
//! connection key, see [`Limits`] for our side's values), discovery and
//! normal sessions, and multi-PDU text (the C bit).

use std::sync::Arc;

use bytes::Bytes;

mod operational;

use crate::chap;
use crate::pdu::{Pdu, op};
use crate::text::TextParams;

/// CHAP credentials of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapConfig {
    /// The name and secret the initiator must prove it knows.
    pub user: String,
    pub secret: String,
    /// For mutual CHAP: the name and secret the target answers with.
    pub mutual: Option<(String, String)>,
}

/// A target as the login phase sees it.
#[derive(Clone, Debug)]
pub struct TargetEntry {
    pub name: String,
    pub alias: Option<String>,
    pub chap: Option<ChapConfig>,
}

/// Our side's limits, offered during negotiation.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The data segment size we accept (declared MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub max_outstanding_r2t: u32,
    /// Commands in the window (MaxCmdSN − ExpCmdSN + 1).
    pub command_window: u32,
    /// We accept InitialR2T=No (unsolicited data).
    pub allow_unsolicited: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment: 256 << 10,
            max_burst: (16 << 20) - 1,
            first_burst: (16 << 20) - 1,
            max_outstanding_r2t: 16,
            command_window: 128,
            allow_unsolicited: true,
        }
    }
}

/// What the login phase needs to know about the portal.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    pub targets: Vec<TargetEntry>,
    pub limits: Limits,
    /// Target portal group tag.
    pub portal_group: u16,
}

/// Negotiated session and connection parameters, with RFC 7143 defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// Largest data segment we may send (the initiator's declaration).
    pub initiator_max_recv_data_segment: u32,
    /// Largest data segment the initiator may send us.
    pub target_max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            initiator_max_recv_data_segment: 8192,
            target_max_recv_data_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            header_digest: false,
            data_digest: false,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
        }
    }
}

/// Discovery or normal session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// A completed login.
#[derive(Clone, Debug)]
pub struct LoginOutcome {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    pub cid: u16,
    pub session_type: SessionType,
    /// Index into [`LoginConfig::targets`] (normal sessions).
    pub target: Option<usize>,
    pub params: SessionParams,
    /// The StatSN of the next response after the final Login Response.
    pub next_stat_sn: u32,
    /// The CmdSN the first command will carry.
    pub exp_cmd_sn: u32,
}

/// Login status class and detail (RFC 7143 §11.13.5).
pub mod login_status {
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTH_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const SESSION_TYPE_UNSUPPORTED: (u8, u8) = (0x02, 0x09);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
}

/// The result of one Login Request.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this response and wait for the next request.
    Continue(Pdu),
    /// Send this response (the caller fills in the TSIH at bytes 14–15);
    /// the connection is in the full feature phase.
    Complete(Pdu, Box<LoginOutcome>),
    /// Send this response, then close the connection.
    Failed(Pdu),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// AuthMethod not yet agreed.
    Pending,
    /// CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapResponse {
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// The login state machine of one connection.
pub struct LoginNegotiation {
    config: Arc<LoginConfig>,
    started: bool,
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    itt: u32,
    cmd_sn: u32,
    stat_sn: u32,
    stage: Stage,
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    session_type: Option<SessionType>,
    target: Option<usize>,
    auth: Auth,
    params: SessionParams,
    sent_declarations: bool,
    sent_portal_group: bool,
    partial: Vec<u8>,
    seed: u64,
}

/// Keys only a target declares; an initiator must not send them.
const TARGET_DECLARED: [&str; 3] = ["TargetAlias", "TargetPortalGroupTag", "TargetAddress"];

/// Longest login text we accept across continued PDUs.
const MAX_LOGIN_TEXT: usize = 64 << 10;

fn yes_no(b: bool) -> &'static str {
    if b { "Yes" } else { "No" }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn parse_num(v: &str, min: u32, max: u32) -> Option<u32> {
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        v.parse::<u64>().ok()?
    };
    if n < u64::from(min) || n > u64::from(max) {
        return None;
    }
    Some(n as u32)
}

impl LoginNegotiation {
    /// A fresh negotiation; `seed` feeds the CHAP challenge (use the clock
    /// and a counter).
    pub fn new(config: Arc<LoginConfig>, seed: u64) -> Self {
        LoginNegotiation {
            config,
            started: false,
            isid: [0; 6],
            tsih: 0,
            cid: 0,
            itt: 0,
            cmd_sn: 0,
            stat_sn: (seed as u32) & 0x0fff_ffff,
            stage: Stage::Security,
            initiator_name: None,
            initiator_alias: None,
            session_type: None,
            target: None,
            auth: Auth::Pending,
            params: SessionParams::default(),
            sent_declarations: false,
            sent_portal_group: false,
            partial: Vec::new(),
            seed,
        }
    }

    /// The TSIH the initiator asked for (0: a new session).
    pub fn requested_tsih(&self) -> u16 {
        self.tsih
    }

    fn response(
        &mut self,
        transit: bool,
        csg: u8,
        nsg: u8,
        status: (u8, u8),
        data: Vec<u8>,
    ) -> Pdu {
        let mut p = Pdu::new(op::LOGIN_RESPONSE);
        p.bhs[1] = (if transit { 0x80 } else { 0 }) | ((csg & 3) << 2) | (nsg & 3);
        p.bhs[2] = 0; // version-max
        p.bhs[3] = 0; // version-active
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.set_u16(14, 0);
        p.set_itt(self.itt);
        p.set_u32(24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        p.set_u32(28, self.cmd_sn);
        p.set_u32(
            32,
            self.cmd_sn
                .wrapping_add(self.config.limits.command_window.max(1) - 1),
        );
        p.bhs[36] = status.0;
        p.bhs[37] = status.1;
        p.data = Bytes::from(data);
        p
    }

    fn fail(&mut self, status: (u8, u8)) -> LoginStep {
        let csg = self.stage as u8;
        LoginStep::Failed(self.response(false, csg, 0, status, Vec::new()))
    }

    /// Handle one Login Request PDU.
    pub fn receive(&mut self, pdu: &Pdu) -> LoginStep {
        if pdu.opcode() != op::LOGIN_REQUEST {
            return self.fail(login_status::INVALID_DURING_LOGIN);
        }
        let flags = pdu.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&pdu.bhs[8..14]);
        let tsih = pdu.u16_at(14);
        let cid = pdu.u16_at(20);
        if !self.started {
            self.started = true;
            self.isid = isid;
            self.tsih = tsih;
            self.cid = cid;
            self.itt = pdu.itt();
            self.cmd_sn = pdu.u32_at(24);
            let exp_stat_sn = pdu.u32_at(28);
            if exp_stat_sn != 0 {
                self.stat_sn = exp_stat_sn;
            }
            // Version: we speak version 0x00 only.
            if pdu.bhs[3] > 0 {
                return self.fail(login_status::UNSUPPORTED_VERSION);
            }
            self.stage = match csg {
                0 => Stage::Security,
                1 => Stage::Operational,
                _ => return self.fail(login_status::INITIATOR_ERROR),
            };
            if tsih != 0 {
                // We run one connection per session and no connection
                // recovery: a login into an existing session cannot succeed.
                return self.fail(login_status::SESSION_DOES_NOT_EXIST);
            }
        } else {
            if isid != self.isid || tsih != self.tsih || cid != self.cid {
                return self.fail(login_status::INITIATOR_ERROR);
            }
            self.itt = pdu.itt();
            if csg != self.stage as u8 {
                return self.fail(login_status::INITIATOR_ERROR);
            }
        }
        if transit && cont {
            return self.fail(login_status::INITIATOR_ERROR);
        }
        if transit && (nsg <= csg || nsg == 2) {
            return self.fail(login_status::INITIATOR_ERROR);
        }
        // Collect continued text.
        if self.partial.len() + pdu.data.len() > MAX_LOGIN_TEXT {
            return self.fail(login_status::OUT_OF_RESOURCES);
        }
        self.partial.extend_from_slice(&pdu.data);
        if cont {
            let stage = self.stage as u8;
            return LoginStep::Continue(self.response(false, stage, 0, (0, 0), Vec::new()));
        }
        let text = std::mem::take(&mut self.partial);
        let keys = match TextParams::parse(&text) {
            Ok(k) => k,
            Err(_) => return self.fail(login_status::INITIATOR_ERROR),
        };
        let mut reply = TextParams::default();
        if let Err(status) = self.leading_keys(&keys, &mut reply) {
            return self.fail(status);
        }
        let can_transit = match self.stage {
            Stage::Security => match self.security_keys(&keys, &mut reply) {
                Ok(done) => done,
                Err(status) => return self.fail(status),
            },
            Stage::Operational => {
                if self.needs_chap() && self.auth != Auth::Done {
                    return self.fail(login_status::AUTH_FAILURE);
                }
                if let Err(status) =
                    operational::negotiate(&keys, self.config.limits, &mut self.params, &mut reply)
                {
                    return self.fail(status);
                }
                true
            }
            Stage::FullFeature => return self.fail(login_status::INITIATOR_ERROR),
        };
        // Declare our receive limit once: in a normal session's operational
        // stage, and in any session on its way into full feature phase if
        // not yet declared (a discovery session's operational PDUs before
        // the last do not declare it, so the last one must).
        let going_to_ffp = transit && can_transit && nsg == 3;
        if (self.stage == Stage::Operational || going_to_ffp)
            && !self.sent_declarations
            && (self.session_type == Some(SessionType::Normal) || going_to_ffp)
        {
            self.sent_declarations = true;
            // An initiator's declaration made in the security stage was
            // answered NotUnderstood there; our own goes in its place (a key
            // appears once per PDU).
            reply.pairs.retain(|(k, _)| k != "MaxRecvDataSegmentLength");
            reply.push(
                "MaxRecvDataSegmentLength",
                self.params.target_max_recv_data_segment.to_string(),
            );
        }
        let stage = self.stage as u8;
        if transit && can_transit {
            if nsg == 3 {
                let data = reply.encode();
                let resp = self.response(true, stage, 3, (0, 0), data);
                let outcome = LoginOutcome {
                    initiator_name: self.initiator_name.clone().unwrap_or_default(),
                    initiator_alias: self.initiator_alias.clone(),
                    isid: self.isid,
                    cid: self.cid,
                    session_type: self.session_type.unwrap_or(SessionType::Normal),
                    target: self.target,
                    params: self.params,
                    next_stat_sn: self.stat_sn,
                    exp_cmd_sn: self.cmd_sn,
                };
                self.stage = Stage::FullFeature;
                return LoginStep::Complete(resp, Box::new(outcome));
            }
            self.stage = Stage::Operational;
            let data = reply.encode();
            return LoginStep::Continue(self.response(true, stage, nsg, (0, 0), data));
        }
        let data = reply.encode();
        LoginStep::Continue(self.response(false, stage, 0, (0, 0), data))
    }

    fn needs_chap(&self) -> bool {
        self.target
            .and_then(|t| self.config.targets.get(t))
            .is_some_and(|t| t.chap.is_some())
    }

    /// InitiatorName, SessionType, TargetName: allowed in either stage,
    /// required on the first PDU.
    fn leading_keys(&mut self, keys: &TextParams, reply: &mut TextParams) -> Result<(), (u8, u8)> {
        // Keys only a target sends (RFC 7143 §13.7, §13.9): our reply
        // carries them itself, so an initiator's are a protocol error.
        if TARGET_DECLARED.iter().any(|k| keys.get(k).is_some()) {
            return Err(login_status::INITIATOR_ERROR);
        }
        if let Some(n) = keys.get("InitiatorName") {
            if n.is_empty() || n.len() > 223 {
                return Err(login_status::INITIATOR_ERROR);
            }
            self.initiator_name = Some(n.to_string());
        }
        if let Some(a) = keys.get("InitiatorAlias") {
            self.initiator_alias = Some(a.to_string());
        }
        if let Some(t) = keys.get("SessionType") {
            let st = match t {
                "Discovery" => SessionType::Discovery,
                "Normal" => SessionType::Normal,
                _ => return Err(login_status::SESSION_TYPE_UNSUPPORTED),
            };
            if self.session_type.is_some_and(|s| s != st) {
                return Err(login_status::INITIATOR_ERROR);
            }
            self.session_type = Some(st);
        }
        if self.initiator_name.is_none() {
            return Err(login_status::MISSING_PARAMETER);
        }
        let st = *self.session_type.get_or_insert(SessionType::Normal);
        if let Some(name) = keys.get("TargetName") {
            if st == SessionType::Discovery {
                return Err(login_status::INITIATOR_ERROR);
            }
            match self.config.targets.iter().position(|t| t.name == name) {
                Some(i) => {
                    if self.target.is_some_and(|t| t != i) {
                        return Err(login_status::INITIATOR_ERROR);
                    }
                    self.target = Some(i);
                }
                None => return Err(login_status::NOT_FOUND),
            }
        }
        if st == SessionType::Normal {
            let Some(t) = self.target else {
                return Err(login_status::MISSING_PARAMETER);
            };
            if !self.sent_portal_group {
                self.sent_portal_group = true;
                if let Some(alias) = self.config.targets.get(t).and_then(|t| t.alias.clone()) {
                    reply.push("TargetAlias", alias);
                }
                reply.push("TargetPortalGroupTag", self.config.portal_group.to_string());
            }
        }
        Ok(())
    }

    /// Security stage keys; `Ok(true)` once the stage may be left.
    fn security_keys(
        &mut self,
        keys: &TextParams,
        reply: &mut TextParams,
    ) -> Result<bool, (u8, u8)> {
        let chap = self
            .target
            .and_then(|t| self.config.targets.get(t))
            .and_then(|t| t.chap.clone());
        for (k, v) in &keys.pairs {
            match k.as_str() {
                "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => {}
                "AuthMethod" => {
                    let offered: Vec<&str> = v.split(',').collect();
                    let want = if chap.is_some() { "CHAP" } else { "None" };
                    if offered.contains(&want) {
                        reply.push("AuthMethod", want);
                        self.auth = if chap.is_some() {
                            Auth::ChapAlgorithm
                        } else {
                            Auth::Done
                        };
                    } else {
                        reply.push("AuthMethod", "Reject");
                        return Err(login_status::AUTH_FAILURE);
                    }
                }
                "CHAP_A" => {
                    if self.auth != Auth::ChapAlgorithm {
                        return Err(login_status::INITIATOR_ERROR);
                    }
                    if !v.split(',').any(|a| a == "5") {
                        return Err(login_status::AUTH_FAILURE);
                    }
                    let id = (self.seed >> 8) as u8;
                    let mut challenge = Vec::with_capacity(16);
                    let mut s = self.seed;
                    while challenge.len() < 16 {
                        let h = chap::md5(&s.to_le_bytes());
                        challenge.extend_from_slice(&h);
                        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    }
                    challenge.truncate(16);
                    reply.push("CHAP_A", "5");
                    reply.push("CHAP_I", id.to_string());
                    reply.push("CHAP_C", chap::to_hex(&challenge));
                    self.auth = Auth::ChapResponse { id, challenge };
                }
                "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {}
                _ => reply.push(k, "NotUnderstood"),
            }
        }
        if let Auth::ChapResponse { id, challenge } = self.auth.clone()
            && keys.get("CHAP_R").is_some()
        {
            let Some(cfg) = chap else {
                return Err(login_status::AUTH_FAILURE);
            };
            let name_ok = keys.get("CHAP_N") == Some(cfg.user.as_str());
            let resp = keys.get("CHAP_R").and_then(chap::decode_binary);
            let want = chap::chap_response(id, cfg.secret.as_bytes(), &challenge);
            if !name_ok || !resp.is_some_and(|r| chap::same(&r, &want)) {
                return Err(login_status::AUTH_FAILURE);
            }
            // Mutual CHAP: the initiator challenges us.
            match (keys.get("CHAP_I"), keys.get("CHAP_C")) {
                (Some(i), Some(c)) => {
                    let Some((tuser, tsecret)) = cfg.mutual.clone() else {
                        return Err(login_status::AUTH_FAILURE);
                    };
                    let Some(i) = parse_num(i, 0, 255) else {
                        return Err(login_status::AUTH_FAILURE);
                    };
                    let Some(c) = chap::decode_binary(c) else {
                        return Err(login_status::AUTH_FAILURE);
                    };
                    if chap::same(&c, &challenge) {
                        // A reflected challenge.
                        return Err(login_status::AUTH_FAILURE);
                    }
                    let r = chap::chap_response(i as u8, tsecret.as_bytes(), &c);
                    reply.push("CHAP_N", tuser);
                    reply.push("CHAP_R", chap::to_hex(&r));
                }
                (None, None) => {
                    if cfg.mutual.is_some() {
                        return Err(login_status::AUTH_FAILURE);
                    }
                }
                _ => return Err(login_status::AUTH_FAILURE),
            }
            self.auth = Auth::Done;
        }
        if self.auth == Auth::Pending && chap_required(&self.config, self.target) {
            return Ok(false);
        }
        if self.auth == Auth::Pending {
            // No AuthMethod sent: acceptable only without CHAP.
            self.auth = Auth::Done;
        }
        Ok(self.auth == Auth::Done)
    }
}

fn chap_required(config: &LoginConfig, target: Option<usize>) -> bool {
    target
        .and_then(|t| config.targets.get(t))
        .is_some_and(|t| t.chap.is_some())
}

#[cfg(test)]
mod tests;
