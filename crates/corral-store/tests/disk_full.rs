//! Story: the metadata database of a replica store runs out of space.
//!
//! redb fails every operation after one I/O error until the database is
//! closed and opened again. A store on a full filesystem whose metadata
//! commit hit ENOSPC used to keep failing every later commit — merges,
//! snapshots, writes into regions not yet marked dirty — with "previous I/O
//! error", even after space was freed, until the daemon restarted. Now the
//! commit fails with the store's `NoSpace` error, and once space is back
//! the store works again, nothing acknowledged lost.
//!
//! Needs root (it mounts an 8 MiB tmpfs): it fails, rather than skips,
//! without it.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use corral_store::{CreateParams, ReplicaStore, StoreError};

const MIB: usize = 1 << 20;

/// A tmpfs mounted for the test, unmounted (lazily, so it always goes) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed: this test needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `path` until the filesystem is full.
fn fill_up(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xf1u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filler: {e}"),
        }
    }
}

#[test]
fn a_metadata_commit_that_runs_out_of_space_fails_clearly_and_the_store_recovers_when_space_returns()
 {
    let fs = Tmpfs::mount("8m");
    let dir = fs.path().join("vol");
    let filler = fs.path().join("filler");
    let store = ReplicaStore::create(
        &dir,
        CreateParams {
            volume: "vol".into(),
            size: 4 * MIB as u64,
            block_size: 512,
            chunk_size: 64 << 10,
            instance_id: "disk-full".into(),
        },
    )
    .unwrap();
    let mut want = vec![0u8; 4 * MIB];
    want[..MIB].fill(1);
    store.write(0, &want[..MIB]).unwrap();
    store.flush().unwrap();

    // The disk fills up; snapshots are taken and deleted until a metadata
    // commit finds no room (each commit writes new redb pages).
    fill_up(&filler);
    let mut failed = None;
    for i in 0..500 {
        let name = format!("s{i}");
        let r = store
            .snapshot_create(&name)
            .and_then(|_| store.snapshot_delete(&name));
        if let Err(e) = r {
            failed = Some((name, e));
            break;
        }
    }
    let (stuck, failed) = failed.expect("a metadata commit ran out of space within 500 snapshots");
    assert!(
        matches!(&failed, StoreError::NoSpace { context } if context.contains("meta.redb")),
        "the error says the disk is full, and where: {failed}"
    );

    // While it is full, the snapshot taken in memory but not recorded keeps
    // flushes failing (nothing is acknowledged durable on a head the
    // metadata does not name).
    assert!(
        store.flush().is_err(),
        "a flush fails while the record is not committed"
    );

    // Space comes back: the metadata takes commits again at once, starting
    // with that record (a retried create of the same name returns it).
    std::fs::remove_file(&filler).unwrap();
    store
        .snapshot_create(&stuck)
        .expect("the stuck snapshot is recorded once space returns");
    while store.merge_step().expect("merges go on") {}
    assert!(!store.merge_pending());
    store
        .snapshot_create("after")
        .expect("snapshots are taken again");
    want[2 * MIB..3 * MIB].fill(2);
    store
        .write(2 * MIB as u64, &want[2 * MIB..3 * MIB])
        .expect("writes into a region not yet dirty are taken again");
    store.flush().unwrap();
    assert!(store.read(0, want.len() as u64).unwrap() == want[..]);
    store.close().unwrap();

    // And it is all on disk.
    let store = ReplicaStore::open(&dir).unwrap();
    assert_eq!(
        store
            .snapshots()
            .iter()
            .map(|s| &s.name)
            .collect::<Vec<_>>(),
        [stuck.as_str(), "after"]
    );
    assert!(
        store.read_snapshot(&stuck, 0, want.len() as u64).unwrap()
            == want[..MIB]
                .iter()
                .chain(&vec![0u8; 3 * MIB])
                .copied()
                .collect::<Vec<_>>()[..]
    );
    assert!(store.read(0, want.len() as u64).unwrap() == want[..]);
    assert!(
        store.read_snapshot("after", 0, want.len() as u64).unwrap()
            == want[..2 * MIB]
                .iter()
                .chain(&vec![0u8; 2 * MIB])
                .copied()
                .collect::<Vec<_>>()[..]
    );
    store.close().unwrap();
}
