//! Write-through (decision 76): a client that flushes after each write has
//! its writes sent FUA to the replicas and its flushes answered without a
//! round to them; a client that flushes less often, or an engine started
//! with `--no-write-through`, gets a flush round for every flush. Counted
//! by the engine's and one replica daemon's metrics; the data checked by
//! fio's verify and `corral volume verify`.

use std::time::Duration;

use corral_tests::tools::{fio_nbd, metric_value, scrape_metrics};
use corral_tests::{Cluster, EngineSpec, free_addr, wait_for_port};

/// The value of the first sample line starting with `prefix`.
fn value(text: &str, prefix: &str) -> f64 {
    metric_value(text, prefix).unwrap()
}

/// What fio's job made the engine and replica 2 count.
struct Counted {
    frontend_flushes: f64,
    flushes_without_round: f64,
    replica_writes: f64,
    replica_flushes: f64,
}

/// A 3-replica volume (replica 2 and the engine with metrics), its engine
/// started with `engine_flags`; fio writes 1 MiB of 4 KiB blocks at QD1
/// with `fsync` = N (a flush after every N writes), then reads it back to
/// verify.
fn run(engine_flags: &[&str], fsync_every: u32) -> Counted {
    let mut cluster = Cluster::with_replicas(2).unwrap();
    let replica_metrics = free_addr();
    let r = cluster
        .start_replica_with(&["--metrics", &replica_metrics.to_string()])
        .unwrap();
    let engine_metrics = free_addr();
    let mut spec =
        EngineSpec::new("db", "16MiB", &[0, 1, r]).arg("--metrics", &engine_metrics.to_string());
    spec.extra
        .extend(engine_flags.iter().map(|f| f.to_string()));
    let e = cluster.start_engine(&spec).unwrap();
    wait_for_port(engine_metrics, Duration::from_secs(10)).unwrap();
    fio_nbd(
        &cluster.engines[e].nbd_uri(),
        "commits",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=1m",
            "--iodepth=1",
            &format!("--fsync={fsync_every}"),
            "--verify=crc32c",
        ],
        Duration::from_secs(120),
    )
    .unwrap();
    cluster.verify(e).unwrap();
    let engine = scrape_metrics(engine_metrics).unwrap();
    let replica = scrape_metrics(replica_metrics).unwrap();
    Counted {
        frontend_flushes: value(
            &engine,
            "corral_engine_io_ops_total{op=\"flush\",result=\"ok\"}",
        ),
        flushes_without_round: value(&engine, "corral_engine_flushes_without_round"),
        replica_writes: value(
            &replica,
            "corral_replica_requests_total{op=\"write\",result=\"ok\"}",
        ),
        replica_flushes: value(
            &replica,
            "corral_replica_requests_total{op=\"flush\",result=\"ok\"}",
        ),
    }
}

#[test]
fn a_client_that_flushes_after_each_write_needs_no_flush_rounds() {
    let c = run(&[], 1);
    // 256 writes, a flush after each but the last.
    assert_eq!(c.replica_writes, 256.0);
    assert!(c.frontend_flushes >= 255.0, "{}", c.frontend_flushes);
    // Only the flushes of the first window of the pattern (16 writes and
    // 16 flushes) need a round; the engine's idle flusher may add two more
    // after fio stops.
    // (corral_engine::write_through::WINDOW is 32 operations.)
    let window = 16.0;
    assert!(
        c.flushes_without_round >= c.frontend_flushes - window,
        "{} of {} flushes answered without a round",
        c.flushes_without_round,
        c.frontend_flushes
    );
    assert!(
        c.replica_flushes <= window + 2.0,
        "{} flush rounds",
        c.replica_flushes
    );
}

#[test]
fn with_write_through_off_every_flush_is_a_round() {
    let c = run(&["--no-write-through"], 1);
    assert_eq!(c.replica_writes, 256.0);
    assert_eq!(c.flushes_without_round, 0.0);
    assert!(
        c.frontend_flushes >= 255.0 && c.replica_flushes >= c.frontend_flushes,
        "{} flush rounds for {} flushes",
        c.replica_flushes,
        c.frontend_flushes
    );
}

#[test]
fn a_client_that_flushes_every_few_writes_gets_a_round_for_each_flush() {
    // A flush after every 4 writes: the writes go as sent (four syncs per
    // flush would cost more than the round), and each flush is a round.
    let c = run(&[], 4);
    assert_eq!(c.replica_writes, 256.0);
    assert!(c.frontend_flushes >= 63.0, "{}", c.frontend_flushes);
    assert_eq!(c.flushes_without_round, 0.0);
    assert!(
        c.replica_flushes >= c.frontend_flushes,
        "{} flush rounds for {} flushes",
        c.replica_flushes,
        c.frontend_flushes
    );
}

#[test]
fn a_replica_killed_while_a_client_flushes_after_each_write_loses_nothing() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let engine_metrics = free_addr();
    let e = cluster
        .start_engine(
            &EngineSpec::new("db", "16MiB", &[0, 1, 2])
                .arg("--metrics", &engine_metrics.to_string()),
        )
        .unwrap();
    wait_for_port(engine_metrics, Duration::from_secs(10)).unwrap();
    let uri = cluster.engines[e].nbd_uri();
    let writer = std::thread::spawn(move || {
        fio_nbd(
            &uri,
            "commits",
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--size=8m",
                "--iodepth=1",
                "--fsync=1",
                "--verify=crc32c",
            ],
            Duration::from_secs(240),
        )
    });
    // Once writes flow, kill a replica daemon under them: FUA writes in
    // flight fail on it, and the flushes after them must make the others'
    // copies durable (a round) before the client hears they are.
    corral_tests::wait_until(
        Duration::from_secs(60),
        "100 flushes answered without a round",
        || {
            scrape_metrics(engine_metrics).is_ok_and(|text| {
                metric_value(&text, "corral_engine_flushes_without_round").is_ok_and(|v| v >= 100.0)
            })
        },
    )
    .unwrap();
    cluster.replicas[2].process.kill9().unwrap();
    let written = writer.join().unwrap();
    assert!(written.is_ok(), "{written:?}");
    cluster
        .wait_mode(e, 2, "ERR", Duration::from_secs(30))
        .unwrap();
    cluster.restart_replica(2).unwrap();
    cluster
        .wait_mode(e, 2, "RW", Duration::from_secs(90))
        .unwrap();
    cluster.verify(e).unwrap();
}
