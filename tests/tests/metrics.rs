//! The Prometheus endpoints: an engine and a replica daemon started with
//! `--metrics` expose I/O counters, latency histograms and replica state.

use std::time::Duration;

use corral_tests::tools::{fio_nbd, metric_value, scrape_metrics};
use corral_tests::{Cluster, EngineSpec, free_addr, wait_for_port};

/// The value of the first sample line starting with `prefix`.
fn value(text: &str, prefix: &str) -> f64 {
    metric_value(text, prefix).unwrap()
}

#[test]
fn engine_and_replica_metrics_count_io_and_show_replica_state() {
    let mut cluster = Cluster::with_replicas(2).unwrap();
    // A third replica daemon with its own metrics endpoint.
    let replica_metrics = free_addr();
    let r = cluster
        .start_replica_with(&["--metrics", &replica_metrics.to_string()])
        .unwrap();
    let engine_metrics = free_addr();
    let e = cluster
        .start_engine(
            &EngineSpec::new("vol", "16MiB", &[0, 1, r])
                .arg("--metrics", &engine_metrics.to_string()),
        )
        .unwrap();
    wait_for_port(engine_metrics, Duration::from_secs(10)).unwrap();
    let uri = cluster.engines[e].nbd_uri();
    fio_nbd(
        &uri,
        "metrics",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=4m",
            "--iodepth=4",
            "--verify=crc32c",
        ],
        Duration::from_secs(120),
    )
    .unwrap();

    let text = scrape_metrics(engine_metrics).unwrap();
    // fio wrote 4 MiB (1024 writes) and read it back to verify.
    assert_eq!(
        value(
            &text,
            "corral_engine_io_ops_total{op=\"write\",result=\"ok\"}"
        ),
        1024.0
    );
    assert_eq!(
        value(&text, "corral_engine_io_bytes_total{op=\"write\"}"),
        4194304.0
    );
    assert!(value(&text, "corral_engine_io_bytes_total{op=\"read\"}") >= 4194304.0);
    assert_eq!(
        value(
            &text,
            "corral_engine_io_latency_seconds_count{op=\"write\"}"
        ),
        1024.0
    );
    assert_eq!(value(&text, "corral_engine_replicas_rw"), 3.0);
    assert_eq!(value(&text, "corral_engine_fenced"), 0.0);
    let rw = format!(
        "corral_engine_replica_mode{{replica=\"{}\",mode=\"RW\"}}",
        cluster.replicas[r].addr
    );
    assert_eq!(value(&text, &rw), 1.0);

    let text = scrape_metrics(replica_metrics).unwrap();
    assert_eq!(
        value(
            &text,
            "corral_replica_requests_total{op=\"write\",result=\"ok\"}"
        ),
        1024.0
    );
    assert_eq!(
        value(&text, "corral_replica_bytes_total{op=\"write\"}"),
        4194304.0
    );
    assert_eq!(value(&text, "corral_replica_hosted"), 1.0);
}
