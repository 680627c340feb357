//! Persistent reservations that outlive the logical unit: saved on the
//! device by PERSISTENT RESERVE OUT, restored by a new `ScsiLun` over the
//! same device, and never in force unless saved.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use corral_block::{BlockDevice, BlockError, BlockResult, FileDevice};

use super::*;
use crate::reservation::pr_type;

/// A file device whose reservation saves can be made to fail, as a volume
/// does when too few replicas can take them.
struct Device {
    file: FileDevice,
    fail_saves: AtomicBool,
}

impl BlockDevice for Device {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn block_size(&self) -> u32 {
        self.file.block_size()
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.file.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.file.write(offset, data, fua).await
    }
    async fn flush(&self) -> BlockResult<()> {
        self.file.flush().await
    }
    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.unmap(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.file.write_zeroes(offset, len, fua).await
    }
    async fn load_reservations(&self) -> BlockResult<Option<Bytes>> {
        self.file.load_reservations().await
    }
    async fn save_reservations(&self, state: Bytes) -> BlockResult<()> {
        if self.fail_saves.load(Ordering::SeqCst) {
            return Err(BlockError::Unavailable("no replica took it".into()));
        }
        self.file.save_reservations(state).await
    }
}

fn device() -> (tempfile::TempDir, Arc<Device>) {
    let dir = tempfile::tempdir().unwrap();
    let file = FileDevice::open(&dir.path().join("d"), Some(1 << 20), 512).unwrap();
    let dev = Device {
        file,
        fail_saves: AtomicBool::new(false),
    };
    (dir, Arc::new(dev))
}

fn lun_over(dev: &Arc<Device>) -> ScsiLun<Device> {
    ScsiLun::new(
        Arc::clone(dev),
        LunIdentity {
            target_name: "iqn.2026-11.io.corral:t".into(),
            volume: "t".into(),
        },
    )
}

fn nx(i: u8) -> Nexus {
    Nexus {
        initiator: format!("iqn.test:{i}"),
        isid: [0x40, 0, 0, 0, 0, i],
    }
}

async fn pr_out(lun: &ScsiLun<Device>, n: &Nexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = opcode::PERSISTENT_RESERVE_OUT;
    cdb[1] = sa;
    cdb[2] = kind;
    cdb[8] = 24;
    let mut params = vec![0u8; 24];
    params[0..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    lun.execute(n, &cdb, Bytes::from(params)).await.status
}

/// PERSISTENT RESERVE IN: (generation, keys) with READ KEYS, or the
/// reservation's (key, type) with READ RESERVATION.
async fn pr_in(lun: &ScsiLun<Device>, n: &Nexus, sa: u8) -> Vec<u8> {
    let mut cdb = [0u8; 10];
    cdb[0] = opcode::PERSISTENT_RESERVE_IN;
    cdb[1] = sa;
    cdb[8] = 255;
    let r = lun.execute(n, &cdb, Bytes::new()).await;
    assert_eq!(r.status, status::GOOD);
    r.data_in.to_vec()
}

fn keys(data: &[u8]) -> Vec<u64> {
    data[8..]
        .chunks_exact(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect()
}

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;

#[tokio::test]
async fn a_new_lun_over_the_same_device_finds_the_registrations_and_the_reservation() {
    let (_d, dev) = device();
    let (a, b) = (nx(1), nx(2));
    let first = lun_over(&dev);
    first.restore_reservations().await.unwrap();
    assert_eq!(pr_out(&first, &a, REGISTER, 0, 0, 0xaa).await, status::GOOD);
    assert_eq!(pr_out(&first, &b, REGISTER, 0, 0, 0xbb).await, status::GOOD);
    let kind = pr_type::WRITE_EXCLUSIVE;
    assert_eq!(
        pr_out(&first, &a, RESERVE, kind, 0xaa, 0).await,
        status::GOOD
    );
    let keys_before = pr_in(&first, &a, 0).await;
    drop(first);

    // The engine restarts, or another one takes over: a new LUN.
    let second = lun_over(&dev);
    second.restore_reservations().await.unwrap();
    let keys_after = pr_in(&second, &b, 0).await;
    assert_eq!(keys_after, keys_before, "generation and keys kept");
    assert_eq!(keys(&keys_after), vec![0xaa, 0xbb]);
    let reservation = pr_in(&second, &b, 1).await;
    assert_eq!(&reservation[8..16], &0xaau64.to_be_bytes());
    assert_eq!(reservation[21], kind);
    // And it is enforced: b may not write, a may.
    let mut write = [0u8; 10];
    write[0] = opcode::WRITE_10;
    write[8] = 1;
    let r = second
        .execute(&b, &write, Bytes::from(vec![1u8; 512]))
        .await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    let r = second
        .execute(&a, &write, Bytes::from(vec![1u8; 512]))
        .await;
    assert_eq!(r.status, status::GOOD);
}

#[tokio::test]
async fn a_change_that_cannot_be_saved_is_refused_and_changes_nothing() {
    let (_d, dev) = device();
    let a = nx(1);
    let lun = lun_over(&dev);
    assert_eq!(pr_out(&lun, &a, REGISTER, 0, 0, 0xaa).await, status::GOOD);
    let before = pr_in(&lun, &a, 0).await;

    dev.fail_saves.store(true, Ordering::SeqCst);
    let mut cdb = [0u8; 10];
    cdb[0] = opcode::PERSISTENT_RESERVE_OUT;
    cdb[1] = RESERVE;
    cdb[2] = pr_type::EXCLUSIVE_ACCESS;
    cdb[8] = 24;
    let mut params = vec![0u8; 24];
    params[0..8].copy_from_slice(&0xaau64.to_be_bytes());
    let r = lun.execute(&a, &cdb, Bytes::from(params)).await;
    assert_eq!(r.status, status::CHECK_CONDITION);
    let sense = r.sense.unwrap();
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (2, 0x04, 0x03));
    // Not in force: no reservation, same keys and generation.
    assert_eq!(&pr_in(&lun, &a, 1).await[4..8], &[0, 0, 0, 0]);
    assert_eq!(pr_in(&lun, &a, 0).await, before);

    // A command that changes nothing needs no save.
    assert_eq!(
        pr_out(&lun, &nx(2), 2, pr_type::WRITE_EXCLUSIVE, 0, 0).await,
        status::RESERVATION_CONFLICT
    );
}

#[tokio::test]
async fn saved_state_that_cannot_be_read_keeps_the_lun_from_starting() {
    let (_d, dev) = device();
    dev.save_reservations(Bytes::from_static(b"{\"version\":1"))
        .await
        .unwrap();
    let err = lun_over(&dev).restore_reservations().await.unwrap_err();
    assert!(err.contains("not readable"), "{err}");
    dev.save_reservations(Bytes::from_static(
        br#"{"version":9,"generation":0,"registrations":[],"reservation":null}"#,
    ))
    .await
    .unwrap();
    let err = lun_over(&dev).restore_reservations().await.unwrap_err();
    assert!(err.contains("version 9"), "{err}");
}
