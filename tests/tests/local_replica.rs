//! A replica on the engine's own node, reached over its daemon's unix
//! socket (issue 13; decision 64): the daemon serves `--listen-unix` beside
//! TCP, the engine given `--local-replica ADDR=PATH` talks to that daemon
//! only over the socket — control and data streams, first and after the
//! daemon comes back — and reads from it first, falling back to the others
//! while it is away. A node daemon hands the flag to the engines it starts
//! whose replicas include its own.
//!
//! Which path the engine uses is read from the kernel's socket tables: the
//! engine's TCP connections (its file descriptors matched against
//! /proc/PID/net/tcp), and the connected sockets at the daemon's socket
//! path (/proc/net/unix). Where reads went is read from each replica
//! daemon's request counters (`--metrics`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use corral_proto::v1 as pb;
use corral_tests::nbd_raw::RawNbd;
use corral_tests::node::NodeCluster;
use corral_tests::tools::scrape_metrics;
use corral_tests::{Cluster, EngineSpec, free_addr, wait_until};

const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

/// Read requests a replica daemon has served (0 before its first).
fn reads(metrics: SocketAddr) -> u64 {
    let text = scrape_metrics(metrics).unwrap();
    text.lines()
        .find(|l| l.starts_with("corral_replica_requests_total{op=\"read\",result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The socket inodes process `pid` holds.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                out.insert(inode);
            }
        }
    }
    out
}

/// The remote ports of the established TCP connections process `pid` holds.
fn tcp_peer_ports(pid: i32) -> BTreeSet<u16> {
    let mine = socket_inodes(pid);
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            let inode: u64 = f[9].parse().unwrap_or(0);
            if !mine.contains(&inode) {
                continue;
            }
            if let Some(port) = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// Connections accepted on the unix socket at `path` and still open (the
/// server's side of each: it carries the socket's path, connected).
fn unix_connections(path: &Path) -> usize {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.display().to_string();
    text.lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path
            f.len() >= 8 && f[5] == "03" && f[7] == path
        })
        .count()
}

fn read_at(nbd: &mut RawNbd, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(256 << 10);
        let at = offset + out.len() as u64;
        out.extend(nbd.read(at, n as u32).unwrap().expect("NBD read"));
    }
    out
}

fn write_at(nbd: &mut RawNbd, offset: u64, data: &[u8]) {
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        let at = offset + (i as u64) * (256 << 10);
        nbd.write(at, piece).unwrap().expect("NBD write");
    }
    nbd.flush().unwrap().expect("NBD flush");
}

/// Read 16 × 64 KiB pieces of the first `len` bytes, one request each, and
/// check them against `data`.
fn read_pieces(nbd: &mut RawNbd, data: &[u8]) {
    for i in 0..16 {
        let at = (i * (data.len() / 16)) & !0xffff;
        let got = nbd.read(at as u64, 64 << 10).unwrap().expect("NBD read");
        assert!(got == data[at..at + (64 << 10)], "bytes at {at} differ");
    }
}

#[test]
fn a_local_replica_is_reached_over_its_socket_and_read_first() {
    let mut cluster = Cluster::new().unwrap();
    let metrics: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    for m in &metrics[..2] {
        cluster
            .start_replica_with(&["--metrics", &m.to_string()])
            .unwrap();
    }
    let socket = cluster.path().join("sockets").join("replica-2.sock");
    let local = cluster
        .start_replica_with(&[
            "--metrics",
            &metrics[2].to_string(),
            "--listen-unix",
            &socket.display().to_string(),
        ])
        .unwrap();
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner only");
    let ports: Vec<u16> = cluster.replicas.iter().map(|r| r.addr.port()).collect();
    let local_addr = cluster.replicas[local].addr.to_string();

    let e = cluster
        .start_engine(
            &EngineSpec::new("vol", "64MiB", &[0, 1, 2])
                .set("--replica-retry-interval", "300ms")
                .arg(
                    "--local-replica",
                    &format!("{local_addr}={}", socket.display()),
                ),
        )
        .unwrap();
    let pid = cluster.engines[e].process.pid().expect("engine pid");
    let nbd_addr = cluster.engines[e].nbd;
    let mut nbd = RawNbd::connect(nbd_addr, "vol").unwrap();
    let data = corral_tests::tools::pattern(1, 4 * MIB);
    write_at(&mut nbd, 0, &data);
    assert!(
        read_at(&mut nbd, 0, data.len()) == data,
        "read back differs"
    );

    // The local daemon over its socket only; the others over TCP.
    let check_paths = |what: &str| {
        let peers = tcp_peer_ports(pid);
        assert!(
            !peers.contains(&ports[local]),
            "{what}: the engine has a TCP connection to the local daemon: {peers:?}"
        );
        assert!(
            peers.contains(&ports[0]) && peers.contains(&ports[1]),
            "{what}: the engine should reach the others over TCP: {peers:?} vs {ports:?}"
        );
        // Its control channel and its data stream.
        let n = unix_connections(&socket);
        assert!(n >= 2, "{what}: {n} connections on {}", socket.display());
    };
    check_paths("at open");
    assert_eq!(cluster.replica_ls(e).unwrap().len(), 3);
    assert_eq!(
        cluster.replica_mode(e, local).unwrap(),
        "RW",
        "named by its TCP address"
    );

    // Reads go to the local replica, not the others.
    let before: Vec<u64> = metrics.iter().map(|m| reads(*m)).collect();
    read_pieces(&mut nbd, &data);
    let after: Vec<u64> = metrics.iter().map(|m| reads(*m)).collect();
    assert!(
        after[local] >= before[local] + 16,
        "reads on the local daemon: {before:?} -> {after:?}"
    );
    assert_eq!(
        (after[0], after[1]),
        (before[0], before[1]),
        "no read went to the remote daemons"
    );

    // The local daemon dies: reads go on from the others, writes too.
    cluster.replicas[local].process.kill9().unwrap();
    read_pieces(&mut nbd, &data);
    let mut newer = data.clone();
    newer[..MIB].copy_from_slice(&corral_tests::tools::pattern(2, MIB));
    write_at(&mut nbd, 0, &newer[..MIB]);
    cluster.wait_mode(e, local, "ERR", WAIT).unwrap();
    let remote_before = reads(metrics[0]) + reads(metrics[1]);
    read_pieces(&mut nbd, &newer);
    assert!(
        reads(metrics[0]) + reads(metrics[1]) >= remote_before + 16,
        "reads served by the remote daemons"
    );

    // It comes back on the same socket path (the stale file replaced) and
    // the engine brings it back over the socket: caught up, RW, read first.
    cluster.restart_replica(local).unwrap();
    cluster.wait_mode(e, local, "RW", WAIT).unwrap();
    check_paths("after the return");
    let before: Vec<u64> = metrics.iter().map(|m| reads(*m)).collect();
    read_pieces(&mut nbd, &newer);
    let after: Vec<u64> = metrics.iter().map(|m| reads(*m)).collect();
    assert!(
        after[local] >= before[local] + 16,
        "reads on the returned local daemon: {before:?} -> {after:?}"
    );
    assert_eq!((after[0], after[1]), (before[0], before[1]));
    let report = cluster.verify(e).unwrap();
    assert_eq!(
        report["differences"].as_array().map(Vec::len),
        Some(0),
        "replicas agree: {report}"
    );
    assert!(read_at(&mut nbd, 0, newer.len()) == newer);
}

#[test]
fn a_local_replica_that_is_not_a_replica_is_refused_in_one_line() {
    let cluster = Cluster::new().unwrap();
    let listen = free_addr().to_string();
    let out = cluster
        .corral(&[
            "engine",
            "--volume",
            "v",
            "--size",
            "64MiB",
            "--replica",
            "127.0.0.1:1",
            "--replica",
            "127.0.0.1:2",
            "--listen",
            &listen,
            "--local-replica",
            "127.0.0.1:3=/tmp/nowhere.sock",
        ])
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("--local-replica 127.0.0.1:3: not one of the --replica addresses"),
        "{stderr}"
    );
    // And a value without '=' is refused by the parser, in one line too.
    let out = cluster
        .corral(&[
            "engine",
            "--volume",
            "v",
            "--size",
            "64MiB",
            "--replica",
            "127.0.0.1:1",
            "--listen",
            &listen,
            "--local-replica",
            "127.0.0.1:1",
        ])
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("ADDR=PATH"), "{stderr}");
}

fn command_line(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[test]
fn a_node_daemon_gives_its_engines_its_socket_for_its_own_replica() {
    const SIZE: u64 = 64 << 20;
    let nodes = NodeCluster::start(3).unwrap();
    let socket = nodes.nodes[0]
        .data_dir
        .join(".sockets")
        .join("replica.sock");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket(), "the default socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // An engine on node 0 over replicas on 0, 1, 2: node 0's own by socket.
    nodes.create_replicas("here", SIZE, &[0, 1, 2]).unwrap();
    let status = nodes
        .start_engine(0, nodes.spec("here", SIZE, &[0, 1, 2]))
        .unwrap();
    assert_eq!(status.state, pb::EngineState::Running as i32, "{status:?}");
    let argv = command_line(status.pid);
    let expected = format!("{}={}", nodes.nodes[0].addr, socket.display());
    assert!(
        argv.windows(2)
            .any(|w| w[0] == "--local-replica" && w[1] == expected),
        "{argv:?}"
    );
    let peers = tcp_peer_ports(status.pid as i32);
    assert!(
        !peers.contains(&nodes.nodes[0].addr.port()),
        "no TCP to its own node's daemon: {peers:?}"
    );
    let addr: SocketAddr = status.nbd_address.parse().unwrap();
    let mut nbd = RawNbd::connect(addr, "here").unwrap();
    let data = corral_tests::tools::pattern(3, MIB);
    write_at(&mut nbd, 0, &data);
    assert!(read_at(&mut nbd, 0, data.len()) == data);
    wait_until(WAIT, "the engine's connections on the socket", || {
        unix_connections(&socket) >= 2
    })
    .unwrap();

    // An engine on node 0 whose replicas are elsewhere gets no such flag.
    nodes.create_replicas("away", SIZE, &[1, 2]).unwrap();
    let status = nodes
        .start_engine(0, nodes.spec("away", SIZE, &[1, 2]))
        .unwrap();
    assert_eq!(status.state, pb::EngineState::Running as i32, "{status:?}");
    let argv = command_line(status.pid);
    assert!(!argv.iter().any(|a| a == "--local-replica"), "{argv:?}");
}
