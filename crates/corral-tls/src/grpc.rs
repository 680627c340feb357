//! Tonic over TLS, built in one place: the stream of connections a gRPC
//! server serves ([`incoming`]) and the connector a channel dials with
//! ([`connect_tcp`], or [`TlsChannelConnector`] for tonic).
//!
//! The data path does not change: TLS wraps the TCP stream below HTTP/2,
//! tonic and the services see the same bytes, and a process without TLS
//! files serves and dials plain TCP exactly as before. Both ends read and
//! write TLS through [`crate::io::TlsIo`] (buffered reads under rustls,
//! gathered writes and drained reads above it).
//!
//! A listener serves at most [`MAX_CONNECTIONS`] connections at once and
//! opens each in a task of its own, bounded in time
//! ([`HANDSHAKE_TIMEOUT`]: the client's first bytes, and with TLS the
//! whole handshake), so a client that connects and says nothing (or a
//! slow one) never stops others from being served. A refused connection is
//! logged with the peer's address and the reason: a plain-TCP client of a
//! TLS listener and a TLS client of a plain one are told apart from a
//! certificate that does not verify.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::io::{ClientStream, ServerStream, TlsIo, buffered};
use crate::{ClientTls, ServerTls, describe};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections a gRPC listener serves at once (opening ones included);
/// further clients wait in the kernel's accept queue. A replica daemon
/// holds three per volume an engine has open on it (control and two data
/// streams), so this is room for over a thousand volumes per node.
pub const MAX_CONNECTIONS: usize = 4096;

/// One connection a gRPC server serves. It holds one of the listener's
/// [`MAX_CONNECTIONS`] places until tonic drops it. Over TLS, writes are
/// gathered until flushed (HTTP/2 flushes after every burst; see
/// [`crate::io`]).
pub struct ServerIo {
    stream: Transport,
    _place: OwnedSemaphorePermit,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<ServerStream>),
}

impl ServerIo {
    fn tcp(&self) -> &TcpStream {
        match &self.stream {
            Transport::Plain(s) => s,
            Transport::Tls(s) => s.tcp(),
        }
    }

    /// Whether the connection runs TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Transport::Tls(_))
    }
}

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections accepted on `listener`, for
/// `tonic::transport::Server::serve_with_incoming*`: plain TCP without
/// `tls`, else each after a mutual-TLS handshake (a failed one is logged
/// and dropped). Accepting stops when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
) -> impl Stream<Item = io::Result<ServerIo>> + Send + 'static {
    incoming_with(listener, tls, ListenerLimits::default())
}

/// A listener's bounds (see the module's docs).
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub opening_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: MAX_CONNECTIONS,
            opening_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// [`incoming`] with bounds of the caller's.
pub fn incoming_with(
    listener: TcpListener,
    tls: Option<ServerTls>,
    limits: ListenerLimits,
) -> impl Stream<Item = io::Result<ServerIo>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<ServerIo>>(16);
    tokio::spawn(accept_loop(listener, tls, limits, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<ServerTls>,
    limits: ListenerLimits,
    tx: mpsc::Sender<io::Result<ServerIo>>,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut full_logged = false;
    loop {
        if places.available_permits() == 0 && !full_logged {
            warn!(
                max = limits.max_connections,
                "gRPC listener at its connection limit: new clients wait in the accept queue"
            );
        }
        full_logged = places.available_permits() == 0;
        let place = tokio::select! {
            _ = tx.closed() => return,
            p = Arc::clone(&places).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.as_ref().map(ServerTls::grpc_acceptor);
        let tx = tx.clone();
        // Each connection opens in a task of its own: a client that says
        // nothing holds its own place for HANDSHAKE_TIMEOUT, nobody else's.
        tokio::spawn(async move {
            let opening = async {
                let tls_first = first_byte_is_tls(&tcp).await?;
                match (tls, tls_first) {
                    (Some(acceptor), true) => acceptor
                        .accept(buffered(tcp))
                        .await
                        .map(|s| Transport::Tls(Box::new(TlsIo::new(s))))
                        .map_err(|e| Refusal::Loud(describe(&e))),
                    (Some(_), false) => Err(Refusal::Loud(
                        "not a TLS client (plain TCP): this listener requires mutual TLS".into(),
                    )),
                    (None, true) => Err(Refusal::Loud(
                        "a TLS client on a plain-TCP listener (start it with --tls-*)".into(),
                    )),
                    (None, false) => Ok(Transport::Plain(tcp)),
                }
            };
            let limit = limits.opening_timeout;
            let stream = match tokio::time::timeout(limit, opening).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(Refusal::Loud(why))) => return log_refusal(peer, &why),
                Ok(Err(Refusal::Quiet(why))) => {
                    return debug!(%peer, reason = %why, "connection closed before it began");
                }
                Err(_) => {
                    return log_refusal(
                        peer,
                        &format!("nothing (or no complete TLS handshake) within {limit:?}"),
                    );
                }
            };
            let _ = tx
                .send(Ok(ServerIo {
                    stream,
                    _place: place,
                }))
                .await;
        });
    }
}

/// Why a connection was dropped before it was served: a refusal worth a
/// warning, or a peer that went away on its own (a port probe).
enum Refusal {
    Loud(String),
    Quiet(String),
}

/// The first byte of a TLS client's first record (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Whether the client's first byte opens a TLS handshake record (a gRPC
/// client without TLS starts with `PRI * HTTP/2.0`).
async fn first_byte_is_tls(tcp: &TcpStream) -> Result<bool, Refusal> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => Err(Refusal::Quiet("closed before sending anything".into())),
        Ok(_) => Ok(first[0] == TLS_HANDSHAKE_RECORD),
        Err(e) => Err(Refusal::Quiet(format!("reading its first byte: {e}"))),
    }
}

fn log_refusal(peer: SocketAddr, why: &str) {
    warn!(%peer, reason = why, "refused a connection: TLS handshake failed");
}

/// Dial `host:port` over TCP and, with `tls`, run the TLS handshake,
/// checking the server's certificate. Errors say which.
pub async fn connect_tcp(host: &str, port: u16, tls: &ClientTls) -> io::Result<ClientIo> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port)).await?;
    tcp.set_nodelay(true)?;
    let name = tls
        .server_name_for(host)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stream = tls
        .connector()
        .connect(name, buffered(tcp))
        .await
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("TLS handshake with {host}:{port} failed: {}", describe(&e)),
            )
        })?;
    Ok(TlsIo::new(stream))
}

/// A client's TLS connection, shaped as a server's is ([`crate::io`]).
pub type ClientIo = ClientStream;

/// A tonic channel connector that dials over TLS
/// (`Endpoint::connect_with_connector`).
#[derive(Clone, Debug)]
pub struct TlsChannelConnector {
    tls: ClientTls,
}

impl TlsChannelConnector {
    pub fn new(tls: ClientTls) -> Self {
        TlsChannelConnector { tls }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<ClientIo>>> + Send>>;

impl tower::Service<tonic::transport::Uri> for TlsChannelConnector {
    type Response = TokioIo<ClientIo>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Connecting {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host"))
                })?
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            Ok(TokioIo::new(connect_tcp(&host, port, &tls).await?))
        })
    }
}
