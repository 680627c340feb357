//! Stories about the ways in: `corral serve-file` (the NBD frontend over a
//! plain file) and `corral dev` (the README's main command).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_tests::tools::{fio_nbd, random_file, run_ok};
use corral_tests::{Cluster, corral_bin, free_addr, wait_for_port};

#[test]
fn serve_file_round_trips_data_and_passes_fio_verify() {
    let cluster = Cluster::new().unwrap();
    let file = cluster.path().join("disk.img");
    let nbd = free_addr();
    let mut server = Command::new(corral_bin())
        .args([
            "serve-file",
            "--file",
            &file.display().to_string(),
            "--size",
            "32MiB",
        ])
        .args(["--nbd", &nbd.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(nbd, Duration::from_secs(20)).unwrap();
    let uri = format!("nbd://{nbd}/disk");
    let info = run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(30)).unwrap();
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "33554432");

    let src = cluster.path().join("src");
    let data = random_file(&src, 8 << 20, 11).unwrap();
    run_ok(
        "nbdcopy",
        &["--flush", &src.display().to_string(), &uri],
        Duration::from_secs(60),
    )
    .unwrap();
    // What the client wrote is in the file itself.
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[..data.len()] == data[..]);

    fio_nbd(
        &uri,
        "serve-file",
        &[
            "--rw=randrw",
            "--bs=4k",
            "--offset=8m",
            "--size=16m",
            "--iodepth=16",
            "--verify=crc32c",
        ],
        Duration::from_secs(120),
    )
    .unwrap();
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = corral_tests::wait_exit(
        &mut server,
        Duration::from_secs(20),
        "serve-file to exit on SIGTERM",
    )
    .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

/// Start `corral dev`, wait for its "is up" line, return the child.
fn start_dev(dir: &std::path::Path, nbd: &str, listen: &str, port: u16) -> std::process::Child {
    let mut child = Command::new(corral_bin())
        .args([
            "dev",
            "--size",
            "64MiB",
            "--dir",
            &dir.display().to_string(),
        ])
        .args([
            "--nbd",
            nbd,
            "--listen",
            listen,
            "--replica-port",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("is up") => return child,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("corral dev did not come up");
            }
        }
    }
}

fn stop_dev(mut child: std::process::Child) {
    // SAFETY: SIGINT (Ctrl-C) to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = corral_tests::wait_exit(
        &mut child,
        Duration::from_secs(60),
        "corral dev to exit on Ctrl-C",
    )
    .unwrap();
    assert!(status.success(), "clean exit on Ctrl-C: {status}");
}

#[test]
fn corral_dev_serves_a_volume_and_a_second_run_reopens_it() {
    let cluster = Cluster::new().unwrap();
    let dir = cluster.path().join("dev");
    let (nbd, listen) = (free_addr().to_string(), free_addr().to_string());
    // Three consecutive free ports for the replica daemons.
    let port = (0..50)
        .map(|_| free_addr().port())
        .find(|p| {
            *p < 65000 && (1..3).all(|k| std::net::TcpListener::bind(("127.0.0.1", p + k)).is_ok())
        })
        .unwrap();
    let uri = format!("nbd://{nbd}/dev");

    let dev = start_dev(&dir, &nbd, &listen, port);
    let src = cluster.path().join("src");
    let data = random_file(&src, 4 << 20, 21).unwrap();
    run_ok(
        "nbdcopy",
        &["--flush", &src.display().to_string(), &uri],
        Duration::from_secs(60),
    )
    .unwrap();
    // Every gRPC hop runs mutual TLS, with the CA dev made under its dir:
    // its control service answers a client with those files only.
    let tls = dir.join("tls");
    let flags = [
        "--tls-cert".to_string(),
        tls.join("corral.pem").display().to_string(),
        "--tls-key".into(),
        tls.join("corral-key.pem").display().to_string(),
        "--tls-ca".into(),
        tls.join("ca.pem").display().to_string(),
    ];
    let mut args = vec!["volume", "--engine", &listen, "--json", "info"];
    let plain = cluster.corral(&args).unwrap();
    assert!(
        !plain.status.success(),
        "dev's engine served a plain client"
    );
    args.extend(flags.iter().map(String::as_str));
    let info = cluster.corral(&args).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");
    stop_dev(dev);

    let dev = start_dev(&dir, &nbd, &listen, port);
    let out = cluster.path().join("out");
    run_ok(
        "nbdcopy",
        &[&uri, &out.display().to_string()],
        Duration::from_secs(60),
    )
    .unwrap();
    let back = std::fs::read(&out).unwrap();
    assert!(
        back[..data.len()] == data[..],
        "the second run serves the same data"
    );
    stop_dev(dev);
}
