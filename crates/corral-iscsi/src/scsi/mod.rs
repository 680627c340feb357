//! The SCSI block device (SBC-4 / SPC-5) over a [`BlockDevice`]: turns a
//! CDB plus Data-Out bytes into device calls and returns status, sense data
//! and Data-In bytes.
//!
//! Transport-independent: the iSCSI layer hands over the CDB and however
//! many Data-Out bytes the initiator announced (its Expected Data Transfer
//! Length); a command uses what its CDB asks for, and the transport works
//! out residuals from [`ScsiResult::transfer_len`].
//!
//! This module owns the logical unit ([`ScsiLun`]): its state (mode
//! parameters, reservations, unit attentions per nexus) and the dispatch of
//! each command, checked in order for CDB length, unit attention, NACA and
//! reservation conflict, then run by the handler its row in the
//! [`opcodes`] table names. The handlers live by command set, as in Linux
//! LIO's target core: `cdb` decodes CDB fields, `spc` has the primary
//! commands, `sbc` the block commands, `pr` the reservation commands.

mod cdb;
pub mod opcodes;
mod pr;
#[cfg(test)]
mod pr_tests;
mod sbc;
mod spc;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use corral_block::BlockDevice;

use crate::reservation::{Access, Nexus, Reservations};
use crate::sense::{Sense, status};

use self::cdb::{be16, be32};
use self::opcodes::Command;
pub use self::opcodes::{cdb_len, opcode, service_action};

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

impl LunState {
    /// Queue a unit attention for `nexus` (once; the oldest are dropped
    /// past [`MAX_UNIT_ATTENTIONS`]).
    fn queue_unit_attention(&mut self, nexus: &Nexus, sense: Sense) {
        let q = self.unit_attentions.entry(nexus.clone()).or_default();
        if q.contains(&sense) {
            return;
        }
        if q.len() >= MAX_UNIT_ATTENTIONS {
            q.pop_front();
        }
        q.push_back(sense);
    }

    /// Take the oldest unit attention pending for `nexus`.
    fn take_unit_attention(&mut self, nexus: &Nexus) -> Option<Sense> {
        self.unit_attentions
            .get_mut(nexus)
            .and_then(|q| q.pop_front())
    }
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
    /// PERSISTENT RESERVE OUT commands take turns: each is applied to a
    /// copy of the state, saved on the device, then put in force.
    pr_turn: tokio::sync::Mutex<()>,
    /// Commands executed (statistics).
    executed: AtomicU64,
    /// The device's size as last seen: when the device reports another (an
    /// online expansion), every nexus gets CAPACITY DATA HAS CHANGED.
    seen_size: AtomicU64,
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl<D: BlockDevice> ScsiLun<D> {
    pub fn new(device: std::sync::Arc<D>, identity: LunIdentity) -> Self {
        let block_size = device.block_size();
        let size = device.size();
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
            pr_turn: tokio::sync::Mutex::new(()),
            executed: AtomicU64::new(0),
            seen_size: AtomicU64::new(size),
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
            st.queue_unit_attention(nexus, Sense::POWER_ON_RESET);
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
            st.queue_unit_attention(&n, Sense::BUS_DEVICE_RESET);
        }
    }

    /// Raise a unit attention for every nexus (e.g. capacity changed).
    pub fn unit_attention_all(&self, sense: Sense) {
        let mut st = self.lock();
        let all = st.known.clone();
        for n in all {
            st.queue_unit_attention(&n, sense);
        }
    }

    /// Notice a change of the device's size (SBC-4 4.10: the capacity may
    /// change while the LUN serves): every nexus known then gets one CAPACITY
    /// DATA HAS CHANGED unit attention (2Ah/09h), and READ CAPACITY reports
    /// the new size from now on. The device's size is its own change
    /// counter: a size only grows, and reading it is one atomic load, so
    /// this runs at every command, which is when an attention is delivered.
    fn notice_capacity_change(&self) {
        let seen = self.seen_size.load(Ordering::Acquire);
        let now = self.device.size();
        if now != seen
            && self
                .seen_size
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.unit_attention_all(Sense::CAPACITY_CHANGED);
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

    /// CHECK CONDITION with `sense` for a command that meant to transfer
    /// `transfer_len` bytes (the transport reports the residual).
    fn check_after_transfer(&self, transfer_len: u64, sense: Sense) -> CmdResult {
        Ok(ScsiResult {
            transfer_len,
            ..self.check(sense)
        })
    }

    /// Execute one command for `nexus` with `data_out` (as many bytes as the
    /// initiator sent, up to its Expected Data Transfer Length).
    pub async fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: Bytes) -> ScsiResult {
        self.executed.fetch_add(1, Ordering::Relaxed);
        let full = cdb::padded(cdb);
        let info = opcodes::lookup(full[0]);
        let len = cdb_len(full[0]);
        if cdb.len() < len {
            return self.check(Sense::INVALID_FIELD_IN_CDB);
        }
        self.notice_capacity_change();
        // Unit attentions: reported once to each nexus, except to INQUIRY,
        // REPORT LUNS and REQUEST SENSE.
        if !info.is_some_and(|i| i.unit_attention_exempt) {
            let ua = self.lock().take_unit_attention(nexus);
            if let Some(sense) = ua {
                return self.check(sense);
            }
        }
        // NACA in the control byte: we do not support ACA.
        if full[len - 1] & 0x04 != 0 {
            return self.check(Sense::INVALID_FIELD_IN_CDB);
        }
        // Commands we do not implement count as writes.
        let (access, spc2) =
            info.map_or((Access::Write, false), |i| (i.access, i.spc2_reservation));
        if self.lock().reservations.conflicts(nexus, access, spc2) {
            return ScsiResult::status(status::RESERVATION_CONFLICT);
        }
        let command = info.map_or(Command::Refuse(Sense::INVALID_OPCODE), |i| i.command(&full));
        match self.dispatch(command, nexus, &full, data_out).await {
            Ok(r) => r,
            Err(Fail::Check(s)) => self.check(s),
            Err(Fail::Conflict) => ScsiResult::status(status::RESERVATION_CONFLICT),
        }
    }

    async fn dispatch(
        &self,
        command: Command,
        nexus: &Nexus,
        cdb: &[u8; 16],
        data: Bytes,
    ) -> CmdResult {
        match command {
            Command::TestUnitReady => Ok(ScsiResult::good()),
            Command::RequestSense => self.request_sense(nexus, cdb),
            Command::Inquiry => self.inquiry(cdb),
            Command::ModeSense => self.mode_sense(cdb),
            Command::ModeSelect => self.mode_select(cdb, &data),
            Command::ReportLuns => self.report_luns(cdb),
            Command::ReportSupportedOperationCodes => self.report_supported_opcodes(cdb),
            Command::ReadCapacity10 => self.read_capacity_10(cdb),
            Command::ReadCapacity16 => self.read_capacity_16(cdb),
            Command::GetLbaStatus => self.get_lba_status(cdb).await,
            Command::Read => self.read(cdb).await,
            Command::Write => self.write(cdb, data, false).await,
            Command::WriteAndVerify => self.write(cdb, data, true).await,
            Command::Verify => self.verify(cdb, data).await,
            Command::OrWrite => self.orwrite(cdb, data).await,
            Command::SynchronizeCache => self.synchronize_cache(cdb).await,
            Command::PreFetch => self.pre_fetch(cdb),
            Command::WriteSame => self.write_same(cdb, data).await,
            Command::Unmap => self.unmap(cdb, data).await,
            Command::CompareAndWrite => self.compare_and_write(cdb, data).await,
            Command::StartStopUnit => self.start_stop_unit(cdb),
            Command::PreventAllowMediumRemoval => self.prevent_allow_medium_removal(cdb),
            Command::ReadDefectData10 => self.read_defect_data_10(cdb),
            Command::ReadDefectData12 => self.read_defect_data_12(cdb),
            Command::Reserve => self.reserve(nexus),
            Command::Release => self.release(nexus),
            Command::PersistentReserveIn => self.persistent_reserve_in(nexus, cdb),
            Command::PersistentReserveOut => self.persistent_reserve_out(nexus, cdb, &data).await,
            Command::Refuse(sense) => Err(sense.into()),
        }
    }
}

/// The answer to a command addressed to a LUN that does not exist: INQUIRY
/// reports "no device at this LUN", REPORT LUNS works, REQUEST SENSE and
/// everything else get LOGICAL UNIT NOT SUPPORTED.
pub fn missing_lun(cdb: &[u8]) -> ScsiResult {
    let opc = cdb.first().copied().unwrap_or(0xff);
    let whole = cdb.len() >= cdb_len(opc);
    match opc {
        opcode::INQUIRY if whole && cdb[1] & 0x01 == 0 => {
            let alloc = usize::from(be16(&cdb[3..5]));
            let mut v = vec![0u8; 36];
            v[0] = 0x7f;
            v[2] = 0x07;
            v[3] = 0x12;
            v[4] = 31;
            v[8..16].copy_from_slice(b"CORRAL  ");
            ScsiResult::data(v, alloc)
        }
        opcode::REPORT_LUNS if whole => {
            let alloc = be32(&cdb[6..10]) as usize;
            let mut v = Vec::new();
            v.extend_from_slice(&8u32.to_be_bytes());
            v.extend_from_slice(&[0; 12]);
            ScsiResult::data(v, alloc)
        }
        opcode::REQUEST_SENSE if whole => {
            ScsiResult::data(Sense::LUN_NOT_SUPPORTED.encode(false), usize::from(cdb[4]))
        }
        _ => ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(Bytes::from(Sense::LUN_NOT_SUPPORTED.encode(false))),
            data_in: Bytes::new(),
            transfer_len: 0,
        },
    }
}
