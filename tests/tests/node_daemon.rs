//! Stories of the node daemon (`corral node`): it runs a volume's engine as
//! a supervised child — restarted when it dies, stopped flushing first —
//! and its engines outlive the daemon itself, which adopts them (or starts
//! them again from its record) when it comes back. Real processes on
//! loopback, data written and read back through the engine's NBD frontend.

use std::net::SocketAddr;
use std::time::Duration;

use corral_client::ClientError;
use corral_proto::v1 as pb;
use corral_tests::nbd_raw::RawNbd;
use corral_tests::node::{NodeCluster, alive, kill9, process_group};
use corral_tests::{run_bounded, wait_until};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const WAIT: Duration = Duration::from_secs(60);

fn running(s: &pb::EngineStatus) -> bool {
    s.state == pb::EngineState::Running as i32 && s.pid != 0
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    data
}

fn nbd(status: &pb::EngineStatus) -> RawNbd {
    let addr: SocketAddr = status.nbd_address.parse().expect("an NBD address");
    let volume = &status.spec.as_ref().expect("a spec").volume;
    RawNbd::connect(addr, volume).expect("NBD connection")
}

/// Write `data` at `offset` through the engine's NBD frontend and flush.
fn write_flushed(status: &pb::EngineStatus, offset: u64, data: &[u8]) {
    let mut c = nbd(status);
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        let at = offset + (i as u64) * (256 << 10);
        c.write(at, piece).unwrap().expect("NBD write");
    }
    c.flush().unwrap().expect("NBD flush");
}

/// Read `len` bytes at `offset` through the engine's NBD frontend.
fn read(status: &pb::EngineStatus, offset: u64, len: usize) -> Vec<u8> {
    let mut c = nbd(status);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(256 << 10);
        let at = offset + out.len() as u64;
        out.extend(c.read(at, n as u32).unwrap().expect("NBD read"));
    }
    out
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddr>().expect("an address").port()
}

/// The gRPC code of a refusal.
fn code(e: &ClientError) -> Option<tonic::Code> {
    match e {
        ClientError::Refused { code, .. } => Some(*code),
        ClientError::NotFound { .. } => Some(tonic::Code::NotFound),
        _ => None,
    }
}

#[test]
fn an_engine_is_supervised_restarted_after_dying_and_stopped_on_request() {
    let nodes = NodeCluster::start(3).unwrap();
    nodes.create_replicas("vol", SIZE, &[0, 1, 2]).unwrap();
    let spec = nodes.spec("vol", SIZE, &[0, 1, 2]);
    let first = nodes.start_engine(0, spec.clone()).unwrap();
    assert!(running(&first), "{first:?}");
    assert_eq!((first.restarts, first.last_exit.as_str()), (0, ""));
    let range = nodes.nodes[0].ports.0..=nodes.nodes[0].ports.1;
    assert!(
        range.contains(&port_of(&first.control_address)),
        "{first:?}"
    );
    assert!(range.contains(&port_of(&first.nbd_address)), "{first:?}");
    assert_eq!(
        (first.iscsi_address.as_str(), first.iscsi_target.as_str()),
        ("", "")
    );
    // Its own process group: a Ctrl-C to the daemon's terminal misses it.
    assert_eq!(process_group(first.pid), Some(first.pid));
    let daemon_pid = nodes.nodes[0].process.pid().unwrap() as u32;
    assert_ne!(process_group(first.pid), process_group(daemon_pid));

    let data = random(2 * MIB as usize, 1);
    write_flushed(&first, 0, &data);
    assert!(read(&first, 0, data.len()) == data, "data reads back");

    // The same spec again: the same engine.
    let again = nodes.start_engine(0, spec.clone()).unwrap();
    assert_eq!(again.pid, first.pid);
    // Another spec for the volume: refused, naming what differs.
    let mut bigger = spec.clone();
    bigger.size = 2 * SIZE;
    let e = nodes.start_engine(0, bigger).unwrap_err();
    let e = e.downcast_ref::<ClientError>().expect("a client error");
    assert_eq!(code(e), Some(tonic::Code::AlreadyExists), "{e}");
    assert!(e.to_string().contains("size"), "{e}");

    // The engine dies: the daemon starts it again, on the same ports.
    kill9(first.pid).unwrap();
    let second = nodes
        .wait_engine(0, "vol", WAIT, "the engine to be restarted", |s| {
            running(s) && s.pid != first.pid
        })
        .unwrap();
    assert_eq!(second.restarts, 1, "{second:?}");
    assert!(second.last_exit.contains("signal 9"), "{second:?}");
    assert_eq!(
        (&second.control_address, &second.nbd_address),
        (&first.control_address, &first.nbd_address)
    );
    assert!(
        read(&second, 0, data.len()) == data,
        "data reads back after the restart"
    );

    let info = nodes
        .block_on(nodes.manager(0).unwrap().node_info())
        .unwrap();
    assert_eq!(info.node_id, "node-0");
    assert!(
        info.capacity_bytes > 0 && info.free_bytes <= info.capacity_bytes,
        "{info:?}"
    );
    assert_eq!(info.allocated_bytes, SIZE, "{info:?}");
    assert_eq!(info.frontend_address, "127.0.0.1");
    assert_eq!(info.replica_address, nodes.nodes[0].addr.to_string());

    // StopEngine: the process is gone when it answers, its ports are free,
    // the record is empty; stopping again is fine.
    let manager = nodes.manager(0).unwrap();
    nodes.block_on(manager.stop_engine("vol")).unwrap();
    assert!(!alive(second.pid), "the engine process is gone");
    for addr in [&second.control_address, &second.nbd_address] {
        std::net::TcpListener::bind(addr.as_str())
            .unwrap_or_else(|e| panic!("{addr} is still taken: {e}"));
    }
    assert!(nodes.block_on(manager.list_engines()).unwrap().is_empty());
    assert!(nodes.nodes[0].recorded().unwrap().is_empty());
    nodes.block_on(manager.stop_engine("vol")).unwrap();
    let e = nodes.block_on(manager.get_engine("vol")).unwrap_err();
    assert!(matches!(e, ClientError::NotFound { .. }), "{e}");
    assert!(
        nodes.engine_log(0, "vol").contains("SIGTERM"),
        "stopped with SIGTERM (flushing): {}",
        nodes.engine_log(0, "vol")
    );
}

#[test]
fn engines_outlive_their_daemon_which_adopts_them_or_starts_them_from_its_record() {
    let mut nodes = NodeCluster::start(3).unwrap();
    nodes.create_replicas("vol", SIZE, &[0, 1, 2]).unwrap();
    let first = nodes
        .start_engine(0, nodes.spec("vol", SIZE, &[0, 1, 2]))
        .unwrap();
    assert!(running(&first), "{first:?}");
    let a = random(MIB as usize, 2);
    write_flushed(&first, 0, &a);

    // kill -9 of the daemon: the engine keeps serving, reads and writes.
    nodes.nodes[0].process.kill9().unwrap();
    assert!(alive(first.pid), "the engine outlives its daemon");
    assert!(read(&first, 0, a.len()) == a);
    let b = random(MIB as usize, 3);
    write_flushed(&first, 8 * MIB, &b);

    // The daemon returns and adopts the running engine.
    nodes.restart_node(0).unwrap();
    let adopted = nodes
        .wait_engine(0, "vol", WAIT, "the engine to be adopted", running)
        .unwrap();
    assert_eq!(
        (adopted.pid, adopted.restarts),
        (first.pid, 0),
        "{adopted:?}"
    );
    let listed = nodes
        .block_on(nodes.manager(0).unwrap().list_engines())
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pid, first.pid);

    // An adopted engine is not the daemon's child, yet its death is seen.
    kill9(first.pid).unwrap();
    let second = nodes
        .wait_engine(0, "vol", WAIT, "the adopted engine to be restarted", |s| {
            running(s) && s.pid != first.pid
        })
        .unwrap();
    assert_eq!(second.restarts, 1, "{second:?}");
    assert!(read(&second, 0, a.len()) == a);
    assert!(read(&second, 8 * MIB, b.len()) == b);

    // SIGTERM: the daemon exits cleanly and leaves the engine running.
    let status = nodes.nodes[0]
        .process
        .terminate(Duration::from_secs(30))
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        alive(second.pid),
        "the engine outlives a graceful daemon stop"
    );
    // With the daemon down, the engine dies too; the next daemon starts
    // it again from its record, on the recorded ports.
    kill9(second.pid).unwrap();
    wait_until(WAIT, "the engine to be gone", || !alive(second.pid)).unwrap();
    nodes.restart_node(0).unwrap();
    let third = nodes
        .wait_engine(0, "vol", WAIT, "the recorded engine to be started", |s| {
            running(s) && s.pid != second.pid
        })
        .unwrap();
    assert_eq!(third.nbd_address, first.nbd_address);
    assert!(read(&third, 0, a.len()) == a);
    assert!(read(&third, 8 * MIB, b.len()) == b);
    let recorded = nodes.nodes[0].recorded().unwrap();
    assert_eq!(recorded, vec![("vol".to_string(), Some(third.pid))]);

    nodes
        .block_on(nodes.manager(0).unwrap().stop_engine("vol"))
        .unwrap();
    assert!(!alive(third.pid));
}

#[test]
fn bad_specs_are_refused_and_an_engine_that_cannot_start_leaves_nothing_behind() {
    let nodes = NodeCluster::start(1).unwrap();
    let manager = nodes.manager(0).unwrap();
    let good = nodes.spec("vol", 32 * MIB, &[0]);
    let mut bad_specs = Vec::new();
    let mut s = good.clone();
    s.volume.clear();
    bad_specs.push(("volume", s));
    let mut s = good.clone();
    s.size = 0;
    bad_specs.push(("size", s));
    let mut s = good.clone();
    s.replicas.clear();
    bad_specs.push(("replicas", s));
    let mut s = good.clone();
    s.write_policy = "bogus".into();
    bad_specs.push(("write_policy", s));
    for (field, spec) in bad_specs {
        let e = nodes.block_on(manager.start_engine(spec)).unwrap_err();
        assert_eq!(code(&e), Some(tonic::Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains(field), "names {field}: {e}");
    }
    let e = nodes.block_on(manager.get_engine("vol")).unwrap_err();
    assert!(matches!(e, ClientError::NotFound { .. }), "{e}");
    nodes.block_on(manager.stop_engine("vol")).unwrap();

    let info = nodes.block_on(manager.node_info()).unwrap();
    assert_eq!((info.node_id.as_str(), info.allocated_bytes), ("node-0", 0));
    assert!(info.capacity_bytes > 0, "{info:?}");

    // The replica holds 32 MiB; an engine told 64 MiB refuses to open it
    // and exits: StartEngine says why, in the engine's own words, and
    // keeps nothing of it.
    nodes.create_replicas("vol", 32 * MIB, &[0]).unwrap();
    let info = nodes.block_on(manager.node_info()).unwrap();
    assert_eq!(info.allocated_bytes, 32 * MIB);
    let mut wrong_size = good.clone();
    wrong_size.size = 64 * MIB;
    let e = nodes
        .block_on(manager.start_engine(wrong_size))
        .unwrap_err();
    assert_eq!(code(&e), Some(tonic::Code::FailedPrecondition), "{e}");
    assert!(
        e.to_string().contains("--size 67108864 is larger"),
        "quotes the engine's log: {e}"
    );
    assert!(nodes.block_on(manager.list_engines()).unwrap().is_empty());
    assert!(nodes.nodes[0].recorded().unwrap().is_empty());

    // The right spec starts, here with iSCSI too.
    let mut with_iscsi = good;
    with_iscsi.iscsi = true;
    let status = nodes.start_engine(0, with_iscsi).unwrap();
    assert!(running(&status), "{status:?}");
    assert_eq!(status.iscsi_target, "iqn.2026-11.io.corral:vol");
    let range = nodes.nodes[0].ports.0..=nodes.nodes[0].ports.1;
    let ports = [
        &status.control_address,
        &status.nbd_address,
        &status.iscsi_address,
    ]
    .map(|a| port_of(a));
    assert!(ports.iter().all(|p| range.contains(p)), "{status:?}");
    assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    std::net::TcpStream::connect(status.iscsi_address.as_str()).expect("the iSCSI portal answers");
    nodes.block_on(manager.stop_engine("vol")).unwrap();
    assert!(!alive(status.pid));
}

#[test]
fn bad_arguments_get_a_one_line_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    for (bad, says) in [
        (vec!["--engine-ports", "2000-1000"], "--engine-ports"),
        (vec!["--engine-ports", "ten-twenty"], "--engine-ports"),
        (vec!["--engine-args", "--listen 127.0.0.1:1"], "--listen"),
        (
            vec!["--frontend-address", "not-an-ip"],
            "--frontend-address",
        ),
    ] {
        let mut args = vec![
            "node",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--node-id",
            "n",
        ];
        args.extend(bad.iter().copied());
        let out = run_bounded(
            std::process::Command::new(corral_tests::corral_bin()).args(&args),
            Duration::from_secs(30),
        )
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(says), "{bad:?}: {stderr}");
    }
}

#[test]
fn replica_changes_made_through_the_daemon_survive_an_engine_restart() {
    let nodes = NodeCluster::start(3).unwrap();
    nodes.create_replicas("chg", SIZE, &[0, 1, 2]).unwrap();
    let first = nodes
        .start_engine(0, nodes.spec("chg", SIZE, &[0, 1]))
        .unwrap();
    let data = random(MIB as usize, 7);
    write_flushed(&first, 0, &data);

    // The controller's stale-replica replacement adds a replica through
    // the daemon (the engine's control port is the node's own).
    let manager = nodes.manager(0).unwrap();
    let third = nodes.nodes[2].addr.to_string();
    nodes
        .block_on(manager.add_engine_replica("chg", &third))
        .unwrap();
    let all_rw = |replicas: &[pb::ReplicaStatus]| {
        replicas.len() == 3
            && replicas
                .iter()
                .all(|r| r.mode == pb::ReplicaMode::Rw as i32)
    };
    wait_until(WAIT, "the added replica to be rebuilt", || {
        nodes
            .block_on(manager.engine_replicas("chg"))
            .is_ok_and(|r| all_rw(&r))
    })
    .unwrap();

    // The engine dies; the daemon starts it again with the new replica set.
    kill9(first.pid).unwrap();
    let second = nodes
        .wait_engine(0, "chg", WAIT, "the engine restarted", |s| {
            running(s) && s.pid != first.pid
        })
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", second.pid)).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--replica" && w[1] == third),
        "the restarted engine is not given {third}: {args:?}"
    );
    wait_until(WAIT, "three RW replicas after the restart", || {
        nodes
            .block_on(manager.engine_replicas("chg"))
            .is_ok_and(|r| all_rw(&r))
    })
    .unwrap();
    assert!(read(&second, 0, data.len()) == data, "data reads back");

    // Removing one is relayed too, and an unknown volume is NOT_FOUND.
    nodes
        .block_on(manager.remove_engine_replica("chg", &third))
        .unwrap();
    let left = nodes.block_on(manager.engine_replicas("chg")).unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    let err = nodes
        .block_on(manager.engine_replicas("nosuch"))
        .unwrap_err();
    assert_eq!(code(&err), Some(tonic::Code::NotFound), "{err}");
}
