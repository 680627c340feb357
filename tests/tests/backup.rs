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
use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

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

#[test]
fn a_full_and_an_incremental_backup_hold_the_volume_as_it_was() {
    let mut c = Cluster::with_replicas(3).expect("cluster");
    let e = c
        .start_engine(&EngineSpec::new("bk", "16MiB", &[0, 1, 2]))
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let dir = c.path().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("file://{}", dir.display());
    let target = Target::open(&url, &S3Settings::default()).unwrap();

    let first = c.path().join("first");
    std::fs::write(&first, pattern(1, 6 * MIB)).unwrap();
    c.write_flushed(e, &first).unwrap();
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
