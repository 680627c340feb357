//! The server against a hand-written client on a real TCP socket: error
//! replies, misbehaving clients, multiple connections and graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use corral_nbd::ServerConfig;

const MIB: u64 = 1 << 20;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_read_gets_einval_and_the_connection_survives() {
    let srv = TestServer::start(&[("vol0", "", MIB)]).await;
    let (mut c, size, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    assert_eq!(size, MIB);

    c.request(CMD_READ, 0, 7, MIB - 512, 1024, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 7));
    c.request(CMD_READ, 0, 8, u64::MAX - 10, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 8));
    c.request(CMD_WRITE, 0, 9, MIB, 4, b"abcd").await;
    assert_eq!(c.simple_reply().await, (ENOSPC, 9));
    // Unknown command.
    c.request(99, 0, 10, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 10));

    // Still usable: write, read back.
    c.request(CMD_WRITE, 0, 11, 512, 4, b"wxyz").await;
    assert_eq!(c.simple_reply().await, (0, 11));
    c.request(CMD_READ, 0, 12, 512, 4, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 12));
    assert_eq!(c.read_n(4).await, b"wxyz");

    c.request(CMD_DISC, 0, 13, 0, 0, &[]).await;
    assert!(c.expect_closed().await.is_empty());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_read_error_is_an_error_chunk() {
    let srv = TestServer::start(&[("vol0", "", MIB)]).await;
    let (mut c, _, flags) = RawClient::handshake(srv.addr, "vol0", true).await;
    assert_ne!(
        flags & (1 << 7),
        0,
        "SEND_DF advertised with structured replies"
    );
    c.request(CMD_READ, 0, 1, MIB, 512, &[]).await;
    let (cflags, typ, cookie, payload) = c.chunk().await;
    assert_eq!((cflags, typ, cookie), (1, 0x8001, 1));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    // A successful read is one OFFSET_DATA chunk with DONE.
    c.request(CMD_WRITE, 0, 2, 4096, 3, b"abc").await;
    assert_eq!(c.simple_reply().await, (0, 2));
    c.request(CMD_READ, 0, 3, 4096, 3, &[]).await;
    let (cflags, typ, cookie, payload) = c.chunk().await;
    assert_eq!((cflags, typ, cookie), (1, 1, 3));
    assert_eq!(&payload[..8], &4096u64.to_be_bytes());
    assert_eq!(&payload[8..], b"abc");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_drops_only_the_sender() {
    let srv = TestServer::start(&[("vol0", "", MIB)]).await;
    let (mut good, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    let (mut bad, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;

    bad.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await;
    let rest = bad.expect_closed().await;
    assert!(rest.is_empty(), "no reply to garbage: {rest:?}");

    // A client that vanishes in the middle of a write payload.
    let (mut gone, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    gone.request(CMD_WRITE, 0, 1, 0, 4096, &[1u8; 100]).await;
    drop(gone);
    // A client that sends half a header and leaves.
    let mut half = RawClient::connect(srv.addr).await;
    half.send(&[0, 0]).await;
    drop(half);

    good.request(CMD_WRITE, 0, 1, 0, 4, b"good").await;
    assert_eq!(good.simple_reply().await, (0, 1));
    good.request(CMD_FLUSH, 0, 2, 0, 0, &[]).await;
    assert_eq!(good.simple_reply().await, (0, 2));
    good.request(CMD_READ, 0, 3, 0, 4, &[]).await;
    assert_eq!(good.simple_reply().await, (0, 3));
    assert_eq!(good.read_n(4).await, b"good");

    // New clients are still welcome.
    let (mut again, size, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    assert_eq!(size, MIB);
    again.request(CMD_READ, 0, 4, 0, 4, &[]).await;
    assert_eq!(again.simple_reply().await, (0, 4));
    assert_eq!(again.read_n(4).await, b"good");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_gets_einval_then_close() {
    let srv = TestServer::start(&[("vol0", "", MIB)]).await;
    let (mut c, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    c.request(CMD_WRITE, 0, 5, 0, 64 << 20, &[0u8; 64]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 5));
    c.expect_closed().await;
    // An oversized read is refused without closing.
    let (mut c, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    c.request(CMD_READ, 0, 6, 0, (32 << 20) + 1, &[]).await;
    assert_eq!(c.simple_reply().await, (EINVAL, 6));
    c.request(CMD_READ, 0, 7, 0, 1, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 7));
    c.read_n(1).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_abort_and_unknown_export() {
    let srv = TestServer::start(&[("vol0", "", MIB), ("vol1", "", 2 * MIB)]).await;

    // Old-style selection; NO_ZEROES negotiated so 10 bytes come back.
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    c.option(OPT_EXPORT_NAME, b"vol1").await;
    let r = c.read_n(10).await;
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 2 * MIB);
    c.request(CMD_READ, 0, 1, 2 * MIB - 512, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 1));
    assert_eq!(c.read_n(512).await, vec![0u8; 512]);

    // EXPORT_NAME for an unknown export: the server hangs up.
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    c.option(OPT_EXPORT_NAME, b"missing").await;
    assert!(c.expect_closed().await.is_empty());

    // ABORT: an ACK, then close.
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(1).await;
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await, (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.expect_closed().await.is_empty());

    // Unknown client flags: dropped without a word.
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(0x80).await;
    assert!(c.expect_closed().await.is_empty());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshake_times_out() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&[("vol0", "", MIB)], config).await;
    let mut c = RawClient::connect(srv.addr).await;
    // Say nothing; the server gives up.
    c.expect_closed().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let srv = TestServer::start(&[("vol0", "", 4 * MIB)]).await;
    let addr = srv.addr;
    let (mut c, _, _) = RawClient::handshake(addr, "vol0", false).await;
    let (mut idle, _, _) = RawClient::handshake(addr, "vol0", false).await;
    let mut in_handshake = RawClient::connect(addr).await;

    // Pipeline 32 writes of 64 KiB, then shut down while they are in flight.
    let mut burst = Vec::new();
    for i in 0..32u64 {
        let payload = vec![i as u8; 64 << 10];
        let mut m = Vec::new();
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&i.to_be_bytes());
        m.extend_from_slice(&(i * (64 << 10)).to_be_bytes());
        m.extend_from_slice(&((64u32) << 10).to_be_bytes());
        m.extend_from_slice(&payload);
        burst.extend(m);
    }
    c.send(&burst).await;
    // Wait for the first reply so the server is surely in transmission.
    let (err, _) = c.simple_reply().await;
    assert_eq!(err, 0);

    let path = srv.paths[0].clone();
    let _dir = srv.shutdown().await;

    // The remaining replies all arrived (the writes that were read before
    // shutdown), then the connection closed.
    let rest = c.expect_closed().await;
    assert_eq!(rest.len() % 16, 0, "only whole replies");
    for r in rest.chunks(16) {
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &[0, 0, 0, 0]);
    }
    let acked = 1 + rest.len() / 16;
    // Every acknowledged write is on disk.
    let disk = std::fs::read(&path).unwrap();
    let mut on_disk = 0;
    for i in 0..32usize {
        let block = &disk[i * (64 << 10)..(i + 1) * (64 << 10)];
        if block.iter().all(|&b| b == i as u8) {
            on_disk += 1;
        }
    }
    assert!(on_disk >= acked, "acked {acked}, on disk {on_disk}");

    idle.expect_closed().await;
    in_handshake.expect_closed().await;
    // Nobody listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
