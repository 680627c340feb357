//! Primary commands (SPC-5) of the logical unit: TEST UNIT READY (in the
//! dispatcher), REQUEST SENSE, INQUIRY with its VPD pages, MODE SENSE and
//! MODE SELECT with the mode pages we keep, REPORT LUNS and REPORT
//! SUPPORTED OPERATION CODES (which lists the [`super::opcodes`] table).

use bytes::Bytes;
use corral_block::BlockDevice;

use crate::reservation::Nexus;
use crate::sense::Sense;

use super::cdb::{be16, be32};
use super::opcodes::{self, OPCODES, opcode};
use super::{
    CmdResult, Fail, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES, MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BYTES, ScsiLun, ScsiResult, fnv1a,
};

impl<D: BlockDevice> ScsiLun<D> {
    pub(super) fn request_sense(&self, nexus: &Nexus, cdb: &[u8; 16]) -> CmdResult {
        let desc = cdb[1] & 0x01 != 0;
        let alloc = usize::from(cdb[4]);
        let pending = self.lock().take_unit_attention(nexus);
        let sense = pending.unwrap_or(Sense::new(0, 0, 0));
        Ok(ScsiResult::data(sense.encode(desc), alloc))
    }

    pub(super) fn inquiry(&self, cdb: &[u8; 16]) -> CmdResult {
        let evpd = cdb[1] & 0x01 != 0;
        if cdb[1] & 0x02 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let page = cdb[2];
        let alloc = usize::from(be16(&cdb[3..5]));
        if !evpd {
            if page != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            }
            let mut v = vec![0u8; 96];
            v[0] = 0x00; // direct access block device
            v[2] = 0x06; // SPC-4
            v[3] = 0x12; // HISUP, response data format 2
            v[4] = (v.len() - 5) as u8;
            v[5] = 0x00;
            v[7] = 0x02; // CMDQUE
            v[8..16].copy_from_slice(b"CORRAL  ");
            v[16..32].copy_from_slice(b"corral volume   ");
            v[32..36].copy_from_slice(b"0001");
            // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
            for (i, d) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
                v[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
            }
            return Ok(ScsiResult::data(v, alloc));
        }
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2],
            0x80 => self.serial().into_bytes(),
            0x83 => self.device_identification(),
            0x86 => {
                // Extended INQUIRY data: HEADSUP/ORDSUP/SIMPSUP, V_SUP? no.
                let mut p = vec![0u8; 60];
                p[1] = 0x07; // HEADSUP ORDSUP SIMPSUP
                p
            }
            0xb0 => self.block_limits(),
            0xb1 => {
                let mut p = vec![0u8; 60];
                p[1] = 0x01; // non-rotating medium
                p
            }
            0xb2 => {
                // LBPU, LBPWS, LBPWS10, LBPRZ=001b; provisioning type: thin.
                vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        };
        let mut v = vec![0x00, page];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(&body);
        Ok(ScsiResult::data(v, alloc))
    }

    /// The unit serial number (VPD page 0x80).
    fn serial(&self) -> String {
        format!("{:016x}", fnv1a(self.identity.volume.as_bytes()))
    }

    /// The device identification VPD page (0x83) designators.
    fn device_identification(&self) -> Vec<u8> {
        let mut v = Vec::new();
        // NAA designator, binary, LU.
        v.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
        v.extend_from_slice(&self.naa);
        // T10 vendor ID, ASCII, LU.
        let t10 = format!("CORRAL  {}", self.identity.volume);
        let t10 = t10.as_bytes();
        v.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
        v.extend_from_slice(t10);
        // Relative target port, binary, target port, iSCSI, PIV.
        v.extend_from_slice(&[0x51, 0x94, 0x00, 4, 0, 0, 0, 1]);
        // Target port group, binary, target port.
        v.extend_from_slice(&[0x51, 0x95, 0x00, 4, 0, 0, 0, 1]);
        // SCSI name string of the target device, UTF-8.
        let mut name = self.identity.target_name.clone().into_bytes();
        name.push(0);
        while !name.len().is_multiple_of(4) {
            name.push(0);
        }
        if name.len() <= 252 {
            v.extend_from_slice(&[0x53, 0xa8, 0x00, name.len() as u8]);
            v.extend_from_slice(&name);
        }
        v
    }

    /// The Block Limits VPD page (0xb0, defined by SBC-4).
    fn block_limits(&self) -> Vec<u8> {
        let bs = u64::from(self.block_size);
        let mut p = vec![0u8; 60];
        p[0] = 0x01; // WSNZ
        p[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
        // Optimal transfer length granularity: 4 KiB.
        p[2..4].copy_from_slice(&((4096 / bs).max(1) as u16).to_be_bytes());
        p[4..8].copy_from_slice(&((MAX_TRANSFER_BYTES / bs) as u32).to_be_bytes());
        p[8..12].copy_from_slice(&(((1u64 << 20) / bs) as u32).to_be_bytes());
        p[12..16].copy_from_slice(&((MAX_TRANSFER_BYTES / bs) as u32).to_be_bytes());
        p[16..20].copy_from_slice(&((MAX_WRITE_SAME_BYTES / bs) as u32).to_be_bytes());
        p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        p[24..28].copy_from_slice(&((4096 / bs).max(1) as u32).to_be_bytes());
        p[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
        p[32..40].copy_from_slice(&(MAX_WRITE_SAME_BYTES / bs).to_be_bytes());
        p
    }

    /// The mode pages asked for (`page` 0x3f: all), current or (`pc` 1)
    /// changeable values.
    fn mode_pages(&self, page: u8, subpage: u8, pc: u8) -> Result<Vec<u8>, Fail> {
        let mode = self.lock().mode;
        let changeable = pc == 1;
        let caching = || {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            if changeable || mode.write_cache {
                p[2] = 0x04;
            }
            p
        };
        let control = || {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            if changeable {
                p[2] = 0x04;
            } else {
                p[2] = if mode.descriptor_sense { 0x04 } else { 0 };
                p[3] = 0x10; // unrestricted reordering
                p[8] = 0xff; // busy timeout period: unlimited
                p[9] = 0xff;
            }
            p
        };
        let rw_recovery = || {
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 0x0a;
            p
        };
        let informational = || {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 0x0a;
            p
        };
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if subpage == 0xff && page != 0x3f {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        Ok(match page {
            0x01 => rw_recovery(),
            0x08 => caching(),
            0x0a => control(),
            0x1c => informational(),
            0x3f => {
                let mut v = rw_recovery();
                v.extend(caching());
                v.extend(control());
                v.extend(informational());
                v
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        })
    }

    pub(super) fn mode_sense(&self, cdb: &[u8; 16]) -> CmdResult {
        let six = cdb[0] == opcode::MODE_SENSE_6;
        let dbd = cdb[1] & 0x08 != 0;
        let llbaa = !six && cdb[1] & 0x10 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        let alloc = if six {
            usize::from(cdb[4])
        } else {
            usize::from(be16(&cdb[7..9]))
        };
        if pc == 3 {
            return Err(Sense::SAVING_PARAMS_UNSUPPORTED.into());
        }
        let pages = self.mode_pages(page, subpage, pc)?;
        let blocks = self.blocks();
        let mut bd = Vec::new();
        if !dbd {
            if llbaa {
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0, 0, 0, 0]);
                bd.extend_from_slice(&self.block_size.to_be_bytes());
            } else {
                let n = blocks.min(0xffff_ffff) as u32;
                bd.extend_from_slice(&n.to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&self.block_size.to_be_bytes()[1..]);
            }
        }
        let dev_specific = 0x10; // DPOFUA
        let mut v = Vec::new();
        if six {
            let total = 3 + bd.len() + pages.len();
            v.push(total.min(255) as u8);
            v.push(0);
            v.push(dev_specific);
            v.push(bd.len() as u8);
        } else {
            let total = 6 + bd.len() + pages.len();
            v.extend_from_slice(&(total.min(0xffff) as u16).to_be_bytes());
            v.push(0);
            v.push(dev_specific);
            v.push(if llbaa && !dbd { 1 } else { 0 });
            v.push(0);
            v.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        }
        v.extend(bd);
        v.extend(pages);
        Ok(ScsiResult::data(v, alloc))
    }

    pub(super) fn mode_select(&self, cdb: &[u8; 16], data: &Bytes) -> CmdResult {
        let six = cdb[0] == opcode::MODE_SELECT_6;
        let plen = if six {
            usize::from(cdb[4])
        } else {
            usize::from(be16(&cdb[7..9]))
        };
        let transfer_len = plen as u64;
        if cdb[1] & 0x01 != 0 {
            // SP: we cannot save parameters.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if plen == 0 {
            return Ok(ScsiResult::good());
        }
        let fail = |s: Sense| self.check_after_transfer(transfer_len, s);
        if data.len() < plen {
            return fail(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let p = &data[..plen];
        let (hdr, bdl) = if six {
            if p.len() < 4 {
                return fail(Sense::PARAM_LIST_LENGTH_ERROR);
            }
            (4, usize::from(p[3]))
        } else {
            if p.len() < 8 {
                return fail(Sense::PARAM_LIST_LENGTH_ERROR);
            }
            (8, usize::from(be16(&p[6..8])))
        };
        let mut i = hdr + bdl;
        if i > p.len() {
            return fail(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let mut mode = self.lock().mode;
        while i + 2 <= p.len() {
            let code = p[i] & 0x3f;
            let spf = p[i] & 0x40 != 0;
            if spf {
                return fail(Sense::INVALID_FIELD_IN_PARAM_LIST);
            }
            let len = usize::from(p[i + 1]);
            if i + 2 + len > p.len() {
                return fail(Sense::PARAM_LIST_LENGTH_ERROR);
            }
            let body = &p[i + 2..i + 2 + len];
            match code {
                0x08 if len == 0x12 => mode.write_cache = body[0] & 0x04 != 0,
                0x0a if len == 0x0a => mode.descriptor_sense = body[0] & 0x04 != 0,
                0x01 | 0x1c if len == 0x0a => {}
                _ => return fail(Sense::INVALID_FIELD_IN_PARAM_LIST),
            }
            i += 2 + len;
        }
        self.lock().mode = mode;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) fn report_luns(&self, cdb: &[u8; 16]) -> CmdResult {
        let select = cdb[2];
        let alloc = be32(&cdb[6..10]) as usize;
        if alloc < 16 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let mut v = Vec::new();
        match select {
            0x00 | 0x02 => {
                v.extend_from_slice(&8u32.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.extend_from_slice(&[0; 8]);
            }
            0x01 | 0x10 | 0x11 | 0x12 => {
                v.extend_from_slice(&0u32.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        }
        Ok(ScsiResult::data(v, alloc))
    }

    /// REPORT SUPPORTED OPERATION CODES: all of [`OPCODES`] (reporting
    /// options 0), or one opcode / service action (options 1 to 3).
    pub(super) fn report_supported_opcodes(&self, cdb: &[u8; 16]) -> CmdResult {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let req_op = cdb[3];
        let req_sa = be16(&cdb[4..6]);
        let alloc = be32(&cdb[6..10]) as usize;
        // Command timeouts descriptor: nominal 0, recommended 30 s.
        let timeouts = |v: &mut Vec<u8>| {
            v.extend_from_slice(&0x0au16.to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&30u32.to_be_bytes());
        };
        match options {
            0 => {
                let mut body = Vec::new();
                for info in OPCODES {
                    for (sa, usage) in info.usages() {
                        body.push(info.opcode);
                        body.push(0);
                        body.extend_from_slice(&u16::from(sa.unwrap_or(0)).to_be_bytes());
                        body.push(0);
                        let mut f = 0u8;
                        if sa.is_some() {
                            f |= 0x01;
                        }
                        if rctd {
                            f |= 0x02;
                        }
                        body.push(f);
                        body.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                        if rctd {
                            timeouts(&mut body);
                        }
                    }
                }
                let mut v = (body.len() as u32).to_be_bytes().to_vec();
                v.extend(body);
                Ok(ScsiResult::data(v, alloc))
            }
            1..=3 => {
                let info = opcodes::lookup(req_op);
                let found = info.and_then(|info| {
                    info.usages()
                        .find(|(sa, _)| match (options, sa) {
                            (1, None) => true,
                            (2, Some(sa)) => u16::from(*sa) == req_sa,
                            (3, None) => true,
                            (3, Some(sa)) => u16::from(*sa) == req_sa,
                            _ => false,
                        })
                        .map(|(_, usage)| usage)
                });
                let has_service_actions = info.is_some_and(|i| i.has_service_actions());
                if options == 1 && has_service_actions {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                if options == 2 && !has_service_actions {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                let mut v = vec![0u8, 0u8];
                match found {
                    Some(usage) => {
                        v[1] = 0x03 | if rctd { 0x80 } else { 0 };
                        v.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                        v.extend_from_slice(usage);
                    }
                    None => {
                        v[1] = 0x01;
                        v.extend_from_slice(&0u16.to_be_bytes());
                    }
                }
                if rctd && found.is_some() {
                    timeouts(&mut v);
                }
                Ok(ScsiResult::data(v, alloc))
            }
            _ => Err(Sense::INVALID_FIELD_IN_CDB.into()),
        }
    }
}
