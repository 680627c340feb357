//! The one table of SCSI operation codes the logical unit implements.
//!
//! Each row holds everything known about one opcode: its name, the CDB
//! usage mask of each of its forms (whose length is the CDB length), its
//! service actions, how it touches the medium (for reservation conflicts),
//! whether unit attentions wait for a later command, and the [`Command`]
//! the dispatcher runs. The dispatcher in [`super::ScsiLun::execute`] looks
//! commands up here, and REPORT SUPPORTED OPERATION CODES lists this table
//! in order, so a new command is added in one place.

use crate::reservation::Access;
use crate::sense::Sense;

use super::cdb::group_cdb_len;

/// SCSI operation codes we implement.
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub mod service_action {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// What the dispatcher runs for a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    // Primary commands (SPC), in `spc.rs`.
    TestUnitReady,
    RequestSense,
    Inquiry,
    ModeSense,
    ModeSelect,
    ReportLuns,
    ReportSupportedOperationCodes,
    // Block commands (SBC), in `sbc.rs`.
    ReadCapacity10,
    ReadCapacity16,
    GetLbaStatus,
    Read,
    Write,
    WriteAndVerify,
    Verify,
    OrWrite,
    SynchronizeCache,
    PreFetch,
    WriteSame,
    Unmap,
    CompareAndWrite,
    StartStopUnit,
    PreventAllowMediumRemoval,
    ReadDefectData10,
    ReadDefectData12,
    // Reservations, in `pr.rs`.
    Reserve,
    Release,
    PersistentReserveIn,
    PersistentReserveOut,
    /// Refused with this sense data without running.
    Refuse(Sense),
}

/// One service action of an opcode that has them (in CDB byte 1, bits 0-4).
#[derive(Debug)]
pub struct ServiceActionInfo {
    pub service_action: u8,
    pub name: &'static str,
    /// CDB usage data for REPORT SUPPORTED OPERATION CODES.
    pub usage: &'static [u8],
    pub command: Command,
}

/// The forms of an opcode.
#[derive(Debug)]
pub enum Forms {
    /// One CDB layout, no service action.
    Single {
        usage: &'static [u8],
        command: Command,
    },
    /// A service action selects the command; `other` runs for service
    /// actions not listed.
    ServiceActions {
        actions: &'static [ServiceActionInfo],
        other: Command,
    },
}

/// Everything about one operation code.
#[derive(Debug)]
pub struct OpcodeInfo {
    pub opcode: u8,
    pub name: &'static str,
    /// How the command touches the medium, for reservation conflicts.
    pub access: Access,
    /// An SPC-2 RESERVE or RELEASE (conflicts are judged differently).
    pub spc2_reservation: bool,
    /// Runs without reporting (or consuming) a pending unit attention
    /// (INQUIRY, REPORT LUNS, REQUEST SENSE: SPC-5 5.14).
    pub unit_attention_exempt: bool,
    pub forms: Forms,
}

impl OpcodeInfo {
    /// The length of this opcode's CDB (the length of its usage data).
    pub fn cdb_len(&self) -> usize {
        match &self.forms {
            Forms::Single { usage, .. } => usage.len(),
            Forms::ServiceActions { actions, .. } => actions
                .first()
                .map_or_else(|| group_cdb_len(self.opcode), |a| a.usage.len()),
        }
    }

    pub fn has_service_actions(&self) -> bool {
        matches!(self.forms, Forms::ServiceActions { .. })
    }

    /// The command a CDB of this opcode asks for.
    pub fn command(&self, cdb: &[u8]) -> Command {
        match &self.forms {
            Forms::Single { command, .. } => *command,
            Forms::ServiceActions { actions, other } => {
                let sa = cdb.get(1).map_or(0, |b| b & 0x1f);
                actions
                    .iter()
                    .find(|a| a.service_action == sa)
                    .map_or(*other, |a| a.command)
            }
        }
    }

    /// Each form as (service action, CDB usage data), in table order.
    pub fn usages(&self) -> impl Iterator<Item = (Option<u8>, &'static [u8])> {
        let (single, actions): (Option<&'static [u8]>, &'static [ServiceActionInfo]) =
            match &self.forms {
                Forms::Single { usage, .. } => (Some(*usage), &[]),
                Forms::ServiceActions { actions, .. } => (None, *actions),
            };
        single
            .map(|u| (None, u))
            .into_iter()
            .chain(actions.iter().map(|a| (Some(a.service_action), a.usage)))
    }
}

/// The table entry of `opcode`, if we implement it.
pub fn lookup(opcode: u8) -> Option<&'static OpcodeInfo> {
    OPCODES.get(usize::from(INDEX[usize::from(opcode)]))
}

/// The length a CDB of `opcode` must have: from the table for the opcodes
/// we implement, by the group code (SAM-5 5.2) for the others.
pub fn cdb_len(opcode: u8) -> usize {
    lookup(opcode).map_or_else(|| group_cdb_len(opcode), OpcodeInfo::cdb_len)
}

/// Position in [`OPCODES`] by opcode (`u8::MAX`: not implemented).
static INDEX: [u8; 256] = {
    let mut index = [u8::MAX; 256];
    let mut i = 0;
    while i < OPCODES.len() {
        index[OPCODES[i].opcode as usize] = i as u8;
        i += 1;
    }
    index
};

const fn single(
    opcode: u8,
    name: &'static str,
    access: Access,
    usage: &'static [u8],
    command: Command,
) -> OpcodeInfo {
    OpcodeInfo {
        opcode,
        name,
        access,
        spc2_reservation: false,
        unit_attention_exempt: false,
        forms: Forms::Single { usage, command },
    }
}

const fn with_service_actions(
    opcode: u8,
    name: &'static str,
    access: Access,
    actions: &'static [ServiceActionInfo],
    other: Command,
) -> OpcodeInfo {
    OpcodeInfo {
        opcode,
        name,
        access,
        spc2_reservation: false,
        unit_attention_exempt: false,
        forms: Forms::ServiceActions { actions, other },
    }
}

const fn sa(
    service_action: u8,
    name: &'static str,
    usage: &'static [u8],
    command: Command,
) -> ServiceActionInfo {
    ServiceActionInfo {
        service_action,
        name,
        usage,
        command,
    }
}

impl OpcodeInfo {
    const fn unit_attention_exempt(mut self) -> Self {
        self.unit_attention_exempt = true;
        self
    }
    const fn spc2_reservation(mut self) -> Self {
        self.spc2_reservation = true;
        self
    }
}

use Access::{Always, Read, Write};
use Command as C;

/// `template` with `opcode` in byte 0 and `byte1` in byte 1.
const fn usage<const N: usize>(template: [u8; N], opcode: u8, byte1: u8) -> [u8; N] {
    let mut u = template;
    u[0] = opcode;
    u[1] = byte1;
    u
}

// CDB usage data shared by several rows (byte 0 and 1 filled in per row).
const RW10: [u8; 10] = [0, 0, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04];
const RW12: [u8; 12] = [
    0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04,
];
const RW16: [u8; 16] = [
    0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04,
];
const PR_IN: &[u8] = &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04];
const PR_OUT: &[u8] = &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04];

/// Every opcode we implement. The order is the order of REPORT SUPPORTED
/// OPERATION CODES' list of all commands.
#[rustfmt::skip]
pub static OPCODES: &[OpcodeInfo] = &[
    single(0x00, "TEST UNIT READY", Always, &[0x00, 0, 0, 0, 0, 0x04], C::TestUnitReady),
    single(0x03, "REQUEST SENSE", Always, &[0x03, 0x01, 0, 0, 0xff, 0x04], C::RequestSense)
        .unit_attention_exempt(),
    single(0x08, "READ(6)", Read, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0x04], C::Read),
    single(0x0a, "WRITE(6)", Write, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0x04], C::Write),
    single(0x12, "INQUIRY", Always, &[0x12, 0x01, 0xff, 0xff, 0xff, 0x04], C::Inquiry)
        .unit_attention_exempt(),
    single(0x15, "MODE SELECT(6)", Write, &[0x15, 0x11, 0, 0, 0xff, 0x04], C::ModeSelect),
    single(0x16, "RESERVE(6)", Write, &[0x16, 0, 0, 0, 0, 0x04], C::Reserve).spc2_reservation(),
    single(0x17, "RELEASE(6)", Always, &[0x17, 0, 0, 0, 0, 0x04], C::Release).spc2_reservation(),
    single(0x1a, "MODE SENSE(6)", Read, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0x04], C::ModeSense),
    single(0x1b, "START STOP UNIT", Write, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0x04], C::StartStopUnit),
    single(0x1e, "PREVENT ALLOW MEDIUM REMOVAL", Write, &[0x1e, 0, 0, 0, 0x03, 0x04],
        C::PreventAllowMediumRemoval),
    single(0x25, "READ CAPACITY(10)", Always, &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04],
        C::ReadCapacity10),
    single(0x28, "READ(10)", Read, &usage(RW10, 0x28, 0xf8), C::Read),
    single(0x2a, "WRITE(10)", Write, &usage(RW10, 0x2a, 0xf8), C::Write),
    single(0x2e, "WRITE AND VERIFY(10)", Write, &usage(RW10, 0x2e, 0xf2), C::WriteAndVerify),
    single(0x2f, "VERIFY(10)", Read, &usage(RW10, 0x2f, 0xf6), C::Verify),
    single(0x34, "PRE-FETCH(10)", Read, &usage(RW10, 0x34, 0x02), C::PreFetch),
    single(0x35, "SYNCHRONIZE CACHE(10)", Write, &usage(RW10, 0x35, 0x02), C::SynchronizeCache),
    single(0x41, "WRITE SAME(10)", Write, &usage(RW10, 0x41, 0xf8), C::WriteSame),
    single(0x42, "UNMAP", Write, &[0x42, 0x00, 0, 0, 0, 0, 0x3f, 0xff, 0xff, 0x04], C::Unmap),
    single(0x55, "MODE SELECT(10)", Write, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        C::ModeSelect),
    single(0x56, "RESERVE(10)", Write, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x04], C::Reserve)
        .spc2_reservation(),
    single(0x57, "RELEASE(10)", Always, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x04], C::Release)
        .spc2_reservation(),
    single(0x5a, "MODE SENSE(10)", Read, &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04],
        C::ModeSense),
    with_service_actions(0x5e, "PERSISTENT RESERVE IN", Always, &[
        sa(0, "READ KEYS", PR_IN, C::PersistentReserveIn),
        sa(1, "READ RESERVATION", PR_IN, C::PersistentReserveIn),
        sa(2, "REPORT CAPABILITIES", PR_IN, C::PersistentReserveIn),
        sa(3, "READ FULL STATUS", PR_IN, C::PersistentReserveIn),
    ],
        // The reservation state refuses the others with sense data.
        C::PersistentReserveIn),
    with_service_actions(0x5f, "PERSISTENT RESERVE OUT", Always, &[
        sa(0, "REGISTER", PR_OUT, C::PersistentReserveOut),
        sa(1, "RESERVE", PR_OUT, C::PersistentReserveOut),
        sa(2, "RELEASE", PR_OUT, C::PersistentReserveOut),
        sa(3, "CLEAR", PR_OUT, C::PersistentReserveOut),
        sa(4, "PREEMPT", PR_OUT, C::PersistentReserveOut),
        sa(5, "PREEMPT AND ABORT", PR_OUT, C::PersistentReserveOut),
        sa(6, "REGISTER AND IGNORE EXISTING KEY", PR_OUT, C::PersistentReserveOut),
    ],
        // REGISTER AND MOVE and unknown service actions are refused once
        // the parameter list length is known (see `pr.rs`).
        C::PersistentReserveOut),
    single(0x88, "READ(16)", Read, &usage(RW16, 0x88, 0xf8), C::Read),
    single(0x89, "COMPARE AND WRITE", Write,
        &[0x89, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x3f, 0x04],
        C::CompareAndWrite),
    single(0x8a, "WRITE(16)", Write, &usage(RW16, 0x8a, 0xf8), C::Write),
    single(0x8b, "ORWRITE(16)", Write, &usage(RW16, 0x8b, 0xf8), C::OrWrite),
    single(0x8e, "WRITE AND VERIFY(16)", Write, &usage(RW16, 0x8e, 0xf2), C::WriteAndVerify),
    single(0x8f, "VERIFY(16)", Read, &usage(RW16, 0x8f, 0xf6), C::Verify),
    single(0x90, "PRE-FETCH(16)", Read, &usage(RW16, 0x90, 0x02), C::PreFetch),
    single(0x91, "SYNCHRONIZE CACHE(16)", Write, &usage(RW16, 0x91, 0x02), C::SynchronizeCache),
    single(0x93, "WRITE SAME(16)", Write, &usage(RW16, 0x93, 0xf9), C::WriteSame),
    with_service_actions(0x9e, "SERVICE ACTION IN(16)", Always, &[
        sa(0x10, "READ CAPACITY(16)",
            &[0x9e, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x04],
            C::ReadCapacity16),
        sa(0x12, "GET LBA STATUS",
            &[0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
            C::GetLbaStatus),
    ], C::Refuse(Sense::INVALID_FIELD_IN_CDB)),
    single(0xa0, "REPORT LUNS", Always, &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        C::ReportLuns).unit_attention_exempt(),
    with_service_actions(0xa3, "MAINTENANCE IN", Always, &[
        sa(0x0c, "REPORT SUPPORTED OPERATION CODES",
            &[0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
            C::ReportSupportedOperationCodes),
    ], C::Refuse(Sense::INVALID_OPCODE)),
    single(0xa8, "READ(12)", Read, &usage(RW12, 0xa8, 0xf8), C::Read),
    single(0xaa, "WRITE(12)", Write, &usage(RW12, 0xaa, 0xf8), C::Write),
    single(0xae, "WRITE AND VERIFY(12)", Write, &usage(RW12, 0xae, 0xf2), C::WriteAndVerify),
    single(0xaf, "VERIFY(12)", Read, &usage(RW12, 0xaf, 0xf6), C::Verify),
    single(0x37, "READ DEFECT DATA(10)", Read, &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        C::ReadDefectData10),
    single(0xb7, "READ DEFECT DATA(12)", Read, &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        C::ReadDefectData12),
];
