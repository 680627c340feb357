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
//! TLS ([`NbdTls`]): when the handshake's state machine accepts the client's
//! `NBD_OPT_STARTTLS` the socket is handed to rustls (with a client
//! certificate required, checked against the CA; bounded by
//! [`TLS_HANDSHAKE_TIMEOUT`]) and the negotiation and the transmission phase
//! go on over the TLS stream. The transmission loop is generic over the
//! connection's halves (`ReplyWriter`): the plaintext path keeps its
//! non-blocking `writev` straight to the socket, the TLS path writes the
//! same queue through rustls (which copies into its records anyway). The
//! TLS stream is [`corral_tls::io::TlsIo`]: the socket is read up to 64 KiB
//! per system call below rustls (rustls alone reads 4 KiB per call), and
//! replies are gathered into full records and flushed once per loop turn.
//! A refused TLS client is logged with its address and rustls's reason.
//!
//! Shutdown: when the [`Shutdown`] token is cancelled the server stops
//! accepting, connections stop reading new requests, in-flight requests
//! finish and their replies are written (for at most
//! [`ServerConfig::shutdown_grace`]), then sockets close; [`serve`] returns
//! once every connection is gone.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use corral_block::BlockDevice;
use corral_block::accept::{Shutdown, serve_connections};
use corral_block::send_queue::SendQueue;
use corral_tls::io::ServerStream;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::error::NbdError;
use crate::export::Exports;
use crate::handshake::{Handshake, HandshakeConfig, HandshakeStatus, Negotiated, TlsMode};
use crate::proto::Errno;
use crate::transmission::{Command, Decoded, Reply, ReplyEncoder, Request, RequestDecoder};

/// Server limits and timeouts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests in flight per connection (device I/O or reply not yet
    /// written to the socket); no further request is read while reached.
    pub max_in_flight: usize,
    /// Payload bytes (the data of running reads and writes, plus replies not
    /// yet written) per connection; raised to at least the 32 MiB payload
    /// cap.
    pub max_in_flight_bytes: usize,
    /// Time a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// At shutdown, how long in-flight replies may take to be written to a
    /// client before its socket is closed anyway.
    pub shutdown_grace: Duration,
    /// Offer structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured_replies: bool,
    /// Offer TLS (`NBD_OPT_STARTTLS`), and perhaps require it; `None`: no
    /// TLS (`STARTTLS` is answered `NBD_REP_ERR_POLICY`).
    pub tls: Option<NbdTls>,
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
            tls: None,
        }
    }
}

/// TLS for the NBD server: the identity and CA it uses, and whether
/// clients must upgrade.
#[derive(Clone, Debug)]
pub struct NbdTls {
    /// The server's certificate and key, and the CA every client
    /// certificate must be signed by (reloaded when the files change).
    pub server: corral_tls::ServerTls,
    /// Refuse clients that do not upgrade (the spec's FORCEDTLS);
    /// otherwise TLS is the client's choice (SELECTIVETLS).
    pub require: bool,
}

impl NbdTls {
    /// TLS with `server`'s files; `require`: refuse plaintext clients.
    pub fn new(server: corral_tls::ServerTls, require: bool) -> NbdTls {
        NbdTls { server, require }
    }

    /// The handshake mode this configuration gives.
    pub fn mode(&self) -> TlsMode {
        if self.require {
            TlsMode::Required
        } else {
            TlsMode::Allowed
        }
    }
}

/// Time a client has for the TLS handshake once its `STARTTLS` is
/// acknowledged (within the whole handshake's
/// [`ServerConfig::handshake_timeout`]).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Offer (or require) TLS, or not (`None`); sets [`ServerConfig::tls`].
    pub fn with_tls(mut self, tls: Option<NbdTls>) -> Self {
        self.config.tls = tls;
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
            move |stream, peer, stop| {
                let shared = Arc::clone(&shared);
                async move {
                    debug!("connection accepted");
                    match handle_connection(stream, peer, shared, stop).await {
                        Ok(()) => debug!("connection closed"),
                        Err(NbdError::Protocol(e)) => {
                            warn!(%peer, error = %e, "dropping client")
                        }
                        Err(NbdError::TlsHandshake(why)) => {
                            warn!(%peer, reason = %why, "refusing client: TLS handshake failed")
                        }
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

/// Serve one client: the handshake (upgrading to TLS if the client asks
/// and the server offers it), then the transmission phase.
async fn handle_connection<D: BlockDevice>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared<D>>,
    stop: Shutdown,
) -> Result<(), NbdError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let tls = shared.config.tls.as_ref();
    let mut hs = Handshake::new(
        shared.exports.infos(),
        HandshakeConfig {
            structured_replies: shared.config.structured_replies,
            tls: tls.map_or(TlsMode::Off, NbdTls::mode),
            ..HandshakeConfig::default()
        },
    );
    let timeout = shared.config.handshake_timeout;
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, handshake(&mut hs, stream, &mut buf, tls, peer)) => {
            r.unwrap_or(Err(NbdError::HandshakeTimeout))
        }
        _ = stop.cancelled() => return Ok(()),
    };
    let Some((conn, negotiated)) = outcome? else {
        return Ok(());
    };
    let Some(export) = shared.exports.get(negotiated.export) else {
        return Ok(());
    };
    debug!(
        export = export.name(),
        size = negotiated.size,
        structured = negotiated.structured_replies,
        tls = matches!(conn, Conn::Tls(_)),
        "transmission"
    );
    let device = Arc::clone(export.device());
    let config = &shared.config;
    match conn {
        Conn::Plain(mut stream) => {
            let (mut rd, wr) = stream.split();
            let mut wr = PlainWriter(wr);
            let result =
                transmission(&*device, negotiated, &mut rd, &mut wr, buf, config, stop).await;
            wr.close().await;
            result
        }
        Conn::Tls(stream) => {
            let (mut rd, wr) = tokio::io::split(*stream);
            // The stream gathers the replies of a loop turn until flushed:
            // rustls makes a record per write it is handed, and many small
            // replies (16 bytes each for writes) would each cost a record.
            let mut wr = TlsWriter {
                wr,
                unflushed: false,
            };
            let result =
                transmission(&*device, negotiated, &mut rd, &mut wr, buf, config, stop).await;
            wr.close().await;
            result
        }
    }
}

/// A connection after the handshake: the socket, or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<ServerStream>),
}

/// How a stretch of negotiation on one stream ended.
enum Step {
    /// Transmission starts.
    Go(Negotiated),
    /// The client aborted or left cleanly.
    Closed,
    /// `STARTTLS` was acknowledged: upgrade the stream.
    StartTls,
}

/// The whole handshake: negotiate in plaintext, and over TLS after an
/// accepted `STARTTLS`. `Ok(None)` when the client aborted or left.
async fn handshake(
    hs: &mut Handshake,
    mut stream: TcpStream,
    buf: &mut BytesMut,
    tls: Option<&NbdTls>,
    peer: SocketAddr,
) -> Result<Option<(Conn, Negotiated)>, NbdError> {
    match negotiate(hs, &mut stream, buf).await? {
        Step::Go(n) => return Ok(Some((Conn::Plain(stream), n))),
        Step::Closed => {
            if hs.refused_for_tls() {
                warn!(%peer, "refused client: TLS is required and it did not start TLS");
            }
            return Ok(None);
        }
        Step::StartTls => {}
    }
    // The state machine acknowledges STARTTLS only when TLS is configured.
    let Some(tls) = tls else {
        return Err(NbdError::TlsHandshake("TLS is not configured".into()));
    };
    let accepting = tls.server.accept(stream);
    let mut stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accepting).await {
        Err(_) => {
            return Err(NbdError::TlsHandshake(format!(
                "not finished within {TLS_HANDSHAKE_TIMEOUT:?}"
            )));
        }
        Ok(Err(e)) => return Err(NbdError::TlsHandshake(corral_tls::describe(&e))),
        Ok(Ok(s)) => Box::new(s),
    };
    debug!(%peer, "client upgraded to TLS");
    match negotiate(hs, &mut *stream, buf).await {
        Ok(Step::Go(n)) => Ok(Some((Conn::Tls(stream), n))),
        Ok(Step::Closed) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            Ok(None)
        }
        // The state machine answers a second STARTTLS with ERR_INVALID.
        Ok(Step::StartTls) => Err(crate::ProtocolError::HandshakeOver.into()),
        Err(e) => Err(e),
    }
}

/// Drive the handshake on one stream until it ends or asks for TLS.
async fn negotiate<S>(hs: &mut Handshake, s: &mut S, buf: &mut BytesMut) -> Result<Step, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let result = negotiate_inner(hs, s, buf).await;
    if result.is_err() && hs.has_output() {
        // A final error reply (e.g. NBD_REP_ERR_TOO_BIG) may be pending.
        let out = hs.take_output();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            s.write_all(&out).await?;
            s.flush().await
        })
        .await;
    }
    result
}

async fn negotiate_inner<S>(
    hs: &mut Handshake,
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Step, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let status = hs.receive(buf)?;
        if hs.has_output() {
            let out = hs.take_output();
            s.write_all(&out).await?;
            s.flush().await?;
        }
        match status {
            HandshakeStatus::NeedMore => {
                ensure_spare(buf);
                if s.read_buf(buf).await? == 0 {
                    return if buf.is_empty() {
                        Ok(Step::Closed)
                    } else {
                        Err(NbdError::UnexpectedEof)
                    };
                }
            }
            HandshakeStatus::Transmission(n) => return Ok(Step::Go(n)),
            HandshakeStatus::Aborted => return Ok(Step::Closed),
            HandshakeStatus::StartTls => return Ok(Step::StartTls),
        }
    }
}

/// The reply side of a connection in the transmission phase.
trait ReplyWriter {
    /// Write what the connection takes now, without waiting.
    fn write_now(&mut self, out: &mut SendQueue) -> io::Result<()>;
    /// Whether bytes wait to be written: in the queue, or below it.
    fn pending(&self, out: &SendQueue) -> bool;
    /// Wait until writing can make progress, or make it.
    async fn progress(&mut self, out: &mut SendQueue) -> io::Result<()>;
    /// Close the write side (bounded; errors ignored: the peer may be gone).
    async fn close(&mut self);
}

/// A plain socket: one non-blocking `writev` per loop turn, straight from
/// the queue.
struct PlainWriter<'a>(tokio::net::tcp::WriteHalf<'a>);

impl ReplyWriter for PlainWriter<'_> {
    fn write_now(&mut self, out: &mut SendQueue) -> io::Result<()> {
        out.write_to(self.0.as_ref())
    }

    fn pending(&self, out: &SendQueue) -> bool {
        !out.is_empty()
    }

    async fn progress(&mut self, _out: &mut SendQueue) -> io::Result<()> {
        self.0.as_ref().writable().await
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.0.shutdown()).await;
    }
}

/// TLS: the queue goes through the stream's write buffer and rustls, which
/// hold bytes until flushed.
struct TlsWriter<W> {
    wr: W,
    /// Bytes were handed to rustls since the last flush.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> TlsWriter<W> {
    /// Hand the queue to rustls and flush its records to the socket.
    /// `Ready` once everything is on the socket (or on error).
    fn poll_send(&mut self, cx: &mut Context<'_>, out: &mut SendQueue) -> Poll<io::Result<()>> {
        if !out.is_empty() {
            // What was taken is gone from the queue even if the writer then
            // blocks; it waits in rustls until flushed.
            self.unflushed = true;
            std::task::ready!(out.poll_write_to(cx, Pin::new(&mut self.wr)))?;
        }
        if self.unflushed {
            std::task::ready!(Pin::new(&mut self.wr).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> ReplyWriter for TlsWriter<W> {
    fn write_now(&mut self, out: &mut SendQueue) -> io::Result<()> {
        // A try without a waker: `progress` polls again, with the task's
        // waker, whenever something is left.
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_send(&mut cx, out) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    fn pending(&self, out: &SendQueue) -> bool {
        self.unflushed || !out.is_empty()
    }

    async fn progress(&mut self, out: &mut SendQueue) -> io::Result<()> {
        poll_fn(|cx| self.poll_send(cx, out)).await
    }

    async fn close(&mut self) {
        // Sends TLS close_notify, then shuts the socket down.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.wr.shutdown()).await;
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
/// Bounds: at most `max_in_flight` requests run or have a reply not yet
/// written, and no new request is taken while the payload bytes of running
/// reads and writes plus queued replies exceed the byte budget (one request
/// is always allowed, so a maximal request cannot stall). Requests already running are always driven to completion,
/// even when the client is gone, so a replicated write is never abandoned
/// half-way by its frontend.
async fn transmission<D: BlockDevice, R: AsyncRead + Unpin, W: ReplyWriter>(
    device: &D,
    negotiated: Negotiated,
    rd: &mut R,
    wr: &mut W,
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
    let mut unwritten = Unwritten::default();
    let mut inflight = FuturesUnordered::new();
    // Payload bytes of the reads and writes now running.
    let mut payload_bytes: usize = 0;
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
        // `drained`: every whole request in `buf` was taken.
        let mut drained = false;
        while ending.is_none()
            && inflight.len() + unwritten.count(&out) < max_in_flight
            && (inflight.is_empty() || payload_bytes + out.len() < byte_budget)
        {
            match decoder.decode(&mut buf) {
                Ok(None) => {
                    drained = true;
                    break;
                }
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
                    queue(&encoder, &reply, &mut out, &mut unwritten, broken);
                    if close {
                        end(&mut ending, Ok(End::Refused));
                    }
                }
                Ok(Some(Decoded::Request(req))) => {
                    let len = payload_len(&req);
                    payload_bytes += len;
                    inflight.push(execute(device, req).map(move |reply| (reply, len)));
                }
                Err(e) => end(&mut ending, Err(e.into())),
            }
        }
        // 2. Queue the replies of requests that have finished.
        while let Some(Some((reply, len))) = inflight.next().now_or_never() {
            payload_bytes -= len;
            queue(&encoder, &reply, &mut out, &mut unwritten, broken);
        }
        // 3. Write what is queued, as far as the socket takes it.
        if !broken && let Err(e) = wr.write_now(&mut out) {
            debug!(error = %e, "writing replies failed");
            broken = true;
            out.clear();
            end(&mut ending, Err(e.into()));
        }
        if inflight.is_empty()
            && (broken || !wr.pending(&out))
            && let Some(e) = ending.take()
        {
            return finish(e.result);
        }
        // 4. Wait for something to do.
        let accepting = ending.is_none()
            && out.len() < OUT_HIGH_WATER
            && inflight.len() + unwritten.count(&out) < max_in_flight
            && (inflight.is_empty() || payload_bytes + out.len() < byte_budget);
        if accepting && !drained {
            // A bound stopped step 1 and has eased since (replies were
            // written): take the requests already in `buf` before waiting
            // for the socket, which may have nothing more to say.
            continue;
        }
        if accepting {
            ensure_spare(&mut buf);
        }
        let writing = !broken && wr.pending(&out);
        let open = ending.is_none();
        let deadline = ending.as_ref().map(|e| e.deadline);
        tokio::select! {
            biased;
            Some((reply, len)) = inflight.next(), if !inflight.is_empty() => {
                payload_bytes -= len;
                queue(&encoder, &reply, &mut out, &mut unwritten, broken);
            }
            r = wr.progress(&mut out), if writing => {
                if let Err(e) = r {
                    debug!(error = %e, "writing replies failed");
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

/// Payload bytes a request holds while it runs: the data of a write, or
/// the data its read reply will carry.
fn payload_len(req: &Request) -> usize {
    match &req.command {
        Command::Read { len, .. } => *len as usize,
        Command::Write { data, .. } => data.len(),
        _ => 0,
    }
}

/// The replies in the send queue not yet written to the socket, counted
/// against `max_in_flight` so that a client that does not read its replies
/// stops the reading of its requests.
#[derive(Default)]
struct Unwritten {
    /// Bytes ever queued.
    queued: u64,
    /// For each reply still (partly) queued, `queued` at its end.
    ends: VecDeque<u64>,
}

impl Unwritten {
    /// A reply was queued; `before`: the queue's length before it.
    fn push(&mut self, out: &SendQueue, before: usize) {
        self.queued += out.len().saturating_sub(before) as u64;
        self.ends.push_back(self.queued);
    }

    /// Replies not yet wholly written.
    fn count(&mut self, out: &SendQueue) -> usize {
        let written = self.queued.saturating_sub(out.len() as u64);
        while self.ends.front().is_some_and(|&end| end <= written) {
            self.ends.pop_front();
        }
        self.ends.len()
    }
}

/// Encode `reply` onto the send queue (or drop it: the socket is gone).
fn queue(
    encoder: &ReplyEncoder,
    reply: &Reply,
    out: &mut SendQueue,
    unwritten: &mut Unwritten,
    broken: bool,
) {
    if broken {
        return;
    }
    let before = out.len();
    let payload_len = match reply {
        Reply::Data { data, .. } => data.len(),
        _ => 0,
    };
    if let Some(payload) = encoder.encode(reply, out.buf(payload_len)) {
        out.payload(&payload);
    }
    unwritten.push(out, before);
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
        let peer = client.local_addr().unwrap();
        let task = tokio::spawn(handle_connection(server, peer, shared, Shutdown::new()));
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
        let peer = client.local_addr().unwrap();
        let task = tokio::spawn(handle_connection(server, peer, shared, Shutdown::new()));
        client_go(&mut client, "").await;
        client.write_all(&[0xffu8; 64]).await.unwrap();
        let r = task.await.unwrap();
        assert!(matches!(r, Err(NbdError::Protocol(_))), "{r:?}");
    }
}
