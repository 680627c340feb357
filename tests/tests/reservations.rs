//! Stories about SCSI persistent reservations that must outlive the engine:
//! two initiators register and one reserves through an engine's iSCSI
//! target; the engine restarts, then dies and a second engine takes the
//! volume over; each time PERSISTENT RESERVE IN reports the same keys,
//! generation and reservation, and the reservation still keeps the other
//! initiator from writing.

mod iscsi_common;

use std::net::SocketAddr;

use corral_tests::{Cluster, EngineSpec};
use iscsi_common::RawInitiator;

const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;

const VOLUME: &str = "pr";
const HOST_A: &str = "iqn.2026-11.test:host-a";
const HOST_B: &str = "iqn.2026-11.test:host-b";
const KEY_A: u64 = 0xa11ce;
const KEY_B: u64 = 0xb0b;
/// PERSISTENT RESERVE OUT type WRITE EXCLUSIVE – REGISTRANTS ONLY would let
/// B write; plain WRITE EXCLUSIVE keeps everyone but the holder out.
const WRITE_EXCLUSIVE: u8 = 1;

fn pr_out(i: &mut RawInitiator, action: u8, kind: u8, key: u64, sa_key: u64) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = action;
    cdb[2] = kind;
    cdb[8] = 24;
    let mut params = [0u8; 24];
    params[0..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    i.command(&cdb, &params, 0).0
}

/// What PERSISTENT RESERVE IN reports.
#[derive(Debug, PartialEq, Eq)]
struct PrView {
    generation: u32,
    keys: Vec<u64>,
    /// (holder's key, type), if reserved.
    reservation: Option<(u64, u8)>,
}

fn pr_in(i: &mut RawInitiator, action: u8) -> Vec<u8> {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5e;
    cdb[1] = action;
    cdb[7..9].copy_from_slice(&1024u16.to_be_bytes());
    let (status, data) = i.command(&cdb, &[], 1024);
    assert_eq!(status, GOOD, "PERSISTENT RESERVE IN");
    data
}

fn view(i: &mut RawInitiator) -> PrView {
    let keys = pr_in(i, 0); // READ KEYS
    let reservation = pr_in(i, 1); // READ RESERVATION
    let be32 = |b: &[u8]| u32::from_be_bytes(b[0..4].try_into().unwrap());
    let be64 = |b: &[u8]| u64::from_be_bytes(b[0..8].try_into().unwrap());
    let n = be32(&keys[4..]) as usize;
    PrView {
        generation: be32(&keys),
        keys: keys[8..8 + n].chunks_exact(8).map(be64).collect(),
        reservation: (be32(&reservation[4..]) >= 16)
            .then(|| (be64(&reservation[8..]), reservation[21] & 0x0f)),
    }
}

/// Log in as `host`; the first command of a new session meets the power-on
/// unit attention, which TEST UNIT READY takes.
fn log_in(portal: SocketAddr, host: &str, isid: u8) -> RawInitiator {
    let mut i = RawInitiator::login_as(portal, VOLUME, host, isid);
    let tur = [0u8; 6];
    let (status, _) = i.command(&tur, &[], 0);
    assert!(
        status == 0x02 || status == GOOD,
        "TEST UNIT READY: {status:#x}"
    );
    i
}

/// WRITE(10) of one block at LBA 0.
fn write_block(i: &mut RawInitiator) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 1;
    i.command(&cdb, &[0x5a; 512], 0).0
}

fn expect_as_reserved(portal: SocketAddr, before: &PrView, when: &str) {
    let mut a = log_in(portal, HOST_A, 1);
    let mut b = log_in(portal, HOST_B, 2);
    assert_eq!(
        &view(&mut b),
        before,
        "{when}: what PERSISTENT RESERVE IN reports"
    );
    assert_eq!(
        write_block(&mut b),
        RESERVATION_CONFLICT,
        "{when}: B is kept out"
    );
    assert_eq!(write_block(&mut a), GOOD, "{when}: the holder writes");
}

#[test]
fn reservations_survive_an_engine_restart_and_a_failover_to_another_engine() {
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let spec = EngineSpec::new(VOLUME, "64MiB", &[0, 1, 2]);
    let first = cluster.start_engine(&spec).unwrap();
    let portal = cluster.engines[first].iscsi;

    // Two hosts register; A takes a WRITE EXCLUSIVE reservation.
    let mut a = log_in(portal, HOST_A, 1);
    let mut b = log_in(portal, HOST_B, 2);
    assert_eq!(pr_out(&mut a, 0, 0, 0, KEY_A), GOOD, "A registers");
    assert_eq!(pr_out(&mut b, 0, 0, 0, KEY_B), GOOD, "B registers");
    assert_eq!(
        pr_out(&mut a, 1, WRITE_EXCLUSIVE, KEY_A, 0),
        GOOD,
        "A reserves"
    );
    assert_eq!(write_block(&mut b), RESERVATION_CONFLICT);
    let before = view(&mut a);
    assert_eq!(before.keys, vec![KEY_A, KEY_B]);
    assert_eq!(before.reservation, Some((KEY_A, WRITE_EXCLUSIVE)));
    drop((a, b));

    // The engine restarts (SIGTERM, then the same command line).
    cluster.engines[first]
        .process
        .terminate(std::time::Duration::from_secs(20))
        .unwrap();
    cluster.restart_engine(first).unwrap();
    expect_as_reserved(portal, &before, "after a restart");

    // The engine dies; another engine, with its own portal, takes over.
    cluster.engines[first].process.kill9().unwrap();
    let second = cluster.start_engine(&spec).unwrap();
    let portal = cluster.engines[second].iscsi;
    expect_as_reserved(portal, &before, "after a failover");

    // Changes made through the second engine are kept as well: B preempts
    // A's registration and reservation, and a third engine sees that.
    let mut b = log_in(portal, HOST_B, 2);
    assert_eq!(
        pr_out(&mut b, 4, WRITE_EXCLUSIVE, KEY_B, KEY_A),
        GOOD,
        "B preempts A"
    );
    let after = view(&mut b);
    assert_eq!(after.keys, vec![KEY_B]);
    assert_eq!(after.reservation, Some((KEY_B, WRITE_EXCLUSIVE)));
    drop(b);
    cluster.engines[second].process.kill9().unwrap();
    let third = cluster.start_engine(&spec).unwrap();
    let mut b = log_in(cluster.engines[third].iscsi, HOST_B, 2);
    assert_eq!(view(&mut b), after, "after a second failover");
}
