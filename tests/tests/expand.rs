//! Online expansion, end to end (`corral volume --engine ADDR expand SIZE`).
//!
//! - Under writes over iSCSI: a verifying writer (its own iSCSI session)
//!   writes numbered 4 KiB blocks while the volume grows; a second session
//!   that was logged in before gets CAPACITY DATA HAS CHANGED (06h, 2Ah/09h)
//!   on its next command, once, and READ CAPACITY(16) shows the new size,
//!   as does `iscsi-readcapacity16` (a new session: libiscsi consumes a new
//!   session's power-on attention silently, so the capacity attention is
//!   checked on the session that was there). Bad sizes — smaller, not a
//!   multiple of 4096, absurd — are refused with a one-line error and change
//!   nothing. Then a new NBD connection sees the new size, and every
//!   acknowledged write reads back.
//! - ext4 (root): made on a 64 MiB volume over NBD, the volume grows to
//!   128 MiB, a new NBD connection sees it, `resize2fs` grows the
//!   filesystem, fsck finds it clean, and every file reads back.

mod iscsi_common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use corral_tests::ext4::{Ext4OnNbd, assert_root};
use corral_tests::tools::run_ok;
use corral_tests::{Cluster, EngineSpec, wait_for_port};
use iscsi_common::RawInitiator;
use serde_json::Value;

const BLOCK: u64 = 4096;

/// Contents of 4 KiB block `block` written as the writer's `n`th write.
fn block_data(block: u64, n: u32) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[0..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..12].copy_from_slice(&n.to_le_bytes());
        chunk[12..16].copy_from_slice(&(i as u32).to_le_bytes());
    }
    v
}

/// WRITE(16) of one 4 KiB block (512-byte logical blocks).
fn write16(block: u64) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[2..10].copy_from_slice(&(block * 8).to_be_bytes());
    cdb[10..14].copy_from_slice(&8u32.to_be_bytes());
    cdb
}

fn read_capacity16() -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    cdb
}

/// Bytes of the LUN per a READ CAPACITY(16) answer.
fn capacity(data: &[u8]) -> u64 {
    let last = u64::from_be_bytes(data[0..8].try_into().unwrap());
    let block = u32::from_be_bytes(data[8..12].try_into().unwrap());
    (last + 1) * u64::from(block)
}

/// (sense key, ASC, ASCQ) of fixed-format sense data.
fn sense(s: &[u8]) -> (u8, u8, u8) {
    assert!(s.len() >= 14, "short sense data {s:?}");
    (s[2] & 0x0f, s[12], s[13])
}

/// What the writer did: the last acknowledged write of each block, and the
/// capacity attentions it was given.
#[derive(Default)]
struct Written {
    last: HashMap<u64, u32>,
    attentions: u32,
    beyond_old_end: u32,
}

/// Writes numbered blocks at pseudo-random places in the volume's current
/// size (it learns the new one from the capacity attention), until `stop`
/// and at least `min_after` writes past the old end, at most `max` writes.
fn writer(
    mut session: RawInitiator,
    old_size: u64,
    new_size: u64,
    stop: Arc<AtomicBool>,
) -> Written {
    let mut w = Written::default();
    let mut size = old_size;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 1..=20_000u32 {
        if stop.load(Ordering::SeqCst) && w.beyond_old_end >= 50 {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let blocks = size / BLOCK;
        // Half of the writes after the expansion go to the new space.
        let block = if size > old_size && n % 2 == 0 {
            old_size / BLOCK + x % ((size - old_size) / BLOCK)
        } else {
            x % blocks
        };
        let data = block_data(block, n);
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(tries <= 3, "write {n} of block {block} kept failing");
            let (status, _, s) = session.command_sense(&write16(block), &data, 0);
            if status == 0 {
                w.last.insert(block, n);
                if block * BLOCK >= old_size {
                    w.beyond_old_end += 1;
                }
                break;
            }
            assert_eq!(status, 2, "write {n}: status {status}");
            match sense(&s) {
                (6, 0x2a, 0x09) => {
                    w.attentions += 1;
                    let (status, data, _) = session.command_sense(&read_capacity16(), &[], 32);
                    assert_eq!(status, 0);
                    size = capacity(&data);
                    assert_eq!(size, new_size);
                }
                (6, 0x29, _) => {} // power on: a new session's first command
                other => panic!("write {n} of block {block}: sense {other:x?}"),
            }
        }
    }
    w
}

fn corral_json(cluster: &Cluster, control: &str, args: &[&str]) -> Value {
    let mut all = vec!["volume", "--engine", control, "--json"];
    all.extend_from_slice(args);
    let out = cluster.corral(&all).unwrap();
    assert!(
        out.status.success(),
        "corral {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `corral volume expand SIZE` must fail with one line naming `why`.
fn refused(cluster: &Cluster, control: &str, size: &str, why: &str) {
    let out = cluster
        .corral(&["volume", "--engine", control, "expand", size])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expand {size} succeeded");
    assert!(err.contains(why), "expand {size}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "expand {size}: {err}");
}

#[test]
fn expand_under_iscsi_writes() {
    const OLD: u64 = 64 << 20;
    const NEW: u64 = 96 << 20;
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("grow", "64MiB", &[0, 1, 2]))
        .unwrap();
    let portal = cluster.engines[e].iscsi;
    let control = cluster.engines[e].control.to_string();
    let url = cluster.engines[e].iscsi_url();
    wait_for_port(portal, Duration::from_secs(30)).unwrap();

    // A session that is there when the volume grows, and has seen its
    // power-on attention.
    let mut watcher = RawInitiator::login(portal, "grow", 1);
    let tur = [0u8; 6];
    let (status, _, s) = watcher.command_sense(&tur, &[], 0);
    assert_eq!((status, sense(&s)), (2, (6, 0x29, 0)));
    let (status, data, _) = watcher.command_sense(&read_capacity16(), &[], 32);
    assert_eq!((status, capacity(&data)), (0, OLD));

    let stop = Arc::new(AtomicBool::new(false));
    let session = RawInitiator::login(portal, "grow", 2);
    let w = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || writer(session, OLD, NEW, stop))
    };
    // Writes are under way when the volume grows.
    std::thread::sleep(Duration::from_millis(500));
    let generation = cluster.volume_info(e).unwrap()["generation"].clone();

    // Bad sizes: refused, nothing changes.
    refused(&cluster, &control, "32MiB", "cannot shrink");
    refused(&cluster, &control, "67108865", "not a multiple of 4096");
    refused(
        &cluster,
        &control,
        "1048576TiB",
        "larger than volume grow can grow",
    );
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["size"], OLD, "{info}");
    assert_eq!(info["generation"], generation, "{info}");

    let r = corral_json(&cluster, &control, &["expand", "96MiB"]);
    assert_eq!(r["old_size"], OLD, "{r}");
    assert_eq!(r["new_size"], NEW, "{r}");
    assert_eq!(r["grown"].as_array().map(Vec::len), Some(3), "{r}");
    assert_eq!(r["failed"].as_array().map(Vec::len), Some(0), "{r}");
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["size"], NEW, "{info}");
    assert_eq!(info["replicas_rw"], 3, "{info}");
    // The same size again: nothing to do.
    let again = corral_json(&cluster, &control, &["expand", "96MiB"]);
    assert_eq!(again["old_size"], NEW, "{again}");

    // The session that was there: one capacity attention, then the new size.
    let (status, _, s) = watcher.command_sense(&tur, &[], 0);
    assert_eq!((status, sense(&s)), (2, (6, 0x2a, 0x09)));
    let (status, _, _) = watcher.command_sense(&tur, &[], 0);
    assert_eq!(status, 0);
    let (status, data, _) = watcher.command_sense(&read_capacity16(), &[], 32);
    assert_eq!((status, capacity(&data)), (0, NEW));
    // A new session (libiscsi's tool) sees the new size.
    let cap = run_ok("iscsi-readcapacity16", &[&url], Duration::from_secs(30)).unwrap();
    let cap = String::from_utf8_lossy(&cap.stdout).to_string();
    assert!(cap.contains(&format!("Total size:{NEW}")), "{cap}");

    stop.store(true, Ordering::SeqCst);
    let written = w.join().expect("the writer");
    assert_eq!(written.attentions, 1, "one capacity attention per session");
    assert!(written.beyond_old_end >= 50);

    // A new NBD connection sees the new size; every acknowledged write is there.
    let data = cluster.read_back(e, NEW as usize + 1).unwrap();
    assert_eq!(data.len() as u64, NEW);
    for (block, n) in &written.last {
        let at = (*block * BLOCK) as usize;
        assert!(
            data[at..at + BLOCK as usize] == block_data(*block, *n)[..],
            "block {block} does not hold write {n}"
        );
    }
    let report = cluster.verify(e).expect("RW replicas identical");
    assert_eq!(
        report["differences"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    cluster.stop_all().unwrap();
}

#[test]
fn ext4_grows_with_resize2fs_after_an_expansion() {
    assert_root();
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("growfs", "64MiB", &[0, 1, 2]))
        .unwrap();
    let control = cluster.engines[e].control.to_string();
    let uri = cluster.engines[e].nbd_uri();
    let dir = cluster.path().to_path_buf();

    let mut fs = Ext4OnNbd::attach(&dir, &uri, 64 << 20).unwrap();
    let files = fs.mkfs_and_write(7).unwrap();
    // Detached: the NBD client keeps the size its connection began with.
    drop(fs);

    let r = corral_json(&cluster, &control, &["expand", "128MiB"]);
    assert_eq!(r["new_size"], 128u64 << 20, "{r}");

    // The next connection sees 128 MiB (attach checks the size). Same
    // directory, so the files are where they were written; the last
    // nbdfuse's pidfile goes first (attach waits for a new one).
    let _ = std::fs::remove_file(dir.join("nbdfuse.pid"));
    let mut fs = Ext4OnNbd::attach(&dir, &uri, 128 << 20).unwrap();
    let size = fs.resize_fsck_and_read_back(&files).unwrap();
    assert!(size > 120 << 20, "ext4 is {size} bytes after resize2fs");
    drop(fs);
    let report = cluster.verify(e).expect("RW replicas identical");
    assert_eq!(
        report["differences"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    cluster.stop_all().unwrap();
}
