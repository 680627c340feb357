//! Tests of the logical unit: unit attentions, reads and writes, and that
//! the opcode table, the dispatcher and REPORT SUPPORTED OPERATION CODES
//! agree.

use std::sync::Arc;

use bytes::Bytes;
use corral_block::FileDevice;

use super::cdb::group_cdb_len;
use super::opcodes::{self, Command, Forms, OPCODES};
use super::*;

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

/// Sense key, ASC and ASCQ of fixed-format sense data.
fn sense_of(r: &ScsiResult) -> (u8, u8, u8) {
    let s = r.sense.as_ref().unwrap();
    (s[2] & 0x0f, s[12], s[13])
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
    assert_eq!(sense_of(&r), (6, 0x29, 0x00));
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
    assert_eq!(sense_of(&r), (5, 0x21, 0));
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

#[test]
fn each_opcode_has_one_row_whose_cdb_length_matches_its_group_code() {
    let mut seen = [false; 256];
    for info in OPCODES {
        assert!(!seen[usize::from(info.opcode)], "{} twice", info.name);
        seen[usize::from(info.opcode)] = true;
        assert_eq!(
            info.cdb_len(),
            group_cdb_len(info.opcode),
            "{}: CDB length",
            info.name
        );
        assert!(std::ptr::eq(opcodes::lookup(info.opcode).unwrap(), info));
        for (sa, usage) in info.usages() {
            assert_eq!(
                usage.len(),
                info.cdb_len(),
                "{} {sa:?}: usage length",
                info.name
            );
            assert_eq!(usage[0], info.opcode, "{}: usage byte 0", info.name);
            // NACA is the only control byte bit we look at.
            assert_eq!(usage[usage.len() - 1], 0x04, "{}: control byte", info.name);
        }
        if let Forms::ServiceActions { actions, .. } = &info.forms {
            assert!(!actions.is_empty(), "{}", info.name);
        }
    }
    assert!(OPCODES.len() < usize::from(u8::MAX));
    assert!(opcodes::lookup(0xff).is_none());
    assert_eq!(cdb_len(0x60), 16);
    assert_eq!(cdb_len(opcode::READ_CAPACITY_10), 10);
}

#[test]
fn service_actions_select_their_command() {
    let sai = opcodes::lookup(opcode::SERVICE_ACTION_IN_16).unwrap();
    let mut cdb = [0u8; 16];
    cdb[0] = opcode::SERVICE_ACTION_IN_16;
    cdb[1] = 0xe0 | service_action::READ_CAPACITY_16;
    assert_eq!(sai.command(&cdb), Command::ReadCapacity16);
    cdb[1] = service_action::GET_LBA_STATUS;
    assert_eq!(sai.command(&cdb), Command::GetLbaStatus);
    cdb[1] = 0x11;
    assert_eq!(
        sai.command(&cdb),
        Command::Refuse(Sense::INVALID_FIELD_IN_CDB)
    );
    let maintenance_in = opcodes::lookup(opcode::MAINTENANCE_IN).unwrap();
    cdb[0] = opcode::MAINTENANCE_IN;
    cdb[1] = 0x05;
    assert_eq!(
        maintenance_in.command(&cdb),
        Command::Refuse(Sense::INVALID_OPCODE)
    );
}

#[tokio::test]
async fn every_listed_command_is_dispatched() {
    let (_d, lun) = lun();
    for info in OPCODES {
        for (sa, usage) in info.usages() {
            let mut cdb = vec![0u8; usage.len()];
            cdb[0] = info.opcode;
            if let Some(sa) = sa {
                cdb[1] = sa;
            }
            let r = lun.execute(&nexus(), &cdb, Bytes::new()).await;
            if r.status == status::CHECK_CONDITION {
                assert_ne!(
                    sense_of(&r),
                    (5, 0x20, 0),
                    "{} {sa:?}: invalid opcode",
                    info.name
                );
            }
        }
    }
    let r = lun.execute(&nexus(), &[0xc0; 16], Bytes::new()).await;
    assert_eq!(sense_of(&r), (5, 0x20, 0));
}

/// REPORT SUPPORTED OPERATION CODES with reporting options 0 lists every
/// row of the table, in order.
#[tokio::test]
async fn report_supported_opcodes_lists_the_table() {
    let (_d, lun) = lun();
    let mut cdb = [0u8; 12];
    cdb[0] = opcode::MAINTENANCE_IN;
    cdb[1] = service_action::REPORT_SUPPORTED_OPCODES;
    cdb[6..10].copy_from_slice(&4096u32.to_be_bytes());
    let r = lun.execute(&nexus(), &cdb, Bytes::new()).await;
    assert_eq!(r.status, status::GOOD);
    let listed: Vec<(u8, Option<u16>, u16)> = r.data_in[4..]
        .chunks(8)
        .map(|d| {
            let sa = u16::from_be_bytes([d[2], d[3]]);
            let len = u16::from_be_bytes([d[6], d[7]]);
            (d[0], (d[5] & 0x01 != 0).then_some(sa), len)
        })
        .collect();
    let table: Vec<(u8, Option<u16>, u16)> = OPCODES
        .iter()
        .flat_map(|i| {
            i.usages()
                .map(move |(sa, u)| (i.opcode, sa.map(u16::from), u.len() as u16))
        })
        .collect();
    assert_eq!(listed, table);
    // One command (reporting options 1): its usage data.
    cdb[2] = 0x01;
    cdb[3] = opcode::READ_10;
    let r = lun.execute(&nexus(), &cdb, Bytes::new()).await;
    assert_eq!(r.data_in[1], 0x03);
    assert_eq!(&r.data_in[4..6], &[opcode::READ_10, 0xf8]);
    // Options 1 for an opcode with service actions is refused.
    cdb[3] = opcode::PERSISTENT_RESERVE_IN;
    let r = lun.execute(&nexus(), &cdb, Bytes::new()).await;
    assert_eq!(sense_of(&r), (5, 0x24, 0));
}

#[test]
fn a_missing_lun_answers_inquiry_and_report_luns_only() {
    let mut inquiry = [0u8; 6];
    inquiry[0] = opcode::INQUIRY;
    inquiry[4] = 36;
    let r = missing_lun(&inquiry);
    assert_eq!((r.status, r.data_in[0]), (status::GOOD, 0x7f));
    let r = missing_lun(&inquiry[..5]);
    assert_eq!(sense_of(&r), (5, 0x25, 0));
    let mut report_luns = [0u8; 12];
    report_luns[0] = opcode::REPORT_LUNS;
    report_luns[9] = 16;
    assert_eq!(missing_lun(&report_luns).data_in.len(), 16);
    let r = missing_lun(&[opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]);
    assert_eq!(sense_of(&r), (5, 0x25, 0));
}

/// A file device that can be grown while the LUN serves it, as a volume
/// is by an online expansion.
struct Growing {
    file: FileDevice,
    size: std::sync::atomic::AtomicU64,
}

impl BlockDevice for Growing {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn block_size(&self) -> u32 {
        self.file.block_size()
    }
    async fn read(&self, offset: u64, len: u32) -> corral_block::BlockResult<Bytes> {
        corral_block::check_range(offset, u64::from(len), self.size())?;
        self.file.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> corral_block::BlockResult<()> {
        corral_block::check_range(offset, data.len() as u64, self.size())?;
        self.file.write(offset, data, fua).await
    }
    async fn flush(&self) -> corral_block::BlockResult<()> {
        self.file.flush().await
    }
    async fn unmap(&self, offset: u64, len: u64) -> corral_block::BlockResult<()> {
        self.file.unmap(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> corral_block::BlockResult<()> {
        self.file.write_zeroes(offset, len, fua).await
    }
    async fn load_reservations(&self) -> corral_block::BlockResult<Option<Bytes>> {
        self.file.load_reservations().await
    }
    async fn save_reservations(&self, state: Bytes) -> corral_block::BlockResult<()> {
        self.file.save_reservations(state).await
    }
}

fn read_capacity_16() -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = opcode::SERVICE_ACTION_IN_16;
    cdb[1] = service_action::READ_CAPACITY_16;
    cdb[13] = 32;
    cdb
}

/// (last LBA, block size) of a READ CAPACITY(16) answer.
fn capacity_of(r: &ScsiResult) -> (u64, u32) {
    let d = &r.data_in;
    (
        u64::from_be_bytes(d[0..8].try_into().unwrap()),
        u32::from_be_bytes(d[8..12].try_into().unwrap()),
    )
}

#[tokio::test]
async fn a_grown_device_raises_capacity_changed_once_per_nexus() {
    let dir = tempfile::tempdir().unwrap();
    // The file is 2 MiB; the device shows 1 MiB of it, then all of it.
    let file = FileDevice::open(&dir.path().join("d"), Some(2 << 20), 512).unwrap();
    let dev = Arc::new(Growing {
        file,
        size: (1u64 << 20).into(),
    });
    let lun = ScsiLun::new(
        Arc::clone(&dev),
        LunIdentity {
            target_name: "iqn.2026-11.io.corral:t".into(),
            volume: "t".into(),
        },
    );
    let a = nexus();
    let b = Nexus {
        initiator: "iqn.other".into(),
        isid: [0, 0, 0, 0, 0, 1],
    };
    let tur = [opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0];
    for n in [&a, &b] {
        lun.nexus_added(n);
        // The power-on attention first.
        let r = lun.execute(n, &tur, Bytes::new()).await;
        assert_eq!(sense_of(&r), (6, 0x29, 0x00));
    }
    let r = lun.execute(&a, &read_capacity_16(), Bytes::new()).await;
    assert_eq!(capacity_of(&r), ((1 << 20) / 512 - 1, 512));
    // Past the end: refused.
    let mut read = [0u8; 10];
    read[0] = opcode::READ_10;
    read[2..6].copy_from_slice(&((1u32 << 20) / 512).to_be_bytes());
    read[8] = 1;
    let r = lun.execute(&a, &read, Bytes::new()).await;
    assert_eq!(sense_of(&r), (5, 0x21, 0x00));

    dev.size.store(2 << 20, std::sync::atomic::Ordering::SeqCst);
    // INQUIRY does not consume it; the next other command of each nexus
    // gets it, once; then READ CAPACITY shows the new size.
    let mut inquiry = [0u8; 6];
    inquiry[0] = opcode::INQUIRY;
    inquiry[4] = 36;
    assert_eq!(
        lun.execute(&a, &inquiry, Bytes::new()).await.status,
        status::GOOD
    );
    for n in [&a, &b] {
        let r = lun.execute(n, &read_capacity_16(), Bytes::new()).await;
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!(sense_of(&r), (6, 0x2a, 0x09));
        let r = lun.execute(n, &read_capacity_16(), Bytes::new()).await;
        assert_eq!(r.status, status::GOOD);
        assert_eq!(capacity_of(&r), ((2 << 20) / 512 - 1, 512));
    }
    let mut rc10 = [0u8; 10];
    rc10[0] = opcode::READ_CAPACITY_10;
    let r = lun.execute(&b, &rc10, Bytes::new()).await;
    assert_eq!(
        u32::from_be_bytes(r.data_in[0..4].try_into().unwrap()),
        (2 << 20) / 512 - 1
    );
    // The new blocks are readable now.
    let r = lun.execute(&a, &read, Bytes::new()).await;
    assert_eq!(r.status, status::GOOD);
    // A nexus that logs in after the change sees only its power-on attention.
    let c = Nexus {
        initiator: "iqn.late".into(),
        isid: [0; 6],
    };
    lun.nexus_added(&c);
    let r = lun.execute(&c, &tur, Bytes::new()).await;
    assert_eq!(sense_of(&r), (6, 0x29, 0x00));
    let r = lun.execute(&c, &tur, Bytes::new()).await;
    assert_eq!(r.status, status::GOOD);
}
