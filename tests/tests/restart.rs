//! Stories about stopping and starting: an engine killed with -9 and
//! restarted, every process killed with -9 and restarted, and a second
//! clean run over the same data.

use std::time::Duration;

use corral_tests::tools::random_file;
use corral_tests::{Cluster, EngineSpec};

const MIB: usize = 1 << 20;

#[test]
fn flushed_writes_survive_an_engine_kill9() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let src = cluster.path().join("src");
    let data = random_file(&src, 32 * MIB, 1).unwrap();
    cluster.write_flushed(e, &src).unwrap();
    let epoch_before = cluster.volume_info(e).unwrap()["epoch"].as_u64().unwrap();

    cluster.engines[e].process.kill9().unwrap();
    cluster.restart_engine(e).unwrap();

    let info = cluster.volume_info(e).unwrap();
    assert!(
        info["epoch"].as_u64().unwrap() > epoch_before,
        "a new epoch fences the old engine: {info}"
    );
    assert_eq!(info["replicas_rw"], 3, "{info}");
    assert!(
        cluster.read_back(e, data.len()).unwrap() == data,
        "flushed data reads back"
    );
}

#[test]
fn flushed_writes_survive_killing_every_process() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let src = cluster.path().join("src");
    let data = random_file(&src, 16 * MIB, 2).unwrap();
    cluster.write_flushed(e, &src).unwrap();

    cluster.engines[e].process.kill9().unwrap();
    for r in 0..3 {
        cluster.replicas[r].process.kill9().unwrap();
    }
    for r in 0..3 {
        cluster.restart_replica(r).unwrap();
    }
    cluster.restart_engine(e).unwrap();

    assert_eq!(cluster.volume_info(e).unwrap()["replicas_rw"], 3);
    assert!(
        cluster.read_back(e, data.len()).unwrap() == data,
        "flushed data reads back"
    );
}

#[test]
fn a_clean_restart_reopens_the_volume_and_refuses_a_size_change() {
    let mut cluster = Cluster::with_replicas(2).unwrap();
    let spec = EngineSpec::new("vol", "16MiB", &[0, 1]);
    let e = cluster.start_engine(&spec).unwrap();
    let src = cluster.path().join("src");
    let data = random_file(&src, 4 * MIB, 3).unwrap();
    cluster.write_flushed(e, &src).unwrap();
    assert!(
        cluster.engines[e]
            .process
            .terminate(Duration::from_secs(20))
            .unwrap()
            .success()
    );

    // Same arguments: the data is there.
    cluster.restart_engine(e).unwrap();
    assert!(cluster.read_back(e, data.len()).unwrap() == data);
    assert!(
        cluster.engines[e]
            .process
            .terminate(Duration::from_secs(20))
            .unwrap()
            .success()
    );

    // A different size is refused with a clear error, not silently applied.
    let bigger = EngineSpec::new("vol", "32MiB", &[0, 1]);
    let b = cluster.spawn_engine(&bigger).unwrap();
    let status = corral_tests::poll(
        Duration::from_secs(30),
        "the engine with a new size to exit",
        || Ok(cluster.engines[b].process.exited()),
    )
    .unwrap();
    assert!(!status.success());
    let log = cluster.engines[b].process.log_text();
    assert!(log.contains("exists with size 16777216"), "{log}");
}
