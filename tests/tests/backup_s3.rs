//! Backup targets against a real S3 server: s3s-fs on loopback
//! ([`corral_tests::s3::S3Server`]), reached through `object_store` as
//! MinIO or AWS would be.
//!
//! - Objects go in create-if-absent (a second create of a name keeps the
//!   first content: the server honours `If-None-Match: *`), are read
//!   whole and by range, listed, sized and deleted.
//! - A full backup then an incremental one, written from a volume in
//!   memory, restore bit-exact, and read back by range bit-exact.
//! - What an operator can get wrong is said plainly, on the first request:
//!   wrong keys ("access denied ... check the keys"), a bucket that does
//!   not exist ("bucket X does not exist"), a store that is down ("cannot
//!   reach http://...: connection refused", after a few quick retries).
//!   A store killed in the middle of a backup fails it with that error;
//!   once the store is back the same target works again, and the backup,
//!   run again, restores bit-exact.
//!
//! Where s3s-fs 0.14.1 differs from S3 (these tests keep clear of it): its
//! `If-None-Match: *` is a check before the write, not atomic — two
//! writers creating one name at the same moment can both be answered
//! "created", the last one's bytes kept; a PUT into a bucket that does not
//! exist creates it (S3 answers NoSuchBucket), and a GET there answers
//! NoSuchKey. The missing bucket is therefore asked about with a listing
//! ([`Target::check`]) and a delete, which answer NoSuchBucket as S3 does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use corral_backup::block::BLOCK_SIZE;
use corral_backup::target::{Put, S3Settings, Target, TargetError};
use corral_backup::transfer::{self, BackupSpec, BlockSink, BlockSource, TransferError};
use corral_backup::{BackupReader, Manifest};
use corral_tests::s3::S3Server;
use corral_tests::tools::pattern;

const GIB: u64 = 1 << 30;
const BS: u64 = BLOCK_SIZE as u64;
/// Two pages: one full GiB, then three blocks.
const SIZE: u64 = GIB + 3 * BS;
/// A hang guard for the tests whose store goes away: far above the few
/// seconds the small retry settings allow, and not asserted.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// A sparse volume in memory: its blocks that may hold data.
#[derive(Default)]
struct Volume(Mutex<HashMap<u64, Vec<u8>>>);

impl Volume {
    fn set(&self, index: u64, data: Vec<u8>) {
        assert_eq!(data.len(), BLOCK_SIZE);
        self.0.lock().unwrap().insert(index, data);
    }

    fn block(&self, index: u64) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .get(&index)
            .cloned()
            .unwrap_or_else(|| vec![0u8; BLOCK_SIZE])
    }

    /// The blocks that are not all zero (what a restore writes).
    fn image(&self) -> HashMap<u64, Vec<u8>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, d)| d.iter().any(|b| *b != 0))
            .map(|(i, d)| (*i, d.clone()))
            .collect()
    }
}

impl BlockSource for Volume {
    async fn read_block(&self, index: u64) -> Result<Bytes, String> {
        Ok(Bytes::from(self.block(index)))
    }
}

impl BlockSink for Volume {
    async fn write_block(&self, index: u64, data: Vec<u8>) -> Result<(), String> {
        self.0.lock().unwrap().insert(index, data);
        Ok(())
    }
}

/// The volume's bytes `offset..offset + len` in `image`.
fn bytes_of(image: &HashMap<u64, Vec<u8>>, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|at| image.get(&(at / BS)).map_or(0, |d| d[(at % BS) as usize]))
        .collect()
}

fn spec(name: &str) -> BackupSpec {
    BackupSpec {
        volume: "db".into(),
        name: name.into(),
        snapshot: format!("snap-{name}"),
        size: SIZE,
        created_unix_ms: 1,
        // About four blocks a pack: several packs per backup.
        pack_bytes: 256 << 10,
    }
}

/// Settings that give up on an unreachable store within a few seconds.
fn quick(settings: S3Settings) -> S3Settings {
    S3Settings {
        max_retries: 2,
        retry_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..settings
    }
}

/// Restores `m` into a new volume in memory; its blocks.
async fn restored(target: &Target, m: &Manifest) -> HashMap<u64, Vec<u8>> {
    let out = Volume::default();
    transfer::restore(target, m, &out).await.unwrap();
    out.image()
}

#[tokio::test]
async fn objects_are_created_once_read_by_range_listed_and_deleted() {
    let s3 = S3Server::start().unwrap();
    let t = Target::open(&s3.url("cluster-a"), &s3.settings().unwrap()).unwrap();
    t.check().await.unwrap();
    let name = "volumes/db/backups/b1.manifest";
    assert_eq!(
        t.put_new(name, b"first".to_vec().into()).await.unwrap(),
        Put::Created
    );
    // The object is in the bucket, under the prefix.
    assert_eq!(
        std::fs::read(s3.bucket_dir().join("cluster-a").join(name)).unwrap(),
        b"first"
    );
    // The second create is refused by the server (If-None-Match: *,
    // answered 412), not overwritten.
    assert_eq!(
        t.put_new(name, b"second".to_vec().into()).await.unwrap(),
        Put::Existed
    );
    assert_eq!(
        &t.get(name).await.unwrap()[..],
        b"first",
        "never overwritten"
    );
    assert_eq!(&t.get_range(name, 1..3).await.unwrap()[..], b"ir");
    assert_eq!(&t.get_range(name, 0..5).await.unwrap()[..], b"first");
    assert_eq!(t.size(name).await.unwrap(), 5);

    let big = pattern(7, 3 << 20);
    t.put_new("volumes/db/packs/p1", big.clone().into())
        .await
        .unwrap();
    assert_eq!(
        t.size("volumes/db/packs/p1").await.unwrap(),
        big.len() as u64
    );
    let at = 1_234_567u64;
    assert_eq!(
        &t.get_range("volumes/db/packs/p1", at..at + 70_000)
            .await
            .unwrap()[..],
        &big[at as usize..at as usize + 70_000]
    );
    assert_eq!(&t.get("volumes/db/packs/p1").await.unwrap()[..], &big[..]);

    t.put_new("volumes/db/backups/b2.manifest", Vec::new().into())
        .await
        .unwrap();
    t.put_new("volumes/other/backups/x.manifest", b"x".to_vec().into())
        .await
        .unwrap();
    let mut listed = t.list("volumes/db/backups/").await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        [
            "volumes/db/backups/b1.manifest",
            "volumes/db/backups/b2.manifest"
        ]
    );
    assert_eq!(t.size("volumes/db/backups/b2.manifest").await.unwrap(), 0);
    assert!(t.list("volumes/none/").await.unwrap().is_empty());
    // Another prefix of the same bucket sees none of it.
    let other = Target::open(&s3.url("cluster-b"), &s3.settings().unwrap()).unwrap();
    assert!(other.list("volumes/db/backups/").await.unwrap().is_empty());

    t.delete(name).await.unwrap();
    t.delete(name).await.unwrap();
    assert!(matches!(
        t.get(name).await,
        Err(TargetError::NotFound { .. })
    ));
    assert!(matches!(
        t.size(name).await,
        Err(TargetError::NotFound { .. })
    ));
    assert_eq!(
        t.list("volumes/db/backups/").await.unwrap(),
        ["volumes/db/backups/b2.manifest"]
    );
    // Once deleted, the name can be created again.
    assert_eq!(
        t.put_new(name, b"third".to_vec().into()).await.unwrap(),
        Put::Created
    );
    assert_eq!(&t.get(name).await.unwrap()[..], b"third");
}

#[tokio::test]
async fn a_full_then_an_incremental_backup_restore_and_read_back_bit_exact() {
    let s3 = S3Server::start().unwrap();
    let t = Target::open(&s3.url("backups"), &s3.settings().unwrap()).unwrap();
    let vol = Volume::default();
    let first: Vec<u64> = vec![0, 1, 2, 7, 100, 101, 5000, 16_383, 16_384, 16_386];
    for &i in &first {
        vol.set(i, pattern(i, BLOCK_SIZE));
    }
    // A block written with zeroes is read but not stored.
    vol.set(3, vec![0u8; BLOCK_SIZE]);
    let mut changed = first.clone();
    changed.push(3);
    let full = transfer::write_backup(&t, &spec("full"), None, &changed, &vol)
        .await
        .unwrap();
    assert_eq!(full.blocks_read, changed.len() as u64);
    assert_eq!(full.blocks_stored, first.len() as u64);
    assert_eq!(full.zero_blocks, 1);
    assert!(full.packs_put >= 2, "{full:?}");
    assert_eq!(full.pages_put, 2);
    let image_full = vol.image();

    // Change some blocks: rewrite two, write a new one, zero one, and copy
    // one block's content to another of the same GiB (its page knows the
    // hash: not stored again).
    vol.set(1, pattern(1001, BLOCK_SIZE));
    vol.set(16_386, pattern(1002, BLOCK_SIZE));
    vol.set(9000, pattern(1003, BLOCK_SIZE));
    vol.set(100, vec![0u8; BLOCK_SIZE]);
    vol.set(8, vol.block(7));
    let changed = [1u64, 16_386, 9000, 100, 8];
    let parent = full.manifest.clone().unwrap();
    let incr = transfer::write_backup(&t, &spec("incr"), Some(&parent), &changed, &vol)
        .await
        .unwrap();
    assert_eq!(incr.blocks_read, changed.len() as u64, "only the change");
    assert_eq!(incr.blocks_stored, 3);
    assert_eq!(incr.blocks_deduplicated, 1);
    assert_eq!(incr.zero_blocks, 1);
    let image_incr = vol.image();
    assert_ne!(image_full, image_incr);

    let mut manifests = t.list("volumes/db/backups/").await.unwrap();
    manifests.sort();
    assert_eq!(
        manifests,
        [
            "volumes/db/backups/full.manifest",
            "volumes/db/backups/incr.manifest"
        ]
    );

    // Restored from the manifests read back from the store.
    for (name, image) in [("full", &image_full), ("incr", &image_incr)] {
        let m = transfer::read_manifest(&t, "db", name).await.unwrap();
        assert_eq!(m.size, SIZE);
        assert_eq!(m.parent.as_deref(), (name == "incr").then_some("full"));
        assert!(
            restored(&t, &m).await == *image,
            "{name} restores bit-exact"
        );
    }

    // And read by range, across blocks and across the two pages.
    let reader = BackupReader::open(t.clone(), "db", "incr").await.unwrap();
    assert_eq!(reader.size(), SIZE);
    for (offset, len) in [
        (0, 4 * BS),
        (1000, 70_000),
        (7 * BS + 5, BS),
        (100 * BS, BS),
        (9000 * BS - 3, 10),
        (16_383 * BS + 17, 3 * BS - 17),
        (SIZE - 5, 5),
    ] {
        let got = reader.read(offset, len).await.unwrap();
        let want = bytes_of(&image_incr, offset, len);
        match got {
            Some(bytes) => assert!(bytes[..] == want[..], "{offset}+{len}"),
            None => assert!(want.iter().all(|b| *b == 0), "{offset}+{len}: None"),
        }
    }
    assert_eq!(reader.read(100 * BS, BS).await.unwrap(), None, "zeroed");
    let full_reader = BackupReader::open(t.clone(), "db", "full").await.unwrap();
    let got = full_reader.read(100 * BS, 2 * BS).await.unwrap().unwrap();
    assert!(got[..] == bytes_of(&image_full, 100 * BS, 2 * BS)[..]);

    // The same name again is refused; nothing is overwritten.
    assert!(matches!(
        transfer::write_backup(&t, &spec("incr"), Some(&parent), &changed, &vol).await,
        Err(TransferError::Exists { .. })
    ));
}

#[tokio::test]
async fn wrong_keys_are_refused_on_the_first_request_with_a_clear_error() {
    let s3 = S3Server::start().unwrap();
    for (creds, code) in [
        (
            s3.wrong_credentials_file().unwrap(),
            "SignatureDoesNotMatch",
        ),
        (s3.unknown_key_credentials_file().unwrap(), "NotSignedUp"),
    ] {
        let t = Target::open(&s3.url("p"), &s3.settings_with(creds)).unwrap();
        let err = t.check().await.unwrap_err();
        let msg = err.to_string();
        eprintln!("wrong keys: {msg}");
        assert!(
            matches!(err, TargetError::AccessDenied { .. }),
            "{code}: {err:?}"
        );
        assert!(msg.contains("access denied"), "{msg}");
        assert!(msg.contains("check the keys"), "{msg}");
        assert!(msg.contains(code), "{msg}");
        assert!(msg.contains(&s3.endpoint()), "{msg}");
        // Every kind of request says the same (a HEAD's answer carries no
        // code: the message has none).
        for err in [
            t.put_new("x", b"x".to_vec().into()).await.unwrap_err(),
            t.get("x").await.unwrap_err(),
            t.size("x").await.unwrap_err(),
            t.list("volumes/").await.unwrap_err(),
            t.delete("x").await.unwrap_err(),
        ] {
            assert!(
                matches!(err, TargetError::AccessDenied { .. }),
                "{code}: {err:?}"
            );
            assert!(err.to_string().contains("check the keys"), "{err}");
        }
        // A backup stops at its first request, having put nothing.
        let vol = Volume::default();
        vol.set(0, pattern(0, BLOCK_SIZE));
        let err = transfer::write_backup(&t, &spec("b"), None, &[0], &vol)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::Target(TargetError::AccessDenied { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("check the keys"), "{err}");
    }
    assert_eq!(
        std::fs::read_dir(s3.bucket_dir()).unwrap().count(),
        0,
        "nothing was stored"
    );
}

#[tokio::test]
async fn a_missing_bucket_is_named_in_the_error() {
    let s3 = S3Server::start().unwrap();
    let t = Target::open("s3://no-such-bucket/p", &s3.settings().unwrap()).unwrap();
    let err = t.check().await.unwrap_err();
    assert!(matches!(err, TargetError::NoBucket { .. }), "{err:?}");
    let msg = err.to_string();
    eprintln!("no bucket: {msg}");
    assert!(
        msg.contains("bucket no-such-bucket does not exist"),
        "{msg}"
    );
    assert!(msg.contains(&s3.endpoint()), "{msg}");
    let err = t.list("volumes/db/backups/").await.unwrap_err();
    assert!(matches!(err, TargetError::NoBucket { .. }), "{err:?}");
    // A delete in a missing bucket is not "already gone".
    let err = t.delete("volumes/db/backups/b.manifest").await.unwrap_err();
    assert!(matches!(err, TargetError::NoBucket { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("bucket no-such-bucket does not exist"),
        "{err}"
    );
    // The server's own bucket, through the same keys, is fine.
    Target::open(&s3.url("p"), &s3.settings().unwrap())
        .unwrap()
        .check()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_store_that_is_down_is_reported_soon_and_the_target_works_once_it_is_back() {
    let mut s3 = S3Server::start().unwrap();
    let endpoint = s3.endpoint();
    let settings = quick(s3.settings().unwrap());
    let t = Target::open(&s3.url("p"), &settings).unwrap();
    t.put_new("a", b"kept".to_vec().into()).await.unwrap();

    s3.kill().unwrap();
    // A target that never connected meets a refused connection.
    let fresh = Target::open(&s3.url("p"), &settings).unwrap();
    let err = tokio::time::timeout(HANG_GUARD, fresh.get("a"))
        .await
        .expect("bounded by the retry settings")
        .unwrap_err();
    eprintln!("down: {err}");
    assert!(matches!(err, TargetError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("cannot reach {endpoint}: connection refused")),
        "{err}"
    );
    // The target used before: every kind of request says it cannot reach
    // the store (its idle connection to the killed server may fail first
    // with another reason than a refusal).
    let errors = tokio::time::timeout(HANG_GUARD, async {
        vec![
            t.get("a").await.unwrap_err(),
            t.put_new("b", b"b".to_vec().into()).await.unwrap_err(),
            t.size("a").await.unwrap_err(),
            t.list("").await.unwrap_err(),
            t.check().await.unwrap_err(),
        ]
    })
    .await
    .expect("bounded by the retry settings");
    for err in errors {
        eprintln!("down, a target used before: {err}");
        assert!(matches!(err, TargetError::Unreachable { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("cannot reach {endpoint}: ")),
            "{err}"
        );
    }

    s3.restart().unwrap();
    assert_eq!(&t.get("a").await.unwrap()[..], b"kept");
    assert_eq!(
        t.put_new("b", b"b".to_vec().into()).await.unwrap(),
        Put::Created
    );
    let mut listed = t.list("").await.unwrap();
    listed.sort();
    assert_eq!(listed, ["a", "b"]);
}

/// A volume whose reads kill the store once `kill_at` is read and a pack
/// is on the store (reads run ahead of uploads: without the wait the kill
/// could come before any pack is put).
struct KillingSource<'a> {
    volume: &'a Volume,
    server: &'a Mutex<S3Server>,
    kill_at: u64,
}

impl BlockSource for KillingSource<'_> {
    async fn read_block(&self, index: u64) -> Result<Bytes, String> {
        if index == self.kill_at {
            let packs = self
                .server
                .lock()
                .unwrap()
                .bucket_dir()
                .join("p/volumes/db/packs");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::fs::read_dir(&packs).map_or(0, |d| d.count()) == 0
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let mut s3 = self.server.lock().unwrap();
            if s3.is_running() {
                s3.kill().map_err(|e| e.to_string())?;
            }
        }
        Ok(Bytes::from(self.volume.block(index)))
    }
}

#[tokio::test]
async fn a_store_killed_in_the_middle_of_a_backup_fails_it_and_the_backup_run_again_restores() {
    let s3 = Mutex::new(S3Server::start().unwrap());
    let (url, settings, endpoint) = {
        let s3 = s3.lock().unwrap();
        (s3.url("p"), quick(s3.settings().unwrap()), s3.endpoint())
    };
    let t = Target::open(&url, &settings).unwrap();
    let vol = Volume::default();
    let blocks: Vec<u64> = (0..16).map(|i| i * 3).collect();
    for &i in &blocks {
        vol.set(i, pattern(i + 50, BLOCK_SIZE));
    }
    // Killed after the first packs are put (four blocks a pack).
    let source = KillingSource {
        volume: &vol,
        server: &s3,
        kill_at: blocks[10],
    };
    let err = tokio::time::timeout(
        HANG_GUARD,
        transfer::write_backup(&t, &spec("b"), None, &blocks, &source),
    )
    .await
    .expect("bounded by the retry settings")
    .unwrap_err();
    eprintln!("killed mid-backup: {err}");
    assert!(
        matches!(err, TransferError::Target(TargetError::Unreachable { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("cannot reach {endpoint}: ")),
        "{err}"
    );
    let bucket_dir = s3.lock().unwrap().bucket_dir();
    assert!(
        bucket_dir.join("p/volumes/db/packs").is_dir(),
        "packs were put before the kill"
    );
    assert!(!bucket_dir.join("p/volumes/db/backups/b.manifest").exists());

    s3.lock().unwrap().restart().unwrap();
    // The same target; the backup, run again, has no manifest yet: the
    // name is free, and what the first run put is left for GC.
    let report = transfer::write_backup(&t, &spec("b"), None, &blocks, &vol)
        .await
        .unwrap();
    let m = transfer::read_manifest(&t, "db", "b").await.unwrap();
    assert_eq!(Some(&m), report.manifest.as_ref());
    assert!(restored(&t, &m).await == vol.image(), "bit-exact");
}
