//! Shared fixtures for the integration tests: a server over `FileDevice`s on
//! an OS-picked loopback port, a minimal raw NBD client, and a runner for the
//! external tools (which must be installed: a missing tool fails the test).
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use corral_block::FileDevice;
use corral_block::accept::Shutdown;
use corral_nbd::{Exports, NbdError, NbdServer, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Send the server's log to the test's output (shown for failed tests, or
/// with `--nocapture`); `RUST_LOG` filters it (default: `corral_nbd=debug`).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("corral_nbd=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Bound on any single network step in a test.
pub const STEP: Duration = Duration::from_secs(10);

/// Await `f`, failing the test if it takes longer than [`STEP`].
pub async fn t<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub paths: Vec<PathBuf>,
    stop: Shutdown,
    handle: JoinHandle<Result<(), NbdError>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Serve `exports` (name, description, size) from fresh sparse files.
    pub async fn start(exports: &[(&str, &str, u64)]) -> TestServer {
        Self::start_with(exports, ServerConfig::default()).await
    }

    pub async fn start_with(exports: &[(&str, &str, u64)], config: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut set = Exports::new();
        let mut paths = Vec::new();
        for (name, desc, size) in exports {
            let path = dir.path().join(format!("{name}.img"));
            let dev = FileDevice::open(&path, Some(*size), 512).expect("open device");
            set.add(*name, *desc, Arc::new(dev)).expect("add export");
            paths.push(path);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stop = Shutdown::new();
        let server = NbdServer::new(Arc::new(set)).with_config(config);
        let handle = tokio::spawn(server.run(listener, stop.clone()));
        TestServer {
            addr,
            paths,
            stop,
            handle,
            _dir: dir,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Signal shutdown and wait (bounded) for the server to finish. Returns
    /// the directory holding the backing files, which lives as long as it does.
    pub async fn shutdown(self) -> tempfile::TempDir {
        self.stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("server did not shut down in time")
            .expect("server task panicked");
        r.expect("server returned an error");
        self._dir
    }
}

/// Run an external tool with a deadline. A missing tool fails the test.
pub async fn run_tool(program: &str, args: &[&str], deadline: Duration) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(deadline, child).await {
        Err(_) => panic!("{program} {args:?} did not finish within {deadline:?}"),
        Ok(Err(e)) => panic!(
            "cannot run {program}: {e} (install it: libnbd-bin provides nbdinfo/nbdcopy, fio provides fio)"
        ),
        Ok(Ok(out)) => out,
    }
}

/// Like [`run_tool`] but requires exit status 0; returns stdout.
pub async fn run_ok(program: &str, args: &[&str], deadline: Duration) -> String {
    let out = run_tool(program, args, deadline).await;
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write file");
}

// ---- a minimal raw NBD client -------------------------------------------

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

/// A raw client over a socket, or over TLS after `STARTTLS` ([`RawClient::into_tls`]).
pub struct RawClient<S = TcpStream> {
    pub s: S,
}

/// One structured chunk: (flags, type, cookie, payload).
pub type Chunk = (u16, u16, u64, Vec<u8>);

impl RawClient {
    /// Connect and check the greeting.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let s = t(TcpStream::connect(addr)).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut c = RawClient { s };
        let g = c.read_n(18).await;
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        c
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub async fn handshake(
        addr: SocketAddr,
        export: &str,
        structured: bool,
    ) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect(addr).await;
        c.flags(3).await;
        let (size, flags) = c.go(export, structured).await;
        (c, size, flags)
    }

    /// Run the TLS handshake (as a client presenting `tls`'s certificate)
    /// on this socket, after the server acknowledged `STARTTLS`.
    pub async fn into_tls(
        self,
        tls: &corral_tls::ClientTls,
    ) -> std::io::Result<RawClient<tokio_rustls::client::TlsStream<TcpStream>>> {
        let name = tls.server_name_for("127.0.0.1").expect("server name");
        let s = t(tls.connector().connect(name, self.s)).await?;
        Ok(RawClient { s })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        t(self.s.read_exact(&mut v)).await.expect("read");
        v
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        t(self.s.write_all(bytes)).await.expect("write");
    }

    pub async fn flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes()).await;
    }

    pub async fn option(&mut self, code: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m).await;
    }

    /// (option, reply type, data)
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20).await;
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let data = self.read_n(len).await;
        (opt, typ, data)
    }

    /// Negotiate (structured replies if asked) and enter transmission with
    /// NBD_OPT_GO; returns (size, transmission flags).
    pub async fn go(&mut self, export: &str, structured: bool) -> (u64, u16) {
        let c = self;
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(c.option_reply().await.1, REP_ACK);
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &d).await;
        let (mut size, mut flags) = (None, 0);
        loop {
            let (opt, typ, data) = c.option_reply().await;
            assert_eq!(opt, OPT_GO);
            assert!(
                typ < 0x8000_0000,
                "GO failed: {typ:#x} {:?}",
                String::from_utf8_lossy(&data)
            );
            if typ == REP_ACK {
                break;
            }
            if data[..2] == [0, 0] {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
            }
        }
        (size.expect("NBD_INFO_EXPORT was sent"), flags)
    }

    pub async fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.send(&m).await;
    }

    /// (error, cookie) of a simple reply.
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16).await;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub async fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20).await;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (flags, typ, cookie, self.read_n(len).await)
    }

    /// Read until EOF (or reset), bounded; returns the bytes seen.
    pub async fn expect_closed(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(STEP, self.s.read_to_end(&mut rest)).await;
        match r {
            Err(_) => panic!("server did not close the connection"),
            Ok(_) => rest, // EOF or a reset both mean closed
        }
    }
}
