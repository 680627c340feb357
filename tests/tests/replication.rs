//! Stories about the replicated data path: fio with verification over NBD
//! against a three-replica volume, with and without a replica dying.

use std::time::Duration;

use corral_tests::tools::fio_nbd;
use corral_tests::{Cluster, EngineSpec, first_difference};

#[test]
fn fio_verify_on_three_replicas_leaves_identical_copies() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("vol", "64MiB", &[0, 1, 2]))
        .unwrap();
    let uri = cluster.engines[e].nbd_uri();

    // Random writes of mixed sizes, then fio reads everything back and checks it.
    fio_nbd(
        &uri,
        "mixed",
        &[
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--size=32m",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
        Duration::from_secs(300),
    )
    .unwrap();
    // Sequential 1 MiB writes over the other half, with a flush every 8 writes.
    fio_nbd(
        &uri,
        "seq",
        &[
            "--rw=write",
            "--bs=1m",
            "--offset=32m",
            "--size=32m",
            "--iodepth=8",
            "--fsync=8",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
        Duration::from_secs(300),
    )
    .unwrap();

    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");
    assert_eq!(
        info["generation"], 1,
        "no membership change expected: {info}"
    );
    assert_eq!(info["state"], "serving");

    // Stop cleanly and compare the replicas' data files byte for byte.
    cluster.stop_all().unwrap();
    let a = cluster.head_file(0, "vol");
    for r in 1..3 {
        let b = cluster.head_file(r, "vol");
        assert_eq!(
            first_difference(&a, &b).unwrap(),
            None,
            "replica 0 and replica {r} differ"
        );
    }
}

#[test]
fn killing_a_replica_mid_write_loses_nothing() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("vol", "64MiB", &[0, 1, 2]))
        .unwrap();
    let uri = cluster.engines[e].nbd_uri();

    // fio writes 48 MiB at random and then verifies it; a replica dies meanwhile.
    let writer = std::thread::spawn(move || {
        fio_nbd(
            &uri,
            "through-a-failure",
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--size=48m",
                "--iodepth=16",
                "--verify=crc32c",
                "--verify_fatal=1",
            ],
            Duration::from_secs(300),
        )
    });
    // Kill it once fio's writes are under way — 4 of the 48 MiB on its disk
    // — and while they still are.
    let allocated = |c: &Cluster| {
        std::fs::metadata(c.head_file(1, "vol")).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
    };
    cluster
        .wait_until(Duration::from_secs(60), "fio writing", |c| {
            allocated(c) >= 4 << 20
        })
        .unwrap();
    let written = allocated(&cluster);
    cluster.replicas[1].process.kill9().unwrap();
    assert!(
        !writer.is_finished() && written < 44 << 20,
        "the kill must land while fio writes ({written} bytes on the replica's disk)"
    );

    writer
        .join()
        .unwrap()
        .expect("fio saw no error and verified every block");

    assert_eq!(cluster.replica_mode(e, 1).unwrap(), "ERR");
    assert_eq!(cluster.replica_mode(e, 0).unwrap(), "RW");
    assert_eq!(cluster.replica_mode(e, 2).unwrap(), "RW");
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["state"], "degraded", "{info}");
    assert!(
        info["generation"].as_u64().unwrap() >= 2,
        "the failure was recorded: {info}"
    );

    // The two survivors hold the same data.
    cluster.stop_all().unwrap();
    assert_eq!(
        first_difference(&cluster.head_file(0, "vol"), &cluster.head_file(2, "vol")).unwrap(),
        None
    );
}

#[test]
fn a_hung_replica_goes_to_err_after_the_timeout_without_a_client_error() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let uri = cluster.engines[e].nbd_uri();
    // The replica stops answering but keeps its connections open.
    cluster.replicas[2].process.pause().unwrap();
    fio_nbd(
        &uri,
        "past-a-hang",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
        Duration::from_secs(120),
    )
    .expect("writes stall for at most the replica timeout, then go on");
    assert_eq!(cluster.replica_mode(e, 2).unwrap(), "ERR");
    assert_eq!(cluster.replica_mode(e, 0).unwrap(), "RW");
    cluster.replicas[2].process.resume().unwrap();
    cluster.stop_all().unwrap();
}
