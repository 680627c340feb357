//! The iSCSI target's bounds against hostile or broken initiators (issue
//! 14), one test per bound, each over real sockets on 127.0.0.1 with the
//! bound made small through [`ServerConfig`], driven by a minimal raw
//! initiator written here:
//!
//! | bound | default | test |
//! | --- | --- | --- |
//! | `max_connections` | 256 | `connections_beyond_max_connections_wait_until_one_closes` |
//! | `login_timeout` | 30 s | `an_initiator_that_never_logs_in_is_dropped_and_frees_its_slot` |
//! | `nop_interval` + `nop_timeout` | 15 s + 15 s | `an_initiator_that_ignores_nop_in_is_dropped` |
//! | `Limits::max_recv_data_segment` (MaxRecvDataSegmentLength) | 256 KiB | `a_data_segment_over_max_recv_data_segment_length_is_refused` |
//! | `Limits::command_window` (MaxCmdSN) | 128 | `commands_beyond_max_cmd_sn_are_not_queued` |
//!
//! Waits are bounded ([`t`], [`STEP`]); timing is asserted only as "within
//! a generous limit".

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral_block::accept::Shutdown;
use corral_block::{BlockDevice, BlockResult, check_range};
use corral_iscsi::{IscsiError, IscsiServer, IscsiTarget, Limits, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bound on any single network step in a test.
const STEP: Duration = Duration::from_secs(10);

/// Await `f`, failing the test if it takes longer than [`STEP`].
async fn t<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

// Opcodes (RFC 7143 §11).
const NOP_OUT: u8 = 0x00;
const SCSI_COMMAND: u8 = 0x01;
const LOGIN_REQUEST: u8 = 0x03;
const DATA_OUT: u8 = 0x05;
const NOP_IN: u8 = 0x20;
const SCSI_RESPONSE: u8 = 0x21;
const LOGIN_RESPONSE: u8 = 0x23;
const DATA_IN: u8 = 0x25;
const R2T: u8 = 0x31;
const REJECT: u8 = 0x3f;
const IMMEDIATE: u8 = 0x40;
const RESERVED_TAG: u32 = 0xffff_ffff;

/// A device that counts the reads and writes it is asked for and holds
/// them until its gate opens; it keeps no data (reads return zeroes).
struct Gated {
    size: u64,
    entered: AtomicUsize,
    open: watch::Sender<bool>,
}

impl Gated {
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

/// A target "vol0" over a [`Gated`] device of 16 MiB.
struct TestTarget {
    addr: SocketAddr,
    dev: Arc<Gated>,
    stop: Shutdown,
    handle: JoinHandle<Result<(), IscsiError>>,
}

impl TestTarget {
    async fn start(open: bool, config: ServerConfig) -> TestTarget {
        let dev = Arc::new(Gated {
            size: 16 << 20,
            entered: AtomicUsize::new(0),
            open: watch::Sender::new(open),
        });
        let target = Arc::new(IscsiTarget::for_volume("vol0", Arc::clone(&dev)));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stop = Shutdown::new();
        let server = IscsiServer::new(vec![target]).with_config(config);
        let handle = tokio::spawn(server.run(listener, stop.clone()));
        TestTarget {
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

/// A basic header segment with `opcode` and `flags`.
fn bhs(opcode: u8, flags: u8) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = opcode;
    b[1] = flags;
    b
}

fn put32(b: &mut [u8; 48], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn get32(b: &[u8; 48], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// A PDU on the wire: the header with its data segment length, the data,
/// padding.
fn with_data(mut header: [u8; 48], data: &[u8]) -> Vec<u8> {
    header[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    let mut v = header.to_vec();
    v.extend_from_slice(data);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

/// A minimal initiator.
struct Initiator {
    s: TcpStream,
    /// CmdSN of the next command.
    cmd_sn: u32,
    /// ITT of the last task.
    itt: u32,
    /// MaxCmdSN of the login response.
    max_cmd_sn: u32,
}

/// The login request of a normal session to "vol0" straight into the full
/// feature phase.
fn login_request(isid_tail: u8) -> Vec<u8> {
    let mut h = bhs(IMMEDIATE | LOGIN_REQUEST, 0x80 | (1 << 2) | 3);
    h[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, isid_tail]);
    put32(&mut h, 16, 1);
    let keys = "InitiatorName=iqn.2026-11.test:limits\0SessionType=Normal\0\
                TargetName=iqn.2026-11.io.corral:vol0\0HeaderDigest=None\0\
                DataDigest=None\0MaxRecvDataSegmentLength=65536\0";
    with_data(h, keys.as_bytes())
}

impl Initiator {
    async fn connect(addr: SocketAddr) -> Initiator {
        let s = t(TcpStream::connect(addr)).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Initiator {
            s,
            cmd_sn: 0,
            itt: 0x100,
            max_cmd_sn: 0,
        }
    }

    async fn login(addr: SocketAddr, isid_tail: u8) -> Initiator {
        let mut me = Initiator::connect(addr).await;
        me.send(&login_request(isid_tail)).await;
        me.login_response().await;
        me.ready().await;
        me
    }

    /// TEST UNIT READY, taking the unit attention a new nexus gets (power
    /// on); notes the MaxCmdSN it is answered with.
    async fn ready(&mut self) {
        let itt = self.command(&[0u8; 6], 0, 0, &[], false).await;
        self.max_cmd_sn = self.status(itt).await.1;
    }

    /// Read the login response and check it succeeded.
    async fn login_response(&mut self) {
        let (resp, _) = self.read_pdu().await;
        assert_eq!(resp[0] & 0x3f, LOGIN_RESPONSE, "login response");
        assert_eq!((resp[36], resp[37]), (0, 0), "login status");
        assert_eq!(resp[1] & 0x83, 0x83, "full feature phase");
        self.cmd_sn = get32(&resp, 28);
        self.max_cmd_sn = get32(&resp, 32);
    }

    async fn send(&mut self, bytes: &[u8]) {
        t(self.s.write_all(bytes)).await.expect("write");
    }

    async fn read_pdu(&mut self) -> ([u8; 48], Vec<u8>) {
        self.try_read_pdu(STEP)
            .await
            .expect("a PDU in time")
            .expect("read a PDU")
    }

    /// The next PDU, or `None` if none comes within `wait`.
    async fn try_read_pdu(
        &mut self,
        wait: Duration,
    ) -> Option<std::io::Result<([u8; 48], Vec<u8>)>> {
        let mut h = [0u8; 48];
        match tokio::time::timeout(wait, self.s.read_exact(&mut h)).await {
            Err(_) => return None,
            Ok(Err(e)) => return Some(Err(e)),
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut data = vec![0u8; (len + 3) & !3];
        if let Err(e) = t(self.s.read_exact(&mut data)).await {
            return Some(Err(e));
        }
        data.truncate(len);
        Some(Ok((h, data)))
    }

    /// A SCSI command on LUN 0 (CmdSN from `self`, advanced unless
    /// `immediate`): `data` goes as immediate data. Returns its ITT.
    async fn command(
        &mut self,
        cdb: &[u8],
        flags: u8,
        edtl: u32,
        data: &[u8],
        immediate: bool,
    ) -> u32 {
        let opcode = if immediate {
            IMMEDIATE | SCSI_COMMAND
        } else {
            SCSI_COMMAND
        };
        let mut h = bhs(opcode, 0x80 | flags | 0x01);
        self.itt += 1;
        put32(&mut h, 16, self.itt);
        put32(&mut h, 20, edtl);
        put32(&mut h, 24, self.cmd_sn);
        if !immediate {
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
        }
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.send(&with_data(h, data)).await;
        self.itt
    }

    /// READ(10) of `blocks` blocks of 512 at `lba`.
    async fn read10(&mut self, lba: u32, blocks: u16) -> u32 {
        let cdb = cdb10(0x28, lba, blocks);
        self.command(&cdb, 0x40, u32::from(blocks) * 512, &[], false)
            .await
    }

    /// The status of the command with `itt`: skips NOP-In pings and takes
    /// Data-In with the status bit or a SCSI Response. Returns (status,
    /// MaxCmdSN).
    async fn status(&mut self, itt: u32) -> (u8, u32) {
        loop {
            let (h, _) = self.read_pdu().await;
            match h[0] & 0x3f {
                DATA_IN if h[1] & 0x01 != 0 && get32(&h, 16) == itt => {
                    return (h[3], get32(&h, 32));
                }
                SCSI_RESPONSE if get32(&h, 16) == itt => return (h[3], get32(&h, 32)),
                DATA_IN | NOP_IN => continue,
                other => panic!("unexpected PDU {other:#04x} waiting for task {itt:#x}"),
            }
        }
    }

    /// Is the connection closed by the target (EOF or reset) within
    /// [`STEP`]? PDUs sent before the close are skipped.
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        t(async {
            loop {
                match self.s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        })
        .await
    }
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
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
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let srv = TestTarget::start(true, config).await;
    let mut a = Initiator::login(srv.addr, 1).await;

    // The second connects (the listen backlog takes it) but its login is
    // not answered while the first is served.
    let mut b = Initiator::connect(srv.addr).await;
    b.send(&login_request(2)).await;
    assert!(
        !speaks_within(&mut b.s, Duration::from_millis(500)).await,
        "a second initiator was served with max_connections = 1"
    );
    let itt = a.read10(0, 1).await;
    assert_eq!(a.status(itt).await.0, 0);

    // The first leaves: the second is logged in and served.
    drop(a);
    b.login_response().await;
    b.ready().await;
    let itt = b.read10(0, 1).await;
    assert_eq!(b.status(itt).await.0, 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_that_never_logs_in_is_dropped_and_frees_its_slot() {
    let config = ServerConfig {
        max_connections: 1,
        login_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestTarget::start(true, config).await;
    // Half a login PDU header, then silence.
    let mut stuck = Initiator::connect(srv.addr).await;
    stuck.send(&login_request(1)[..20]).await;
    // Another initiator waits for the slot.
    let mut next = Initiator::connect(srv.addr).await;
    next.send(&login_request(2)).await;

    assert!(stuck.closed().await, "a stalled login was not dropped");
    // Its slot is given back: the waiting initiator logs in.
    next.login_response().await;
    next.ready().await;
    let itt = next.read10(0, 1).await;
    assert_eq!(next.status(itt).await.0, 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_that_ignores_nop_in_is_dropped() {
    let config = ServerConfig {
        nop_interval: Duration::from_millis(200),
        nop_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = TestTarget::start(true, config).await;
    let mut silent = Initiator::login(srv.addr, 1).await;
    let mut polite = Initiator::login(srv.addr, 2).await;

    // The polite one answers every ping for several rounds of interval +
    // timeout, and stays.
    let polite = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut pings = 0;
        while tokio::time::Instant::now() < until {
            let Some(r) = polite.try_read_pdu(Duration::from_millis(100)).await else {
                continue;
            };
            let (h, _) = r.expect("the polite initiator's connection failed");
            assert_eq!(h[0] & 0x3f, NOP_IN);
            pings += 1;
            let mut answer = bhs(IMMEDIATE | NOP_OUT, 0x80);
            answer[8..16].copy_from_slice(&h[8..16]);
            put32(&mut answer, 16, RESERVED_TAG);
            put32(&mut answer, 20, get32(&h, 20));
            put32(&mut answer, 24, polite.cmd_sn);
            put32(&mut answer, 28, get32(&h, 24));
            polite.send(&answer).await;
        }
        assert!(pings >= 2, "only {pings} pings in 1.5 s");
        polite
    });

    // The silent one is pinged, does not answer, and is dropped.
    let (ping, _) = silent.read_pdu().await;
    assert_eq!(ping[0] & 0x3f, NOP_IN);
    assert_eq!(get32(&ping, 16), RESERVED_TAG, "a ping of the target's own");
    assert_ne!(
        get32(&ping, 20),
        RESERVED_TAG,
        "a ping that wants an answer"
    );
    assert!(
        silent.closed().await,
        "an initiator that never answered was kept"
    );

    let mut polite = t(polite).await.expect("the polite initiator");
    let itt = polite.read10(0, 1).await;
    assert_eq!(polite.status(itt).await.0, 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_segment_over_max_recv_data_segment_length_is_refused() {
    const MRDSL: u32 = 8192;
    let config = ServerConfig {
        limits: Limits {
            max_recv_data_segment: MRDSL,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let srv = TestTarget::start(true, config).await;
    let mut good = Initiator::login(srv.addr, 1).await;
    let mut bad = Initiator::login(srv.addr, 2).await;

    // A write whose immediate data is exactly the limit is taken.
    let cdb = cdb10(0x2a, 0, (MRDSL / 512) as u16);
    let itt = good
        .command(&cdb, 0x20, MRDSL, &vec![5u8; MRDSL as usize], false)
        .await;
    assert_eq!(good.status(itt).await.0, 0);

    // One over it: Reject (protocol error), then the target hangs up.
    let cdb = cdb10(0x2a, 0, (MRDSL / 512) as u16 + 1);
    bad.command(
        &cdb,
        0x20,
        MRDSL + 512,
        &vec![6u8; MRDSL as usize + 4],
        false,
    )
    .await;
    let (reject, data) = bad.read_pdu().await;
    assert_eq!(reject[0] & 0x3f, REJECT);
    assert_eq!(reject[2], 0x04, "reason: protocol error");
    assert_eq!(
        data[0] & 0x3f,
        SCSI_COMMAND,
        "the offending header comes back"
    );
    assert!(bad.closed().await, "the connection stayed open");

    // The other session goes on.
    let itt = good.read10(0, 16).await;
    assert_eq!(good.status(itt).await.0, 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_max_cmd_sn_are_not_queued() {
    const WINDOW: u32 = 4;
    const N: u32 = 64;
    const LEN: u32 = 64 << 10;
    let config = ServerConfig {
        limits: Limits {
            command_window: WINDOW,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    // The device holds every command until released.
    let srv = TestTarget::start(false, config).await;
    let mut c = Initiator::login(srv.addr, 1).await;
    let first = c.cmd_sn;
    assert_eq!(
        c.max_cmd_sn,
        first + WINDOW - 1,
        "MaxCmdSN with nothing running"
    );

    // N writes that wait for R2T, numbered on past MaxCmdSN. Only those in
    // the window are taken (each holds a slot while it collects its data);
    // the rest are ignored (RFC 7143 §3.2.2.1), not queued.
    let cdb = cdb10(0x2a, 0, (LEN / 512) as u16);
    let mut burst = Vec::new();
    let mut itts = Vec::new();
    for _ in 0..N {
        let mut h = bhs(SCSI_COMMAND, 0x80 | 0x20 | 0x01);
        c.itt += 1;
        itts.push(c.itt);
        put32(&mut h, 16, c.itt);
        put32(&mut h, 20, LEN);
        put32(&mut h, 24, c.cmd_sn);
        c.cmd_sn += 1;
        h[32..42].copy_from_slice(&cdb);
        burst.extend(with_data(h, &[]));
    }
    c.send(&burst).await;
    let mut r2ts = Vec::new();
    while let Some(r) = c.try_read_pdu(Duration::from_millis(500)).await {
        let (h, _) = r.expect("read");
        assert_eq!(h[0] & 0x3f, R2T, "only R2Ts");
        assert!(
            get32(&h, 32).wrapping_sub(first) < WINDOW,
            "MaxCmdSN {} beyond the window",
            get32(&h, 32)
        );
        r2ts.push(h);
    }
    let solicited: Vec<u32> = r2ts.iter().map(|h| get32(h, 16)).collect();
    assert_eq!(
        solicited,
        itts[..WINDOW as usize],
        "R2Ts for the commands in the window only"
    );

    // An immediate command while the window is full: rejected.
    c.command(&cdb, 0x20, LEN, &[], true).await;
    let (h, _) = c.read_pdu().await;
    assert_eq!(h[0] & 0x3f, REJECT);
    assert_eq!(h[2], 0x06, "reason: immediate command reject");

    // The data for the writes in the window: they run (and wait in the
    // device); once released they are answered and the window moves on.
    for r in &r2ts {
        let mut d = bhs(DATA_OUT, 0x80);
        d[8..16].copy_from_slice(&r[8..16]);
        d[16..24].copy_from_slice(&r[16..24]);
        put32(&mut d, 40, get32(r, 40));
        assert_eq!(get32(r, 44), LEN);
        c.send(&with_data(d, &vec![9u8; LEN as usize])).await;
    }
    let dev = Arc::clone(&srv.dev);
    t(async {
        while dev.entered() < WINDOW as usize {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    srv.dev.release();
    let mut answered = Vec::new();
    let mut max_cmd_sn = first;
    while answered.len() < WINDOW as usize {
        let (h, _) = c.read_pdu().await;
        assert_eq!(h[0] & 0x3f, SCSI_RESPONSE, "only the writes' responses");
        assert_eq!(h[3], 0, "write status");
        answered.push(get32(&h, 16));
        if get32(&h, 32).wrapping_sub(max_cmd_sn) < 0x8000_0000 {
            max_cmd_sn = get32(&h, 32);
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, itts[..WINDOW as usize]);
    // ExpCmdSN is the first ignored command's: the initiator resends from
    // there.
    assert_eq!(
        max_cmd_sn,
        first + 2 * WINDOW - 1,
        "MaxCmdSN after the window drained"
    );
    c.cmd_sn = first + WINDOW;
    let itt = c.read10(0, 1).await;
    assert_eq!(c.status(itt).await.0, 0);
    assert_eq!(srv.dev.entered(), WINDOW as usize + 1);
    srv.shutdown().await;
}
