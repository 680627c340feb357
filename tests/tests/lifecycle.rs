//! SIGTERM ends an engine at any moment of its life — before its volume
//! opens, while it opens, while it serves — within a few seconds, with
//! exit status 0; and a replica daemon likewise.

use std::time::Duration;

use corral_tests::proxy::Mode;
use corral_tests::{Cluster, EngineSpec};

const LIMIT: Duration = Duration::from_secs(10);

fn spec() -> EngineSpec {
    EngineSpec::new("vol", "16MiB", &[0, 1, 2]).arg("--open-timeout", "120s")
}

fn terminates_cleanly(cluster: &mut Cluster, engine: usize) {
    let status = cluster.engines[engine]
        .process
        .terminate(LIMIT)
        .expect("the engine exits within 10 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigterm_before_the_volume_opens_ends_the_engine() {
    // No replica daemon answers yet: the engine waits for them.
    let mut cluster = Cluster::with_replicas(3).unwrap();
    for r in &mut cluster.replicas {
        r.process.kill9().unwrap();
    }
    let e = cluster.spawn_engine(&spec()).unwrap();
    cluster
        .wait_until(Duration::from_secs(20), "the engine waiting to open", |c| {
            c.volume_info(e).is_ok_and(|i| {
                i["state"] == "opening"
                    && i["open_reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("no replica daemon reachable"))
            })
        })
        .unwrap();
    terminates_cleanly(&mut cluster, e);
}

#[test]
fn sigterm_while_the_volume_opens_ends_the_engine() {
    // The replicas' network swallows everything: the engine is inside its
    // first probe, which would wait the whole (long) replica timeout.
    let mut cluster = Cluster::with_replicas(3).unwrap();
    for r in 0..3 {
        cluster.ensure_proxy(r).unwrap();
        cluster.proxy(r).set_mode(Mode::BlackHole);
    }
    let e = cluster
        .spawn_engine(&spec().set("--replica-timeout", "60s").via_proxies())
        .unwrap();
    cluster
        .wait_until(Duration::from_secs(20), "the engine probing", |c| {
            c.proxy(0).connections() > 0 && c.volume_info(e).is_ok_and(|i| i["state"] == "opening")
        })
        .unwrap();
    terminates_cleanly(&mut cluster, e);
}

#[test]
fn sigterm_while_serving_ends_the_engine_and_the_daemons() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster.start_engine(&spec()).unwrap();
    assert_eq!(cluster.volume_info(e).unwrap()["state"], "serving");
    terminates_cleanly(&mut cluster, e);
    for r in &mut cluster.replicas {
        let status = r.process.terminate(LIMIT).expect("daemon exits");
        assert!(status.success(), "exit status {status}");
    }
}
