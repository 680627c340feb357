//! The SCSI block device (SBC-4 / SPC-5) over a [`BlockDevice`]: turns a
//! CDB plus Data-Out bytes into device calls and returns status, sense data
//! and Data-In bytes.
//!
//! Transport-independent: the iSCSI layer hands over the CDB and however
//! many Data-Out bytes the initiator announced (its Expected Data Transfer
//! Length); a command uses what its CDB asks for, and the transport works
//! out residuals from [`ScsiResult::transfer_len`].

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use corral_block::{BlockDevice, BlockError};
use tracing::{debug, warn};

use crate::reservation::{Access, Nexus, PrError, Reservations};
use crate::sense::{Sense, status};

/// Largest transfer of one READ/WRITE command, in bytes (advertised in the
/// Block Limits VPD page).
pub const MAX_TRANSFER_BYTES: u64 = 32 << 20;
/// Largest WRITE SAME / UNMAP range per descriptor, in bytes.
pub const MAX_WRITE_SAME_BYTES: u64 = 512 << 20;
/// Most UNMAP block descriptors per command.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// COMPARE AND WRITE: most blocks per command.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 128;
/// Unit attentions queued per nexus before the oldest are dropped.
const MAX_UNIT_ATTENTIONS: usize = 16;

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

/// Identity of the logical unit, stable per volume.
#[derive(Clone, Debug)]
pub struct LunIdentity {
    /// Target IQN (for the SCSI name string designator).
    pub target_name: String,
    /// The volume name (unit serial number and T10 vendor id).
    pub volume: String,
}

/// The outcome of one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    pub status: u8,
    /// Sense data (already encoded), for CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In bytes (the command's full output, before any EDTL trimming).
    pub data_in: Bytes,
    /// Bytes the command meant to transfer (in or out) per its CDB; the
    /// transport compares it with the Expected Data Transfer Length.
    pub transfer_len: u64,
}

impl ScsiResult {
    fn good() -> Self {
        ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: Bytes::new(),
            transfer_len: 0,
        }
    }
    fn data(data: Vec<u8>, alloc_len: usize) -> Self {
        let mut data = data;
        data.truncate(alloc_len);
        let n = data.len() as u64;
        ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: Bytes::from(data),
            transfer_len: n,
        }
    }
    fn status(status: u8) -> Self {
        ScsiResult {
            status,
            ..ScsiResult::good()
        }
    }
}

/// A command's failure before or during execution.
#[derive(Debug, Clone, Copy)]
enum Fail {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

type CmdResult = Result<ScsiResult, Fail>;

/// Mode parameters the initiator may change.
#[derive(Clone, Copy, Debug)]
struct ModeState {
    write_cache: bool,
    descriptor_sense: bool,
}

struct LunState {
    mode: ModeState,
    reservations: Reservations,
    /// Pending unit attentions per nexus.
    unit_attentions: HashMap<Nexus, VecDeque<Sense>>,
    /// Nexuses seen (they get attentions for resets and PR changes).
    known: Vec<Nexus>,
}

/// One logical unit: a [`BlockDevice`] plus SCSI state.
pub struct ScsiLun<D> {
    device: std::sync::Arc<D>,
    identity: LunIdentity,
    block_size: u32,
    naa: [u8; 16],
    state: Mutex<LunState>,
    /// COMPARE AND WRITE takes this exclusively; writes share it.
    atomic: tokio::sync::RwLock<()>,
    /// Commands executed (statistics).
    executed: AtomicU64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The length a CDB of `opcode` must have (by its group code).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Map a device error onto sense data.
fn device_sense(e: &BlockError, write: bool) -> Sense {
    match e {
        BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        BlockError::Invalid(_) => Sense::INVALID_FIELD_IN_CDB,
        BlockError::NoSpace(_) => Sense::SPACE_ALLOCATION_FAILED,
        BlockError::Integrity(_) => Sense::UNRECOVERED_READ,
        BlockError::Unavailable(_) => Sense::NOT_READY_UNAVAILABLE,
        BlockError::Io(_) if write => Sense::WRITE_ERROR,
        BlockError::Io(_) => Sense::UNRECOVERED_READ,
    }
}

/// Every opcode (and service action) we support, with its CDB usage mask,
/// for REPORT SUPPORTED OPERATION CODES.
struct OpInfo {
    opcode: u8,
    service_action: Option<u16>,
    usage: &'static [u8],
}

const SUPPORTED: &[OpInfo] = &[
    op(0x00, None, &[0x00, 0, 0, 0, 0, 0x04]),
    op(0x03, None, &[0x03, 0x01, 0, 0, 0xff, 0x04]),
    op(0x08, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    op(0x0a, None, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    op(0x12, None, &[0x12, 0x01, 0xff, 0xff, 0xff, 0x04]),
    op(0x15, None, &[0x15, 0x11, 0, 0, 0xff, 0x04]),
    op(0x16, None, &[0x16, 0, 0, 0, 0, 0x04]),
    op(0x17, None, &[0x17, 0, 0, 0, 0, 0x04]),
    op(0x1a, None, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0x04]),
    op(0x1b, None, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0x04]),
    op(0x1e, None, &[0x1e, 0, 0, 0, 0x03, 0x04]),
    op(
        0x25,
        None,
        &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04],
    ),
    op(
        0x28,
        None,
        &[0x28, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x2a,
        None,
        &[0x2a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x2e,
        None,
        &[0x2e, 0xf2, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x2f,
        None,
        &[0x2f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x34,
        None,
        &[0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x35,
        None,
        &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x41,
        None,
        &[0x41, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(
        0x42,
        None,
        &[0x42, 0x00, 0, 0, 0, 0, 0x3f, 0xff, 0xff, 0x04],
    ),
    op(0x55, None, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    op(0x56, None, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x04]),
    op(0x57, None, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x04]),
    op(
        0x5a,
        None,
        &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    op(
        0x5e,
        Some(0),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    op(
        0x5e,
        Some(1),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    op(
        0x5e,
        Some(2),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    op(
        0x5e,
        Some(3),
        &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(0),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(1),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(2),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(3),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(4),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(5),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x5f,
        Some(6),
        &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
    ),
    op(
        0x88,
        None,
        &[
            0x88, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x89,
        None,
        &[
            0x89, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x3f, 0x04,
        ],
    ),
    op(
        0x8a,
        None,
        &[
            0x8a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x8b,
        None,
        &[
            0x8b, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x8e,
        None,
        &[
            0x8e, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x8f,
        None,
        &[
            0x8f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x90,
        None,
        &[
            0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x91,
        None,
        &[
            0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x93,
        None,
        &[
            0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, 0x04,
        ],
    ),
    op(
        0x9e,
        Some(0x10),
        &[
            0x9e, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x01, 0x04,
        ],
    ),
    op(
        0x9e,
        Some(0x12),
        &[
            0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    op(
        0xa0,
        None,
        &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
    ),
    op(
        0xa3,
        Some(0x0c),
        &[
            0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    op(
        0xa8,
        None,
        &[
            0xa8, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04,
        ],
    ),
    op(
        0xaa,
        None,
        &[
            0xaa, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04,
        ],
    ),
    op(
        0xae,
        None,
        &[
            0xae, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04,
        ],
    ),
    op(
        0xaf,
        None,
        &[
            0xaf, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04,
        ],
    ),
    op(0x37, None, &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    op(
        0xb7,
        None,
        &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
    ),
];

const fn op(opcode: u8, service_action: Option<u16>, usage: &'static [u8]) -> OpInfo {
    OpInfo {
        opcode,
        service_action,
        usage,
    }
}

/// Which opcodes carry a service action in byte 1.
fn has_service_action(opcode: u8) -> bool {
    matches!(opcode, 0x5e | 0x5f | 0x9e | 0xa3)
}

fn access_of(opcode: u8) -> Access {
    use opcode::*;
    match opcode {
        INQUIRY
        | REPORT_LUNS
        | REQUEST_SENSE
        | PERSISTENT_RESERVE_IN
        | PERSISTENT_RESERVE_OUT
        | MAINTENANCE_IN
        | READ_CAPACITY_10
        | SERVICE_ACTION_IN_16
        | TEST_UNIT_READY
        | RELEASE_6
        | RELEASE_10 => Access::Always,
        READ_6 | READ_10 | READ_12 | READ_16 | VERIFY_10 | VERIFY_12 | VERIFY_16 | PRE_FETCH_10
        | PRE_FETCH_16 | MODE_SENSE_6 | MODE_SENSE_10 | READ_DEFECT_DATA_10
        | READ_DEFECT_DATA_12 => Access::Read,
        _ => Access::Write,
    }
}

/// A decoded READ/WRITE-family CDB.
struct Rw {
    lba: u64,
    blocks: u64,
    flags: u8,
}

fn decode_rw(cdb: &[u8]) -> Rw {
    match cdb[0] {
        opcode::READ_6 | opcode::WRITE_6 => {
            let lba = u64::from(be32(&[0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let blocks = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            Rw {
                lba,
                blocks,
                flags: 0,
            }
        }
        0x20..=0x5f => Rw {
            lba: u64::from(be32(&cdb[2..6])),
            blocks: u64::from(be16(&cdb[7..9])),
            flags: cdb[1],
        },
        0xa0..=0xbf => Rw {
            lba: u64::from(be32(&cdb[2..6])),
            blocks: u64::from(be32(&cdb[6..10])),
            flags: cdb[1],
        },
        _ => Rw {
            lba: be64(&cdb[2..10]),
            blocks: u64::from(be32(&cdb[10..14])),
            flags: cdb[1],
        },
    }
}

impl<D: BlockDevice> ScsiLun<D> {
    pub fn new(device: std::sync::Arc<D>, identity: LunIdentity) -> Self {
        let block_size = device.block_size();
        let hash = fnv1a(identity.volume.as_bytes());
        let hash2 = fnv1a(identity.target_name.as_bytes());
        // NAA 6 (IEEE registered extended): locally chosen OUI-like prefix.
        let mut naa = [0u8; 16];
        naa[0] = 0x60 | 0x0c;
        naa[1] = 0x0a;
        naa[2] = 0x7c;
        naa[3] = 0x00;
        naa[4..12].copy_from_slice(&hash.to_be_bytes());
        naa[12..16].copy_from_slice(&(hash2 as u32).to_be_bytes());
        ScsiLun {
            device,
            identity,
            block_size,
            naa,
            state: Mutex::new(LunState {
                mode: ModeState {
                    write_cache: true,
                    descriptor_sense: false,
                },
                reservations: Reservations::default(),
                unit_attentions: HashMap::new(),
                known: Vec::new(),
            }),
            atomic: tokio::sync::RwLock::new(()),
            executed: AtomicU64::new(0),
        }
    }

    pub fn device(&self) -> &std::sync::Arc<D> {
        &self.device
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn blocks(&self) -> u64 {
        self.device.size() / u64::from(self.block_size)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LunState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Register a nexus (a new session logged in). Its first command other
    /// than INQUIRY, REPORT LUNS or REQUEST SENSE gets the power-on unit
    /// attention (SPC-5 6.4): to this nexus the LUN has just appeared.
    pub fn nexus_added(&self, nexus: &Nexus) {
        let mut st = self.lock();
        if !st.known.contains(nexus) {
            st.known.push(nexus.clone());
            queue_ua(&mut st, nexus, Sense::POWER_ON_RESET);
        }
    }

    /// A session ended: drop its SPC-2 reservation and attentions.
    pub fn nexus_removed(&self, nexus: &Nexus) {
        let mut st = self.lock();
        st.reservations.nexus_lost(nexus);
        st.unit_attentions.remove(nexus);
        st.known.retain(|n| n != nexus);
    }

    /// A LUN or target reset: SPC-2 reservations cleared, every other nexus
    /// gets a reset unit attention.
    pub fn reset(&self, by: Option<&Nexus>) {
        let mut st = self.lock();
        st.reservations.reset();
        let others: Vec<Nexus> = st
            .known
            .iter()
            .filter(|n| Some(*n) != by)
            .cloned()
            .collect();
        for n in others {
            queue_ua(&mut st, &n, Sense::BUS_DEVICE_RESET);
        }
    }

    /// Raise a unit attention for every nexus (e.g. capacity changed).
    pub fn unit_attention_all(&self, sense: Sense) {
        let mut st = self.lock();
        let all = st.known.clone();
        for n in all {
            queue_ua(&mut st, &n, sense);
        }
    }

    fn sense_bytes(&self, sense: Sense) -> Bytes {
        let desc = self.lock().mode.descriptor_sense;
        Bytes::from(sense.encode(desc))
    }

    fn check(&self, sense: Sense) -> ScsiResult {
        ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(self.sense_bytes(sense)),
            data_in: Bytes::new(),
            transfer_len: 0,
        }
    }

    /// Execute one command for `nexus` with `data_out` (as many bytes as the
    /// initiator sent, up to its Expected Data Transfer Length).
    pub async fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: Bytes) -> ScsiResult {
        self.executed.fetch_add(1, Ordering::Relaxed);
        let mut full = [0u8; 16];
        let n = cdb.len().min(16);
        full[..n].copy_from_slice(&cdb[..n]);
        let opc = full[0];
        if cdb.len() < cdb_len(opc) {
            return self.check(Sense::INVALID_FIELD_IN_CDB);
        }
        // Unit attentions: reported once to each nexus, except to INQUIRY,
        // REPORT LUNS and REQUEST SENSE.
        if !matches!(
            opc,
            opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
        ) {
            let ua = {
                let mut st = self.lock();
                st.unit_attentions
                    .get_mut(nexus)
                    .and_then(|q| q.pop_front())
            };
            if let Some(sense) = ua {
                return self.check(sense);
            }
        }
        // NACA in the control byte: we do not support ACA.
        let control = full[cdb_len(opc) - 1];
        if control & 0x04 != 0 {
            return self.check(Sense::INVALID_FIELD_IN_CDB);
        }
        let legacy = matches!(
            opc,
            opcode::RESERVE_6 | opcode::RESERVE_10 | opcode::RELEASE_6 | opcode::RELEASE_10
        );
        let access = if matches!(opc, opcode::RESERVE_6 | opcode::RESERVE_10) {
            Access::Write
        } else {
            access_of(opc)
        };
        if self.lock().reservations.conflicts(nexus, access, legacy) {
            return ScsiResult::status(status::RESERVATION_CONFLICT);
        }
        match self.dispatch(nexus, &full, data_out).await {
            Ok(r) => r,
            Err(Fail::Check(s)) => self.check(s),
            Err(Fail::Conflict) => ScsiResult::status(status::RESERVATION_CONFLICT),
        }
    }

    async fn dispatch(&self, nexus: &Nexus, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        use opcode::*;
        match cdb[0] {
            TEST_UNIT_READY => Ok(ScsiResult::good()),
            REQUEST_SENSE => self.request_sense(nexus, cdb),
            INQUIRY => self.inquiry(cdb),
            READ_CAPACITY_10 => self.read_capacity_10(cdb),
            SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
                service_action::READ_CAPACITY_16 => self.read_capacity_16(cdb),
                service_action::GET_LBA_STATUS => self.get_lba_status(cdb).await,
                _ => Err(Sense::INVALID_FIELD_IN_CDB.into()),
            },
            READ_6 | READ_10 | READ_12 | READ_16 => self.read(cdb).await,
            WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => self.write(cdb, data, false).await,
            WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
                self.write(cdb, data, true).await
            }
            VERIFY_10 | VERIFY_12 | VERIFY_16 => self.verify(cdb, data).await,
            ORWRITE_16 => self.orwrite(cdb, data).await,
            SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => self.synchronize_cache(cdb).await,
            PRE_FETCH_10 | PRE_FETCH_16 => {
                let rw = decode_rw(cdb);
                self.check_range(rw.lba, rw.blocks)?;
                Ok(ScsiResult::good())
            }
            WRITE_SAME_10 | WRITE_SAME_16 => self.write_same(cdb, data).await,
            UNMAP => self.unmap(cdb, data).await,
            COMPARE_AND_WRITE => self.compare_and_write(cdb, data).await,
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(cdb),
            MODE_SELECT_6 | MODE_SELECT_10 => self.mode_select(cdb, &data),
            REPORT_LUNS => self.report_luns(cdb),
            MAINTENANCE_IN if cdb[1] & 0x1f == service_action::REPORT_SUPPORTED_OPCODES => {
                self.report_supported_opcodes(cdb)
            }
            START_STOP_UNIT => {
                // Power conditions other than START_VALID (0) and the
                // LOEJ bit on a non-removable unit are not supported.
                let pc = cdb[4] >> 4;
                if !matches!(pc, 0 | 1 | 2 | 3 | 5 | 7 | 0xa | 0xb) {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                Ok(ScsiResult::good())
            }
            READ_DEFECT_DATA_10 => {
                // A virtual disk has no defects: an empty list in the
                // format asked for.
                let alloc = usize::from(be16(&cdb[7..9]));
                let flags = cdb[2] & 0x1f;
                Ok(ScsiResult::data(vec![0, flags, 0, 0], alloc))
            }
            READ_DEFECT_DATA_12 => {
                let alloc = be32(&cdb[6..10]) as usize;
                let flags = cdb[1] & 0x1f;
                Ok(ScsiResult::data(vec![0, flags, 0, 0, 0, 0, 0, 0], alloc))
            }
            PREVENT_ALLOW => {
                if cdb[4] & 0x03 > 1 {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                Ok(ScsiResult::good())
            }
            RESERVE_6 | RESERVE_10 => {
                if self.lock().reservations.legacy_reserve(nexus) {
                    Ok(ScsiResult::good())
                } else {
                    Err(Fail::Conflict)
                }
            }
            RELEASE_6 | RELEASE_10 => {
                self.lock().reservations.legacy_release(nexus);
                Ok(ScsiResult::good())
            }
            PERSISTENT_RESERVE_IN => {
                let alloc = usize::from(be16(&cdb[7..9]));
                let v = self.lock().reservations.pr_in(cdb[1] & 0x1f, nexus)?;
                Ok(ScsiResult::data(v, alloc))
            }
            PERSISTENT_RESERVE_OUT => self.pr_out(nexus, cdb, &data),
            _ => Err(Sense::INVALID_OPCODE.into()),
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Fail> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
        }
    }

    fn check_transfer(&self, blocks: u64) -> Result<(), Fail> {
        if blocks * u64::from(self.block_size) > MAX_TRANSFER_BYTES {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        Ok(())
    }

    fn request_sense(&self, nexus: &Nexus, cdb: &[u8; 16]) -> CmdResult {
        let desc = cdb[1] & 0x01 != 0;
        let alloc = usize::from(cdb[4]);
        let pending = {
            let mut st = self.lock();
            st.unit_attentions
                .get_mut(nexus)
                .and_then(|q| q.pop_front())
        };
        let sense = pending.unwrap_or(Sense::new(0, 0, 0));
        Ok(ScsiResult::data(sense.encode(desc), alloc))
    }

    fn inquiry(&self, cdb: &[u8; 16]) -> CmdResult {
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

    fn serial(&self) -> String {
        format!("{:016x}", fnv1a(self.identity.volume.as_bytes()))
    }

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

    fn read_capacity_10(&self, cdb: &[u8; 16]) -> CmdResult {
        let pmi = cdb[8] & 0x01 != 0;
        if !pmi && be32(&cdb[2..6]) != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let last = self.blocks().saturating_sub(1);
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
        v.extend_from_slice(&self.block_size.to_be_bytes());
        Ok(ScsiResult::data(v, 8))
    }

    fn read_capacity_16(&self, cdb: &[u8; 16]) -> CmdResult {
        let alloc = be32(&cdb[10..14]) as usize;
        let mut v = vec![0u8; 32];
        v[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        v[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        v[14] = 0x80 | 0x40; // LBPME, LBPRZ
        Ok(ScsiResult::data(v, alloc))
    }

    async fn get_lba_status(&self, cdb: &[u8; 16]) -> CmdResult {
        let lba = be64(&cdb[2..10]);
        let alloc = be32(&cdb[10..14]) as usize;
        let blocks = self.blocks();
        if lba >= blocks {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
        // The device cannot tell us what is allocated; report runs of
        // all-zero blocks as deallocated (LBPRZ: they read as zeroes either
        // way), scanning at most 1 MiB.
        let bs = u64::from(self.block_size);
        let span = ((1u64 << 20) / bs).min(blocks - lba);
        let data = self
            .device
            .read(lba * bs, (span * bs) as u32)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, false)))?;
        let max_desc = (alloc.saturating_sub(8) / 16).max(1);
        let mut descs: Vec<(u64, u64, u8)> = Vec::new();
        for i in 0..span {
            let off = (i * bs) as usize;
            let blk = &data[off..off + bs as usize];
            let state = if blk.iter().all(|&b| b == 0) { 1 } else { 0 };
            match descs.last_mut() {
                Some(d) if d.2 == state => d.1 += 1,
                _ => {
                    if descs.len() == max_desc {
                        break;
                    }
                    descs.push((lba + i, 1, state));
                }
            }
        }
        // The last run extends to the end of the device when we stopped at
        // the scan limit, rather than at a state change.
        let mut v = vec![0u8; 8];
        for (start, len, state) in &descs {
            v.extend_from_slice(&start.to_be_bytes());
            v.extend_from_slice(&(*len as u32).to_be_bytes());
            v.extend_from_slice(&[*state, 0, 0, 0]);
        }
        let plen = (v.len() - 4) as u32;
        v[0..4].copy_from_slice(&plen.to_be_bytes());
        Ok(ScsiResult::data(v, alloc))
    }

    async fn read(&self, cdb: &[u8; 16]) -> CmdResult {
        let rw = decode_rw(cdb);
        if rw.flags & 0xe0 != 0 {
            // RDPROTECT without protection information.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let bs = u64::from(self.block_size);
        let len = rw.blocks * bs;
        let data = self
            .device
            .read(rw.lba * bs, len as u32)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, false)))?;
        if data.len() as u64 != len {
            warn!(want = len, got = data.len(), "device returned a short read");
            return Err(Sense::UNRECOVERED_READ.into());
        }
        Ok(ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: data,
            transfer_len: len,
        })
    }

    /// The data-out bytes a command needs, or sense: fewer whole blocks
    /// than asked are written (the transport reports the overflow), a
    /// partial block is refused.
    fn take_blocks(&self, data: &Bytes, blocks: u64) -> Result<(u64, Bytes), Fail> {
        let bs = u64::from(self.block_size);
        let want = blocks * bs;
        if data.len() as u64 >= want {
            return Ok((blocks, data.slice(..want as usize)));
        }
        if !(data.len() as u64).is_multiple_of(bs) {
            return Err(Sense::INVALID_FIELD_IN_IU.into());
        }
        let n = data.len() as u64 / bs;
        Ok((n, data.clone()))
    }

    async fn write(&self, cdb: &[u8; 16], data: Bytes, verify: bool) -> CmdResult {
        let rw = decode_rw(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        let bs = u64::from(self.block_size);
        let transfer_len = rw.blocks * bs;
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let (blocks, payload) = match self.take_blocks(&data, rw.blocks) {
            Ok(x) => x,
            Err(f) => {
                return match f {
                    Fail::Check(s) => Ok(ScsiResult {
                        transfer_len,
                        ..self.check(s)
                    }),
                    other => Err(other),
                };
            }
        };
        if blocks > 0 {
            // WRITE AND VERIFY and FUA make the data durable before status;
            // so does a disabled write cache.
            let fua = verify || rw.flags & 0x08 != 0 || !self.lock().mode.write_cache;
            let _shared = self.atomic.read().await;
            self.device
                .write(rw.lba * bs, payload, fua)
                .await
                .map_err(|e| Fail::Check(device_sense(&e, true)))?;
        }
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    async fn verify(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let rw = decode_rw(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let bytchk = (rw.flags >> 1) & 0x03;
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        if bytchk == 2 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let bs = u64::from(self.block_size);
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let stored = self
            .device
            .read(rw.lba * bs, (rw.blocks * bs) as u32)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, false)))?;
        let transfer_len = match bytchk {
            0 => 0,
            1 => rw.blocks * bs,
            _ => bs,
        };
        if bytchk == 0 {
            return Ok(ScsiResult::good());
        }
        let expect_len = transfer_len as usize;
        if data.len() < expect_len {
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::INVALID_FIELD_IN_IU)
            });
        }
        let mismatch = if bytchk == 1 {
            stored.iter().zip(data.iter()).position(|(a, b)| a != b)
        } else {
            stored
                .iter()
                .enumerate()
                .position(|(i, a)| *a != data[i % bs as usize])
        };
        if let Some(pos) = mismatch {
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::MISCOMPARE_VERIFY.with_information(pos as u64))
            });
        }
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    async fn orwrite(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let rw = decode_rw(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        let bs = u64::from(self.block_size);
        let transfer_len = rw.blocks * bs;
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        if (data.len() as u64) < transfer_len {
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::INVALID_FIELD_IN_IU)
            });
        }
        let _excl = self.atomic.write().await;
        let stored = self
            .device
            .read(rw.lba * bs, transfer_len as u32)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, false)))?;
        let mut out = BytesMut::with_capacity(stored.len());
        out.extend(stored.iter().zip(data.iter()).map(|(a, b)| a | b));
        let fua = rw.flags & 0x08 != 0;
        self.device
            .write(rw.lba * bs, out.freeze(), fua)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, true)))?;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    async fn synchronize_cache(&self, cdb: &[u8; 16]) -> CmdResult {
        let (lba, blocks) = if cdb[0] == opcode::SYNCHRONIZE_CACHE_10 {
            (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])))
        } else {
            (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])))
        };
        self.check_range(lba, blocks)?;
        // A real flush, whatever the range (the device flushes everything).
        self.device
            .flush()
            .await
            .map_err(|e| Fail::Check(device_sense(&e, true)))?;
        Ok(ScsiResult::good())
    }

    async fn write_same(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let ten = cdb[0] == opcode::WRITE_SAME_10;
        let (lba, blocks) = if ten {
            (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])))
        } else {
            (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])))
        };
        let flags = cdb[1];
        let unmap = flags & 0x08 != 0;
        let anchor = flags & 0x10 != 0;
        let ndob = !ten && flags & 0x01 != 0;
        if flags & 0xe0 != 0 || anchor {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, blocks)?;
        let bs = u64::from(self.block_size);
        if blocks == 0 {
            // WSNZ: zero blocks is not supported.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if blocks * bs > MAX_WRITE_SAME_BYTES {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let transfer_len = if ndob { 0 } else { bs };
        let pattern = if ndob {
            Bytes::from(vec![0u8; bs as usize])
        } else {
            if data.len() as u64 != bs {
                // Exactly one logical block of Data-Out.
                return Ok(ScsiResult {
                    transfer_len,
                    ..self.check(Sense::INVALID_FIELD_IN_CDB)
                });
            }
            data.slice(..bs as usize)
        };
        let zero = pattern.iter().all(|&b| b == 0);
        let _shared = self.atomic.read().await;
        let r = if zero && unmap {
            self.device.unmap(lba * bs, blocks * bs).await
        } else if zero {
            self.device.write_zeroes(lba * bs, blocks * bs, false).await
        } else {
            // Write the pattern in chunks of up to 1 MiB.
            let per = ((1u64 << 20) / bs).max(1);
            let mut chunk = BytesMut::with_capacity((per.min(blocks) * bs) as usize);
            for _ in 0..per.min(blocks) {
                chunk.extend_from_slice(&pattern);
            }
            let chunk = chunk.freeze();
            let mut done = 0u64;
            let mut res = Ok(());
            while done < blocks {
                let n = per.min(blocks - done);
                res = self
                    .device
                    .write((lba + done) * bs, chunk.slice(..(n * bs) as usize), false)
                    .await;
                if res.is_err() {
                    break;
                }
                done += n;
            }
            res
        };
        r.map_err(|e| Fail::Check(device_sense(&e, true)))?;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    async fn unmap(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        if cdb[1] & 0x01 != 0 {
            // ANCHOR: not supported (ANC_SUP = 0).
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let plen = usize::from(be16(&cdb[7..9]));
        if plen == 0 {
            return Ok(ScsiResult::good());
        }
        let transfer_len = plen as u64;
        let fail = |s: Sense| {
            Ok(ScsiResult {
                transfer_len,
                ..self.check(s)
            })
        };
        if plen < 8 || data.len() < plen {
            return fail(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let p = &data[..plen];
        let desc_len = usize::from(be16(&p[2..4]));
        if desc_len % 16 != 0 || 8 + desc_len > plen {
            return fail(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let count = desc_len / 16;
        if count as u32 > MAX_UNMAP_DESCRIPTORS {
            return fail(Sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        let bs = u64::from(self.block_size);
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let d = &p[8 + i * 16..8 + (i + 1) * 16];
            let lba = be64(&d[0..8]);
            let n = u64::from(be32(&d[8..12]));
            if let Err(Fail::Check(s)) = self.check_range(lba, n) {
                return fail(s);
            }
            if n * bs > MAX_WRITE_SAME_BYTES {
                return fail(Sense::INVALID_FIELD_IN_PARAM_LIST);
            }
            if n > 0 {
                ranges.push((lba * bs, n * bs));
            }
        }
        let _shared = self.atomic.read().await;
        for (off, len) in ranges {
            if let Err(e) = self.device.unmap(off, len).await {
                return fail(device_sense(&e, true));
            }
        }
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    async fn compare_and_write(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let lba = be64(&cdb[2..10]);
        let blocks = u64::from(cdb[13]);
        if cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, blocks)?;
        if blocks > u64::from(MAX_COMPARE_AND_WRITE_BLOCKS) {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let bs = u64::from(self.block_size);
        let len = blocks * bs;
        let transfer_len = 2 * len;
        if data.len() as u64 != transfer_len {
            // The Data-Out must be exactly the verify and write data.
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::INVALID_FIELD_IN_CDB)
            });
        }
        if blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let verify = data.slice(..len as usize);
        let write = data.slice(len as usize..transfer_len as usize);
        let _excl = self.atomic.write().await;
        let stored = self
            .device
            .read(lba * bs, len as u32)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, false)))?;
        if let Some(pos) = stored.iter().zip(verify.iter()).position(|(a, b)| a != b) {
            debug!(lba, pos, "COMPARE AND WRITE miscompare");
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::MISCOMPARE_VERIFY.with_information(pos as u64))
            });
        }
        let fua = cdb[1] & 0x08 != 0;
        self.device
            .write(lba * bs, write, fua)
            .await
            .map_err(|e| Fail::Check(device_sense(&e, true)))?;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

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

    fn mode_sense(&self, cdb: &[u8; 16]) -> CmdResult {
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

    fn mode_select(&self, cdb: &[u8; 16], data: &Bytes) -> CmdResult {
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
        let fail = |s: Sense| {
            Ok(ScsiResult {
                transfer_len,
                ..self.check(s)
            })
        };
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

    fn report_luns(&self, cdb: &[u8; 16]) -> CmdResult {
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

    fn report_supported_opcodes(&self, cdb: &[u8; 16]) -> CmdResult {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let req_op = cdb[3];
        let req_sa = be16(&cdb[4..6]);
        let alloc = be32(&cdb[6..10]) as usize;
        let timeouts = |v: &mut Vec<u8>| {
            v.extend_from_slice(&0x0au16.to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&30u32.to_be_bytes());
        };
        match options {
            0 => {
                let mut body = Vec::new();
                for o in SUPPORTED {
                    body.push(o.opcode);
                    body.push(0);
                    body.extend_from_slice(&o.service_action.unwrap_or(0).to_be_bytes());
                    body.push(0);
                    let mut f = 0u8;
                    if o.service_action.is_some() {
                        f |= 0x01;
                    }
                    if rctd {
                        f |= 0x02;
                    }
                    body.push(f);
                    body.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
                    if rctd {
                        timeouts(&mut body);
                    }
                }
                let mut v = (body.len() as u32).to_be_bytes().to_vec();
                v.extend(body);
                Ok(ScsiResult::data(v, alloc))
            }
            1..=3 => {
                let found = SUPPORTED.iter().find(|o| {
                    o.opcode == req_op
                        && match (options, o.service_action) {
                            (1, None) => true,
                            (2, Some(sa)) => sa == req_sa,
                            (3, None) => true,
                            (3, Some(sa)) => sa == req_sa,
                            _ => false,
                        }
                });
                if options == 1 && has_service_action(req_op) {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                if options == 2 && !has_service_action(req_op) {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                let mut v = vec![0u8, 0u8];
                match found {
                    Some(o) => {
                        v[1] = 0x03 | if rctd { 0x80 } else { 0 };
                        v.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
                        v.extend_from_slice(o.usage);
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

    fn pr_out(&self, nexus: &Nexus, cdb: &[u8; 16], data: &Bytes) -> CmdResult {
        let sa = cdb[1] & 0x1f;
        let scope = cdb[2] >> 4;
        let kind = cdb[2] & 0x0f;
        let plen = be32(&cdb[5..9]) as usize;
        let transfer_len = plen as u64;
        if scope != 0 && matches!(sa, 1 | 2 | 4 | 5) {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if sa == 7 {
            // REGISTER AND MOVE is not supported.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if plen != 24 {
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::PARAM_LIST_LENGTH_ERROR)
            });
        }
        if data.len() < 24 {
            return Ok(ScsiResult {
                transfer_len,
                ..self.check(Sense::PARAM_LIST_LENGTH_ERROR)
            });
        }
        let outcome = {
            let mut st = self.lock();
            let r = st.reservations.pr_out(sa, kind, &data[..24], nexus);
            if let Ok(preempted) = &r {
                for n in preempted {
                    queue_ua(&mut st, n, Sense::REGISTRATIONS_PREEMPTED);
                }
            }
            r
        };
        match outcome {
            Ok(_) => Ok(ScsiResult {
                transfer_len,
                ..ScsiResult::good()
            }),
            Err(PrError::Conflict) => Ok(ScsiResult {
                transfer_len,
                ..ScsiResult::status(status::RESERVATION_CONFLICT)
            }),
            Err(PrError::Sense(s)) => Ok(ScsiResult {
                transfer_len,
                ..self.check(s)
            }),
        }
    }
}

/// The answer to a command addressed to a LUN that does not exist: INQUIRY
/// reports "no device at this LUN", REPORT LUNS works, REQUEST SENSE and
/// everything else get LOGICAL UNIT NOT SUPPORTED.
pub fn missing_lun(cdb: &[u8]) -> ScsiResult {
    let opc = cdb.first().copied().unwrap_or(0xff);
    let sense = |s: Sense| ScsiResult {
        status: status::CHECK_CONDITION,
        sense: Some(Bytes::from(s.encode(false))),
        data_in: Bytes::new(),
        transfer_len: 0,
    };
    match opc {
        opcode::INQUIRY if cdb.len() >= 6 && cdb[1] & 0x01 == 0 => {
            let alloc = usize::from(be16(&cdb[3..5]));
            let mut v = vec![0u8; 36];
            v[0] = 0x7f;
            v[2] = 0x07;
            v[3] = 0x12;
            v[4] = 31;
            v[8..16].copy_from_slice(b"CORRAL  ");
            ScsiResult::data(v, alloc)
        }
        opcode::REPORT_LUNS if cdb.len() >= 12 => {
            let alloc = be32(&cdb[6..10]) as usize;
            let mut v = Vec::new();
            v.extend_from_slice(&8u32.to_be_bytes());
            v.extend_from_slice(&[0; 12]);
            ScsiResult::data(v, alloc)
        }
        opcode::REQUEST_SENSE if cdb.len() >= 6 => {
            ScsiResult::data(Sense::LUN_NOT_SUPPORTED.encode(false), usize::from(cdb[4]))
        }
        _ => sense(Sense::LUN_NOT_SUPPORTED),
    }
}

fn queue_ua(st: &mut LunState, nexus: &Nexus, sense: Sense) {
    let q = st.unit_attentions.entry(nexus.clone()).or_default();
    if q.contains(&sense) {
        return;
    }
    if q.len() >= MAX_UNIT_ATTENTIONS {
        q.pop_front();
    }
    q.push_back(sense);
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_block::FileDevice;
    use std::sync::Arc;

    fn lun() -> (tempfile::TempDir, ScsiLun<FileDevice>) {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&dir.path().join("d"), Some(1 << 20), 512).unwrap();
        let lun = ScsiLun::new(
            Arc::new(dev),
            LunIdentity {
                target_name: "iqn.2026-11.io.corral:t".into(),
                volume: "t".into(),
            },
        );
        (dir, lun)
    }

    fn nexus() -> Nexus {
        Nexus {
            initiator: "iqn.test".into(),
            isid: [0; 6],
        }
    }

    #[tokio::test]
    async fn a_new_nexus_gets_the_power_on_unit_attention_once() {
        let (_d, lun) = lun();
        let n = nexus();
        lun.nexus_added(&n);
        let mut inquiry = [0u8; 6];
        inquiry[0] = opcode::INQUIRY;
        inquiry[4] = 36;
        // INQUIRY is answered without consuming the attention.
        let r = lun.execute(&n, &inquiry, Bytes::new()).await;
        assert_eq!(r.status, status::GOOD);
        let tur = [opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0];
        let r = lun.execute(&n, &tur, Bytes::new()).await;
        assert_eq!(r.status, status::CHECK_CONDITION);
        let s = r.sense.unwrap();
        assert_eq!((s[2] & 0x0f, s[12], s[13]), (6, 0x29, 0x00));
        let r = lun.execute(&n, &tur, Bytes::new()).await;
        assert_eq!(r.status, status::GOOD);
        // The same nexus registering again (a second connection) is not new.
        lun.nexus_added(&n);
        let r = lun.execute(&n, &tur, Bytes::new()).await;
        assert_eq!(r.status, status::GOOD);
    }

    #[tokio::test]
    async fn write_then_read_back() {
        let (_d, lun) = lun();
        let mut cdb = [0u8; 10];
        cdb[0] = opcode::WRITE_10;
        cdb[5] = 4;
        cdb[8] = 2;
        let r = lun
            .execute(&nexus(), &cdb, Bytes::from(vec![7u8; 1024]))
            .await;
        assert_eq!(r.status, status::GOOD);
        cdb[0] = opcode::READ_10;
        let r = lun.execute(&nexus(), &cdb, Bytes::new()).await;
        assert_eq!(r.status, status::GOOD);
        assert_eq!(r.data_in.len(), 1024);
        assert!(r.data_in.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn read_beyond_the_end_is_lba_out_of_range() {
        let (_d, lun) = lun();
        let mut cdb = [0u8; 16];
        cdb[0] = opcode::READ_16;
        cdb[2..10].copy_from_slice(&2048u64.to_be_bytes());
        cdb[13] = 1;
        let r = lun.execute(&nexus(), &cdb, Bytes::new()).await;
        assert_eq!(r.status, status::CHECK_CONDITION);
        let s = r.sense.unwrap();
        assert_eq!((s[2], s[12]), (5, 0x21));
    }

    #[tokio::test]
    async fn compare_and_write_miscompare() {
        let (_d, lun) = lun();
        let mut cdb = [0u8; 16];
        cdb[0] = opcode::COMPARE_AND_WRITE;
        cdb[13] = 1;
        let mut data = vec![0u8; 1024];
        data[512..].fill(9);
        let r = lun.execute(&nexus(), &cdb, Bytes::from(data.clone())).await;
        assert_eq!(r.status, status::GOOD);
        let r = lun.execute(&nexus(), &cdb, Bytes::from(data)).await;
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!(r.sense.unwrap()[2], 0x0e);
    }
}
