//! Stories about bad input: wrong command lines, unreachable replicas, and
//! NBD clients that send garbage or out-of-range requests. Each gets a clear
//! error; nobody else is disturbed.

use std::io::Write;
use std::time::Duration;

use corral_tests::nbd_raw::RawNbd;
use corral_tests::tools::run_ok;
use corral_tests::{Cluster, EngineSpec, free_addr};

/// Run corral with `args`; it must fail with a one-line error containing `needle`.
fn rejects(cluster: &Cluster, args: &[&str], needle: &str) {
    let out = cluster.corral(args).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} should fail; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line of error, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
}

#[test]
fn bad_command_lines_get_one_line_errors() {
    let cluster = Cluster::new().unwrap();
    let free = free_addr().to_string();
    let engine = |size: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "engine",
            "--volume",
            "v",
            "--size",
            size,
            "--replica",
            "127.0.0.1:1",
            "--listen",
            &free,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |args: Vec<String>, needle: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        rejects(&cluster, &refs, needle);
    };
    check(engine("12XB", &[]), "invalid size");
    check(engine("1.5GiB", &[]), "invalid size");
    check(engine("1000", &[]), "multiple of 4096");
    check(
        engine("1GiB", &["--write-policy", "sometimes"]),
        "unknown write policy",
    );
    check(
        engine("1GiB", &["--replica-timeout", "8 parsecs"]),
        "invalid duration",
    );
    check(engine("1GiB", &["--chunk-size", "3000"]), "power of two");
    check(engine("1GiB", &["--io-threads", "0"]), "not in 1..=1024");
    check(engine("1GiB", &["--replica", "127.0.0.1:1"]), "given twice");
    rejects(
        &cluster,
        &[
            "replica",
            "--listen",
            "not-an-address",
            "--data-dir",
            "/tmp/x",
        ],
        "invalid",
    );
    rejects(
        &cluster,
        &["volume", "--engine", &free, "info"],
        "cannot reach the engine",
    );
    rejects(&cluster, &["no-such-command"], "unrecognized subcommand");
}

#[test]
fn an_engine_whose_replicas_are_unreachable_exits_with_a_clear_error() {
    let cluster = Cluster::new().unwrap();
    let (r1, r2, listen) = (
        free_addr().to_string(),
        free_addr().to_string(),
        free_addr().to_string(),
    );
    let out = cluster
        .corral(&[
            "engine",
            "--volume",
            "v",
            "--size",
            "16MiB",
            "--replica",
            &r1,
            "--replica",
            &r2,
            "--listen",
            &listen,
            "--open-timeout",
            "2s",
            "--replica-timeout",
            "1s",
        ])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no replica daemon reachable"), "{stderr}");
    assert!(
        stderr.contains(&r1) && stderr.contains(&r2),
        "names each replica: {stderr}"
    );
}

#[test]
fn nbd_garbage_and_out_of_range_requests_do_not_disturb_other_clients() {
    let mut cluster = Cluster::with_replicas(2).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("vol", "16MiB", &[0, 1]))
        .unwrap();
    let nbd = cluster.engines[e].nbd;
    let mut good = RawNbd::connect(nbd, "vol").unwrap();
    assert_eq!(good.size, 16 << 20);
    assert_eq!(good.write(4096, &[0xab; 4096]).unwrap(), Ok(()));

    // A client that sends garbage after the handshake is dropped.
    let mut bad = RawNbd::connect(nbd, "vol").unwrap();
    bad.stream.write_all(&[0xde; 64]).unwrap();
    let mut buf = [0u8; 16];
    let closed = match std::io::Read::read(&mut bad.stream, &mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(_) => true,
    };
    assert!(closed, "the garbage client's connection is closed");

    // A client asking for an unknown export is refused at negotiation.
    assert!(RawNbd::connect(nbd, "no-such-volume").is_err());

    // Out-of-range requests get EINVAL (22) and the connection stays usable.
    assert_eq!(good.read((16 << 20) - 512, 1024).unwrap(), Err(22));
    assert_eq!(good.read(u64::MAX - 100, 512).unwrap(), Err(22));
    // The NBD spec asks for ENOSPC (28) on a write past the end.
    assert_eq!(good.write(16 << 20, &[1; 512]).unwrap(), Err(28));
    assert_eq!(good.read(4096, 4096).unwrap(), Ok(vec![0xab; 4096]));
    assert_eq!(good.flush().unwrap(), Ok(()));

    // Real clients still get served, and the engine never lost a replica over it.
    run_ok(
        "nbdinfo",
        &[&cluster.engines[e].nbd_uri()],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(cluster.volume_info(e).unwrap()["replicas_rw"], 2);
}
