//! Stories about failures, one per scenario of the failure-handling issue:
//! replicas that crash, hang, fill their disk, rot a block or drop off the
//! network; engines that crash, are cut off with a minority, or meet a
//! second engine on the same volume.
//!
//! Every story writes through a verifying writer ([`Checker`]: it knows
//! which writes the engine acknowledged) and ends by reading the whole
//! volume back — no acknowledged write may be missing — and by `corral
//! volume verify`, which compares the RW replicas chunk by chunk.
//!
//! Failure detection is tuned for tests: a replica timeout of 2 s and a
//! retry every 300 ms, so each story takes seconds.

use std::time::Duration;

use corral_tests::checker::{Checker, Load};
use corral_tests::proxy::Mode;
use corral_tests::{Cluster, EngineSpec};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 256 << 10;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// An engine that notices failures (and returns) quickly.
fn spec(volume: &str, size: &str, replicas: &[usize]) -> EngineSpec {
    EngineSpec::new(volume, size, replicas)
        .set("--replica-timeout", "2s")
        .arg("--replica-retry-interval", "300ms")
        .arg("--open-timeout", "30s")
}

/// The end of every story: all replicas back to RW, identical (`corral
/// volume verify`), and every acknowledged write reads back.
fn assert_healed(cluster: &Cluster, engine: usize, checker: &Checker) {
    let total = cluster.volume_info(engine).unwrap()["replicas_total"]
        .as_u64()
        .unwrap();
    cluster
        .wait_until(secs(30), "every replica RW", |c| {
            c.volume_info(engine)
                .is_ok_and(|i| i["replicas_rw"].as_u64() == Some(total))
        })
        .unwrap();
    assert_consistent(cluster, engine, checker);
}

/// The RW replicas are identical and hold every acknowledged write.
fn assert_consistent(cluster: &Cluster, engine: usize, checker: &Checker) {
    let report = cluster.verify(engine).expect("RW replicas identical");
    assert_eq!(report["differences"].as_array().map(Vec::len), Some(0));
    let e = &cluster.engines[engine];
    checker
        .verify(e.nbd, &e.volume)
        .expect("every acknowledged write reads back");
}

/// The newest rebuild into `replica`, finished, and finished well.
fn finished_rebuild(cluster: &Cluster, engine: usize, replica: usize) -> serde_json::Value {
    let r = cluster
        .finished_rebuild(engine, replica)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(r["state"], "done", "{r}");
    r
}

#[test]
fn a_replica_killed_mid_write_and_back_in_time_is_caught_up_partially() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "64MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(64 * MIB);
    // Random writes into the first half of the volume only.
    let load = Load {
        range: Some((0, 32 * MIB)),
        ..Default::default()
    };
    let writer = checker.start(cluster.engines[e].nbd, "vol", load).unwrap();
    writer.wait_acked(4 * MIB, secs(30)).unwrap();

    // kill -9 in the middle of the writes: the engine moves it to ERR and
    // goes on with two replicas (a quorum of three) without a client error.
    let before = writer.stats();
    cluster.replicas[1].process.kill9().unwrap();
    writer.wait_more(2 * MIB, secs(30)).unwrap();
    let after = writer.stop();
    assert_eq!(after.errors, 0, "no client error: {after:?}");
    assert_eq!(cluster.replica_mode(e, 1).unwrap(), "ERR");
    // Everything that may have been written while it was away: what was
    // sent from the moment of the kill on, plus what was in flight then.
    let away = after.sent_bytes - before.acked_bytes;

    // It comes back well within the stale-replica timeout (30 min): only
    // the chunks written while it was away (and those its own write-intent
    // log marks as in flight at the crash) are walked — never the untouched
    // second half — and only blocks that differ are copied.
    cluster.restart_replica(1).unwrap();
    cluster.wait_mode(e, 1, "RW", secs(30)).unwrap();
    let rebuild = finished_rebuild(&cluster, e, 1);
    assert_eq!(rebuild["kind"], "partial", "{rebuild}");
    let copied = rebuild["copied_bytes"].as_u64().unwrap();
    let walked = rebuild["total_bytes"].as_u64().unwrap();
    assert!(copied > 0, "{rebuild}");
    assert!(
        copied <= away + CHUNK,
        "copied {copied} bytes, but only {away} were written while it was away: {rebuild}"
    );
    assert!(
        walked <= 32 * MIB,
        "a partial rebuild walks only what changed: {rebuild}"
    );

    assert_healed(&cluster, e, &checker);
}

#[test]
fn a_replica_back_after_the_stale_timeout_is_rebuilt_in_full() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).arg("--stale-replica-timeout", "1s"))
        .unwrap();
    let nbd = cluster.engines[e].nbd;
    let checker = Checker::new(32 * MIB);
    checker
        .write_ok(nbd, "vol", Load::fill(0, 8 * MIB))
        .unwrap();

    // Replica 2 dies; writes go on without it.
    cluster.replicas[2].process.kill9().unwrap();
    let away = checker
        .write_ok(nbd, "vol", Load::default().bytes(2 * MIB))
        .unwrap();
    cluster.wait_mode(e, 2, "ERR", secs(10)).unwrap();

    // It stays away longer than the stale-replica timeout (1 s here): the
    // engine forgets which chunks it missed, so when it returns every chunk
    // is compared — and still only the blocks that differ are copied.
    std::thread::sleep(Duration::from_millis(1500));
    cluster.restart_replica(2).unwrap();
    cluster.wait_mode(e, 2, "RW", secs(30)).unwrap();
    let rebuild = finished_rebuild(&cluster, e, 2);
    assert_eq!(rebuild["kind"], "full", "{rebuild}");
    assert_eq!(
        rebuild["total_bytes"],
        32 * MIB,
        "every chunk walked: {rebuild}"
    );
    let copied = rebuild["copied_bytes"].as_u64().unwrap();
    assert!(
        copied > 0 && copied <= away.sent_bytes + CHUNK,
        "copied {copied} bytes; {} were written while it was away: {rebuild}",
        away.sent_bytes
    );

    assert_healed(&cluster, e, &checker);
}

#[test]
fn a_hung_replica_goes_to_err_after_the_timeout_and_is_rebuilt_when_it_wakes() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(32 * MIB);
    let writer = checker
        .start(cluster.engines[e].nbd, "vol", Load::default())
        .unwrap();
    writer.wait_acked(2 * MIB, secs(30)).unwrap();

    // SIGSTOP: the replica keeps its connections open but answers nothing.
    // Writes stall for at most the replica timeout (2 s), then the engine
    // moves it to ERR and goes on with the other two.
    cluster.replicas[2].process.pause().unwrap();
    cluster.wait_mode(e, 2, "ERR", secs(15)).unwrap();
    writer.wait_more(2 * MIB, secs(30)).unwrap();
    assert_eq!(
        writer.stats().errors,
        0,
        "no client error: {:?}",
        writer.stats()
    );

    // SIGCONT: it answers again; the engine reconnects and catches it up
    // while the writer keeps writing (the copier and new writes race for
    // the same chunks).
    cluster.replicas[2].process.resume().unwrap();
    cluster.wait_mode(e, 2, "RW", secs(30)).unwrap();
    let rebuild = finished_rebuild(&cluster, e, 2);
    assert_eq!(rebuild["kind"], "partial", "{rebuild}");
    writer.wait_more(MIB, secs(30)).unwrap();
    let summary = writer.stop();
    assert_eq!(summary.errors, 0, "no client error: {summary:?}");

    assert_healed(&cluster, e, &checker);
}

#[test]
fn a_partitioned_replica_goes_to_err_and_is_rebuilt_once_the_partition_heals() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).via_proxies())
        .unwrap();
    let checker = Checker::new(32 * MIB);
    let writer = checker
        .start(cluster.engines[e].nbd, "vol", Load::default())
        .unwrap();
    writer.wait_acked(2 * MIB, secs(30)).unwrap();

    // The network to replica 2 goes dark: connections stay up, nothing
    // arrives either way. The engine notices by the timeout.
    cluster.proxy(2).set_mode(Mode::BlackHole);
    cluster.wait_mode(e, 2, "ERR", secs(15)).unwrap();
    writer.wait_more(2 * MIB, secs(30)).unwrap();
    assert_eq!(
        writer.stats().errors,
        0,
        "no client error: {:?}",
        writer.stats()
    );

    // The partition heals: what was held in the network arrives late, the
    // engine's retries get through, and the replica is caught up.
    cluster.proxy(2).set_mode(Mode::Pass);
    cluster.wait_mode(e, 2, "RW", secs(30)).unwrap();
    let rebuild = finished_rebuild(&cluster, e, 2);
    assert_eq!(rebuild["kind"], "partial", "{rebuild}");
    writer.wait_more(MIB, secs(30)).unwrap();
    let summary = writer.stop();
    assert_eq!(summary.errors, 0, "no client error: {summary:?}");

    assert_healed(&cluster, e, &checker);
}

#[test]
fn a_slow_link_is_no_failure_but_a_reset_one_is_until_it_recovers() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).via_proxies())
        .unwrap();
    let checker = Checker::new(32 * MIB);
    let writer = checker
        .start(cluster.engines[e].nbd, "vol", Load::default())
        .unwrap();
    writer.wait_acked(MIB, secs(30)).unwrap();
    let generation = cluster.volume_info(e).unwrap()["generation"].clone();

    // 100 ms each way to replica 1, well under the 2 s timeout: every
    // write waits for it, but nothing fails.
    cluster
        .proxy(1)
        .set_mode(Mode::Delay(Duration::from_millis(100)));
    writer.wait_more(256 << 10, secs(30)).unwrap();
    assert_eq!(cluster.replica_mode(e, 1).unwrap(), "RW");
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(
        info["generation"], generation,
        "no membership change: {info}"
    );

    // The network resets every connection to replica 1 and refuses new
    // ones: the engine moves it to ERR at once and writes on.
    cluster.proxy(1).set_mode(Mode::Reset);
    cluster.wait_mode(e, 1, "ERR", secs(10)).unwrap();
    writer.wait_more(MIB, secs(30)).unwrap();

    // The network recovers: the engine's retries get through and the
    // replica is caught up.
    cluster.proxy(1).set_mode(Mode::Pass);
    cluster.wait_mode(e, 1, "RW", secs(30)).unwrap();
    let rebuild = finished_rebuild(&cluster, e, 1);
    assert_eq!(rebuild["kind"], "partial", "{rebuild}");
    let summary = writer.stop();
    assert_eq!(summary.errors, 0, "no client error: {summary:?}");

    assert_healed(&cluster, e, &checker);
}

#[test]
fn cut_off_under_quorum_the_old_engine_acknowledges_nothing_and_a_new_one_serves_at_once() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let a = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).via_proxies())
        .unwrap();
    assert_eq!(cluster.volume_info(a).unwrap()["write_policy"], "quorum");
    let checker = Checker::new(32 * MIB);
    let wa = checker
        .start(cluster.engines[a].nbd, "vol", Load::lane(0, 2))
        .unwrap();
    wa.wait_acked(2 * MIB, secs(30)).unwrap();

    // A partition: engine A with replica 0 on one side, replicas 1 and 2
    // on the other. A has lost its majority: after the timeout its writes
    // fail rather than being acknowledged by one replica.
    cluster.partition(&[a], &[0]).unwrap();
    cluster.wait_state(a, "unavailable", secs(20)).unwrap();
    let acked_by_a = wa.stats().acked_writes;

    // Engine B starts on the other side. It reaches two of three replicas,
    // fences them and serves at once (automatic failover).
    let b = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).via_proxies())
        .unwrap();
    let info = cluster.volume_info(b).unwrap();
    assert_eq!(info["replicas_rw"], 2, "{info}");
    let wb = checker
        .start(cluster.engines[b].nbd, "vol", Load::lane(1, 2))
        .unwrap();
    wb.wait_acked(2 * MIB, secs(30)).unwrap();
    assert_eq!(
        wa.stats().acked_writes,
        acked_by_a,
        "A acknowledged writes without a majority: {:?}",
        wa.stats()
    );

    // The partition heals. A learns from the replicas that a newer engine
    // owns the volume; B brings replica 0 back (it holds A's unacknowledged
    // attempts, which the rebuild overwrites).
    cluster.heal();
    cluster.wait_state(a, "fenced", secs(20)).unwrap();
    let a_final = wa.stop();
    assert_eq!(a_final.acked_writes, acked_by_a, "{a_final:?}");
    let b_final = wb.stop();
    assert_eq!(b_final.errors, 0, "{b_final:?}");

    // B's volume holds every write either engine acknowledged.
    assert_healed(&cluster, b, &checker);
}

#[test]
fn cut_off_under_available_the_old_engine_writes_on_and_a_new_one_waits_for_its_replica() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let available = spec("vol", "32MiB", &[0, 1, 2])
        .arg("--write-policy", "available")
        .via_proxies();
    let a = cluster.start_engine(&available).unwrap();
    let checker = Checker::new(32 * MIB);
    let wa = checker
        .start(cluster.engines[a].nbd, "vol", Load::lane(0, 2))
        .unwrap();
    wa.wait_acked(2 * MIB, secs(30)).unwrap();

    // The partition: A with replica 0 against replicas 1 and 2. Under
    // `available` A drops the two it cannot reach and keeps acknowledging
    // writes on replica 0 alone — writes nobody else holds.
    cluster.partition(&[a], &[0]).unwrap();
    cluster.wait_mode(a, 1, "ERR", secs(20)).unwrap();
    cluster.wait_mode(a, 2, "ERR", secs(20)).unwrap();
    wa.wait_more(2 * MIB, secs(30)).unwrap();

    // Engine B on the other side finds a membership record naming replica
    // 0 as RW, and cannot reach it: it must not serve (it would lose A's
    // latest writes), so it waits and says for whom.
    let b = cluster.spawn_engine(&available).unwrap();
    let replica0 = cluster.proxy(0).addr().to_string();
    cluster
        .wait_until(secs(20), "B waiting for replica 0", |c| {
            c.volume_info(b).is_ok_and(|i| {
                i["state"] == "opening"
                    && i["open_reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(&replica0))
            })
        })
        .unwrap();
    std::thread::sleep(secs(2));
    let info = cluster.volume_info(b).unwrap();
    assert_eq!(
        info["state"], "opening",
        "B must wait for replica 0: {info}"
    );
    let a_summary = wa.stop();
    assert_eq!(
        a_summary.errors, 0,
        "A wrote on without errors: {a_summary:?}"
    );

    // The partition heals: B reaches replica 0, sees the newest record,
    // fences every replica and opens with A's data.
    cluster.heal();
    cluster.wait_engine_ready(b, secs(30)).unwrap();
    // A is fenced: its next write fails, and it says so.
    let late = checker
        .write(
            cluster.engines[a].nbd,
            "vol",
            Load::lane(0, 2).bytes(256 << 10),
        )
        .unwrap();
    assert_eq!(
        late.acked_writes, 0,
        "a fenced engine acknowledged: {late:?}"
    );
    cluster.wait_state(a, "fenced", secs(10)).unwrap();

    let wb = checker
        .write_ok(
            cluster.engines[b].nbd,
            "vol",
            Load::lane(1, 2).bytes(2 * MIB),
        )
        .unwrap();
    assert_eq!(wb.errors, 0);
    // B's volume holds every write either engine acknowledged.
    assert_healed(&cluster, b, &checker);
}

#[test]
fn a_node_lost_with_its_engine_and_a_replica_fails_over_to_a_new_engine_without_an_operator() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let a = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(32 * MIB);
    let writer = checker
        .start(cluster.engines[a].nbd, "vol", Load::default())
        .unwrap();
    writer.wait_acked(4 * MIB, secs(30)).unwrap();

    // The node running engine A and replica 0 dies in the middle of writes.
    cluster.engines[a].process.kill9().unwrap();
    cluster.replicas[0].process.kill9().unwrap();
    let summary = writer.stop();
    assert!(summary.disconnected, "{summary:?}");

    // A new engine on another node, given the same three replicas, fences
    // the two it reaches — a majority — and serves at once.
    let b = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let info = cluster.volume_info(b).unwrap();
    assert_eq!(info["state"], "degraded", "{info}");
    assert_eq!(info["replicas_rw"], 2, "{info}");
    assert_consistent(&cluster, b, &checker);

    // The node returns: its replica is rebuilt into the new engine's set.
    cluster.restart_replica(0).unwrap();
    assert_healed(&cluster, b, &checker);
}

#[test]
fn an_engine_killed_mid_write_and_restarted_keeps_every_acknowledged_write() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(32 * MIB);
    // Deep pipelining, never a flush: acknowledged is all that counts.
    let load = Load {
        depth: 16,
        flush_every: 0,
        ..Default::default()
    };
    let writer = checker.start(cluster.engines[e].nbd, "vol", load).unwrap();
    writer.wait_acked(4 * MIB, secs(30)).unwrap();

    cluster.engines[e].process.kill9().unwrap();
    let summary = writer.stop();
    assert!(summary.disconnected, "{summary:?}");

    // Restarted over the same replicas, the engine resyncs what was in
    // flight among them and serves every acknowledged write.
    cluster.restart_engine(e).unwrap();
    assert_eq!(cluster.volume_info(e).unwrap()["replicas_rw"], 3);
    assert_consistent(&cluster, e, &checker);
}

#[test]
fn an_engine_killed_during_a_rebuild_resumes_it_after_restart() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "64MiB", &[0, 1, 2]).arg("--rebuild-bandwidth", "8MiB"))
        .unwrap();
    let checker = Checker::new(64 * MIB);
    checker
        .write_ok(cluster.engines[e].nbd, "vol", Load::fill(0, 48 * MIB))
        .unwrap();

    // Replica 2 loses its disk: a new, empty replica takes its place and
    // is rebuilt in full — 48 MiB at 8 MiB/s, about six seconds.
    cluster.replicas[2].process.kill9().unwrap();
    std::fs::remove_dir_all(cluster.replicas[2].data_dir.join("vol")).unwrap();
    cluster.restart_replica(2).unwrap();
    cluster
        .wait_until(secs(30), "16 MiB of the rebuild walked", |c| {
            c.rebuild_of(e, 2).ok().flatten().is_some_and(|r| {
                r["state"] == "running" && r["done_bytes"].as_u64().unwrap_or(0) >= 16 * MIB
            })
        })
        .unwrap();
    let first = cluster.rebuild_of(e, 2).unwrap().unwrap();
    assert_eq!(first["kind"], "full", "{first}");
    let copied_before = first["copied_bytes"].as_u64().unwrap();

    // The engine dies in the middle of it and is restarted.
    cluster.engines[e].process.kill9().unwrap();
    cluster.restart_engine(e).unwrap();

    // The new engine knows nothing of what the old one copied: it resumes
    // by comparing every chunk, so what was copied before is compared, not
    // copied again (give or take the chunks in flight at the kill, at most
    // one window of eight).
    cluster.wait_mode(e, 2, "RW", secs(30)).unwrap();
    let resumed = finished_rebuild(&cluster, e, 2);
    assert_eq!(resumed["kind"], "resumed", "{resumed}");
    let copied_after = resumed["copied_bytes"].as_u64().unwrap();
    assert!(
        copied_after > 0 && copied_after + copied_before <= 48 * MIB + 8 * CHUNK,
        "copied {copied_before} bytes before the kill and {copied_after} after, of 48 MiB: {resumed}"
    );

    assert_healed(&cluster, e, &checker);
}

#[test]
fn a_second_engine_fences_the_first_whose_writes_then_fail() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let a = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(32 * MIB);
    checker
        .write_ok(
            cluster.engines[a].nbd,
            "vol",
            Load::lane(0, 2).bytes(2 * MIB),
        )
        .unwrap();
    let epoch_a = cluster.volume_info(a).unwrap()["epoch"].as_u64().unwrap();

    // A second engine opens the same volume: a higher epoch on every replica.
    let b = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let info_b = cluster.volume_info(b).unwrap();
    assert!(info_b["epoch"].as_u64().unwrap() > epoch_a, "{info_b}");

    // A's next writes are refused by every replica; A knows it is fenced.
    let late = checker
        .write(
            cluster.engines[a].nbd,
            "vol",
            Load::lane(0, 2).bytes(256 << 10),
        )
        .unwrap();
    assert_eq!(
        late.acked_writes, 0,
        "a fenced engine acknowledged: {late:?}"
    );
    assert!(late.errors > 0, "{late:?}");
    cluster.wait_state(a, "fenced", secs(10)).unwrap();

    // B serves A's acknowledged writes and its own.
    checker
        .write_ok(
            cluster.engines[b].nbd,
            "vol",
            Load::lane(1, 2).bytes(2 * MIB),
        )
        .unwrap();
    assert_consistent(&cluster, b, &checker);
}

#[test]
fn a_block_rotten_on_one_replica_is_read_from_another_and_repaired() {
    use std::os::unix::fs::FileExt;

    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&spec("vol", "16MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(16 * MIB);
    checker
        .write_ok(cluster.engines[e].nbd, "vol", Load::fill(0, 4 * MIB))
        .unwrap();

    // Rot one block of replica 1's copy behind the daemon's back (through
    // the page cache, so the daemon reads exactly these bytes).
    let block = 100u64;
    let good = checker.expected(block).unwrap();
    let head = cluster.head_file(1, "vol");
    let file = std::fs::OpenOptions::new().write(true).open(&head).unwrap();
    file.write_all_at(&[0xAB; 4096], block * 4096).unwrap();
    drop(file);

    // Reads go to the replicas round robin: read the block a few times so
    // that one lands on the rotten copy. Every read returns good data.
    let mut nbd = corral_tests::nbd_raw::RawNbd::connect(cluster.engines[e].nbd, "vol").unwrap();
    for _ in 0..6 {
        let data = nbd
            .read(block * 4096, 4096)
            .unwrap()
            .expect("read succeeds");
        assert!(data == good, "a read returned the rotten block");
    }
    let info = cluster.volume_info(e).unwrap();
    assert!(info["repaired_blocks"].as_u64().unwrap() >= 1, "{info}");
    assert_eq!(
        info["replicas_rw"], 3,
        "a checksum error is no replica failure: {info}"
    );

    // The rotten copy was rewritten on replica 1's disk.
    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(&head)
        .unwrap()
        .read_exact_at(&mut on_disk, block * 4096)
        .unwrap();
    assert!(on_disk == good, "replica 1's copy was repaired");

    assert_consistent(&cluster, e, &checker);
}

#[test]
fn a_replica_whose_disk_fills_up_fails_and_the_volume_stays_writable() {
    let mut cluster = Cluster::new().unwrap();
    cluster.start_replica().unwrap();
    cluster.start_replica().unwrap();
    // Replica 2's disk is an 8 MiB tmpfs; the volume is 32 MiB.
    cluster.start_replica_on_tmpfs("8m").unwrap();
    let e = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]))
        .unwrap();
    let checker = Checker::new(32 * MIB);

    // Fill 24 MiB: replica 2 runs out of space part way (ENOSPC), goes to
    // ERR, and the writes go on on the other two without a client error.
    checker
        .write_ok(cluster.engines[e].nbd, "vol", Load::fill(0, 24 * MIB))
        .expect("no client error");
    // (The engine keeps retrying it, so it flips between ERR and WO; it
    // never gets back to RW.)
    assert_ne!(cluster.replica_mode(e, 2).unwrap(), "RW");
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["state"], "degraded", "{info}");
    assert_eq!(info["replicas_rw"], 2, "{info}");
    let log = cluster.engines[e].process.log_text();
    assert!(log.contains("replica disk full"), "the engine says why");

    // Still writable, and the two RW replicas hold every acknowledged write.
    checker
        .write_ok(cluster.engines[e].nbd, "vol", Load::default().bytes(MIB))
        .expect("still writable");
    assert_consistent(&cluster, e, &checker);
}

#[test]
fn a_new_engine_elects_from_what_it_fenced_not_from_an_earlier_look() {
    // Found by this suite: the engine used to elect from the records it
    // probed before fencing, which an older engine could still change.
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let a = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).via_proxies())
        .unwrap();
    let checker = Checker::new(32 * MIB);
    let wa = checker
        .start(cluster.engines[a].nbd, "vol", Load::lane(0, 2))
        .unwrap();
    wa.wait_acked(MIB, secs(30)).unwrap();

    // Engine A loses replica 1; every other engine (B, started below)
    // loses replica 0. A's writes stall on replica 1 for the 2 s timeout,
    // then A drops it (generation 2: RW = {0, 2}) and acknowledges writes
    // on replicas 0 and 2 — a majority.
    let pid_a = cluster.engines[a].process.pid().unwrap();
    cluster.proxy(0).set_mode_for(pid_a, Mode::Pass);
    cluster.proxy(0).set_mode(Mode::BlackHole);
    cluster.proxy(1).set_mode_for(pid_a, Mode::BlackHole);

    // As soon as A's writes are held on the way to replica 1, B starts. It
    // reads the records of replicas 1 and 2 at once (both generation 1: RW =
    // {0, 1, 2}) and waits the timeout for replica 0. Meanwhile A records
    // generation 2 on replicas 0 and 2 and acknowledges writes replica 1
    // never sees. Only then does B fence.
    cluster
        .wait_until(secs(10), "A stalled on replica 1", |c| {
            c.proxy(1).held() > 0
        })
        .unwrap();
    let b = cluster
        .start_engine(&spec("vol", "32MiB", &[0, 1, 2]).via_proxies())
        .unwrap();
    let a_final = wa.stop();
    assert!(a_final.acked_bytes > MIB, "{a_final:?}");

    // Replica 1 missed writes A acknowledged: B must not serve it as up to
    // date (nor resync the others from it). Whatever B serves must hold
    // every write A acknowledged.
    let e = &cluster.engines[b];
    checker
        .verify(e.nbd, &e.volume)
        .expect("B serves every write A acknowledged");
    cluster.heal();
    cluster
        .wait_until(secs(30), "every replica RW", |c| {
            c.volume_info(b).is_ok_and(|i| i["replicas_rw"] == 3)
        })
        .unwrap();
    cluster.verify(b).expect("RW replicas identical");
    checker
        .verify(e.nbd, &e.volume)
        .expect("B serves every write A acknowledged");
}

/// Found by the fault campaign: two engines started for a volume at the
/// same moment both picked "newest epoch seen + 1", both opened the
/// replicas at it, and both served. An epoch now belongs to the first
/// engine that opens a replica at it; the other is refused as fenced and
/// must take a newer one.
#[test]
fn two_engines_opening_at_once_never_both_serve_at_one_epoch() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let spec = EngineSpec::new("race", "16MiB", &[0, 1, 2]);
    let first = cluster.start_engine(&spec).unwrap();
    cluster.engines[first].process.kill9().unwrap();
    for round in 0..6 {
        let a = cluster.spawn_engine(&spec).unwrap();
        let b = cluster.spawn_engine(&spec).unwrap();
        // Until neither is still opening (or 20 s: one may retry for long).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut epochs = Vec::new();
        loop {
            epochs.clear();
            let mut opening = false;
            for e in [a, b] {
                if cluster.engines[e].process.exited().is_some() {
                    continue;
                }
                match cluster.volume_info(e) {
                    Ok(info) if info["state"] == "serving" => {
                        epochs.push(info["epoch"].as_u64().unwrap())
                    }
                    Ok(info) if info["state"] == "opening" => opening = true,
                    Ok(_) => {}
                    Err(_) => opening = true,
                }
            }
            if !opening || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !(epochs.len() == 2 && epochs[0] == epochs[1]),
            "round {round}: both engines serve at epoch {}",
            epochs[0]
        );
        for e in [a, b] {
            let _ = cluster.engines[e].process.kill9();
        }
    }
}
