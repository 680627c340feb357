//! Backups through the command line, on three replica daemons and an
//! engine, to a `file://` target: 6 MiB written over NBD, `corral volume
//! backup create` takes a snapshot and backs it up in full; 1 MiB more is
//! written and a second backup reads about that and names the first as
//! its parent. Each backup, read back from the target and checked block
//! by block against its hash, is the volume as it was when it was taken.
//! Bad input — an unknown scheme, a name already taken, a snapshot that
//! does not exist — is refused with one line and changes nothing.

use std::collections::HashMap;
use std::sync::Mutex;

use corral_backup::block::BLOCK_SIZE;
use corral_backup::target::{S3Settings, Target};
use corral_backup::transfer::{self, BlockSink};
use corral_tests::tools::pattern;
use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;

#[derive(Default)]
struct Image(Mutex<HashMap<u64, Vec<u8>>>);

impl BlockSink for Image {
    async fn write_block(&self, index: u64, data: Vec<u8>) -> Result<(), String> {
        self.0.lock().unwrap().insert(index, data);
        Ok(())
    }
}

/// Backup `name` of volume "bk" on `target`, restored into memory.
fn restored(target: &Target, name: &str) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = transfer::read_manifest(target, "bk", name).await.unwrap();
        let image = Image::default();
        transfer::restore(target, &m, &image).await.unwrap();
        let mut out = vec![0u8; m.size as usize];
        for (i, b) in image.0.lock().unwrap().iter() {
            let at = *i as usize * BLOCK_SIZE;
            let n = BLOCK_SIZE.min(out.len() - at);
            out[at..at + n].copy_from_slice(&b[..n]);
        }
        out
    })
}

fn backup(c: &Cluster, control: &str, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["volume", "--engine", control, "--json", "backup", "create"];
    all.extend_from_slice(args);
    let out = c.corral(&all).expect("corral runs");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Volume "bk" of `size` on the first three of `replicas` daemons, `data`
/// written from its start and flushed, and a `file://` target in the
/// cluster's directory (`backups/`).
struct Source {
    c: Cluster,
    e: usize,
    control: String,
    url: String,
}

fn source(replicas: usize, size: &str, data: &[u8]) -> Source {
    let mut c = Cluster::with_replicas(replicas).expect("cluster");
    let e = c
        .start_engine(&EngineSpec::new("bk", size, &[0, 1, 2]))
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let dir = c.path().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}", dir.display());
    let file = c.path().join("data");
    std::fs::write(&file, data).unwrap();
    c.write_flushed(e, &file).unwrap();
    Source { c, e, control, url }
}

#[test]
fn a_full_and_an_incremental_backup_hold_the_volume_as_it_was() {
    let Source { c, e, control, url } = source(3, "16MiB", &pattern(1, 6 * MIB));
    let target = Target::open(&url, &S3Settings::default()).unwrap();
    let full = backup(&c, &control, &["--target", &url, "--name", "monday"]).unwrap();
    assert_eq!(full["parent"], Value::Null, "{full}");
    assert_eq!(full["blocks_read"], 96, "6 MiB of 64 KiB blocks: {full}");
    let then = c.read_back(e, SIZE).unwrap();

    let second = c.path().join("second");
    std::fs::write(&second, pattern(2, MIB)).unwrap();
    c.write_flushed(e, &second).unwrap();
    let inc = backup(&c, &control, &["--target", &url, "--name", "tuesday"]).unwrap();
    assert_eq!(inc["parent"], "monday", "{inc}");
    assert_eq!(inc["blocks_read"], 16, "the 1 MiB written since: {inc}");
    let now = c.read_back(e, SIZE).unwrap();

    assert!(
        restored(&target, "monday") == then,
        "monday is not the volume as it was"
    );
    assert!(
        restored(&target, "tuesday") == now,
        "tuesday is not the volume as it is"
    );

    // Refused, with one line.
    for (args, why) in [
        (vec!["--target", "ftp://x/y"], "file:///DIR or s3://"),
        (
            vec!["--target", url.as_str(), "--name", "monday"],
            "already exists",
        ),
        (
            vec!["--target", url.as_str(), "--snapshot", "no-such"],
            "no snapshot",
        ),
    ] {
        let err = backup(&c, &control, &args).expect_err("refused");
        assert!(err.contains(why), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

fn clone_status(c: &Cluster, control: &str, wait: &str) -> Value {
    let out = c
        .corral(&[
            "volume", "--engine", control, "--json", "clone", "status", "--wait", wait,
        ])
        .expect("corral runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Starts the restoring engine of `spec` and waits (120 s at most) until
/// its fill is done: the engine's index and its last `clone status`.
fn restore_engine(c: &mut Cluster, spec: EngineSpec) -> (usize, Value) {
    let r = c.start_engine(&spec).expect("restore engine");
    let control = c.engines[r].control.to_string();
    let status = clone_status(c, &control, "120s");
    assert_eq!(status["done"], true, "{status}");
    (r, status)
}

fn verify(c: &Cluster, control: &str) {
    let out = c
        .corral(&["volume", "--engine", control, "verify"])
        .expect("corral runs");
    assert!(
        out.status.success(),
        "replicas differ: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Restores through the engine: a backup becomes a new volume on three
/// other replica daemons, filled once through the replicated write path.
/// Without `--serve-while-filling` the frontends start once it is filled;
/// with it, reads are served at once (a part not restored yet is read from
/// the backup first). A backup that is not there, or a volume too small
/// for it, is refused at once with one clear line.
#[test]
fn a_backup_restores_into_a_new_volume_on_other_replicas() {
    let Source {
        mut c,
        e,
        control,
        url,
    } = source(6, "16MiB", &pattern(3, 6 * MIB));
    backup(&c, &control, &["--target", &url, "--name", "monday"]).unwrap();
    let then = c.read_back(e, SIZE).unwrap();
    let second = c.path().join("second");
    std::fs::write(&second, pattern(4, 3 * MIB / 2)).unwrap();
    c.write_flushed(e, &second).unwrap();
    backup(&c, &control, &["--target", &url, "--name", "tuesday"]).unwrap();
    let now = c.read_back(e, SIZE).unwrap();

    // The incremental one, filled before it serves. A smaller chunk than
    // the default makes the fill many windows long.
    let (r, status) = restore_engine(
        &mut c,
        EngineSpec::new("restored", "16MiB", &[3, 4, 5])
            .arg("--from-backup", &format!("{url}/bk/tuesday"))
            .arg("--chunk-size", "64KiB"),
    );
    let r_control = c.engines[r].control.to_string();
    assert_eq!(status["backup"], format!("{url}/bk/tuesday"), "{status}");
    assert_eq!(status["total_bytes"], SIZE as u64, "{status}");
    assert!(
        c.read_back(r, SIZE).unwrap() == now,
        "the restored volume is not the volume as backed up"
    );
    verify(&c, &r_control);

    // The full one, served at once while it fills.
    let mut spec = EngineSpec::new("early", "16MiB", &[3, 4, 5])
        .arg("--from-backup", &format!("{url}/bk/monday"))
        .arg("--chunk-size", "4KiB");
    spec.extra.push("--serve-while-filling".into());
    let early = c
        .start_engine(&spec)
        .expect("restore engine serving at once");
    assert!(
        c.read_back(early, SIZE).unwrap() == then,
        "the volume read while it fills is not the backup"
    );
    let e_control = c.engines[early].control.to_string();
    assert_eq!(clone_status(&c, &e_control, "60s")["done"], true);
    assert!(c.read_back(early, SIZE).unwrap() == then);
    verify(&c, &e_control);

    // Refused at once, with a clear line in the engine's log.
    for (volume, from, size, why) in [
        ("absent", format!("{url}/bk/no-such"), "16MiB", "not found"),
        (
            "small",
            format!("{url}/bk/monday"),
            "8MiB",
            "smaller than backup",
        ),
        (
            "bad-url",
            "ftp://x/bk/monday".to_string(),
            "16MiB",
            "file:///DIR",
        ),
    ] {
        let i = c
            .spawn_engine(&EngineSpec::new(volume, size, &[3, 4, 5]).arg("--from-backup", &from))
            .expect("spawn");
        let status = corral_tests::poll(
            std::time::Duration::from_secs(30),
            "the engine to give up",
            || Ok(c.engines[i].process.exited()),
        )
        .expect("the engine gives up at once");
        assert!(!status.success(), "{volume}: exited {status}");
        let log = c.engines[i].process.log_text();
        assert!(log.contains(why), "{volume}: no {why:?} in:\n{log}");
    }
}

/// An ext4 filesystem on a volume, backed up while the engine serves it,
/// restored into a new volume on other replica daemons: fsck-clean, every
/// file as written.
#[test]
fn an_ext4_volume_restores_fsck_clean() {
    corral_tests::ext4::assert_root();
    let mut c = Cluster::with_replicas(6).expect("cluster");
    let size: u64 = 64 << 20;
    let e = c
        .start_engine(&EngineSpec::new("fs", "64MiB", &[0, 1, 2]))
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let files = {
        let dir = c.path().join("fs-source");
        let mut fs = corral_tests::ext4::Ext4OnNbd::attach(&dir, &c.engines[e].nbd_uri(), size)
            .expect("attach the source");
        fs.mkfs_and_write(41).expect("mkfs and write")
    };
    let dir = c.path().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}", dir.display());
    backup(&c, &control, &["--target", &url, "--name", "fs-1"]).unwrap();

    let (r, _) = restore_engine(
        &mut c,
        EngineSpec::new("fs-restored", "64MiB", &[3, 4, 5])
            .arg("--from-backup", &format!("{url}/fs/fs-1")),
    );
    let dir = c.path().join("fs-restored");
    let mut fs = corral_tests::ext4::Ext4OnNbd::attach(&dir, &c.engines[r].nbd_uri(), size)
        .expect("attach the restored volume");
    fs.fsck_and_read_back(&files)
        .expect("the restored filesystem is clean and holds every file");
}

fn backup_cli(c: &Cluster, url: &str, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["backup", "--target", url, "--json"];
    all.extend_from_slice(args);
    let out = c.corral(&all).expect("corral runs");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn objects_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// The target's upkeep while a restore reads from it: `backup ls` shows the
/// backups; removing the one being restored takes its manifest at once,
/// but its data stays while the restore's lease lives (the restoring
/// engine is paused meanwhile, so the lease cannot end on its own); the
/// restore then completes bit-exact, and the next `backup gc` frees the
/// data. `--retain 1` keeps the newest backup only.
#[test]
fn removing_a_backup_while_it_restores_keeps_its_data_until_the_restore_is_done() {
    let Source {
        mut c,
        e,
        control,
        url,
    } = source(6, "32MiB", &pattern(7, 32 * MIB));
    let dir = c.path().join("backups");
    backup(&c, &control, &["--target", &url, "--name", "b1"]).unwrap();
    let image = c.read_back(e, 32 * MIB).unwrap();

    let listed = backup_cli(&c, &url, &["ls"]).unwrap();
    let names: Vec<&str> = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1"], "{listed}");
    assert_eq!(listed["backups"][0]["url"], format!("{url}/bk/b1"));
    let err = backup_cli(&c, &url, &["rm", "bk/no-such"]).unwrap_err();
    assert!(err.contains("not found"), "{err}");

    // A restore, made slow by one fill round per 4 KiB, paused as soon as
    // its lease is on the target.
    let leases = dir.join("volumes/bk/leases");
    let r = c
        .spawn_engine(
            &EngineSpec::new("copy", "32MiB", &[3, 4, 5])
                .arg("--from-backup", &format!("{url}/bk/b1"))
                .arg("--chunk-size", "4KiB"),
        )
        .expect("restore engine");
    corral_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the restore's lease",
        || objects_under(&leases) == 1,
    )
    .unwrap();
    c.engines[r].process.pause().unwrap();
    let packs = dir.join("volumes/bk/packs");
    let before = objects_under(&packs);
    assert!(before >= 1);
    let rm = backup_cli(&c, &url, &["rm", "bk/b1", "--min-age", "0s"]).unwrap();
    assert!(
        rm["gc"]["skipped"]
            .as_str()
            .is_some_and(|w| w.contains("restore of backup b1")),
        "{rm}"
    );
    assert_eq!(
        objects_under(&packs),
        before,
        "nothing deleted under the lease"
    );
    assert_eq!(
        backup_cli(&c, &url, &["ls"]).unwrap()["backups"],
        serde_json::json!([])
    );

    c.engines[r].process.resume().unwrap();
    c.wait_engine_ready(r, std::time::Duration::from_secs(60))
        .unwrap();
    let r_control = c.engines[r].control.to_string();
    assert_eq!(clone_status(&c, &r_control, "120s")["done"], true);
    assert!(
        c.read_back(r, 32 * MIB).unwrap() == image,
        "the restore of a removed backup is not the backup"
    );
    corral_tests::wait_until(
        std::time::Duration::from_secs(10),
        "the restore to release its lease",
        || objects_under(&leases) == 0,
    )
    .unwrap();
    let gc = backup_cli(&c, &url, &["gc", "--min-age", "0s"]).unwrap();
    assert_eq!(gc["volumes"][0]["skipped"], Value::Null, "{gc}");
    assert_eq!(gc["volumes"][0]["deleted_packs"], before as u64, "{gc}");
    assert_eq!(objects_under(&packs), 0);

    // Retention: three more backups, keeping the newest each time.
    for name in ["b2", "b3"] {
        let out = backup(
            &c,
            &control,
            &["--target", &url, "--name", name, "--retain", "1"],
        )
        .unwrap();
        assert_eq!(out["name"], name);
    }
    let listed = backup_cli(&c, &url, &["ls", "--volume", "bk"]).unwrap();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["backups"][0]["name"], "b3", "{listed}");
}

/// A backup interrupted by kill -9 of its engine (its reads slowed by a
/// proxy so that it is killed half way), run again: the packs
/// the first run put (recorded in its lease) are reused, not uploaded
/// again, and the backup restores bit-exact. The interrupted run left no
/// manifest.
#[test]
fn a_backup_killed_half_way_resumes_from_what_it_put() {
    let mut c = Cluster::with_replicas(3).expect("cluster");
    let size = 192 * MIB;
    let e = c
        .start_engine(&EngineSpec::new("bk", "192MiB", &[0, 1, 2]).via_proxies())
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let dir = c.path().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}", dir.display());
    let data = c.path().join("data");
    std::fs::write(&data, pattern(9, size)).unwrap();
    c.write_flushed(e, &data).unwrap();
    c.corral(&[
        "volume", "--engine", &control, "snapshot", "create", "nightly",
    ])
    .unwrap();

    // The first run, killed once its lease records a pack put; its reads
    // of the snapshot are slowed (20 ms each way) so that it is still
    // running then.
    for r in 0..3 {
        c.proxy(r).set_mode(corral_tests::proxy::Mode::Delay(
            std::time::Duration::from_millis(20),
        ));
    }
    let first = std::process::Command::new(corral_tests::corral_bin())
        .args([
            "volume",
            "--engine",
            &control,
            "backup",
            "create",
            "--target",
            &url,
            "--snapshot",
            "nightly",
            "--name",
            "nightly",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let leases = dir.join("volumes/bk/leases");
    corral_tests::wait_until(
        std::time::Duration::from_secs(120),
        "a pack recorded in the backup's lease",
        || {
            std::fs::read_dir(&leases).is_ok_and(|d| {
                d.flatten().any(|f| {
                    std::fs::read(f.path()).is_ok_and(|b| {
                        serde_json::from_slice::<Value>(&b)
                            .is_ok_and(|l| l["packs"].as_array().is_some_and(|p| !p.is_empty()))
                    })
                })
            })
        },
    )
    .unwrap();
    c.engines[e].process.kill9().unwrap();
    let mut first = first;
    let _ = corral_tests::wait_exit(&mut first, std::time::Duration::from_secs(30), "the CLI");
    assert!(
        !dir.join("volumes/bk/backups/nightly.manifest").exists(),
        "an interrupted backup has no manifest"
    );
    let packs_left = objects_under(&dir.join("volumes/bk/packs"));
    assert!(packs_left >= 1);

    // Run again, on the restarted engine: the same snapshot, the same name.
    for r in 0..3 {
        c.proxy(r).set_mode(corral_tests::proxy::Mode::Pass);
    }
    c.restart_engine(e).unwrap();
    let again = backup(
        &c,
        &control,
        &[
            "--target",
            &url,
            "--snapshot",
            "nightly",
            "--name",
            "nightly",
        ],
    )
    .unwrap();
    let total = (size / BLOCK_SIZE) as u64;
    assert_eq!(again["blocks_read"], total, "{again}");
    let reused = again["blocks_deduplicated"].as_u64().unwrap();
    assert!(
        reused >= 512,
        "at least one recorded pack's blocks (about 1,000 of incompressible 64 KiB) are reused: {again}"
    );
    assert_eq!(
        again["blocks_stored"].as_u64().unwrap() + reused,
        total,
        "{again}"
    );
    let target = Target::open(&url, &S3Settings::default()).unwrap();
    let m = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(transfer::read_manifest(&target, "bk", "nightly"))
            .unwrap()
    };
    assert_eq!(m.size, size as u64);
    let image = c.read_back(e, size).unwrap();
    let restored = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sink = Image::default();
            transfer::restore(&target, &m, &sink).await.unwrap();
            let mut out = vec![0u8; size];
            for (i, b) in sink.0.lock().unwrap().iter() {
                let at = *i as usize * BLOCK_SIZE;
                out[at..at + BLOCK_SIZE].copy_from_slice(b);
            }
            out
        })
    };
    assert!(restored == image, "the resumed backup is not the volume");
}

/// Disks that fill up during a restore: a replica whose disk is full drops
/// out with the reason in the engine's log and the restore completes on
/// the other two, bit-exact; when every replica's disk is full, `clone
/// status` says the fill is stuck and why, and the engine keeps serving
/// its control API.
#[test]
fn a_restore_onto_full_disks_says_so() {
    corral_tests::ext4::assert_root();
    let Source {
        mut c,
        e,
        control,
        url,
    } = source(5, "32MiB", &pattern(5, 32 * MIB));
    for _ in 0..4 {
        c.start_replica_on_tmpfs("8m").expect("tmpfs replica");
    }
    backup(&c, &control, &["--target", &url, "--name", "b"]).unwrap();
    let image = c.read_back(e, 32 * MIB).unwrap();

    // Replicas 3 and 4 have room; 5 has 8 MiB.
    let (r, _) = restore_engine(
        &mut c,
        EngineSpec::new("one-full", "32MiB", &[3, 4, 5])
            .arg("--from-backup", &format!("{url}/bk/b")),
    );
    assert!(c.read_back(r, 32 * MIB).unwrap() == image);
    let info = c.volume_info(r).unwrap();
    assert_eq!(info["replicas_rw"], 2, "{info}");
    assert!(
        c.engines[r]
            .process
            .log_text()
            .contains("replica disk full"),
        "the engine says why replica 5 dropped out"
    );

    // Every replica 8 MiB: the fill cannot go on.
    let stuck = c
        .start_engine(
            &EngineSpec::new("all-full", "32MiB", &[6, 7, 8])
                .arg("--from-backup", &format!("{url}/bk/b")),
        )
        .expect("restore engine");
    let s_control = c.engines[stuck].control.to_string();
    let status = corral_tests::poll(
        std::time::Duration::from_secs(60),
        "clone status to report the stuck fill",
        || {
            let out = c.corral(&[
                "volume", "--engine", &s_control, "--json", "clone", "status",
            ])?;
            let v: Value = serde_json::from_slice(&out.stdout)?;
            Ok(v["error"].is_string().then_some(v))
        },
    )
    .unwrap();
    assert_eq!(status["done"], false, "{status}");
    assert!(
        c.engines[stuck]
            .process
            .log_text()
            .contains("replica disk full"),
        "the engine says why: {status}"
    );
    assert!(
        c.engines[stuck].process.exited().is_none(),
        "the engine stays up"
    );
}

/// Backups under a verifying writer: the checker writes and reads its own
/// tagged blocks all along while a full and then an incremental backup
/// are taken. Each backup, restored into a new volume, is bit-exact the
/// snapshot it was taken of — read independently through a clone of that
/// snapshot — and the volume still holds every acknowledged write.
#[test]
fn backups_taken_under_a_verifying_writer_restore_as_their_snapshots() {
    use corral_tests::checker::{Checker, Load};
    let mut c = Cluster::with_replicas(9).expect("cluster");
    let e = c
        .start_engine(&EngineSpec::new("live", "16MiB", &[0, 1, 2]))
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let dir = c.path().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}", dir.display());
    let checker = Checker::new(SIZE as u64);
    let writer = checker
        .start(c.engines[e].nbd, "live", Load::lane(0, 1))
        .unwrap();
    writer
        .wait_acked(4 * MIB as u64, std::time::Duration::from_secs(60))
        .unwrap();
    let full = backup(&c, &control, &["--target", &url, "--name", "full"]).unwrap();
    writer
        .wait_more(2 * MIB as u64, std::time::Duration::from_secs(60))
        .unwrap();
    let inc = backup(&c, &control, &["--target", &url, "--name", "inc"]).unwrap();
    assert_eq!(inc["parent"], "full", "{inc}");
    let summary = writer.stop();
    assert!(summary.acked_bytes > 6 * MIB as u64, "{summary:?}");
    let report = checker
        .verify(c.engines[e].nbd, "live")
        .expect("every acknowledged write is there");
    assert!(report.acked_blocks > 0, "{report:?}");

    for (i, (name, taken)) in [("full", &full), ("inc", &inc)].into_iter().enumerate() {
        let snapshot = taken["snapshot"].as_str().unwrap();
        let (restored, _) = restore_engine(
            &mut c,
            EngineSpec::new(&format!("restored-{name}"), "16MiB", &[3, 4, 5])
                .arg("--from-backup", &format!("{url}/live/{name}")),
        );
        let clone = c
            .start_engine(
                &EngineSpec::new(&format!("clone-{i}"), "16MiB", &[6, 7, 8])
                    .arg("--clone-from", &control)
                    .arg("--clone-snapshot", snapshot),
            )
            .unwrap();
        let from_backup = c.read_back(restored, SIZE).unwrap();
        let from_snapshot = c.read_back(clone, SIZE).unwrap();
        assert!(
            from_backup == from_snapshot,
            "backup {name} is not snapshot {snapshot}"
        );
    }
}
