//! The NBD server's bounds against hostile or broken clients (issue 14),
//! one test per bound, each over real sockets on 127.0.0.1 with the bound
//! made small through [`ServerConfig`]:
//!
//! | bound | default | test |
//! | --- | --- | --- |
//! | `max_connections` | 256 | `connections_beyond_max_connections_wait_until_one_closes` |
//! | `handshake_timeout` | 30 s | `slow_handshake_times_out` (raw_client.rs: a silent client), `a_client_stuck_mid_handshake_is_dropped_and_frees_its_slot` |
//! | `max_in_flight` | 128 | `requests_in_flight_are_bounded_by_max_in_flight` (device stuck), `a_client_that_never_reads_replies_stops_the_server_reading` (replies not read) |
//! | `max_in_flight_bytes` | 64 MiB, never below the 32 MiB payload cap | `write_payload_in_flight_is_bounded_by_max_in_flight_bytes` |
//! | payload cap | 32 MiB | `an_oversized_request_is_refused_without_affecting_another_connection` |
//!
//! Waits are bounded ([`t`], [`STEP`]); timing is asserted only as "within
//! a generous limit".

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use corral_block::accept::Shutdown;
use corral_block::{BlockDevice, BlockResult, check_range};
use corral_nbd::{Exports, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const EINVAL: u32 = 22;

/// A device that counts the reads and writes it is asked for and holds
/// them until its gate opens; it keeps no data (reads return zeroes), so
/// that many requests cost little.
struct Gated {
    size: u64,
    entered: AtomicUsize,
    open: watch::Sender<bool>,
}

impl Gated {
    fn new(size: u64, open: bool) -> Gated {
        Gated {
            size,
            entered: AtomicUsize::new(0),
            open: watch::Sender::new(open),
        }
    }

    fn entered(&self) -> usize {
        self.entered.load(Ordering::SeqCst)
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        512
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.size)?;
        self.pass().await;
        Ok(Bytes::from(vec![0u8; len as usize]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BlockResult<()> {
        check_range(offset, data.len() as u64, self.size)?;
        self.pass().await;
        Ok(())
    }
    async fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size)
    }
    async fn load_reservations(&self) -> BlockResult<Option<Bytes>> {
        Ok(None)
    }
    async fn save_reservations(&self, _state: Bytes) -> BlockResult<()> {
        Ok(())
    }
}

/// A server of one export "vol0" over a [`Gated`] device.
struct GatedServer {
    addr: std::net::SocketAddr,
    dev: Arc<Gated>,
    stop: Shutdown,
    handle: JoinHandle<Result<(), corral_nbd::NbdError>>,
}

impl GatedServer {
    async fn start(size: u64, open: bool, config: ServerConfig) -> GatedServer {
        init_logs();
        let dev = Arc::new(Gated::new(size, open));
        let exports = Exports::single("vol0", Arc::clone(&dev));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stop = Shutdown::new();
        let server = NbdServer::new(Arc::new(exports)).with_config(config);
        let handle = tokio::spawn(server.run(listener, stop.clone()));
        GatedServer {
            addr,
            dev,
            stop,
            handle,
        }
    }

    async fn shutdown(self) {
        self.dev.release();
        self.stop.cancel();
        t(self.handle)
            .await
            .expect("server task panicked")
            .expect("server returned an error");
    }
}

/// One NBD request on the wire.
fn request(cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(28 + payload.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Poll `value` until it has not changed for `quiet`; returns it.
/// Bounded by [`STEP`].
async fn settled(value: impl Fn() -> usize, quiet: Duration) -> usize {
    t(async {
        let mut last = value();
        loop {
            tokio::time::sleep(quiet).await;
            let now = value();
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
}

/// Wait (bounded) until `cond` holds.
async fn until(cond: impl Fn() -> bool) {
    t(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Bytes arrive on `s` within `wait`?
async fn speaks_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, s.peek(&mut b)).await {
        Err(_) => false,
        Ok(r) => r.expect("peek") > 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    init_logs();
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&[("vol0", "", MIB)], config).await;
    let (a, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    let (mut b, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;

    // The third connects (the listen backlog takes it) but is not served:
    // no greeting.
    let mut c = t(TcpStream::connect(srv.addr)).await.expect("connect");
    assert!(
        !speaks_within(&mut c, Duration::from_millis(500)).await,
        "a third client was served with max_connections = 2"
    );
    // The two served clients work meanwhile.
    b.request(CMD_WRITE, 0, 1, 0, 4, b"full").await;
    assert_eq!(b.simple_reply().await, (0, 1));

    // One leaves: the waiting client gets its greeting and is served.
    drop(a);
    assert!(
        speaks_within(&mut c, STEP).await,
        "the waiting client was not served after a slot freed"
    );
    let mut c = RawClient { s: c };
    let g = c.read_n(18).await;
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    c.flags(3).await;
    c.go("vol0", false).await;
    c.request(CMD_READ, 0, 2, 0, 4, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 2));
    assert_eq!(c.read_n(4).await, b"full");
    srv.shutdown().await;
}

/// A silent client is `slow_handshake_times_out` (raw_client.rs); this one
/// starts the handshake and stalls in the middle of an option, holding the
/// only connection slot, which the timeout gives back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_mid_handshake_is_dropped_and_frees_its_slot() {
    init_logs();
    let config = ServerConfig {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&[("vol0", "", MIB)], config).await;
    let mut stuck = RawClient::connect(srv.addr).await;
    stuck.flags(3).await;
    // Half an option header: IHAVEOPT and the option, no length.
    let mut half = IHAVEOPT.to_be_bytes().to_vec();
    half.extend_from_slice(&OPT_GO.to_be_bytes());
    stuck.send(&half).await;

    // A second client waits for the slot...
    let mut next = t(TcpStream::connect(srv.addr)).await.expect("connect");
    // ...which the stuck one loses within a generous limit.
    let rest = stuck.expect_closed().await;
    assert!(rest.is_empty(), "no reply to half an option: {rest:?}");
    assert!(
        speaks_within(&mut next, STEP).await,
        "the slot of the dropped client was not given back"
    );
    let mut next = RawClient { s: next };
    next.read_n(18).await;
    next.flags(3).await;
    let (size, _) = next.go("vol0", false).await;
    assert_eq!(size, MIB);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_by_max_in_flight() {
    const N: u64 = 64;
    let config = ServerConfig {
        max_in_flight: 4,
        ..ServerConfig::default()
    };
    // The device holds every request until released.
    let srv = GatedServer::start(MIB, false, config).await;
    let (c, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let m = request(CMD_WRITE, i, i * 4096, 4096, &[i as u8; 4096]);
            wr.write_all(&m).await.expect("write");
        }
        wr
    });
    let dev = Arc::clone(&srv.dev);
    until(|| dev.entered() >= 4).await;
    let seen = settled(|| dev.entered(), Duration::from_millis(300)).await;
    assert_eq!(
        seen, 4,
        "requests handed to the device with max_in_flight = 4"
    );

    // Released, every request is served.
    srv.dev.release();
    let mut cookies = Vec::new();
    for _ in 0..N {
        let mut h = [0u8; 16];
        t(rd.read_exact(&mut h)).await.expect("reply");
        assert_eq!(&h[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
        cookies.push(u64::from_be_bytes(h[8..].try_into().unwrap()));
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..N).collect::<Vec<_>>());
    let _wr = t(writer).await.expect("writer");
    assert_eq!(srv.dev.entered(), N as usize);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_payload_in_flight_is_bounded_by_max_in_flight_bytes() {
    // 128 writes of 1 MiB; the budget is raised to the 32 MiB payload cap.
    const N: u64 = 128;
    const LEN: u32 = 1 << 20;
    let config = ServerConfig {
        max_in_flight: 1000,
        max_in_flight_bytes: 1,
        ..ServerConfig::default()
    };
    let srv = GatedServer::start(N * u64::from(LEN), false, config).await;
    let (c, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    let (mut rd, mut wr) = c.s.into_split();
    let writer = tokio::spawn(async move {
        let payload = vec![7u8; LEN as usize];
        for i in 0..N {
            let m = request(CMD_WRITE, i, i * u64::from(LEN), LEN, &payload);
            wr.write_all(&m).await.expect("write");
        }
        wr
    });
    let dev = Arc::clone(&srv.dev);
    until(|| dev.entered() >= 1).await;
    let seen = settled(|| dev.entered(), Duration::from_millis(300)).await;
    assert!(
        (1..=32).contains(&seen),
        "{seen} writes of 1 MiB held at once with a 32 MiB budget"
    );
    // The server stopped reading: the rest (over 90 MiB) cannot all sit in
    // the kernel's socket buffers.
    assert!(
        !writer.is_finished(),
        "the server kept reading while its byte budget was used up"
    );

    srv.dev.release();
    for _ in 0..N {
        let mut h = [0u8; 16];
        t(rd.read_exact(&mut h)).await.expect("reply");
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "write failed");
    }
    let _wr = t(writer).await.expect("writer");
    assert_eq!(srv.dev.entered(), N as usize);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_replies_stops_the_server_reading() {
    // Requests and replies are tiny (29 and 16 bytes), so that the kernel's
    // socket buffers (here up to 4 MiB of replies: some 260 000) hold fewer
    // than N; without the bound on replies not yet written the server would
    // take all N, queueing up to 16 MiB of replies (a million).
    const N: u64 = 1_000_000;
    const SIZE: u64 = 1 << 20;
    let config = ServerConfig {
        max_in_flight: 4,
        ..ServerConfig::default()
    };
    // Writes are served at once; only the client is slow.
    let srv = GatedServer::start(SIZE, true, config).await;
    // A small receive buffer, so that few replies hide on the client's side.
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let s = t(sock.connect(srv.addr)).await.expect("connect");
    let mut c = RawClient { s };
    c.read_n(18).await;
    c.flags(3).await;
    c.go("vol0", false).await;
    let (mut rd, mut wr) = c.s.into_split();
    // Pipeline writes, never reading a reply.
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for i in 0..N {
            batch.extend(request(CMD_WRITE, i, i % SIZE, 1, &[1]));
            if batch.len() >= 64 << 10 || i == N - 1 {
                wr.write_all(&batch).await.expect("write");
                batch.clear();
            }
        }
        wr
    });
    let dev = Arc::clone(&srv.dev);
    until(|| dev.entered() >= 4).await;
    let served = settled(|| dev.entered(), Duration::from_millis(500)).await;
    // The server stopped taking requests once 4 replies waited for the
    // socket; what it served beyond those are the replies the kernel's
    // buffers took.
    assert!(
        served < N as usize / 2,
        "{served} of {N} writes served while no reply was read"
    );
    eprintln!("{served} of {N} writes served without a reply read");

    // Once the client reads, everything is served.
    let mut replies = vec![0u8; 16 * N as usize];
    tokio::time::timeout(4 * STEP, rd.read_exact(&mut replies))
        .await
        .expect("replies in time")
        .expect("replies");
    for r in replies.chunks(16) {
        assert_eq!(&r[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
    }
    let _wr = t(writer).await.expect("writer");
    assert_eq!(srv.dev.entered(), N as usize);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_without_affecting_another_connection() {
    init_logs();
    let srv = TestServer::start(&[("vol0", "", 4 * MIB)]).await;
    let (mut good, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;
    let (mut bad, _, _) = RawClient::handshake(srv.addr, "vol0", false).await;

    // The good client has writes in flight while the other misbehaves.
    let mut burst = Vec::new();
    for i in 0..16u64 {
        burst.extend(request(CMD_WRITE, i, i * 4096, 4096, &[i as u8 + 1; 4096]));
    }
    good.send(&burst).await;

    // A read over the 32 MiB payload cap: EINVAL, the connection stays.
    bad.request(CMD_READ, 0, 100, 0, (32 << 20) + 1, &[]).await;
    assert_eq!(bad.simple_reply().await, (EINVAL, 100));
    bad.request(CMD_READ, 0, 101, 0, 8, &[]).await;
    assert_eq!(bad.simple_reply().await, (0, 101));
    bad.read_n(8).await;
    // A write over the cap: its payload cannot be skipped safely, so EINVAL
    // and the server hangs up (the NBD spec allows either).
    bad.request(CMD_WRITE, 0, 102, 0, 64 << 20, &[0u8; 64])
        .await;
    assert_eq!(bad.simple_reply().await, (EINVAL, 102));
    bad.expect_closed().await;

    // The other connection never noticed.
    let mut cookies = Vec::new();
    for _ in 0..16 {
        let (err, cookie) = good.simple_reply().await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..16).collect::<Vec<_>>());
    good.request(CMD_READ, 0, 50, 5 * 4096, 4096, &[]).await;
    assert_eq!(good.simple_reply().await, (0, 50));
    assert_eq!(good.read_n(4096).await, vec![6u8; 4096]);
    srv.shutdown().await;
}
