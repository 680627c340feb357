//! The tokio server: sockets around the sans-IO [`crate::handshake`] and
//! [`crate::transmission`] layers.
//!
//! Per connection: TCP_NODELAY, the handshake (bounded by a timeout), then
//! one task runs the transmission phase: it decodes requests from a
//! `BytesMut` (check-then-parse), runs them as futures polled by that same
//! task (a `FuturesUnordered`, no task spawned per request), queues each
//! reply whole (header then payload) as it completes, and writes the queue
//! with one non-blocking `writev` per loop turn, so the replies of requests
//! that finish together share a system call. The same shape as the iSCSI
//! target's connection (decision 25). Reading pauses while the request
//! count or the byte budget (payload bytes of running reads plus replies not
//! yet written) is used up, so memory per connection stays bounded even when
//! the client reads slowly.
//!
//! Connections are accepted by the loop both frontends share
//! ([`corral_block::accept`]), bounded in number. A client that breaks the
//! protocol or disconnects loses only its own connection.
//!
//! Shutdown: when the [`Shutdown`] token is cancelled the server stops
//! accepting, connections stop reading new requests, in-flight requests
//! finish and their replies are written (for at most
//! [`ServerConfig::shutdown_grace`]), then sockets close; [`serve`] returns
//! once every connection is gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use corral_block::BlockDevice;
use corral_block::accept::{Shutdown, serve_connections};
use corral_block::send_queue::SendQueue;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::error::NbdError;
use crate::export::Exports;
use crate::handshake::{Handshake, HandshakeConfig, HandshakeStatus, Negotiated};
use crate::proto::Errno;
use crate::transmission::{Command, Decoded, Reply, ReplyEncoder, Request, RequestDecoder};

/// Server limits and timeouts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests in flight per connection (device I/O or reply not yet written).
    pub max_in_flight: usize,
    /// Payload bytes (read and write data) in flight per connection; raised to
    /// at least the 32 MiB payload cap.
    pub max_in_flight_bytes: usize,
    /// Time a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// At shutdown, how long in-flight replies may take to be written to a
    /// client before its socket is closed anyway.
    pub shutdown_grace: Duration,
    /// Offer structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured_replies: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            structured_replies: true,
        }
    }
}

/// An NBD server over a set of exports.
pub struct NbdServer<D> {
    exports: Arc<Exports<D>>,
    config: ServerConfig,
}

/// Serve `exports` on `listener` with the default [`ServerConfig`] until
/// `shutdown` is cancelled; returns once every connection has finished its
/// in-flight requests and closed.
pub async fn serve<D: BlockDevice>(
    listener: TcpListener,
    exports: Arc<Exports<D>>,
    shutdown: Shutdown,
) -> Result<(), NbdError> {
    NbdServer::new(exports).run(listener, shutdown).await
}

impl<D: BlockDevice> NbdServer<D> {
    /// A server with the default configuration.
    pub fn new(exports: Arc<Exports<D>>) -> Self {
        NbdServer {
            exports,
            config: ServerConfig::default(),
        }
    }

    /// Replace the configuration.
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Accept and serve connections until `shutdown` is cancelled; see [`serve`].
    pub async fn run(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), NbdError> {
        self.exports.validate()?;
        let shared = Arc::new(Shared {
            exports: self.exports,
            config: self.config,
        });
        let max = shared.config.max_connections;
        serve_connections(
            listener,
            max,
            shutdown,
            "NBD server",
            "nbd",
            move |stream, _peer, stop| {
                let shared = Arc::clone(&shared);
                async move {
                    debug!("connection accepted");
                    match handle_connection(stream, shared, stop).await {
                        Ok(()) => debug!("connection closed"),
                        Err(NbdError::Protocol(e)) => warn!(error = %e, "dropping client"),
                        Err(e) => debug!(error = %e, "connection ended"),
                    }
                }
            },
        )
        .await;
        Ok(())
    }
}

struct Shared<D> {
    exports: Arc<Exports<D>>,
    config: ServerConfig,
}

const READ_CHUNK: usize = 256 << 10;
const MIN_SPARE: usize = 16 << 10;

fn ensure_spare(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_SPARE {
        buf.reserve(READ_CHUNK);
    }
}

/// Serve one client: the handshake, then the transmission phase.
async fn handle_connection<D: BlockDevice>(
    mut stream: TcpStream,
    shared: Arc<Shared<D>>,
    stop: Shutdown,
) -> Result<(), NbdError> {
    let (mut rd, mut wr) = stream.split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut hs = Handshake::new(
        shared.exports.infos(),
        HandshakeConfig {
            structured_replies: shared.config.structured_replies,
            ..HandshakeConfig::default()
        },
    );
    let timeout = shared.config.handshake_timeout;
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, negotiate(&mut hs, &mut rd, &mut wr, &mut buf)) => {
            r.unwrap_or(Err(NbdError::HandshakeTimeout))
        }
        _ = stop.cancelled() => return Ok(()),
    };
    let negotiated = match outcome {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(()),
        Err(e) => {
            // A final error reply (e.g. NBD_REP_ERR_TOO_BIG) may be pending.
            if hs.has_output() {
                let out = hs.take_output();
                let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
            }
            return Err(e);
        }
    };
    let Some(export) = shared.exports.get(negotiated.export) else {
        return Ok(());
    };
    debug!(
        export = export.name(),
        size = negotiated.size,
        structured = negotiated.structured_replies,
        "transmission"
    );
    let device = Arc::clone(export.device());
    let result = transmission(
        &*device,
        negotiated,
        &mut rd,
        wr.as_ref(),
        buf,
        &shared.config,
        stop,
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    result
}

/// Drive the handshake; `Ok(None)` when the client aborted or left cleanly.
async fn negotiate<R, W>(
    hs: &mut Handshake,
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
) -> Result<Option<Negotiated>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let status = hs.receive(buf)?;
        if hs.has_output() {
            let out = hs.take_output();
            wr.write_all(&out).await?;
            wr.flush().await?;
        }
        match status {
            HandshakeStatus::NeedMore => {
                ensure_spare(buf);
                if rd.read_buf(buf).await? == 0 {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(NbdError::UnexpectedEof)
                    };
                }
            }
            HandshakeStatus::Transmission(n) => return Ok(Some(n)),
            HandshakeStatus::Aborted => return Ok(None),
        }
    }
}

/// Why a connection's transmission phase ended.
#[derive(Debug)]
enum End {
    Disconnect,
    Eof,
    Shutdown,
    Refused,
}

/// A connection that is no longer reading: finish what is in flight, write
/// the replies (for at most the shutdown grace), then close with `result`.
struct Ending {
    result: Result<End, NbdError>,
    deadline: Instant,
}

/// Stop reading while this many reply bytes wait for the client.
const OUT_HIGH_WATER: usize = 16 << 20;

/// The transmission phase of one connection, all in this one task: decode
/// requests from `buf`, run them as futures in a `FuturesUnordered` (only the
/// device's own I/O leaves the task), queue each reply as it completes, and
/// write the queue with one non-blocking `writev` per loop turn.
///
/// Bounds: at most `max_in_flight` requests run at once, and no new request
/// is taken while the payload bytes of running reads plus queued replies
/// exceed the byte budget (one request is always allowed, so a maximal read
/// cannot stall). Requests already running are always driven to completion,
/// even when the client is gone, so a replicated write is never abandoned
/// half-way by its frontend.
async fn transmission<D: BlockDevice>(
    device: &D,
    negotiated: Negotiated,
    rd: &mut ReadHalf<'_>,
    stream: &TcpStream,
    mut buf: BytesMut,
    config: &ServerConfig,
    stop: Shutdown,
) -> Result<(), NbdError> {
    let decoder = RequestDecoder::new(negotiated.size, negotiated.structured_replies);
    let encoder = ReplyEncoder::new(negotiated.structured_replies);
    let max_in_flight = config.max_in_flight.clamp(1, 1 << 16);
    let byte_budget = config
        .max_in_flight_bytes
        .max(decoder.max_payload() as usize);
    let mut out = SendQueue::new();
    let mut inflight = FuturesUnordered::new();
    // Payload bytes of the reads now running.
    let mut read_bytes: usize = 0;
    let mut ending: Option<Ending> = None;
    // The socket failed: replies are dropped, requests still finish.
    let mut broken = false;
    let end = |ending: &mut Option<Ending>, result: Result<End, NbdError>| {
        if ending.is_none() {
            *ending = Some(Ending {
                result,
                deadline: Instant::now() + config.shutdown_grace,
            });
        }
    };
    loop {
        // 1. Take the requests the client sent, as far as the bounds allow.
        while ending.is_none()
            && inflight.len() < max_in_flight
            && (inflight.is_empty() || read_bytes + out.len() < byte_budget)
        {
            match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(Decoded::Disconnect)) => end(&mut ending, Ok(End::Disconnect)),
                Ok(Some(Decoded::Reject {
                    cookie,
                    errno,
                    read,
                    close,
                    reason,
                })) => {
                    debug!(cookie, ?errno, reason, "request refused");
                    let reply = Reply::Error {
                        cookie,
                        errno,
                        read,
                        message: reason.to_string(),
                    };
                    queue(&encoder, &reply, &mut out, broken);
                    if close {
                        end(&mut ending, Ok(End::Refused));
                    }
                }
                Ok(Some(Decoded::Request(req))) => {
                    let len = read_len(&req);
                    read_bytes += len;
                    inflight.push(execute(device, req).map(move |reply| (reply, len)));
                }
                Err(e) => end(&mut ending, Err(e.into())),
            }
        }
        // 2. Queue the replies of requests that have finished.
        while let Some(Some((reply, len))) = inflight.next().now_or_never() {
            read_bytes -= len;
            queue(&encoder, &reply, &mut out, broken);
        }
        // 3. Write what is queued, as far as the socket takes it.
        if !broken && let Err(e) = out.write_to(stream) {
            debug!(error = %e, "writing replies failed");
            broken = true;
            out.clear();
            end(&mut ending, Err(e.into()));
        }
        if inflight.is_empty()
            && (out.is_empty() || broken)
            && let Some(e) = ending.take()
        {
            return finish(e.result);
        }
        // 4. Wait for something to do.
        let accepting = ending.is_none()
            && out.len() < OUT_HIGH_WATER
            && inflight.len() < max_in_flight
            && (inflight.is_empty() || read_bytes + out.len() < byte_budget);
        if accepting {
            ensure_spare(&mut buf);
        }
        let writing = !broken && !out.is_empty();
        let open = ending.is_none();
        let deadline = ending.as_ref().map(|e| e.deadline);
        tokio::select! {
            biased;
            Some((reply, len)) = inflight.next(), if !inflight.is_empty() => {
                read_bytes -= len;
                queue(&encoder, &reply, &mut out, broken);
            }
            r = stream.writable(), if writing => {
                if let Err(e) = r {
                    broken = true;
                    out.clear();
                    end(&mut ending, Err(e.into()));
                }
            }
            // A read that does not fill the buffer clears the socket's
            // readiness, so an idle socket costs no extra system call.
            r = rd.read_buf(&mut buf), if accepting => match r {
                Ok(0) => {
                    let r = if buf.is_empty() {
                        Ok(End::Eof)
                    } else {
                        Err(NbdError::UnexpectedEof)
                    };
                    end(&mut ending, r);
                }
                Ok(_) => {}
                Err(e) => end(&mut ending, Err(e.into())),
            },
            _ = sleep_until_deadline(deadline), if !open => {
                if inflight.is_empty() {
                    warn!("client is not reading its replies; closing");
                } else {
                    warn!(requests = inflight.len(), "requests did not finish in time; closing");
                }
                return finish(ending.take().map_or(Ok(End::Shutdown), |e| e.result));
            }
            _ = stop.cancelled(), if open => end(&mut ending, Ok(End::Shutdown)),
        }
    }
}

/// Log how the transmission phase ended and turn it into the result.
fn finish(result: Result<End, NbdError>) -> Result<(), NbdError> {
    match &result {
        Ok(end) => debug!(?end, "transmission over"),
        Err(e) => debug!(error = %e, "transmission aborted"),
    }
    result.map(|_| ())
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Payload bytes a request's reply will carry.
fn read_len(req: &Request) -> usize {
    match &req.command {
        Command::Read { len, .. } => *len as usize,
        _ => 0,
    }
}

/// Encode `reply` onto the send queue (or drop it: the socket is gone).
fn queue(encoder: &ReplyEncoder, reply: &Reply, out: &mut SendQueue, broken: bool) {
    if broken {
        return;
    }
    let payload_len = match reply {
        Reply::Data { data, .. } => data.len(),
        _ => 0,
    };
    if let Some(payload) = encoder.encode(reply, out.buf(payload_len)) {
        out.payload(&payload);
    }
}

fn failure(cookie: u64, read: bool, e: &corral_block::BlockError) -> Reply {
    let errno = Errno::from_block_error(e);
    if errno == Errno::Einval {
        debug!(cookie, error = %e, "device refused request");
    } else {
        debug!(cookie, error = %e, "device I/O failed");
    }
    Reply::Error {
        cookie,
        errno,
        read,
        message: e.to_string(),
    }
}

/// Run one request against the device.
async fn execute<D: BlockDevice>(device: &D, req: Request) -> Reply {
    let cookie = req.cookie;
    let result = match req.command {
        Command::Read { offset, len } => {
            return match device.read(offset, len).await {
                Ok(data) if data.len() == len as usize => Reply::Data {
                    cookie,
                    offset,
                    data,
                },
                Ok(data) => {
                    // Sending it would desynchronise the stream.
                    warn!(
                        cookie,
                        want = len,
                        got = data.len(),
                        "device returned a short read"
                    );
                    Reply::Error {
                        cookie,
                        errno: Errno::Eio,
                        read: true,
                        message: "short read from the device".into(),
                    }
                }
                Err(e) => failure(cookie, true, &e),
            };
        }
        Command::Write { offset, data, fua } => device.write(offset, data, fua).await,
        Command::Flush => device.flush().await,
        Command::Trim { offset, len, fua } => match device.unmap(offset, u64::from(len)).await {
            Ok(()) if fua => device.flush().await,
            r => r,
        },
        Command::WriteZeroes { offset, len, fua } => {
            device.write_zeroes(offset, u64::from(len), fua).await
        }
    };
    match result {
        Ok(()) => Reply::Done { cookie },
        Err(e) => failure(cookie, false, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{IHAVEOPT, REQUEST_MAGIC, cmd, opt};
    use corral_block::FileDevice;

    /// A connected client and server socket on loopback.
    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    async fn client_go(c: &mut TcpStream, name: &str) {
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        let mut m = Vec::new();
        m.extend_from_slice(&3u32.to_be_bytes());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt::GO.to_be_bytes());
        m.extend_from_slice(&((name.len() + 6) as u32).to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        c.write_all(&m).await.unwrap();
        // Read option replies until ACK (type 1).
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).await.unwrap();
            let typ = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut d = vec![0u8; len];
            c.read_exact(&mut d).await.unwrap();
            assert!(typ < 0x8000_0000, "error reply {typ:#x}");
            if typ == 1 {
                break;
            }
        }
    }

    fn request(command: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    async fn simple_reply(c: &mut TcpStream) -> (u32, u64) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..4], &[0x67, 0x44, 0x66, 0x98]);
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut ck = [0u8; 8];
        ck.copy_from_slice(&h[8..]);
        (err, u64::from_be_bytes(ck))
    }

    #[tokio::test]
    async fn in_memory_session_with_pipelined_requests() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&dir.path().join("d"), Some(1 << 20), 512).unwrap();
        let shared = Arc::new(Shared {
            exports: Arc::new(Exports::single("mem", Arc::new(dev))),
            config: ServerConfig::default(),
        });
        let (mut client, server) = loopback_pair().await;
        let task = tokio::spawn(handle_connection(server, shared, Shutdown::new()));
        client_go(&mut client, "mem").await;

        // Pipeline: 8 writes, then a flush, without waiting.
        let mut burst = Vec::new();
        for i in 0..8u64 {
            burst.extend(request(cmd::WRITE, i, i * 4096, 4096, &[i as u8 + 1; 4096]));
        }
        client.write_all(&burst).await.unwrap();
        let mut seen: Vec<u64> = Vec::new();
        for _ in 0..8 {
            let (err, cookie) = simple_reply(&mut client).await;
            assert_eq!(err, 0);
            seen.push(cookie);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..8).collect::<Vec<_>>());
        client
            .write_all(&request(cmd::FLUSH, 100, 0, 0, &[]))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut client).await, (0, 100));

        client
            .write_all(&request(cmd::READ, 200, 3 * 4096, 4096, &[]))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut client).await, (0, 200));
        let mut data = vec![0u8; 4096];
        client.read_exact(&mut data).await.unwrap();
        assert!(data.iter().all(|&b| b == 4));

        // Out of range read: EINVAL and no payload.
        client
            .write_all(&request(cmd::READ, 300, 1 << 20, 1, &[]))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut client).await, (22, 300));

        client
            .write_all(&request(cmd::DISC, 0, 0, 0, &[]))
            .await
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&dir.path().join("d"), Some(1 << 20), 512).unwrap();
        let shared = Arc::new(Shared {
            exports: Arc::new(Exports::single("mem", Arc::new(dev))),
            config: ServerConfig::default(),
        });
        let (mut client, server) = loopback_pair().await;
        let task = tokio::spawn(handle_connection(server, shared, Shutdown::new()));
        client_go(&mut client, "").await;
        client.write_all(&[0xffu8; 64]).await.unwrap();
        let r = task.await.unwrap();
        assert!(matches!(r, Err(NbdError::Protocol(_))), "{r:?}");
    }
}
