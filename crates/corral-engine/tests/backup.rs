//! Backups of a volume over real replica daemons (in-process gRPC servers
//! on 127.0.0.1) to a `file://` target: a full backup of a snapshot, then
//! an incremental one after a few writes and a discard, which reads only
//! the blocks those touched; each restores bit-exact to its snapshot's
//! view, checked block by block by hash on the way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use corral_backup::block::BLOCK_SIZE;
use corral_backup::target::{S3Settings, Target};
use corral_backup::transfer::{self, BlockSink};
use corral_block::BlockDevice;

mod common;
use common::{config, replicas, start};

const SIZE: u64 = 8 << 20;

/// A restored volume in memory.
#[derive(Default)]
struct Image(Mutex<HashMap<u64, Vec<u8>>>);

impl BlockSink for Image {
    async fn write_block(&self, index: u64, data: Vec<u8>) -> Result<(), String> {
        self.0.lock().unwrap().insert(index, data);
        Ok(())
    }
}

impl Image {
    fn bytes(&self, size: u64) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        for (i, b) in self.0.lock().unwrap().iter() {
            let at = *i as usize * BLOCK_SIZE;
            let n = BLOCK_SIZE.min(out.len() - at);
            out[at..at + n].copy_from_slice(&b[..n]);
        }
        out
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ u64::from(seed);
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

async fn snapshot_image(volume: &corral_engine::volume::Volume, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for at in (0..SIZE).step_by(1 << 20) {
        out.extend_from_slice(&volume.read_snapshot(name, at, 1 << 20).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_and_an_incremental_backup_restore_their_snapshots_bit_exact() {
    let reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, _stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let tmp = tempfile::tempdir().unwrap();
    let target = Target::open(
        &format!("file://{}", tmp.path().display()),
        &S3Settings::default(),
    )
    .unwrap();

    // 1 MiB at the start, 12 KiB in the middle, 4 KiB at the end.
    volume.write(0, pattern(1, 1 << 20), false).await.unwrap();
    volume
        .write(3 << 20, pattern(2, 12 << 10), false)
        .await
        .unwrap();
    volume
        .write(SIZE - 4096, pattern(3, 4096), false)
        .await
        .unwrap();
    set.snapshot_create("s1").await.unwrap();
    // As the engine's control service does: the second backup finds its
    // parent's manifest and page among those the first one kept.
    let recent = corral_backup::recent::RecentObjects::default();
    let full =
        corral_engine::backup::create_backup(&volume, &target, "b1", "s1", None, Some(&recent))
            .await
            .unwrap();
    assert_eq!(full.manifest.as_ref().unwrap().parent, None);
    // 16 + 1 + 1 blocks of 64 KiB hold data; nothing else is read.
    assert_eq!(full.blocks_read, 18, "{full:?}");

    // A write inside one block, and a discard of another.
    volume
        .write(5 << 20, pattern(4, 4096), false)
        .await
        .unwrap();
    volume.unmap(3 << 20, 12 << 10).await.unwrap();
    set.snapshot_create("s2").await.unwrap();
    let inc =
        corral_engine::backup::create_backup(&volume, &target, "b2", "s2", None, Some(&recent))
            .await
            .unwrap();
    assert_eq!(inc.manifest.as_ref().unwrap().parent.as_deref(), Some("b1"));
    assert_eq!(inc.blocks_read, 2, "only the two changed blocks: {inc:?}");
    assert_eq!((inc.blocks_stored, inc.zero_blocks), (1, 1), "{inc:?}");

    for (backup, snapshot) in [("b1", "s1"), ("b2", "s2")] {
        let m = transfer::read_manifest(&target, "vol", backup)
            .await
            .unwrap();
        let image = Image::default();
        transfer::restore(&target, &m, &image).await.unwrap();
        assert!(
            image.bytes(SIZE) == snapshot_image(&volume, snapshot).await,
            "backup {backup} does not restore snapshot {snapshot}"
        );
    }
    // Taken once.
    assert!(matches!(
        corral_engine::backup::create_backup(&volume, &target, "b2", "s2", None, None).await,
        Err(corral_engine::backup::BackupError::Transfer(
            transfer::TransferError::Exists { .. }
        ))
    ));
}
