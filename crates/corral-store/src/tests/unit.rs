//! Unit tests of the public API.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use super::{params, pattern, small_store};
use crate::{
    BLOCK, Epoch, Generation, LayerInfo, Member, Membership, ReplicaMode, ReplicaStore, StoreError,
    zero_block_crc,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ReplicaStore>();
}

#[test]
fn create_open_close_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r1");
    assert!(!ReplicaStore::exists(&dir));
    let s = ReplicaStore::create(&dir, params(4 * MIB, 64 * 1024)).unwrap();
    assert!(ReplicaStore::exists(&dir));
    for f in ["meta.redb", "head.img", "head.crc"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert!(!dir.join("meta.redb.tmp").exists());
    let m = s.meta();
    assert_eq!(m.volume, "vol-test");
    assert_eq!(m.size, 4 * MIB);
    assert_eq!(m.block_size, 512);
    assert_eq!(m.chunk_size, 64 * 1024);
    assert_eq!(m.instance_id, "inst-1");
    assert_eq!(m.epoch, Epoch(0));
    assert_eq!(m.membership, Membership::default());
    assert_eq!(
        m.layers,
        vec![LayerInfo::new("head".into(), 0, false, 4 * MIB)]
    );
    assert!(m.clean_shutdown);
    assert_eq!(s.region_size(), MIB);

    let data = pattern(7, 100_000);
    s.write(12_345, &data).unwrap();
    s.set_epoch(Epoch(3)).unwrap();
    let ms = Membership {
        generation: Generation(2),
        epoch: Epoch(3),
        members: vec![
            Member {
                address: "10.0.0.1:9502".into(),
                instance_id: "inst-1".into(),
                mode: ReplicaMode::Rw,
            },
            Member {
                address: "10.0.0.2:9502".into(),
                instance_id: "inst-2".into(),
                mode: ReplicaMode::Wo,
            },
        ],
    };
    s.set_membership(ms.clone()).unwrap();
    s.close().unwrap();

    let s = ReplicaStore::open(&dir).unwrap();
    let m = s.meta();
    assert!(m.clean_shutdown);
    assert_eq!(m.epoch, Epoch(3));
    assert_eq!(m.membership, ms);
    assert!(s.dirty_regions().is_empty());
    assert!(s.recovered_regions().is_empty());
    assert_eq!(&s.read(12_345, data.len() as u64).unwrap()[..], &data[..]);
    assert_eq!(&s.read(0, 12_345).unwrap()[..], &vec![0u8; 12_345][..]);
    // Dropped without close: the next open reports an unclean stop.
    s.crash();
    let s = ReplicaStore::open(&dir).unwrap();
    assert!(!s.meta().clean_shutdown);
    assert_eq!(s.meta().epoch, Epoch(3));
    s.close().unwrap();
}

#[test]
fn create_refuses_existing_store_and_open_refuses_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let s = ReplicaStore::create(&dir, params(MIB, 4096)).unwrap();
    match ReplicaStore::create(&dir, params(MIB, 4096)) {
        Err(StoreError::AlreadyExists(p)) => assert_eq!(p, dir),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    s.close().unwrap();
    let missing = tmp.path().join("nothing");
    match ReplicaStore::open(&missing) {
        Err(StoreError::NotFound(p)) => assert_eq!(p, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // An empty directory holds no store either.
    std::fs::create_dir(&missing).unwrap();
    assert!(matches!(
        ReplicaStore::open(&missing),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn second_open_of_an_open_store_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let s = ReplicaStore::create(tmp.path(), params(MIB, 4096)).unwrap();
    let err = ReplicaStore::open(tmp.path()).unwrap_err();
    assert!(matches!(err, StoreError::Metadata(_)), "{err:?}");
    s.close().unwrap();
}

#[test]
fn create_validates_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = [
        (0, 512, 4096),
        (MIB + 512, 512, 4096), // not a multiple of 4096
        (MIB, 1024, 4096),      // block size
        (MIB, 512, 3000),       // not a power of two
        (MIB, 512, 2048),       // chunk too small
        (MIB, 512, 128 << 20),  // chunk too large
    ];
    for (i, (size, bs, chunk)) in bad.into_iter().enumerate() {
        let mut p = params(size, chunk);
        p.block_size = bs;
        let dir = tmp.path().join(format!("d{i}"));
        match ReplicaStore::create(&dir, p) {
            Err(StoreError::Invalid(msg)) => assert!(!msg.contains('\n')),
            other => panic!("case {i}: expected Invalid, got {other:?}"),
        }
        assert!(!ReplicaStore::exists(&dir));
    }
    let mut p = params(MIB, 4096);
    p.volume.clear();
    assert!(matches!(
        ReplicaStore::create(&tmp.path().join("e"), p),
        Err(StoreError::Invalid(_))
    ));
    // 4 KiB blocks and the largest chunk are fine.
    let mut p = params(MIB, 64 << 20);
    p.block_size = 4096;
    let s = ReplicaStore::create(&tmp.path().join("ok"), p).unwrap();
    assert_eq!(s.region_size(), 64 << 20);
    s.close().unwrap();
}

#[test]
fn partial_block_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * KIB;
    let s = ReplicaStore::create(tmp.path(), params(size, 16 * 1024)).unwrap();
    let mut model = vec![0u8; size as usize];
    let writes: &[(u64, usize, u8)] = &[
        (4095, 1, 1),           // last byte of block 0
        (4094, 3, 2),           // spans blocks 0 and 1
        (10, 20, 3),            // inside block 0
        (8192 + 100, 4096, 4),  // two partial blocks
        (3 * 4096, 4096, 5),    // exactly one block
        (5000, 3 * 4096, 6),    // partial, whole, whole, partial
        (size - 1, 1, 7),       // last byte of the volume
        (size - 4097, 4097, 8), // to the end
        (0, 1, 0),              // a zero byte
    ];
    for &(off, len, seed) in writes {
        let data = pattern(seed, len);
        s.write(off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(
            &s.read(0, size).unwrap()[..],
            &model[..],
            "after write at {off}"
        );
    }
    for (off, len) in [(0, 1), (4095, 2), (4097, 10_000), (size - 3, 3)] {
        assert_eq!(
            &s.read(off, len).unwrap()[..],
            &model[off as usize..(off + len) as usize]
        );
    }
    s.write_fua(777, &pattern(9, 9000)).unwrap();
    model[777..9777].copy_from_slice(&pattern(9, 9000));
    s.close().unwrap();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(&s.read(0, size).unwrap()[..], &model[..]);
    s.close().unwrap();
}

#[test]
fn a_sent_write_is_stored_only_when_its_payload_matches_the_senders_crc() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * KIB;
    let s = ReplicaStore::create(tmp.path(), params(size, 16 * 1024)).unwrap();
    let mut model = vec![0u8; size as usize];
    // One aligned block (its checksum serves both), several blocks, a
    // partial block; each with a good and a bad sender's CRC, FUA or not.
    for (i, &(off, len)) in [(3 * 4096, 4096usize), (8192, 3 * 4096), (5000, 300)]
        .iter()
        .enumerate()
    {
        let data = pattern(10 + i as u8, len);
        let crc = crc32c::crc32c(&data);
        match s.write_sent(off, &data, crc ^ 1, i == 1) {
            Err(StoreError::PayloadChecksum {
                offset,
                len: l,
                computed,
                sent,
            }) => {
                assert_eq!((offset, l, computed, sent), (off, len as u64, crc, crc ^ 1));
            }
            other => panic!("write at {off} with a bad CRC: {other:?}"),
        }
        assert_eq!(
            &s.read(0, size).unwrap()[..],
            &model[..],
            "stored a bad payload"
        );
        s.write_sent(off, &data, crc, i == 1).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(
            &s.read(0, size).unwrap()[..],
            &model[..],
            "after write at {off}"
        );
    }
    // The block's entry is its checksum: a reopened store verifies it.
    s.close().unwrap();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(&s.read(0, size).unwrap()[..], &model[..]);
    s.close().unwrap();
}

#[test]
fn out_of_range_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64 * KIB;
    let s = ReplicaStore::create(tmp.path(), params(size, 4096)).unwrap();
    let oor = |r: Result<(), StoreError>| match r {
        Err(StoreError::OutOfRange { size: sz, .. }) => assert_eq!(sz, size),
        other => panic!("expected OutOfRange, got {other:?}"),
    };
    oor(s.read(size - 1, 2).map(|_| ()));
    oor(s.read(size + 1, 0).map(|_| ()));
    oor(s.read(u64::MAX, 2).map(|_| ()));
    oor(s.write(size, &[1]));
    oor(s.write(u64::MAX - 1, &[1, 2, 3]));
    oor(s.write_fua(size - 1, &[1, 2]));
    oor(s.unmap(size - 4096, 4097));
    oor(s.unmap(u64::MAX, u64::MAX));
    oor(s.write_zeroes(1, size));
    oor(s.block_checksums(0, size + 4096).map(|_| ()));
    // Empty ranges at the end are fine.
    assert!(s.read(size, 0).unwrap().is_empty());
    s.write(size, &[]).unwrap();
    s.unmap(size, 0).unwrap();
    assert!(s.block_checksums(size, 0).unwrap().is_empty());
    assert!(matches!(
        s.block_checksums(1, 4096),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.block_checksums(0, 100),
        Err(StoreError::Invalid(_))
    ));
    s.close().unwrap();
}

#[test]
fn stale_epoch_and_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let s = ReplicaStore::create(tmp.path(), params(MIB, 4096)).unwrap();
    s.set_epoch(Epoch(5)).unwrap();
    s.set_epoch(Epoch(5)).unwrap();
    match s.set_epoch(Epoch(4)) {
        Err(StoreError::StaleEpoch { current, given }) => {
            assert_eq!((current, given), (Epoch(5), Epoch(4)))
        }
        other => panic!("expected StaleEpoch, got {other:?}"),
    }
    let m = |generation: u64| Membership {
        generation: Generation(generation),
        epoch: Epoch(1),
        members: vec![Member {
            address: format!("a:{generation}"),
            instance_id: "i".into(),
            mode: ReplicaMode::Rw,
        }],
    };
    s.set_membership(m(7)).unwrap();
    s.set_membership(m(7)).unwrap();
    match s.set_membership(m(6)) {
        Err(StoreError::StaleGeneration { current, given }) => {
            assert_eq!((current, given), (Generation(7), Generation(6)))
        }
        other => panic!("expected StaleGeneration, got {other:?}"),
    }
    assert_eq!(s.meta().membership, m(7));
    // Durable without a clean close.
    s.crash();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(s.meta().epoch, Epoch(5));
    assert_eq!(s.meta().membership, m(7));
    assert!(matches!(
        s.set_epoch(Epoch(1)),
        Err(StoreError::StaleEpoch { .. })
    ));
    s.set_epoch(Epoch(6)).unwrap();
    // A newer engine's record supersedes, whatever its generation.
    let mut newer = m(2);
    newer.epoch = Epoch(6);
    s.set_membership(newer.clone()).unwrap();
    assert_eq!(s.meta().membership, newer);
    s.close().unwrap();
}

fn corrupt_byte(path: &std::path::Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn checksum_mismatch_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let s = ReplicaStore::create(tmp.path(), params(size, 64 * 1024)).unwrap();
    s.write(10 * BLOCK, &pattern(3, 3 * BLOCK as usize))
        .unwrap();
    s.close().unwrap();
    corrupt_byte(&tmp.path().join("head.img"), 11 * BLOCK + 100);
    // A never-written block that gains data is corrupt too.
    corrupt_byte(&tmp.path().join("head.img"), 3 * MIB + 5);

    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert!(s.dirty_regions().is_empty());
    let err = s.read(10 * BLOCK, 3 * BLOCK).unwrap_err();
    match &err {
        StoreError::ChecksumMismatch {
            offset,
            stored,
            computed,
        } => {
            assert_eq!(*offset, 11 * BLOCK);
            assert_ne!(stored, computed);
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(err.is_checksum_mismatch());
    let msg = err.to_string();
    assert!(msg.contains("45056") && !msg.contains('\n'), "{msg}");
    // One byte of the bad block is enough to fail; neighbours are fine.
    assert!(s.read(11 * BLOCK + 4000, 1).is_err());
    assert!(s.read(10 * BLOCK, BLOCK).is_ok());
    assert!(s.read(12 * BLOCK, BLOCK).is_ok());
    match s.read(3 * MIB, 10) {
        Err(StoreError::ChecksumMismatch { offset, stored, .. }) => {
            assert_eq!((offset, stored), (3 * MIB, 0))
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    // A partial write into the bad block does not launder the corruption.
    assert!(matches!(
        s.write(11 * BLOCK + 1, &[1, 2]),
        Err(StoreError::ChecksumMismatch { .. })
    ));
    // Overwriting the whole block (as a repair from another replica does) heals it.
    s.write(11 * BLOCK, &pattern(4, BLOCK as usize)).unwrap();
    assert_eq!(
        &s.read(11 * BLOCK, BLOCK).unwrap()[..],
        &pattern(4, BLOCK as usize)[..]
    );
    s.unmap(3 * MIB, BLOCK).unwrap();
    assert_eq!(&s.read(3 * MIB, 10).unwrap()[..], &[0u8; 10][..]);
    s.close().unwrap();
}

#[test]
fn unmap_reads_zero_and_deallocates() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let s = ReplicaStore::create(tmp.path(), params(size, 64 * 1024)).unwrap();
    let mut model = pattern(9, (2 * MIB) as usize);
    s.write(0, &model).unwrap();
    s.flush().unwrap();
    let allocated = || {
        std::fs::metadata(tmp.path().join("head.img"))
            .unwrap()
            .blocks()
            * 512
    };
    assert!(allocated() >= 2 * MIB);
    // Unaligned at both ends.
    s.unmap(1000, MIB + 5000).unwrap();
    model[1000..(MIB + 6000) as usize].fill(0);
    assert_eq!(&s.read(0, 2 * MIB).unwrap()[..], &model[..]);
    s.flush().unwrap();
    assert!(
        allocated() <= MIB + 64 * 1024,
        "holes not punched: {} bytes allocated",
        allocated()
    );
    // Within one block, and write_zeroes.
    s.unmap(MIB + 10_000, 10).unwrap();
    model[(MIB + 10_000) as usize..(MIB + 10_010) as usize].fill(0);
    s.write_zeroes(MIB + 3 * BLOCK, 2 * BLOCK + 1).unwrap();
    model[(MIB + 3 * BLOCK) as usize..(MIB + 5 * BLOCK + 1) as usize].fill(0);
    assert_eq!(&s.read(0, 2 * MIB).unwrap()[..], &model[..]);
    s.close().unwrap();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(&s.read(0, 2 * MIB).unwrap()[..], &model[..]);
    s.close().unwrap();
}

#[test]
fn block_checksums_compare_contents_not_history() {
    let tmp = tempfile::tempdir().unwrap();
    let size = MIB;
    let a = ReplicaStore::create(&tmp.path().join("a"), params(size, 4096)).unwrap();
    let b = ReplicaStore::create(&tmp.path().join("b"), params(size, 4096)).unwrap();
    let c = ReplicaStore::create(&tmp.path().join("c"), params(size, 4096)).unwrap();
    // Same final contents, reached three different ways.
    let data = pattern(5, 200_000);
    a.write(4096, &data).unwrap();
    a.write(500_000, &pattern(6, 70_000)).unwrap();
    a.unmap(500_000, 70_000).unwrap();
    for (i, piece) in data.chunks(777).enumerate() {
        b.write(4096 + (i * 777) as u64, piece).unwrap();
    }
    c.write(0, &vec![0u8; size as usize]).unwrap();
    c.write(4096, &data).unwrap();
    let ca = a.block_checksums(0, size).unwrap();
    let cb = b.block_checksums(0, size).unwrap();
    let cc = c.block_checksums(0, size).unwrap();
    assert_eq!(ca.len(), 256);
    assert_eq!(ca, cb);
    assert_eq!(ca, cc);
    assert_eq!(ca[0], zero_block_crc());
    assert_eq!(ca[255], zero_block_crc());
    assert_eq!(ca[1], crc32c::crc32c(&data[..4096]));
    // A differing block shows up at its index.
    b.write(10 * 4096 + 7, &[0xff]).unwrap();
    let cb = b.block_checksums(0, size).unwrap();
    let diff: Vec<usize> = (0..256).filter(|&i| ca[i] != cb[i]).collect();
    assert_eq!(diff, vec![10]);
    assert_eq!(
        b.block_checksums(10 * 4096, 2 * 4096).unwrap(),
        cb[10..12].to_vec()
    );
    for s in [a, b, c] {
        s.close().unwrap();
    }
}

#[test]
fn a_busy_volume_keeps_its_regions_dirty_for_a_clear_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let r = 16 * KIB;
    let s = small_store(tmp.path(), 256 * KIB, 4096, r);
    let interval = Duration::from_millis(200);
    s.set_clear_interval(interval);
    s.write(0, &[1; 10]).unwrap(); // region 0
    s.flush().unwrap();
    s.write(r, &[2; 10]).unwrap(); // region 1
    s.flush().unwrap();
    s.write(r, &[3; 10]).unwrap();
    s.flush().unwrap();
    // Region 0 has been idle for two flushes, but the interval has not passed:
    // under writes a flush commits nothing.
    assert_eq!(s.dirty_regions(), vec![0, r]);
    std::thread::sleep(interval + Duration::from_millis(50));
    s.write(r, &[4; 10]).unwrap();
    s.flush().unwrap();
    // The interval has passed: what was not written since it began is cleared.
    assert_eq!(s.dirty_regions(), vec![r]);
    // A flush right after another finds nothing new, but that is no sign of an
    // idle volume (an engine's group commit sends rounds back to back).
    s.flush().unwrap();
    assert_eq!(s.dirty_regions(), vec![r]);
    // Nothing written since a flush a while ago: an idle volume clears at once.
    std::thread::sleep(interval + Duration::from_millis(50));
    s.flush().unwrap();
    assert!(s.dirty_regions().is_empty());
    // Cleared regions survive a crash with their entries intact.
    s.write(2 * r, &pattern(9, 4096)).unwrap();
    s.crash();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(s.recovered_regions(), vec![2 * r]);
    assert_eq!(&s.read(0, 10).unwrap()[..], &[1; 10]);
    assert_eq!(&s.read(r, 10).unwrap()[..], &[4; 10]);
    assert_eq!(&s.read(2 * r, 4096).unwrap()[..], &pattern(9, 4096)[..]);
}

#[test]
fn dirty_regions_are_set_before_writes_and_cleared_lazily() {
    let tmp = tempfile::tempdir().unwrap();
    let r = 16 * KIB;
    let s = small_store(tmp.path(), 256 * KIB, 4096, r);
    // Every flush may clear (the rule of a busy volume, per interval, is below).
    s.set_clear_interval(Duration::ZERO);
    assert_eq!(s.region_size(), r);
    assert!(s.dirty_regions().is_empty());
    s.write(100, &[1; 10]).unwrap();
    s.write(2 * r - 1, &[1; 2]).unwrap(); // regions 1 and 2
    assert_eq!(s.dirty_regions(), vec![0, r, 2 * r]);
    // Written since the previous flush: still dirty after this one.
    s.flush().unwrap();
    assert_eq!(s.dirty_regions(), vec![0, r, 2 * r]);
    // A hot region stays dirty; idle ones are cleared.
    s.write(r, &[2; 10]).unwrap();
    s.flush().unwrap();
    assert_eq!(s.dirty_regions(), vec![r]);
    s.flush().unwrap();
    assert!(s.dirty_regions().is_empty());
    // Unmap marks regions too, and the marks are durable.
    s.unmap(5 * r + 10, 3 * r).unwrap();
    assert_eq!(s.dirty_regions(), vec![5 * r, 6 * r, 7 * r, 8 * r]);
    s.crash();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    s.set_clear_interval(Duration::ZERO);
    assert!(!s.meta().clean_shutdown);
    assert_eq!(s.recovered_regions(), vec![5 * r, 6 * r, 7 * r, 8 * r]);
    assert_eq!(s.dirty_regions(), s.recovered_regions());
    // Recovered regions clear after two flushes that find them untouched.
    s.write(6 * r, &[3; 1]).unwrap();
    s.flush().unwrap();
    assert_eq!(s.dirty_regions().len(), 4);
    s.flush().unwrap();
    assert!(s.dirty_regions().is_empty());
    assert_eq!(s.recovered_regions().len(), 4);
    s.write(0, &[1]).unwrap();
    s.close().unwrap();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert!(s.meta().clean_shutdown);
    assert!(s.dirty_regions().is_empty());
    assert!(s.recovered_regions().is_empty());
    s.close().unwrap();
}

#[test]
fn torn_writes_are_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let r = 16 * KIB;
    let s = small_store(tmp.path(), 256 * KIB, 4096, r);
    s.set_clear_interval(Duration::ZERO);
    let old = pattern(1, 40_000);
    s.write(1000, &old).unwrap();
    s.flush().unwrap();
    s.flush().unwrap();
    s.flush().unwrap();
    assert!(s.dirty_regions().is_empty());
    // Data landed, checksum did not.
    let new = pattern(2, 10_000);
    s.torn_write_data_only(3000, &new).unwrap();
    assert!(s.read(0, 64 * KIB).is_err());
    s.crash();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    let mut model = vec![0u8; 64 * KIB as usize];
    model[1000..41_000].copy_from_slice(&old);
    model[3000..13_000].copy_from_slice(&new);
    assert_eq!(&s.read(0, 64 * KIB).unwrap()[..], &model[..]);
    // Checksum landed, data did not: the old data stays.
    s.torn_write_crc_only(20_000, &pattern(3, 5000)).unwrap();
    s.crash();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(&s.read(0, 64 * KIB).unwrap()[..], &model[..]);
    // A torn write to a never-written block whose data never landed.
    s.torn_write_crc_only(200 * KIB, &pattern(4, 4096)).unwrap();
    s.crash();
    let s = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(&s.read(200 * KIB, 4096).unwrap()[..], &[0u8; 4096][..]);
    assert_eq!(
        s.block_checksums(200 * KIB, 4096).unwrap(),
        vec![zero_block_crc()]
    );
    s.close().unwrap();
}

#[test]
fn errors_are_one_line_with_context() {
    let tmp = tempfile::tempdir().unwrap();
    let errs = [
        crate::error::io_err(
            "writing head.img at offset 4096",
            std::io::Error::from_raw_os_error(libc::EIO),
        ),
        crate::error::io_err(
            "writing head.img at offset 4096",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        ),
        StoreError::ChecksumMismatch {
            offset: 8192,
            stored: 1,
            computed: 2,
        },
        StoreError::OutOfRange {
            offset: 1,
            len: 2,
            size: 3,
        },
        StoreError::StaleEpoch {
            current: Epoch(2),
            given: Epoch(1),
        },
        StoreError::AlreadyExists(tmp.path().to_path_buf()),
        ReplicaStore::open(&tmp.path().join("x")).unwrap_err(),
    ];
    for e in &errs {
        let s = e.to_string();
        assert!(!s.contains('\n') && !s.is_empty(), "{s:?}");
    }
    assert!(!errs[0].is_no_space());
    assert!(errs[1].is_no_space());
    assert!(matches!(errs[1], StoreError::NoSpace { .. }));
    assert!(errs[1].to_string().contains("head.img at offset 4096"));
    assert!(
        StoreError::Io {
            context: "x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC)
        }
        .is_no_space()
    );
}

#[test]
fn unwritten_volume_reads_zeroes_and_large_reads_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    let s = ReplicaStore::create(tmp.path(), params(size, 1 << 20)).unwrap();
    assert_eq!(&s.read(size - 10, 10).unwrap()[..], &[0u8; 10][..]);
    let big = s.read(0, crate::MAX_IO_LEN).unwrap();
    assert!(big.iter().all(|&b| b == 0));
    assert!(matches!(
        s.read(0, crate::MAX_IO_LEN + 1),
        Err(StoreError::Invalid(_))
    ));
    let sums = s.block_checksums(0, size).unwrap();
    assert_eq!(sums.len(), (size / BLOCK) as usize);
    assert!(sums.iter().all(|&c| c == zero_block_crc()));
    s.close().unwrap();
}

#[test]
fn a_write_is_light_once_its_regions_are_marked_dirty() {
    let tmp = tempfile::tempdir().unwrap();
    let s = ReplicaStore::create(&tmp.path().join("r"), params(4 * MIB, 64 * 1024)).unwrap();
    s.set_clear_interval(Duration::ZERO);
    // Region size is 1 MiB: nothing is marked yet.
    assert!(!s.write_is_light(0, 4096));
    s.write(0, &pattern(1, 4096)).unwrap();
    assert!(s.write_is_light(8192, 4096));
    // A range that crosses into the unmarked second region is not light.
    assert!(!s.write_is_light(MIB - 4096, 8192));
    // Out of range: the write fails fast, no commit either way.
    assert!(s.write_is_light(4 * MIB, 4096));
    // A flush with no write since the last one clears idle regions again.
    s.flush().unwrap();
    s.flush().unwrap();
    assert!(!s.write_is_light(0, 4096));
}

#[test]
fn a_background_sync_keeps_the_write_intent_bits() {
    // Dirty bits also tell a newly elected engine where replicas may differ;
    // only the engine's flushes clear them, however many syncs happen.
    let tmp = tempfile::tempdir().unwrap();
    let s = ReplicaStore::create(&tmp.path().join("r"), params(4 * MIB, 64 * 1024)).unwrap();
    s.set_clear_interval(Duration::ZERO);
    s.write(0, &pattern(3, 4096)).unwrap();
    for _ in 0..3 {
        s.sync().unwrap();
    }
    assert_eq!(s.dirty_regions(), vec![0]);
    s.flush().unwrap();
    s.flush().unwrap();
    assert!(s.dirty_regions().is_empty());
}

#[test]
fn discarded_and_never_written_are_distinct_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let s = ReplicaStore::create(dir.path(), params(MIB, 65536)).unwrap();
    s.write(0, &pattern(3, 8 * BLOCK as usize)).unwrap();
    s.unmap(2 * BLOCK, 3 * BLOCK).unwrap();
    s.write_zeroes(6 * BLOCK, BLOCK).unwrap();
    s.close().unwrap();
    let raw = std::fs::read(dir.path().join("head.crc")).unwrap();
    let entry = |b: usize| u32::from_le_bytes(raw[b * 4..b * 4 + 4].try_into().unwrap());
    let states: Vec<u32> = (0..10).map(entry).collect();
    assert!(states[0] > 1 && states[1] > 1 && states[5] > 1 && states[7] > 1);
    assert_eq!(&states[2..5], &[1, 1, 1], "unmapped: discarded");
    assert_eq!(states[6], 1, "write-zeroes: discarded");
    assert_eq!(&states[8..10], &[0, 0], "never written");
}

#[test]
fn reservation_records_persist_and_refuse_older_ones() {
    use crate::ReservationRecord;
    let dir = tempfile::tempdir().unwrap();
    let s = ReplicaStore::create(dir.path(), params(MIB, 65536)).unwrap();
    assert_eq!(s.meta().reservations, None);
    let rec = |epoch: u64, sequence: u64, state: &[u8]| ReservationRecord {
        epoch: Epoch(epoch),
        sequence,
        state: state.to_vec(),
    };
    s.set_reservations(rec(2, 5, b"five")).unwrap();
    s.set_reservations(rec(3, 6, b"six")).unwrap();
    match s.set_reservations(rec(2, 9, b"older engine")) {
        Err(StoreError::StaleReservations {
            current_epoch,
            current_sequence,
            ..
        }) => {
            assert_eq!((current_epoch, current_sequence), (Epoch(3), 6));
        }
        other => panic!("expected StaleReservations, got {other:?}"),
    }
    // Reopened after a crash: the record is durable.
    s.crash();
    let s = ReplicaStore::open(dir.path()).unwrap();
    assert_eq!(s.meta().reservations, Some(rec(3, 6, b"six")));
    s.close().unwrap();
}

/// A fill's blocks of zeroes take no space: the clone of a sparse source
/// stays sparse, and reads the same.
#[test]
fn a_fill_skips_blocks_of_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * BLOCK;
    let store = ReplicaStore::create(dir.path(), super::params(size, 65536)).unwrap();
    let mut fill = vec![0u8; 64 * BLOCK as usize];
    fill[5 * BLOCK as usize + 17] = 0xAB; // one block with a single byte set
    assert_eq!(store.fill(0, &fill).unwrap(), 1, "only block 5");
    store.flush().unwrap();
    assert_eq!(store.read(0, size).unwrap()[..], fill[..]);
    let head = store.layer_usage().pop().unwrap();
    assert!(
        head.allocated_bytes < 16 * BLOCK,
        "{} bytes allocated for one block of data",
        head.allocated_bytes
    );
}

/// How many pages of `path`'s `offset..offset + len` are in the page cache.
fn resident_pages(path: &std::path::Path, offset: u64, len: u64) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let pages = (len / BLOCK) as usize;
    // SAFETY: a fresh read-only shared mapping of `len` bytes of an open
    // file, unmapped below; mincore writes one byte per page into `vec`.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        );
        assert_ne!(at, libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(at, len as usize, vec.as_mut_ptr()), 0);
        libc::munmap(at, len as usize);
        vec.iter().filter(|b| *b & 1 == 1).count()
    }
}

/// A fill writes past the page cache (decision 69): when it returns its
/// blocks are in the file and none of them is cached, pages cached over the
/// range before are gone (a read sees the fill, through the store and
/// through the file), and a client's block in the middle keeps what the
/// client wrote; all of it reads back after a flush and a reopen.
#[test]
fn a_fill_writes_past_the_page_cache() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::create(dir.path(), params(4 * MIB, 65536)).unwrap();
    let data = dir.path().join("head.img");
    // Cache the first MiB of the file as the zeroes of a hole.
    let raw = std::fs::File::open(&data).unwrap();
    let mut zeroes = vec![1u8; MIB as usize];
    raw.read_exact_at(&mut zeroes, 0).unwrap();
    assert!(zeroes.iter().all(|&b| b == 0));
    assert!(
        resident_pages(&data, 0, MIB) > 0,
        "the hole's pages are cached"
    );
    let client = pattern(5, BLOCK as usize);
    store.write(MIB + 3 * BLOCK, &client).unwrap();

    let fill = pattern(6, 2 * MIB as usize);
    assert_eq!(store.fill(0, &fill).unwrap(), 2 * MIB / BLOCK - 1);
    assert_eq!(
        resident_pages(&data, 0, MIB),
        0,
        "no page of the fill is cached"
    );
    let mut expected = fill.clone();
    let at = (MIB + 3 * BLOCK) as usize;
    expected[at..at + BLOCK as usize].copy_from_slice(&client);
    let mut through_file = vec![0u8; 2 * MIB as usize];
    raw.read_exact_at(&mut through_file, 0).unwrap();
    assert!(
        through_file == expected,
        "the file holds the fill and the client's block"
    );
    assert!(store.read(0, 2 * MIB).unwrap()[..] == expected[..]);

    store.flush().unwrap();
    drop(store);
    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.read(0, 2 * MIB).unwrap()[..] == expected[..]);
}

/// A fill marks the whole 64 MiB window around it dirty in one commit
/// (decision 71), so the fills after it in the window commit no metadata;
/// the next window is not marked until a fill reaches it.
#[test]
fn a_fill_marks_its_whole_window_dirty_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::create(dir.path(), params(160 * MIB, 65536)).unwrap();
    assert!(!store.write_is_light(32 * MIB, BLOCK), "nothing marked yet");
    store.fill(MIB, &pattern(1, MIB as usize)).unwrap();
    assert!(store.write_is_light(0, 64 * MIB), "the whole first window");
    assert!(!store.write_is_light(64 * MIB, BLOCK), "not the next one");
    store.fill(130 * MIB, &pattern(2, MIB as usize)).unwrap();
    assert!(
        store.write_is_light(128 * MIB, 32 * MIB),
        "the last, short window"
    );
    assert!(
        !store.write_is_light(100 * MIB, BLOCK),
        "the window between"
    );
    // A client's write marks only its own region.
    store.write(100 * MIB, &pattern(3, BLOCK as usize)).unwrap();
    assert!(store.write_is_light(100 * MIB, MIB));
    assert!(!store.write_is_light(101 * MIB, BLOCK));
}

/// On a filesystem without direct I/O a fill goes through the page cache
/// and streams its source through once: once a flush has made its blocks
/// durable they leave the page cache, so that the rest of the fill reuses
/// those pages instead of taking fresh ones (decision 65). A client's own
/// writes stay cached, and the filled data reads back.
#[test]
fn a_fills_pages_leave_the_page_cache_once_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::create(dir.path(), params(3 * MIB, 65536)).unwrap();
    store.refuse_direct_writes();
    let filled = pattern(7, MIB as usize);
    let written = pattern(9, MIB as usize);
    assert_eq!(store.fill(0, &filled).unwrap(), MIB / BLOCK);
    store.write(MIB, &written).unwrap();
    let data = dir.path().join("head.img");
    let pages = (MIB / BLOCK) as usize;
    assert_eq!(resident_pages(&data, 0, MIB), pages, "dirty, until flushed");
    store.flush().unwrap();
    assert_eq!(resident_pages(&data, 0, MIB), 0, "the fill, once flushed");
    assert_eq!(resident_pages(&data, MIB, MIB), pages, "the write");
    assert_eq!(store.read(0, MIB).unwrap()[..], filled[..]);
    // A fill after that flush waits for the next one.
    assert_eq!(store.fill(2 * MIB, &filled).unwrap(), MIB / BLOCK);
    assert_eq!(resident_pages(&data, 2 * MIB, MIB), pages);
    store.flush().unwrap();
    assert_eq!(resident_pages(&data, 2 * MIB, MIB), 0);
}

/// Through the page cache (no direct I/O), a fill starts its blocks' writeback as it writes them, so that the disk
/// works while the fill goes on and the next flush finds them written
/// (decision 68); a client's write is left to the flush. Observed from
/// outside: waiting only for writeback already under way, then asking the
/// kernel to drop the range, leaves no page of the fill (clean) but every
/// page of the write (still dirty). A `sync` by another process in between
/// would clean the write too, so the story gets three tries on new stores;
/// without the early writeback the fill stays dirty in every one.
#[test]
fn a_fill_starts_writing_its_blocks_back_before_the_flush() {
    use std::os::fd::AsRawFd;
    let pages = (MIB / BLOCK) as usize;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::create(dir.path(), params(2 * MIB, 65536)).unwrap();
        store.refuse_direct_writes();
        assert_eq!(
            store.fill(0, &pattern(3, MIB as usize)).unwrap(),
            MIB / BLOCK
        );
        store.write(MIB, &pattern(4, MIB as usize)).unwrap();
        let data = dir.path().join("head.img");
        let file = std::fs::File::open(&data).unwrap();
        // SAFETY: integer arguments on an open descriptor.
        unsafe {
            // Waits for pages already under writeback; starts none.
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE;
            assert_eq!(
                libc::sync_file_range(file.as_raw_fd(), 0, 2 * MIB as i64, wait),
                0
            );
            let drop = libc::POSIX_FADV_DONTNEED;
            assert_eq!(
                libc::posix_fadvise(file.as_raw_fd(), 0, 2 * MIB as i64, drop),
                0
            );
        }
        let left = (
            resident_pages(&data, 0, MIB),
            resident_pages(&data, MIB, MIB),
        );
        if left == (0, pages) {
            return;
        }
        seen.push(left);
    }
    panic!(
        "pages of the fill and of the write left in the page cache, per try: {seen:?} \
         (the fill's should be written back already, the write's still dirty)"
    );
}

/// A clone's fill lands only on blocks no layer has written or discarded:
/// blocks written in the head, in a snapshot under it, or discarded keep
/// what they hold; the rest take the fill; a second fill changes nothing;
/// and all of it survives a reopen.
#[test]
fn a_sent_fill_lands_only_when_its_payload_matches_the_senders_crc() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * BLOCK;
    let store = ReplicaStore::create(dir.path(), super::params(size, 65536)).unwrap();
    let fill = pattern(7, 16 * BLOCK as usize);
    let crc = crc32c::crc32c(&fill);
    match store.fill_sent(8 * BLOCK, &fill, crc ^ 1) {
        Err(StoreError::PayloadChecksum {
            offset,
            len,
            computed,
            sent,
        }) => assert_eq!(
            (offset, len, computed, sent),
            (8 * BLOCK, 16 * BLOCK, crc, crc ^ 1)
        ),
        other => panic!("a fill with a bad CRC: {other:?}"),
    }
    assert!(
        store.read(0, size).unwrap().iter().all(|&b| b == 0),
        "filled a bad payload"
    );
    assert_eq!(store.fill_sent(8 * BLOCK, &fill, crc).unwrap(), 16);
    assert_eq!(&store.read(8 * BLOCK, 16 * BLOCK).unwrap()[..], &fill[..]);
}

#[test]
fn a_fill_only_lands_on_blocks_never_written_in_any_layer() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * BLOCK;
    let store = ReplicaStore::create(dir.path(), super::params(size, 65536)).unwrap();
    let old = vec![0x11u8; BLOCK as usize];
    let new = vec![0x22u8; BLOCK as usize];
    store.write(BLOCK, &old).unwrap(); // block 1: in the snapshot
    store.snapshot_create("s").unwrap();
    store.write(2 * BLOCK, &new).unwrap(); // block 2: in the head
    store.unmap(3 * BLOCK, BLOCK).unwrap(); // block 3: discarded
    store.write(4 * BLOCK, &vec![0u8; BLOCK as usize]).unwrap(); // block 4: written zeroes
    let fill = vec![0xF1u8; 8 * BLOCK as usize];
    assert_eq!(store.fill(0, &fill).unwrap(), 4, "blocks 0, 5, 6, 7");
    let again = vec![0xF2u8; 8 * BLOCK as usize];
    assert_eq!(store.fill(0, &again).unwrap(), 0, "nothing is left to fill");
    let check = |store: &ReplicaStore| {
        let data = store.read(0, 8 * BLOCK).unwrap();
        let block = |i: usize| &data[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        assert!(block(0).iter().all(|&b| b == 0xF1));
        assert_eq!(block(1), &old[..]);
        assert_eq!(block(2), &new[..]);
        assert!(block(3).iter().all(|&b| b == 0));
        assert!(block(4).iter().all(|&b| b == 0));
        for i in 5..8 {
            assert!(block(i).iter().all(|&b| b == 0xF1), "block {i}");
        }
        // The snapshot's view is untouched by the fill.
        let snap = store.read_snapshot("s", 0, 8 * BLOCK).unwrap();
        assert!(snap[..BLOCK as usize].iter().all(|&b| b == 0));
        assert_eq!(&snap[BLOCK as usize..2 * BLOCK as usize], &old[..]);
    };
    check(&store);
    assert!(store.fill(100, &fill[..4096]).is_err(), "unaligned");
    assert!(
        store.fill(15 * BLOCK, &fill[..8192]).is_err(),
        "past the end"
    );
    store.flush().unwrap();
    store.close().unwrap();
    let store = ReplicaStore::open(dir.path()).unwrap();
    check(&store);
    let sums = store.snapshot_checksums("s", 0, 8 * BLOCK).unwrap();
    assert_eq!(sums.len(), 8);
    assert!(store.snapshot_checksums("nope", 0, BLOCK).is_err());
}
