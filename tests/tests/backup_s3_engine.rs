//! Backups through the engine to a real S3 server (s3s-fs on loopback):
//! a volume is backed up with `corral volume backup create` (the keys in
//! the engine's environment or its --s3-credentials file, never on the
//! command line) and restored into
//! a new volume on three other replica daemons (`corral engine
//! --from-backup`, the keys from a credentials file), bit-exact. Refused
//! keys and a missing bucket are each one clear line, and the backup takes
//! no snapshot; a restore with refused keys stops the engine at once.

use corral_tests::s3::S3Server;
use corral_tests::tools::pattern;
use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn backup(c: &Cluster, control: &str, s3: &S3Server, target: &str) -> Result<Value, String> {
    let out = c
        .corral(&[
            "volume",
            "--engine",
            control,
            "--json",
            "backup",
            "create",
            "--target",
            target,
            "--s3-endpoint",
            &s3.endpoint(),
            "--name",
            "first",
        ])
        .expect("corral runs");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn snapshots(c: &Cluster, control: &str) -> Value {
    let out = c
        .corral(&["volume", "--engine", control, "--json", "snapshot", "ls"])
        .expect("corral runs");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn an_engine_backs_up_to_s3_and_a_new_volume_restores_from_it() {
    let s3 = S3Server::start().expect("s3s-fs");
    let mut c = Cluster::with_replicas(6).expect("cluster");
    let keys = |spec: EngineSpec, key: &str, secret: &str| {
        spec.env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_REGION", "us-east-1")
    };
    let e = c
        .start_engine(&keys(
            EngineSpec::new("vol", "16MiB", &[0, 1, 2]),
            s3.access_key(),
            s3.secret_key(),
        ))
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let data = c.path().join("data");
    std::fs::write(&data, pattern(1, 10 * MIB)).unwrap();
    c.write_flushed(e, &data).unwrap();
    let target = s3.url("corral");
    let done = backup(&c, &control, &s3, &target).unwrap();
    assert_eq!(done["blocks_read"], 160, "{done}");
    let image = c.read_back(e, 16 * MIB).unwrap();

    // A missing bucket: one line, and no snapshot taken for it.
    let before = snapshots(&c, &control);
    let err = backup(&c, &control, &s3, "s3://no-such-bucket/corral").unwrap_err();
    assert!(
        err.contains("bucket no-such-bucket does not exist"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(snapshots(&c, &control), before, "nothing taken");

    // An engine with refused keys (in its --s3-credentials file): one
    // line, nothing taken.
    let wrong = s3.wrong_credentials_file().unwrap();
    let w = c
        .start_engine(
            &EngineSpec::new("other", "16MiB", &[3, 4, 5])
                .arg("--s3-credentials", &wrong.display().to_string()),
        )
        .expect("engine with wrong keys");
    let w_control = c.engines[w].control.to_string();
    let before = snapshots(&c, &w_control);
    let err = backup(&c, &w_control, &s3, &target).unwrap_err();
    assert!(err.contains("access denied"), "{err}");
    assert!(err.contains("check the keys"), "{err}");
    assert_eq!(snapshots(&c, &w_control), before, "nothing taken");

    // Restore on other replica daemons, the keys from a file.
    let from = format!("{target}/vol/first");
    let creds = s3.credentials_file().unwrap();
    let r = c
        .start_engine(
            &EngineSpec::new("restored", "16MiB", &[3, 4, 5])
                .arg("--from-backup", &from)
                .arg("--s3-endpoint", &s3.endpoint())
                .arg("--s3-credentials", &creds.display().to_string()),
        )
        .expect("restore engine");
    let r_control = c.engines[r].control.to_string();
    let out = c
        .corral(&[
            "volume", "--engine", &r_control, "--json", "clone", "status", "--wait", "60s",
        ])
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["done"], true, "{status}");
    assert_eq!(status["backup"], from.as_str(), "{status}");
    assert!(c.read_back(r, 16 * MIB).unwrap() == image, "not the backup");

    // A restore with refused keys stops at once, saying why.
    let bad = c
        .spawn_engine(
            &EngineSpec::new("refused", "16MiB", &[3, 4, 5])
                .arg("--from-backup", &from)
                .arg("--s3-endpoint", &s3.endpoint())
                .arg("--s3-credentials", &wrong.display().to_string()),
        )
        .expect("spawn");
    let exited = corral_tests::poll(
        std::time::Duration::from_secs(60),
        "the engine to give up",
        || Ok(c.engines[bad].process.exited()),
    )
    .expect("the engine stops");
    assert!(!exited.success());
    let log = c.engines[bad].process.log_text();
    assert!(log.contains("access denied"), "{log}");
}

/// The store goes away in the middle of a restore (s3s-fs killed once a
/// part is filled) and comes back on the same port: `clone status` shows
/// the fill stuck with the reason meanwhile, then the restore goes on
/// from where it was and the volume is the backup, bit-exact.
#[test]
fn a_restore_waits_out_a_store_that_goes_away_and_comes_back() {
    let mut s3 = S3Server::start().expect("s3s-fs");
    let mut c = Cluster::with_replicas(6).expect("cluster");
    let e = c
        .start_engine(
            &EngineSpec::new("vol", "128MiB", &[0, 1, 2])
                .env("AWS_ACCESS_KEY_ID", s3.access_key())
                .env("AWS_SECRET_ACCESS_KEY", s3.secret_key()),
        )
        .expect("engine");
    let control = c.engines[e].control.to_string();
    let data = c.path().join("data");
    std::fs::write(&data, pattern(2, 128 * MIB)).unwrap();
    c.write_flushed(e, &data).unwrap();
    let target = s3.url("corral");
    backup(&c, &control, &s3, &target).unwrap();
    let image = c.read_back(e, 128 * MIB).unwrap();

    // One fill round per 4 KiB makes the restore last a while; the volume
    // is twice the restore's read-ahead (64 MiB), so that reads are left
    // for the outage to stop.
    let creds = s3.credentials_file().unwrap();
    let mut spec = EngineSpec::new("restored", "128MiB", &[3, 4, 5])
        .arg("--from-backup", &format!("{target}/vol/first"))
        .arg("--s3-endpoint", &s3.endpoint())
        .arg("--s3-credentials", &creds.display().to_string())
        .arg("--chunk-size", "4KiB")
        .set("--replica-retry-interval", "1s");
    spec.extra.push("--serve-while-filling".into());
    let r = c.start_engine(&spec).expect("restore engine");
    let r_control = c.engines[r].control.to_string();
    let status = |c: &Cluster| -> Value {
        let out = c
            .corral(&[
                "volume", "--engine", &r_control, "--json", "clone", "status",
            ])
            .expect("corral runs");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    corral_tests::wait_until(
        std::time::Duration::from_secs(60),
        "part of the volume filled",
        || status(&c)["filled_bytes"].as_u64().is_some_and(|f| f > 0),
    )
    .unwrap();
    s3.kill().unwrap();
    let stuck = corral_tests::poll(
        std::time::Duration::from_secs(120),
        "clone status to say the fill is stuck",
        || {
            let s = status(&c);
            Ok((s["done"] == false && s["error"].is_string()).then_some(s))
        },
    );
    s3.restart().unwrap();
    let stuck = stuck.expect("the fill reports the store gone");
    assert!(
        stuck["error"].as_str().unwrap().contains("cannot reach"),
        "{stuck}"
    );
    let out = c
        .corral(&[
            "volume", "--engine", &r_control, "--json", "clone", "status", "--wait", "300s",
        ])
        .unwrap();
    let done: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(done["done"], true, "{done}");
    assert!(
        c.read_back(r, 128 * MIB).unwrap() == image,
        "the restore resumed after the outage is not the backup"
    );
}
