//! Snapshots, end to end through the command line (`corral volume --engine
//! ADDR snapshot create|ls|rm|revert`) on three replica daemons and an
//! engine: data written over NBD, a snapshot, more data, a second snapshot;
//! revert is refused while an NBD client is attached and works once it
//! leaves, giving back the first snapshot's data; the later snapshot stays
//! and can be deleted; bad names and unknown snapshots get one-line errors;
//! `volume info` shows each layer's space. A delete followed at once by
//! kill -9 of a replica daemon and of the engine (mid-merge or just after)
//! finishes after they restart, on every replica, with the data intact.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(7) ^ (i >> 12) as u8)
        .collect()
}

fn snapshot(c: &Cluster, control: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["volume", "--engine", control, "--json", "snapshot"];
    all.extend_from_slice(args);
    c.corral(&all).expect("corral runs")
}

fn ok_json(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "corral failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn snapshot_revert_and_delete_through_the_command_line() {
    let mut c = Cluster::with_replicas(3).expect("cluster");
    let e = c
        .start_engine(&EngineSpec::new("snapvol", "16MiB", &[0, 1, 2]))
        .expect("engine");
    let control = c.engines[e].control.to_string();

    let first = c.path().join("first");
    std::fs::write(&first, pattern(1, 4 * MIB)).unwrap();
    c.write_flushed(e, &first).unwrap();
    let taken = ok_json(snapshot(&c, &control, &["create", "before-upgrade"]));
    assert_eq!(taken["name"], "before-upgrade");
    assert_eq!(taken["replicas"].as_array().map(Vec::len), Some(3));

    let second = c.path().join("second");
    std::fs::write(&second, pattern(2, 6 * MIB)).unwrap();
    c.write_flushed(e, &second).unwrap();
    ok_json(snapshot(&c, &control, &["create", "after-upgrade"]));

    let listed = ok_json(snapshot(&c, &control, &["ls"]));
    let names: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before-upgrade", "after-upgrade"]);
    assert_eq!(listed["layers"].as_array().map(Vec::len), Some(3));
    // `volume info` shows actual against provisioned bytes per layer.
    let info = c.volume_info(e).unwrap();
    let layers = info["layers"].as_array().expect("layers in volume info");
    assert_eq!(layers.len(), 3, "{info}");
    assert_eq!(layers[0]["snapshot"], "before-upgrade");
    assert!(layers[2]["snapshot"].is_null(), "the head last: {info}");
    for l in layers {
        assert_eq!(l["provisioned_bytes"], 16 * MIB as u64, "{l}");
    }
    let first_alloc = layers[0]["allocated_bytes"].as_u64().unwrap();
    assert!(
        first_alloc >= 4 * MIB as u64 && first_alloc < 8 * MIB as u64,
        "the first layer holds the 4 MiB written before it: {first_alloc}"
    );

    // Bad input: one-line errors, nothing changes.
    for (args, what) in [
        (vec!["create", "a/b"], "snapshot name"),
        (vec!["rm", "missing"], "no snapshot named"),
        (vec!["revert", "missing"], "no snapshot named"),
    ] {
        let out = snapshot(&c, &control, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what), "{args:?}: {err}");
    }

    // Attached (an NBD connection is open): revert is refused.
    let mut held = TcpStream::connect(c.engines[e].nbd).expect("NBD connect");
    // The server counts it once accepted; give the accept loop a moment.
    let mut refused = String::new();
    for _ in 0..50 {
        let out = snapshot(&c, &control, &["revert", "before-upgrade"]);
        assert!(
            !out.status.success(),
            "revert succeeded with a client attached"
        );
        refused = String::from_utf8_lossy(&out.stderr).to_string();
        if refused.contains("attached") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused.contains("attached"), "{refused}");
    let _ = held.write_all(b"x");
    drop(held);

    // Detached: revert works and the first snapshot's data is back.
    let mut reverted = None;
    for _ in 0..50 {
        let out = snapshot(&c, &control, &["revert", "before-upgrade"]);
        if out.status.success() {
            reverted = Some(ok_json(out));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reverted = reverted.expect("revert succeeds once the client has left");
    assert_eq!(reverted["replicas"].as_array().map(Vec::len), Some(3));
    let back = c.read_back(e, 6 * MIB).unwrap();
    assert!(
        back[..4 * MIB] == pattern(1, 4 * MIB)[..],
        "the snapshot's data"
    );
    assert!(
        back[4 * MIB..].iter().all(|&b| b == 0),
        "data written after the snapshot is gone"
    );
    let verify = c.verify(e).unwrap();
    assert_eq!(
        verify["differences"].as_array().map(Vec::len),
        Some(0),
        "{verify}"
    );

    // The later snapshot stayed; delete it and see it merged away.
    ok_json(snapshot(&c, &control, &["rm", "after-upgrade"]));
    let mut layers = 0;
    for _ in 0..100 {
        let listed = ok_json(snapshot(&c, &control, &["ls"]));
        layers = listed["layers"].as_array().map(Vec::len).unwrap_or(0);
        if layers == 2 && listed["merge_pending"] == false {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(layers, 2, "the deleted snapshot's layer is merged away");
    let back = c.read_back(e, 4 * MIB).unwrap();
    assert!(back == pattern(1, 4 * MIB), "the data after the merge");
}

/// Lists the snapshots of `volume` on the replica daemon at `addr` directly.
fn replica_listing(addr: &str, volume: &str) -> corral_proto::v1::ListSnapshotsResponse {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let control = corral_client::ReplicaControl::connect(addr, Duration::from_secs(5))
            .await
            .expect("connect to the replica daemon");
        control
            .list_snapshots(volume)
            .await
            .expect("list snapshots")
    })
}

#[test]
fn a_delete_interrupted_by_kill_9_of_a_replica_and_the_engine_resumes() {
    let mut c = Cluster::with_replicas(3).expect("cluster");
    let e = c
        .start_engine(&EngineSpec::new("mergevol", "64MiB", &[0, 1, 2]))
        .expect("engine");
    let control = c.engines[e].control.to_string();
    // The snapshot holds 24 MiB the head never overwrites: its merge copies
    // them all into the head (six granules per replica).
    let old = c.path().join("old");
    std::fs::write(&old, pattern(3, 24 * MIB)).unwrap();
    c.write_flushed(e, &old).unwrap();
    ok_json(snapshot(&c, &control, &["create", "nightly"]));
    let newer = c.path().join("newer");
    std::fs::write(&newer, pattern(4, 4 * MIB)).unwrap();
    c.write_flushed(e, &newer).unwrap();

    ok_json(snapshot(&c, &control, &["rm", "nightly"]));
    // At once: kill -9 a replica daemon and the engine, mid-merge or just after.
    c.replicas[0].process.kill9().unwrap();
    c.engines[e].process.kill9().unwrap();
    c.restart_replica(0).unwrap();
    c.restart_engine(e).unwrap();

    // Every replica finishes the merge, and its chain is the head alone.
    for r in 0..3 {
        let addr = c.replicas[r].addr.to_string();
        let mut listed = replica_listing(&addr, "mergevol");
        for _ in 0..100 {
            if !listed.merge_pending {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            listed = replica_listing(&addr, "mergevol");
        }
        assert!(
            !listed.merge_pending,
            "replica {r}: still merging after 10 s"
        );
        assert_eq!(listed.layers.len(), 1, "replica {r}: {listed:?}");
        assert!(listed.snapshots.is_empty(), "replica {r}: {listed:?}");
    }
    c.wait_until(Duration::from_secs(60), "every replica RW again", |c| {
        c.volume_info(e)
            .map(|v| v["replicas_rw"] == 3)
            .unwrap_or(false)
    })
    .unwrap();
    let mut want = pattern(3, 24 * MIB);
    want[..4 * MIB].copy_from_slice(&pattern(4, 4 * MIB));
    let back = c.read_back(e, 24 * MIB).unwrap();
    assert!(back == want, "the volume after the interrupted merge");
    let verify = c.verify(e).unwrap();
    assert_eq!(
        verify["differences"].as_array().map(Vec::len),
        Some(0),
        "{verify}"
    );
}
