//! The server against real NBD clients from Debian: `nbdinfo`, `nbdcopy`
//! (libnbd-bin) and `fio --ioengine=nbd`. A missing tool fails the test.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_size_and_name() {
    let srv = TestServer::start(&[("vol0", "first volume", 16 * MIB)]).await;
    let out = run_ok("nbdinfo", &[&srv.uri("vol0")], Duration::from_secs(30)).await;
    assert!(out.contains("export=\"vol0\""), "{out}");
    assert!(out.contains("export-size: 16777216"), "{out}");
    assert!(out.contains("can_flush: true"), "{out}");
    assert!(out.contains("can_fua: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("can_trim: true"), "{out}");
    assert!(out.contains("can_zero: true"), "{out}");
    assert!(out.contains("is_read_only: false"), "{out}");
    let size = run_ok(
        "nbdinfo",
        &["--size", &srv.uri("vol0")],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(size.trim(), "16777216");
    // The default export (empty name) is the first one.
    let size = run_ok(
        "nbdinfo",
        &["--size", &format!("nbd://{}", srv.addr)],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(size.trim(), "16777216");
    // An unknown export is an error, and the server keeps going.
    let bad = run_tool("nbdinfo", &[&srv.uri("nope")], Duration::from_secs(30)).await;
    assert!(!bad.status.success());
    run_ok(
        "nbdinfo",
        &["--size", &srv.uri("vol0")],
        Duration::from_secs(30),
    )
    .await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_every_export() {
    let srv = TestServer::start(&[("alpha", "the first", 4 * MIB), ("beta", "", 8 * MIB)]).await;
    let out = run_ok(
        "nbdinfo",
        &["--list", &format!("nbd://{}", srv.addr)],
        Duration::from_secs(30),
    )
    .await;
    assert!(out.contains("export=\"alpha\""), "{out}");
    assert!(out.contains("export=\"beta\""), "{out}");
    assert!(out.contains("description: the first"), "{out}");
    assert!(out.contains("export-size: 4194304"), "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_random_data() {
    let size = 8 * MIB;
    let srv = TestServer::start(&[("vol0", "", size)]).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    let data = pseudo_random(size as usize, 0x5eed);
    write_file(&input, &data);
    let uri = srv.uri("vol0");
    run_ok(
        "nbdcopy",
        &["--flush", input.to_str().unwrap(), &uri],
        Duration::from_secs(60),
    )
    .await;
    // The backing file holds exactly what was copied in.
    let backing = std::fs::read(&srv.paths[0]).unwrap();
    assert!(backing == data, "backing file differs from the input");
    run_ok(
        "nbdcopy",
        &[&uri, output.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "data read back differs from the input");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_with_crc32c_verify() {
    let srv = TestServer::start(&[("vol0", "", 16 * MIB)]).await;
    let uri = format!("--uri={}", srv.uri("vol0"));
    let out = run_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            // Do not leave a verify state file in the working directory.
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=normal",
        ],
        Duration::from_secs(120),
    )
    .await;
    // Every block was written, then read back and checked.
    assert!(out.contains("issued rwts: total=4096,4096,"), "{out}");
    assert!(!out.contains("verify: bad"), "{out}");
    srv.shutdown().await;
}
