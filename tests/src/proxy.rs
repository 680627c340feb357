//! A TCP proxy for fault injection between an engine and a replica daemon.
//!
//! A [`Proxy`] listens on 127.0.0.1 (a free port) and forwards every
//! connection to its target. What it does with the bytes is its [`Mode`],
//! switchable at run time:
//!
//! - [`Mode::Pass`]: forward both ways;
//! - [`Mode::Delay`]: forward each piece of data that long after it arrived
//!   (latency, in order, throughput unchanged);
//! - [`Mode::BlackHole`]: a network partition. Connections are accepted and
//!   kept, but nothing is forwarded either way; what was sent is held (as TCP
//!   would retransmit it) and delivered in order once the partition heals.
//!   Senders see backpressure once the held data fills the buffers.
//! - [`Mode::Reset`]: close every connection and refuse new ones (they are
//!   accepted and closed at once).
//!
//! A mode can be set for every connection ([`Proxy::set_mode`]) or only for
//! the connections made by one process ([`Proxy::set_mode_for`]). The second
//! is how one proxy per replica serves several engines while a test
//! partitions them differently: every engine names the replica by the same
//! address (so their membership records agree), and the proxy tells the
//! engines apart by which process owns the client end of each connection
//! (`/proc/net/tcp` gives the socket's inode, `/proc/<pid>/fd` its owner,
//! looked up among this process's children when the connection is accepted).
//!
//! Everything is std threads (the tests are synchronous): an accept loop,
//! and per connection one reader and one writer thread per direction with a
//! bounded queue between them. Dropping the proxy closes every connection
//! and joins every thread.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What a proxy does with a connection's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Forward each piece of data this long after it arrived.
    Delay(Duration),
    /// Forward nothing either way, but keep the connections (a partition).
    BlackHole,
    /// Close every connection, refuse new ones.
    Reset,
}

/// Pieces of data queued per direction before the reader stops reading.
const QUEUE_DEPTH: usize = 16;
/// Largest piece read at once.
const PIECE: usize = 64 << 10;
/// How often waiting threads look at the mode again.
const POLL: Duration = Duration::from_millis(10);

struct Rules {
    default: Mode,
    by_pid: HashMap<i32, Mode>,
}

impl Rules {
    fn mode_for(&self, owner: Option<i32>) -> Mode {
        owner
            .and_then(|pid| self.by_pid.get(&pid).copied())
            .unwrap_or(self.default)
    }
}

struct Conn {
    owner: Option<i32>,
    client: TcpStream,
    upstream: TcpStream,
    closed: AtomicBool,
    /// Pump threads still running (4 while the connection is alive).
    live: AtomicUsize,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

struct Inner {
    listen: SocketAddr,
    target: SocketAddr,
    rules: Mutex<Rules>,
    changed: Condvar,
    conns: Mutex<Vec<Arc<Conn>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: AtomicBool,
    /// Pieces of data a black hole holds right now.
    held: AtomicUsize,
}

/// Counts a piece as held by a black hole while it lives.
struct Held<'a>(Option<&'a AtomicUsize>);

impl<'a> Held<'a> {
    fn hold(&mut self, counter: &'a AtomicUsize) {
        if self.0.is_none() {
            counter.fetch_add(1, Ordering::SeqCst);
            self.0 = Some(counter);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn mode_for(&self, owner: Option<i32>) -> Mode {
        lock(&self.rules).mode_for(owner)
    }

    /// Close the connections whose mode is now Reset.
    fn enforce(&self) {
        let rules = lock(&self.rules);
        for c in lock(&self.conns).iter() {
            if rules.mode_for(c.owner) == Mode::Reset {
                c.close();
            }
        }
        self.changed.notify_all();
    }

    fn spawn(self: &Arc<Self>, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::spawn(f);
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }
}

/// A fault-injecting TCP proxy in front of one target address.
pub struct Proxy {
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on 127.0.0.1 (a free port), forwarding to `target`, in [`Mode::Pass`].
    pub fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("proxy: bind 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let listen = listener.local_addr()?;
        let inner = Arc::new(Inner {
            listen,
            target,
            rules: Mutex::new(Rules {
                default: Mode::Pass,
                by_pid: HashMap::new(),
            }),
            changed: Condvar::new(),
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            held: AtomicUsize::new(0),
        });
        let acceptor = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name(format!("proxy-{listen}"))
                .spawn(move || accept_loop(inner, listener))?
        };
        Ok(Proxy {
            inner,
            acceptor: Some(acceptor),
        })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// Where the traffic goes.
    pub fn target(&self) -> SocketAddr {
        self.inner.target
    }

    /// The mode of connections no per-process mode applies to.
    pub fn mode(&self) -> Mode {
        lock(&self.inner.rules).default
    }

    /// Set the mode of every connection (except those of processes given
    /// their own mode with [`Proxy::set_mode_for`]).
    pub fn set_mode(&self, mode: Mode) {
        lock(&self.inner.rules).default = mode;
        self.inner.enforce();
    }

    /// Set the mode of the connections made by process `pid` only.
    pub fn set_mode_for(&self, pid: i32, mode: Mode) {
        lock(&self.inner.rules).by_pid.insert(pid, mode);
        self.inner.enforce();
    }

    /// Back to [`Mode::Pass`] for everyone: forget every per-process mode.
    pub fn heal(&self) {
        {
            let mut rules = lock(&self.inner.rules);
            rules.default = Mode::Pass;
            rules.by_pid.clear();
        }
        self.inner.enforce();
    }

    /// Connections currently open through the proxy.
    /// Pieces of data a black hole holds right now (a sender is stalled).
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        lock(&self.inner.conns)
            .iter()
            .filter(|c| !c.closed.load(Ordering::SeqCst))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in lock(&self.inner.conns).drain(..) {
            c.close();
        }
        self.inner.changed.notify_all();
        let threads: Vec<_> = lock(&self.inner.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    while !inner.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, peer)) => {
                let owner = owner_of(peer, inner.listen);
                if inner.mode_for(owner) == Mode::Reset {
                    drop(client);
                    continue;
                }
                let inner2 = Arc::clone(&inner);
                inner.spawn(move || connect_upstream(inner2, client, owner));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Connect to the target for a new client connection and start the pumps.
/// If the target refuses, the client's connection is closed (as if refused).
fn connect_upstream(inner: Arc<Inner>, client: TcpStream, owner: Option<i32>) {
    let Ok(upstream) = TcpStream::connect_timeout(&inner.target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let setup = || -> std::io::Result<[TcpStream; 4]> {
        client.set_nonblocking(false)?;
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        Ok([
            client.try_clone()?,
            upstream.try_clone()?,
            upstream.try_clone()?,
            client.try_clone()?,
        ])
    };
    let Ok([c_read, u_write, u_read, c_write]) = setup() else {
        return;
    };
    let conn = Arc::new(Conn {
        owner,
        client,
        upstream,
        closed: AtomicBool::new(false),
        live: AtomicUsize::new(4),
    });
    {
        let mut conns = lock(&inner.conns);
        conns.retain(|c| !c.closed.load(Ordering::SeqCst));
        conns.push(Arc::clone(&conn));
    }
    if inner.stop.load(Ordering::SeqCst) || inner.mode_for(owner) == Mode::Reset {
        conn.close();
    }
    for (src, dst) in [(c_read, u_write), (u_read, c_write)] {
        let (tx, rx) = sync_channel(QUEUE_DEPTH);
        let (i1, c1) = (Arc::clone(&inner), Arc::clone(&conn));
        inner.spawn(move || {
            read_pump(src, tx);
            finished(&c1, &i1);
        });
        let (i2, c2) = (Arc::clone(&inner), Arc::clone(&conn));
        inner.spawn(move || {
            write_pump(&i2, &c2, rx, dst);
            finished(&c2, &i2);
        });
    }
}

fn finished(conn: &Conn, inner: &Inner) {
    if conn.live.fetch_sub(1, Ordering::SeqCst) == 1 {
        conn.close();
        inner.changed.notify_all();
    }
}

/// A piece of data and when it arrived; `None` data: end of stream.
type Piece = (Instant, Option<Vec<u8>>);

fn read_pump(mut src: TcpStream, tx: SyncSender<Piece>) {
    let mut buf = vec![0u8; PIECE];
    loop {
        match src.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send((Instant::now(), None));
                return;
            }
            Ok(n) => {
                if tx.send((Instant::now(), Some(buf[..n].to_vec()))).is_err() {
                    return;
                }
            }
        }
    }
}

fn write_pump(inner: &Inner, conn: &Conn, rx: Receiver<Piece>, mut dst: TcpStream) {
    while let Ok((arrived, data)) = rx.recv() {
        if !deliverable(inner, conn, arrived) {
            return;
        }
        match data {
            Some(bytes) => {
                if dst.write_all(&bytes).is_err() {
                    conn.close();
                    return;
                }
            }
            None => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Wait until a piece that arrived at `arrived` may be forwarded; false if
/// the connection is to be closed instead.
fn deliverable(inner: &Inner, conn: &Conn, arrived: Instant) -> bool {
    let mut held = Held(None);
    loop {
        if inner.stop.load(Ordering::SeqCst) || conn.closed.load(Ordering::SeqCst) {
            return false;
        }
        let rules = lock(&inner.rules);
        let wait = match rules.mode_for(conn.owner) {
            Mode::Pass => return true,
            Mode::Delay(d) => {
                let due = arrived + d;
                let now = Instant::now();
                if now >= due {
                    return true;
                }
                (due - now).min(POLL)
            }
            Mode::BlackHole => {
                held.hold(&inner.held);
                POLL
            }
            Mode::Reset => {
                drop(rules);
                conn.close();
                return false;
            }
        };
        let _ = inner
            .changed
            .wait_timeout(rules, wait)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// `/proc/net/tcp`'s spelling of an IPv4 socket address.
fn proc_addr(a: SocketAddr) -> Option<String> {
    match a {
        SocketAddr::V4(v) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v.ip().octets()),
            v.port()
        )),
        SocketAddr::V6(_) => None,
    }
}

/// The inode of the client end of the connection `peer` → `local`.
fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let (p, l) = (proc_addr(peer)?, proc_addr(local)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == p && f[2] == l)
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

/// This process's child processes (each thread's children).
fn child_pids() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

/// Which of our child processes made the connection from `peer` to `local`.
fn owner_of(peer: SocketAddr, local: SocketAddr) -> Option<i32> {
    let inode = socket_inode(peer, local)?;
    let needle = format!("socket:[{inode}]");
    child_pids().into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str())
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port, for as long as the test runs.
    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    }

    fn connect(p: &Proxy) -> TcpStream {
        let s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    #[test]
    fn passes_delays_holds_and_resets() {
        let proxy = Proxy::start(echo_server()).unwrap();
        let mut s = connect(&proxy);
        assert_eq!(roundtrip(&mut s, b"hello").unwrap(), b"hello");

        // Delay: the echo comes back no sooner than twice the delay.
        proxy.set_mode(Mode::Delay(Duration::from_millis(150)));
        let t = Instant::now();
        assert_eq!(roundtrip(&mut s, b"slow").unwrap(), b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );

        // Black hole: nothing comes back, but nothing is lost either.
        proxy.set_mode(Mode::BlackHole);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.write_all(b"held").unwrap();
        let mut b = [0u8; 4];
        assert!(
            s.read_exact(&mut b).is_err(),
            "a partition forwards nothing"
        );
        proxy.heal();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"held", "held data arrives once the partition heals");

        // Reset: the connection is closed and new ones are refused.
        proxy.set_mode(Mode::Reset);
        let mut buf = [0u8; 1];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
        let mut s2 = connect(&proxy);
        assert!(matches!(s2.read(&mut buf), Ok(0) | Err(_)));
        proxy.set_mode(Mode::Pass);
        let mut s3 = connect(&proxy);
        assert_eq!(roundtrip(&mut s3, b"again").unwrap(), b"again");
    }

    #[test]
    fn a_mode_can_apply_to_one_process_only() {
        let proxy = Proxy::start(echo_server()).unwrap();
        // A child process (bash's /dev/tcp) connects through the proxy and
        // holds the connection; we connect too.
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{}; sleep 30",
            proxy.addr().port()
        );
        let mut child = std::process::Command::new("bash")
            .args(["-c", &script])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let wait_for = |n: usize| {
            crate::wait_until(Duration::from_secs(5), "the proxy's connections", || {
                proxy.connections() == n
            })
            .unwrap_or_else(|e| panic!("{e}: {} open", proxy.connections()));
        };
        wait_for(1);
        let mut ours = connect(&proxy);
        assert_eq!(roundtrip(&mut ours, b"hi").unwrap(), b"hi");
        wait_for(2);
        // Resetting the child's connections leaves ours alone.
        proxy.set_mode_for(pid, Mode::Reset);
        wait_for(1);
        assert_eq!(roundtrip(&mut ours, b"still").unwrap(), b"still");
        let _ = child.kill();
        let _ = child.wait();
    }
}
