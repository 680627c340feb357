//! The PDUs that answer a SCSI command (Data-In, SCSI Response, with
//! residuals against the Expected Data Transfer Length), and the stamping
//! of StatSN, ExpCmdSN and MaxCmdSN into outgoing PDUs at the moment they
//! are written, so that numbering follows wire order even though commands
//! complete out of order.

use bytes::Bytes;

use crate::login::SessionParams;
use crate::pdu::{Pdu, RESERVED_TAG, op};
use crate::scsi::ScsiResult;
use crate::sense::status;

use super::{ScsiCommand, sn_lt};

/// The PDUs answering a SCSI command: Data-In (segmented by the
/// initiator's MaxRecvDataSegmentLength, sequences of MaxBurstLength) with
/// the status in the last one when there is no sense data, otherwise a SCSI
/// Response. Residuals compare what the command transferred with the
/// Expected Data Transfer Length.
pub fn scsi_response_pdus(
    cmd: &ScsiCommand,
    result: &ScsiResult,
    params: &SessionParams,
) -> Vec<Pdu> {
    let edtl = u64::from(cmd.edtl);
    let mut sent_data = Bytes::new();
    if cmd.read && !result.data_in.is_empty() {
        let n = (result.data_in.len() as u64).min(edtl) as usize;
        sent_data = result.data_in.slice(..n);
    }
    let transferred = if result.status == status::GOOD || result.transfer_len > 0 {
        result.transfer_len
    } else {
        0
    };
    let (res_flag, residual) = if transferred > edtl {
        (0x04u8, transferred - edtl)
    } else if transferred < edtl {
        (0x02u8, edtl - transferred)
    } else {
        (0, 0)
    };
    let residual = residual.min(u64::from(u32::MAX)) as u32;
    let mut pdus = Vec::new();
    let seg = params.initiator_max_recv_data_segment.max(512) as usize;
    let burst = params.max_burst.max(512) as usize;
    let collapse = result.sense.is_none() && !sent_data.is_empty();
    let mut off = 0usize;
    let mut data_sn = 0u32;
    let mut in_burst = 0usize;
    while off < sent_data.len() {
        let n = seg.min(sent_data.len() - off).min(burst - in_burst);
        let last = off + n == sent_data.len();
        in_burst += n;
        let mut p = Pdu::new(op::DATA_IN);
        let mut flags = 0u8;
        if last || in_burst == burst {
            flags |= 0x80;
            in_burst = 0;
        }
        if last && collapse {
            flags |= 0x01 | res_flag;
            p.bhs[3] = result.status;
            p.set_u32(44, residual);
        }
        p.bhs[1] = flags;
        p.set_lun_raw(cmd.lun_raw);
        p.set_itt(cmd.itt);
        p.set_u32(20, RESERVED_TAG);
        p.set_u32(36, data_sn);
        p.set_u32(40, off as u32);
        p.data = sent_data.slice(off..off + n);
        pdus.push(p);
        data_sn += 1;
        off += n;
    }
    if !collapse {
        let mut r = Pdu::new(op::SCSI_RESPONSE);
        r.bhs[1] = 0x80 | res_flag;
        r.bhs[2] = 0; // command completed at target
        r.bhs[3] = result.status;
        r.set_itt(cmd.itt);
        r.set_u32(36, data_sn);
        r.set_u32(44, residual);
        if let Some(sense) = &result.sense {
            let mut d = Vec::with_capacity(2 + sense.len());
            d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            d.extend_from_slice(sense);
            r.data = Bytes::from(d);
        }
        pdus.push(r);
    }
    pdus
}

/// Stamps StatSN, ExpCmdSN and MaxCmdSN into outgoing PDUs in wire order.
#[derive(Debug)]
pub struct StatusSequencer {
    stat_sn: u32,
    max_cmd_sn: u32,
}

impl StatusSequencer {
    pub fn new(first_stat_sn: u32) -> Self {
        StatusSequencer {
            stat_sn: first_stat_sn,
            max_cmd_sn: 0,
        }
    }

    /// The next StatSN to be assigned.
    pub fn stat_sn(&self) -> u32 {
        self.stat_sn
    }

    /// Stamp `pdu`; `exp_cmd_sn` is the current ExpCmdSN and `room` the
    /// number of further commands we are willing to queue.
    pub fn stamp(&mut self, pdu: &mut Pdu, exp_cmd_sn: u32, room: u32) {
        let carries_status = match pdu.opcode() {
            op::DATA_IN => pdu.flags() & 0x01 != 0,
            op::R2T | op::ASYNC_MESSAGE => false,
            op::NOP_IN => pdu.itt() != RESERVED_TAG,
            _ => true,
        };
        let max = exp_cmd_sn.wrapping_add(room).wrapping_sub(1);
        if self.max_cmd_sn == 0 || sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
        if pdu.opcode() == op::DATA_IN && !carries_status {
            pdu.set_u32(24, 0);
        } else {
            pdu.set_u32(24, self.stat_sn);
        }
        if carries_status {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        pdu.set_u32(28, exp_cmd_sn);
        pdu.set_u32(32, self.max_cmd_sn);
    }
}
