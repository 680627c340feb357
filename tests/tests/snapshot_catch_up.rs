//! A replica that missed a snapshot gets it when it is caught up, end to
//! end through the command line on three replica daemons and an engine:
//! kill -9 of a replica daemon, `snapshot create` on the other two, more
//! data written over NBD, the daemon restarted. Once every replica is RW
//! again, the restarted one lists the snapshot, and reverting to it gives
//! every replica the same head (`volume verify`), holding the snapshot's
//! data — so the snapshot's view on the caught-up replica is the others'.

use std::time::Duration;

use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(13) ^ (i >> 12) as u8)
        .collect()
}

fn snapshot(c: &Cluster, control: &str, args: &[&str]) -> Value {
    let mut all = vec!["volume", "--engine", control, "--json", "snapshot"];
    all.extend_from_slice(args);
    let out = c.corral(&all).expect("corral runs");
    assert!(
        out.status.success(),
        "corral {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn replica_snapshots(addr: &str, volume: &str) -> Vec<String> {
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
            .snapshots
            .into_iter()
            .map(|s| s.name)
            .collect()
    })
}

#[test]
fn a_replica_killed_during_a_snapshot_has_it_once_caught_up() {
    let mut c = Cluster::with_replicas(3).expect("cluster");
    let e = c
        .start_engine(
            &EngineSpec::new("catchvol", "16MiB", &[0, 1, 2])
                .arg("--replica-retry-interval", "200ms"),
        )
        .expect("engine");
    let control = c.engines[e].control.to_string();

    let first = c.path().join("first");
    std::fs::write(&first, pattern(1, 8 * MIB)).unwrap();
    c.write_flushed(e, &first).unwrap();
    snapshot(&c, &control, &["create", "earlier"]);

    // Replica 2 dies; the snapshot is taken on the other two.
    c.replicas[2].process.kill9().unwrap();
    let taken = snapshot(&c, &control, &["create", "while-away"]);
    assert_eq!(
        taken["replicas"].as_array().map(Vec::len),
        Some(2),
        "{taken}"
    );
    // Writes go on, over part of what the snapshot holds.
    let second = c.path().join("second");
    std::fs::write(&second, pattern(2, 3 * MIB)).unwrap();
    c.write_flushed(e, &second).unwrap();

    c.restart_replica(2).unwrap();
    c.wait_until(Duration::from_secs(60), "every replica RW again", |c| {
        c.volume_info(e)
            .map(|v| v["replicas_rw"] == 3)
            .unwrap_or(false)
    })
    .unwrap();
    for r in 0..3 {
        let addr = c.replicas[r].addr.to_string();
        assert_eq!(
            replica_snapshots(&addr, "catchvol"),
            ["earlier", "while-away"],
            "replica {r}"
        );
    }
    let mut now = pattern(1, 8 * MIB);
    now[..3 * MIB].copy_from_slice(&pattern(2, 3 * MIB));
    assert!(
        c.read_back(e, 8 * MIB).unwrap() == now,
        "the volume holds the newest data"
    );

    // Revert to it: every replica's head becomes its view of the snapshot.
    snapshot(&c, &control, &["revert", "while-away"]);
    let verify = c.verify(e).unwrap();
    assert_eq!(
        verify["differences"].as_array().map(Vec::len),
        Some(0),
        "the replicas' views of the snapshot differ: {verify}"
    );
    assert!(
        c.read_back(e, 8 * MIB).unwrap() == pattern(1, 8 * MIB),
        "the snapshot holds what was written before it"
    );
}
