//! Stories of the catch-up invariant (docs/failure-handling.md): a replica
//! turns RW only when every chunk that may differ between it and the RW set
//! has been copied or compared since it was last identical — whatever
//! happens in between: the replica dying again mid-rebuild, the engine
//! restarting while it is away, a rebuild source dying, flushes that clear
//! the write-intent bits.
//!
//! Each story ends the same way: every replica RW, `corral volume verify`
//! finds them identical, every acknowledged write reads back through the
//! engine, and — with every process stopped — from each replica's own data
//! file, so no replica can hide behind round-robin reads.

use std::time::Duration;

use corral_tests::checker::{Checker, Load};
use corral_tests::{Cluster, EngineSpec};

const MIB: u64 = 1 << 20;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The engine of the reproduction in issue 16: fast failure detection, a
/// stale timeout long enough that returns are incremental, and a slow
/// rebuild that a kill can interrupt.
fn spec(size: &str, bandwidth: &str) -> EngineSpec {
    EngineSpec::new("v", size, &[0, 1, 2])
        .set("--replica-timeout", "2s")
        .arg("--stale-replica-timeout", "30s")
        .arg("--replica-retry-interval", "1s")
        .arg("--rebuild-bandwidth", bandwidth)
        .arg("--open-timeout", "30s")
}

/// Wait until the running rebuild into `replica` has walked `bytes`.
fn wait_rebuild_walked(cluster: &Cluster, engine: usize, replica: usize, bytes: u64) {
    cluster
        .wait_until(secs(60), "the rebuild to walk far enough", |c| {
            c.rebuild_of(engine, replica)
                .ok()
                .flatten()
                .is_some_and(|r| {
                    r["state"] == "running" && r["done_bytes"].as_u64().unwrap_or(0) >= bytes
                })
        })
        .unwrap();
}

/// Kill replica `i`, wipe its data as a lost disk would, and restart its
/// daemon empty: the engine recreates the replica and rebuilds it in full.
fn replace_disk(cluster: &mut Cluster, i: usize) {
    cluster.replicas[i].process.kill9().unwrap();
    std::fs::remove_dir_all(cluster.replicas[i].data_dir.join("v")).unwrap();
    cluster.restart_replica(i).unwrap();
}

/// A cluster of three replica daemons and an engine serving volume `v` of
/// `size` MiB, written in full and flushed; then replica 1's disk is
/// replaced and its full rebuild (at `bandwidth`) has walked `walked` MiB.
fn rebuilding_volume(size: u64, bandwidth: &str, walked: u64) -> (Cluster, usize, Checker) {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec(&format!("{size}MiB"), bandwidth))
        .unwrap();
    let checker = Checker::new(size * MIB);
    let nbd = cluster.engines[e].nbd;
    checker
        .write_ok(nbd, "v", Load::fill(0, size * MIB))
        .unwrap();
    checker.flush(nbd, "v").unwrap();
    replace_disk(&mut cluster, 1);
    wait_rebuild_walked(&cluster, e, 1, walked * MIB);
    (cluster, e, checker)
}

/// Overwrite `0..len` through engine `e`, then flush three times, the
/// last two after a pause: long enough for every replica to clear the
/// write-intent bits of what was written.
fn overwrite_and_flush(cluster: &Cluster, e: usize, checker: &Checker, len: u64) {
    let nbd = cluster.engines[e].nbd;
    checker.write_ok(nbd, "v", Load::fill(0, len)).unwrap();
    checker.flush(nbd, "v").unwrap();
    std::thread::sleep(secs(3));
    checker.flush(nbd, "v").unwrap();
    checker.flush(nbd, "v").unwrap();
}

/// The end of every story (see the module doc).
fn assert_every_replica_holds_every_write(cluster: &mut Cluster, e: usize, checker: &Checker) {
    cluster
        .wait_until(secs(90), "every replica RW", |c| {
            c.volume_info(e)
                .is_ok_and(|i| i["replicas_rw"] == 3 && i["replicas_total"] == 3)
        })
        .unwrap();
    let report = cluster.verify(e).expect("the RW replicas are identical");
    assert_eq!(report["differences"].as_array().map(Vec::len), Some(0));
    // Round-robin reads: several passes, so each copy serves some of them.
    let engine = &cluster.engines[e];
    for _ in 0..3 {
        checker
            .verify(engine.nbd, "v")
            .expect("every acknowledged write reads back through the engine");
    }
    cluster.stop_all().unwrap();
    for r in 0..cluster.replicas.len() {
        let image = cluster.head_file(r, "v");
        checker
            .verify_image(&image)
            .unwrap_or_else(|e| panic!("replica-{r} lost acknowledged writes: {e:#}"));
    }
}

/// Issue 16's reproduction. A rebuild interrupted by its target's death
/// used to resume from a cursor recorded on the target, skipping the
/// chunks below it that were written while the target was away — their
/// write-intent bits long cleared by flushes. Now the engine keeps what
/// the target had not been sent, and adds what it misses while away.
#[test]
fn a_replica_killed_mid_rebuild_gets_the_writes_below_its_cursor_when_it_returns() {
    // Replica 1's disk is replaced: a full rebuild at 32 MiB/s starts.
    // Three seconds in, the old code had recorded a rebuild cursor past
    // 16 MiB (it did about once a second).
    let (mut cluster, e, checker) = rebuilding_volume(256, "32MiB", 96);

    // It dies again well into the rebuild, and while it is away the start
    // of the volume — below the rebuild's cursor — is overwritten and
    // flushed until no write-intent bit remembers it.
    cluster.replicas[1].process.kill9().unwrap();
    cluster.wait_mode(e, 1, "ERR", secs(10)).unwrap();
    overwrite_and_flush(&cluster, e, &checker, 16 * MIB);

    cluster.restart_replica(1).unwrap();
    assert_every_replica_holds_every_write(&mut cluster, e, &checker);
}

/// The same, with the engine killed while the replica is away, and the
/// replica back before the engine: the new engine finds it reachable at
/// open, part-rebuilt, and knows nothing of what the old engine tracked —
/// nothing written while it was away, before or after the restart, may be
/// skipped.
#[test]
fn a_replica_away_across_an_engine_restart_gets_every_write_when_it_returns() {
    let (mut cluster, e, checker) = rebuilding_volume(128, "16MiB", 48);
    cluster.replicas[1].process.kill9().unwrap();
    cluster.wait_mode(e, 1, "ERR", secs(10)).unwrap();
    overwrite_and_flush(&cluster, e, &checker, 16 * MIB);

    // The engine dies; the replica comes back before the engine does.
    cluster.engines[e].process.kill9().unwrap();
    cluster.restart_replica(1).unwrap();
    cluster.restart_engine(e).unwrap();
    let nbd = cluster.engines[e].nbd;
    checker
        .write_ok(nbd, "v", Load::fill(16 * MIB, 8 * MIB))
        .unwrap();
    assert_every_replica_holds_every_write(&mut cluster, e, &checker);
}

/// An engine killed while a rebuild runs, and the rebuild's target killed
/// while the engine is down: the new engine finds the target WO in the
/// newest membership record and cannot reach it. Writes it takes in the
/// part already copied must reach the target when it returns.
#[test]
fn a_rebuild_target_lost_while_its_engine_restarts_gets_every_write_when_it_returns() {
    let (mut cluster, e, checker) = rebuilding_volume(128, "16MiB", 48);
    cluster.engines[e].process.kill9().unwrap();
    cluster.replicas[1].process.kill9().unwrap();
    cluster.restart_engine(e).unwrap();
    overwrite_and_flush(&cluster, e, &checker, 16 * MIB);

    cluster.restart_replica(1).unwrap();
    assert_every_replica_holds_every_write(&mut cluster, e, &checker);
}

/// The replica a rebuild copies from dies in the middle of it, under
/// writes: the copier takes the other RW replica as its source, the
/// writes go on (policy `available`), and when the source returns it is
/// caught up with what it missed.
#[test]
fn a_rebuild_source_killed_mid_rebuild_loses_nothing() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("128MiB", "16MiB").arg("--write-policy", "available"))
        .unwrap();
    let checker = Checker::new(128 * MIB);
    let nbd = cluster.engines[e].nbd;
    checker
        .write_ok(nbd, "v", Load::fill(0, 128 * MIB))
        .unwrap();

    replace_disk(&mut cluster, 1);
    let writer = checker.start(nbd, "v", Load::default()).unwrap();
    wait_rebuild_walked(&cluster, e, 1, 32 * MIB);

    // Reads for the copier alternate between replicas 0 and 2: kill 0.
    cluster.replicas[0].process.kill9().unwrap();
    cluster.wait_mode(e, 0, "ERR", secs(10)).unwrap();
    writer.wait_more(4 * MIB, secs(60)).unwrap();
    cluster.wait_mode(e, 1, "RW", secs(60)).unwrap();
    let rebuild = cluster.finished_rebuild(e, 1).unwrap();
    assert_eq!(rebuild["state"], "done", "{rebuild}");

    cluster.restart_replica(0).unwrap();
    cluster.wait_mode(e, 0, "RW", secs(60)).unwrap();
    let summary = writer.stop();
    assert_eq!(summary.errors, 0, "no client error: {summary:?}");
    checker.flush(nbd, "v").unwrap();
    assert_every_replica_holds_every_write(&mut cluster, e, &checker);
}
