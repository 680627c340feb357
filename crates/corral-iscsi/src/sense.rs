//! SCSI status codes and sense data (SPC-5 §4.4): fixed format (0x70) and
//! descriptor format (0x72), chosen by the D_SENSE bit of the control mode
//! page or the DESC bit of REQUEST SENSE.

/// SCSI status byte values.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// A sense key with its additional sense code and qualifier, plus the
/// optional INFORMATION field and sense-key-specific field pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the offset of a miscompare).
    pub information: Option<u64>,
    /// Sense-key specific: field pointer (C/D bit, byte, bit) for ILLEGAL REQUEST.
    pub field_pointer: Option<(bool, u16)>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field_pointer: None,
        }
    }

    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAM_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const INVALID_RELEASE_OF_PR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    pub const SAVING_PARAMS_UNSUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
    pub const MISCOMPARE_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    pub const POWER_ON_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    pub const BUS_DEVICE_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x03);
    pub const CAPACITY_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
    pub const MODE_PARAMS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x05);
    pub const UNRECOVERED_READ: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    pub const NOT_READY_UNAVAILABLE: Sense = Sense::new(key::NOT_READY, 0x04, 0x03);
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x00);
    pub const LOGICAL_BLOCK_GUARD_CHECK: Sense = Sense::new(key::ABORTED_COMMAND, 0x10, 0x01);

    pub fn with_information(mut self, info: u64) -> Self {
        self.information = Some(info);
        self
    }

    /// Sense data in fixed (0x70) or descriptor (0x72) format.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut v = vec![0x72, self.key & 0xf, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.information {
                // Information descriptor (type 0), VALID set.
                v.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                v.extend_from_slice(&info.to_be_bytes());
            }
            if let Some((cd, byte)) = self.field_pointer {
                v.extend_from_slice(&[0x02, 0x06, 0, 0]);
                v.push(0x80 | if cd { 0x40 } else { 0 });
                v.extend_from_slice(&byte.to_be_bytes());
                v.push(0);
            }
            v[7] = (v.len() - 8) as u8;
            v
        } else {
            let mut v = vec![0u8; 18];
            v[0] = 0x70;
            v[2] = self.key & 0xf;
            if let Some(info) = self.information {
                v[0] |= 0x80;
                v[3..7].copy_from_slice(&(info as u32).to_be_bytes());
            }
            v[7] = 10;
            v[12] = self.asc;
            v[13] = self.ascq;
            if let Some((cd, byte)) = self.field_pointer {
                v[15] = 0x80 | if cd { 0x40 } else { 0 };
                v[16..18].copy_from_slice(&byte.to_be_bytes());
            }
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_descriptor_formats() {
        let s = Sense::MISCOMPARE_VERIFY.with_information(17);
        let f = s.encode(false);
        assert_eq!(f[0], 0xf0);
        assert_eq!(f[2], key::MISCOMPARE);
        assert_eq!(&f[3..7], &17u32.to_be_bytes());
        assert_eq!((f[12], f[13]), (0x1d, 0));
        let d = s.encode(true);
        assert_eq!(d[0], 0x72);
        assert_eq!((d[1], d[2], d[3]), (key::MISCOMPARE, 0x1d, 0));
        assert_eq!(d[7] as usize, d.len() - 8);
    }
}
