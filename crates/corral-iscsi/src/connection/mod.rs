//! The full feature phase of one connection (RFC 7143 §4.2, §11), sans-IO.
//!
//! [`FullFeature::receive`] takes each PDU from the initiator and returns
//! [`Action`]s: PDUs to send (R2T, NOP-In, Reject, Text and Logout
//! responses), SCSI commands ready to execute (all their Data-Out
//! collected), task management requests, and a close. It owns command
//! numbering (the CmdSN window, with out-of-order commands held until the
//! gap fills and out-of-window ones ignored), immediate and unsolicited data,
//! R2T generation within MaxBurstLength/MaxOutstandingR2T, and Data-Out
//! validation (DataSN, buffer offset, TTT).
//!
//! The PDUs that answer SCSI commands, and the stamping of StatSN,
//! ExpCmdSN and MaxCmdSN in wire order, are in `response`
//! ([`scsi_response_pdus`], [`StatusSequencer`]).

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

mod response;

use crate::login::{SessionParams, SessionType};
use crate::pdu::{Pdu, RESERVED_TAG, op};
use crate::scsi::ScsiResult;
use crate::sense::{Sense, status};
use crate::text::TextParams;

pub use self::response::{StatusSequencer, scsi_response_pdus};

/// Largest Expected Data Transfer Length accepted for a write.
pub const MAX_WRITE_EDTL: u32 = 32 << 20;

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

/// Task management functions (RFC 7143 §11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
}

/// TMF response codes.
pub mod tmf_response {
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}

/// A SCSI command with all its Data-Out, ready to run.
#[derive(Debug, Clone)]
pub struct ScsiCommand {
    pub itt: u32,
    pub lun_raw: u64,
    pub cdb: Bytes,
    pub edtl: u32,
    pub read: bool,
    pub write: bool,
    pub data: Bytes,
    pub cmd_sn: u32,
    pub immediate: bool,
}

impl ScsiCommand {
    /// The LUN number, or `None` when the LUN field is not a flat LUN.
    pub fn lun(&self) -> Option<u16> {
        decode_lun(self.lun_raw)
    }
}

/// Decode a single-level LUN (peripheral or flat addressing).
pub fn decode_lun(raw: u64) -> Option<u16> {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 => Some(u16::from(b[0] & 0x3f) << 8 | u16::from(b[1])),
        1 => Some(u16::from(b[0] & 0x3f) << 8 | u16::from(b[1])),
        _ => None,
    }
}

/// A task management request.
#[derive(Debug, Clone, Copy)]
pub struct TmfRequest {
    pub itt: u32,
    pub function: u8,
    pub lun_raw: u64,
    pub referenced_itt: u32,
    pub ref_cmd_sn: u32,
    pub cmd_sn: u32,
}

/// What the connection must do next.
#[derive(Debug)]
pub enum Action {
    /// Write this PDU.
    Send(Pdu),
    /// Run this SCSI command, then send [`scsi_response_pdus`].
    Execute(ScsiCommand),
    /// Run a task management function, then send its response.
    TaskManagement(TmfRequest),
    /// Finish in-flight commands, send this Logout Response, close.
    Logout(Pdu),
    /// The initiator answered our NOP-In ping with this TTT.
    PingAnswered(u32),
    /// Answer this write with CHECK CONDITION (DATA PHASE ERROR).
    FailWrite(u32),
    /// Send this (Reject) PDU if any, then drop the connection.
    Close(Option<Pdu>),
}

/// Per-write Data-Out collection.
#[derive(Debug)]
struct WriteCollect {
    cmd: ScsiCommand,
    buf: BytesMut,
    /// Unsolicited Data-Out still allowed (the command's F bit was clear).
    unsolicited_open: bool,
    /// Bytes allowed unsolicited (FirstBurstLength, immediate data included).
    unsolicited_limit: u32,
    unsolicited_data_sn: u32,
    /// Offset up to which data has been solicited by R2Ts.
    solicited_to: u32,
    r2t_sn: u32,
    outstanding: VecDeque<R2tState>,
}

#[derive(Debug, Clone, Copy)]
struct R2tState {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    data_sn: u32,
}

/// Full feature phase state of one connection.
pub struct FullFeature {
    params: SessionParams,
    session_type: SessionType,
    exp_cmd_sn: u32,
    window: u32,
    /// Non-immediate PDUs that arrived ahead of ExpCmdSN.
    held: BTreeMap<u32, Pdu>,
    writes: HashMap<u32, WriteCollect>,
    next_ttt: u32,
    /// Text for SendTargets.
    send_targets: Vec<(String, String)>,
    this_target: Option<String>,
}

/// Compare sequence numbers with serial arithmetic: `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

impl FullFeature {
    /// `send_targets`: (target name, "address:port,tag") pairs to answer
    /// SendTargets with; `this_target` the target of a normal session.
    pub fn new(
        params: SessionParams,
        session_type: SessionType,
        exp_cmd_sn: u32,
        window: u32,
        send_targets: Vec<(String, String)>,
        this_target: Option<String>,
    ) -> Self {
        FullFeature {
            params,
            session_type,
            exp_cmd_sn,
            window: window.max(1),
            held: BTreeMap::new(),
            writes: HashMap::new(),
            next_ttt: 1,
            send_targets,
            this_target,
        }
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The next CmdSN expected.
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// Writes still collecting Data-Out.
    pub fn collecting(&self) -> usize {
        self.writes.len()
    }

    /// Forget a write still collecting data (aborted).
    pub fn abort_collecting(&mut self, itt: u32) -> bool {
        self.writes.remove(&itt).is_some()
    }

    /// Forget every write still collecting data.
    pub fn abort_all_collecting(&mut self) -> Vec<u32> {
        let v: Vec<u32> = self.writes.keys().copied().collect();
        self.writes.clear();
        v
    }

    /// Handle one PDU from the initiator.
    pub fn receive(&mut self, pdu: Pdu) -> Vec<Action> {
        let mut out = Vec::new();
        match pdu.opcode() {
            op::DATA_OUT => self.data_out(pdu, &mut out),
            op::SNACK_REQUEST => out.push(Action::Send(reject(&pdu, reject_reason::SNACK_REJECT))),
            op::NOP_OUT if pdu.itt() == RESERVED_TAG => {
                // The answer to our ping; it carries no new CmdSN.
                out.push(Action::PingAnswered(pdu.u32_at(20)));
            }
            op::SCSI_COMMAND
            | op::NOP_OUT
            | op::TASK_MGMT_REQUEST
            | op::TEXT_REQUEST
            | op::LOGOUT_REQUEST => {
                if pdu.immediate() {
                    self.command(pdu, &mut out);
                } else {
                    self.ordered(pdu, &mut out);
                }
            }
            op::LOGIN_REQUEST => {
                out.push(Action::Close(Some(reject(
                    &pdu,
                    reject_reason::PROTOCOL_ERROR,
                ))));
            }
            _ => out.push(Action::Send(reject(
                &pdu,
                reject_reason::COMMAND_NOT_SUPPORTED,
            ))),
        }
        out
    }

    /// A non-immediate PDU: deliver it in CmdSN order, hold it if early,
    /// ignore it if outside the window.
    fn ordered(&mut self, pdu: Pdu, out: &mut Vec<Action>) {
        let sn = pdu.u32_at(24);
        let offset = sn.wrapping_sub(self.exp_cmd_sn);
        if offset >= self.window {
            tracing::debug!(
                cmd_sn = sn,
                exp = self.exp_cmd_sn,
                "command outside the CmdSN window ignored"
            );
            return;
        }
        if offset > 0 {
            self.held.insert(sn, pdu);
            return;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        self.command(pdu, out);
        while let Some(next) = self.held.remove(&self.exp_cmd_sn) {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.command(next, out);
        }
    }

    fn command(&mut self, pdu: Pdu, out: &mut Vec<Action>) {
        match pdu.opcode() {
            op::SCSI_COMMAND => self.scsi_command(pdu, out),
            op::NOP_OUT => {
                let mut r = Pdu::new(op::NOP_IN);
                r.set_lun_raw(pdu.lun_raw());
                r.set_itt(pdu.itt());
                r.set_u32(20, RESERVED_TAG);
                let max = self.params.initiator_max_recv_data_segment as usize;
                r.data = pdu.data.slice(..pdu.data.len().min(max));
                out.push(Action::Send(r));
            }
            op::TASK_MGMT_REQUEST => {
                let req = TmfRequest {
                    itt: pdu.itt(),
                    function: pdu.flags() & 0x7f,
                    lun_raw: pdu.lun_raw(),
                    referenced_itt: pdu.u32_at(20),
                    ref_cmd_sn: pdu.u32_at(32),
                    cmd_sn: pdu.u32_at(24),
                };
                if matches!(
                    req.function,
                    tmf::ABORT_TASK_SET
                        | tmf::CLEAR_TASK_SET
                        | tmf::LOGICAL_UNIT_RESET
                        | tmf::TARGET_WARM_RESET
                        | tmf::TARGET_COLD_RESET
                ) {
                    // Writes still collecting data die with the task set.
                    self.writes.clear();
                } else if req.function == tmf::ABORT_TASK {
                    self.writes.remove(&req.referenced_itt);
                }
                out.push(Action::TaskManagement(req));
            }
            op::TEXT_REQUEST => self.text(pdu, out),
            op::LOGOUT_REQUEST => {
                let reason = pdu.flags() & 0x7f;
                let mut r = Pdu::new(op::LOGOUT_RESPONSE);
                r.set_itt(pdu.itt());
                r.bhs[2] = match reason {
                    0 | 1 => 0,
                    _ => 2, // connection recovery is not supported
                };
                r.set_u16(40, self.params.default_time2wait as u16);
                r.set_u16(42, self.params.default_time2retain as u16);
                out.push(Action::Logout(r));
            }
            _ => out.push(Action::Send(reject(
                &pdu,
                reject_reason::COMMAND_NOT_SUPPORTED,
            ))),
        }
    }

    fn text(&mut self, pdu: Pdu, out: &mut Vec<Action>) {
        let keys = match TextParams::parse(&pdu.data) {
            Ok(k) => k,
            Err(_) => {
                out.push(Action::Send(reject(&pdu, reject_reason::PROTOCOL_ERROR)));
                return;
            }
        };
        let mut reply = TextParams::default();
        for (k, v) in &keys.pairs {
            if k == "SendTargets" {
                let all = v == "All";
                if all && self.session_type != SessionType::Discovery {
                    continue;
                }
                for (name, addr) in &self.send_targets {
                    let wanted = all
                        || v == name
                        || (v.is_empty() && self.this_target.as_deref() == Some(name));
                    if wanted {
                        reply.push("TargetName", name.clone());
                        reply.push("TargetAddress", addr.clone());
                    }
                }
            } else {
                reply.push(k, "NotUnderstood");
            }
        }
        let mut r = Pdu::new(op::TEXT_RESPONSE);
        r.bhs[1] = 0x80;
        r.set_lun_raw(pdu.lun_raw());
        r.set_itt(pdu.itt());
        r.set_u32(20, RESERVED_TAG);
        r.data = Bytes::from(reply.encode());
        out.push(Action::Send(r));
    }

    fn scsi_command(&mut self, pdu: Pdu, out: &mut Vec<Action>) {
        if self.session_type == SessionType::Discovery {
            out.push(Action::Send(reject(&pdu, reject_reason::PROTOCOL_ERROR)));
            return;
        }
        let flags = pdu.flags();
        let read = flags & 0x40 != 0;
        let write = flags & 0x20 != 0;
        let edtl = pdu.u32_at(20);
        // CDB: 16 bytes in the BHS, more in an extended-CDB AHS (type 1).
        let mut cdb = pdu.bhs[32..48].to_vec();
        if pdu.ahs.len() >= 4 {
            let ahs_len = usize::from(u16::from_be_bytes([pdu.ahs[0], pdu.ahs[1]]));
            if pdu.ahs[2] == 1 && ahs_len >= 1 && 4 + ahs_len - 1 <= pdu.ahs.len() {
                cdb.extend_from_slice(&pdu.ahs[4..4 + ahs_len - 1]);
            }
        }
        let cmd = ScsiCommand {
            itt: pdu.itt(),
            lun_raw: pdu.lun_raw(),
            cdb: Bytes::from(cdb),
            edtl,
            read,
            write,
            data: Bytes::new(),
            cmd_sn: pdu.u32_at(24),
            immediate: pdu.immediate(),
        };
        if !write || edtl == 0 {
            // Immediate data with no write expected is ignored.
            out.push(Action::Execute(cmd));
            return;
        }
        if edtl > MAX_WRITE_EDTL {
            out.push(Action::Close(Some(reject(
                &pdu,
                reject_reason::INVALID_PDU_FIELD,
            ))));
            return;
        }
        let imm = pdu.data.len() as u32;
        let first_burst = self.params.first_burst.min(edtl);
        if imm > 0 && (!self.params.immediate_data || imm > first_burst) {
            out.push(Action::Close(Some(reject(
                &pdu,
                reject_reason::PROTOCOL_ERROR,
            ))));
            return;
        }
        if self.writes.contains_key(&cmd.itt) {
            out.push(Action::Send(reject(&pdu, reject_reason::INVALID_PDU_FIELD)));
            return;
        }
        if imm == edtl {
            // All the data came as immediate data: no copy, no collection.
            let mut cmd = cmd;
            cmd.data = pdu.data;
            out.push(Action::Execute(cmd));
            return;
        }
        let unsolicited_open = !self.params.initial_r2t && flags & 0x80 == 0;
        let mut buf = BytesMut::with_capacity(edtl as usize);
        buf.extend_from_slice(&pdu.data);
        let itt = cmd.itt;
        let w = WriteCollect {
            cmd,
            buf,
            unsolicited_open,
            unsolicited_limit: if self.params.initial_r2t {
                imm
            } else {
                first_burst
            },
            unsolicited_data_sn: 0,
            solicited_to: imm,
            r2t_sn: 0,
            outstanding: VecDeque::new(),
        };
        self.writes.insert(itt, w);
        self.advance_write(itt, out);
    }

    /// Issue R2Ts or hand the command over once all data is in.
    fn advance_write(&mut self, itt: u32, out: &mut Vec<Action>) {
        let Some(w) = self.writes.get_mut(&itt) else {
            return;
        };
        let edtl = w.cmd.edtl;
        if w.buf.len() as u32 >= edtl {
            if let Some(mut w) = self.writes.remove(&itt) {
                w.cmd.data = w.buf.freeze();
                out.push(Action::Execute(w.cmd));
            }
            return;
        }
        if w.unsolicited_open {
            return;
        }
        if w.solicited_to < w.buf.len() as u32 {
            w.solicited_to = w.buf.len() as u32;
        }
        while w.solicited_to < edtl
            && (w.outstanding.len() as u32) < self.params.max_outstanding_r2t.max(1)
        {
            let len = (edtl - w.solicited_to).min(self.params.max_burst);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            let mut r = Pdu::new(op::R2T);
            r.set_lun_raw(w.cmd.lun_raw);
            r.set_itt(itt);
            r.set_u32(20, ttt);
            r.set_u32(36, w.r2t_sn);
            r.set_u32(40, w.solicited_to);
            r.set_u32(44, len);
            w.r2t_sn += 1;
            w.outstanding.push_back(R2tState {
                ttt,
                offset: w.solicited_to,
                len,
                received: 0,
                data_sn: 0,
            });
            w.solicited_to += len;
            out.push(Action::Send(r));
        }
    }

    fn data_out(&mut self, pdu: Pdu, out: &mut Vec<Action>) {
        let itt = pdu.itt();
        let ttt = pdu.u32_at(20);
        let data_sn = pdu.u32_at(36);
        let offset = pdu.u32_at(40);
        let fin = pdu.final_bit();
        let Some(w) = self.writes.get_mut(&itt) else {
            // Data for a task we do not know (maybe aborted): ignore it.
            tracing::debug!(itt, "Data-Out for an unknown task ignored");
            return;
        };
        let len = pdu.data.len() as u32;
        let have = w.buf.len() as u32;
        // A sequence error fails the command (ABORTED COMMAND, DATA PHASE
        // ERROR); the connection survives and later Data-Out for the task
        // is ignored.
        let protocol_error = |out: &mut Vec<Action>| {
            out.push(Action::FailWrite(itt));
        };
        if offset != have || have.saturating_add(len) > w.cmd.edtl {
            return protocol_error(out);
        }
        if ttt == RESERVED_TAG {
            if !w.unsolicited_open
                || data_sn != w.unsolicited_data_sn
                || have + len > w.unsolicited_limit
            {
                return protocol_error(out);
            }
            w.unsolicited_data_sn += 1;
            w.buf.extend_from_slice(&pdu.data);
            if fin {
                w.unsolicited_open = false;
            }
        } else {
            let Some(r) = w.outstanding.front_mut() else {
                return protocol_error(out);
            };
            if r.ttt != ttt
                || data_sn != r.data_sn
                || offset != r.offset + r.received
                || r.received + len > r.len
            {
                return protocol_error(out);
            }
            r.data_sn += 1;
            r.received += len;
            w.buf.extend_from_slice(&pdu.data);
            if r.received == r.len {
                if !fin {
                    return protocol_error(out);
                }
                w.outstanding.pop_front();
            } else if fin {
                return protocol_error(out);
            }
        }
        self.advance_write(itt, out);
    }

    /// Resolve [`Action::FailWrite`]: forget the write and build its response.
    pub fn fail_write(&mut self, itt: u32) -> Vec<Pdu> {
        let Some(w) = self.writes.remove(&itt) else {
            return Vec::new();
        };
        let result = ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(Bytes::from(Sense::DATA_PHASE_ERROR.encode(false))),
            data_in: Bytes::new(),
            transfer_len: 0,
        };
        scsi_response_pdus(&w.cmd, &result, &self.params)
    }
}

/// A Reject PDU carrying the offending header.
pub fn reject(pdu: &Pdu, reason: u8) -> Pdu {
    let mut r = Pdu::new(op::REJECT);
    r.bhs[2] = reason;
    r.set_itt(RESERVED_TAG);
    r.data = Bytes::copy_from_slice(&pdu.bhs);
    r
}

#[cfg(test)]
mod tests;
