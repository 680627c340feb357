//! Tonic over TLS, built in one place: the stream of connections a gRPC
//! server serves ([`incoming`]) and the connector a channel dials with
//! ([`connect_tcp`], or [`TlsChannelConnector`] for tonic).
//!
//! The data path does not change: TLS wraps the TCP stream below HTTP/2,
//! tonic and the services see the same bytes, and a process without TLS
//! files serves and dials plain TCP exactly as before.
//!
//! A listener hands each accepted connection's TLS handshake to a task of
//! its own, bounded in number ([`MAX_HANDSHAKES`]) and in time
//! ([`HANDSHAKE_TIMEOUT`]), so a client that connects and says nothing
//! (or a slow one) never stops others from being served. A refused
//! handshake is logged with the peer's address and the reason.

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
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

use crate::{ClientTls, ServerTls, describe};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes a listener runs at once; further connections wait in the
/// kernel's accept queue.
pub const MAX_HANDSHAKES: usize = 64;

/// One connection a gRPC server serves.
pub enum ServerIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            ServerIo::Plain(s) => s,
            ServerIo::Tls(s) => s.get_ref().0,
        }
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
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
    let (tx, rx) = mpsc::channel::<io::Result<ServerIo>>(16);
    tokio::spawn(accept_loop(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<ServerTls>,
    tx: mpsc::Sender<io::Result<ServerIo>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = Arc::clone(&handshakes).acquire_owned() => match p {
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
        match &tls {
            None => {
                if tx.send(Ok(ServerIo::Plain(tcp))).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                let acceptor = tls.grpc_acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let handshake = async {
                        check_tls_record(&tcp).await?;
                        acceptor.accept(tcp).await.map_err(|e| describe(&e))
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(ServerIo::Tls(Box::new(stream)))).await;
                        }
                        Ok(Err(why)) => log_refusal(peer, &why),
                        Err(_) => log_refusal(
                            peer,
                            &format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                        ),
                    }
                });
            }
        }
    }
}

/// The first byte of a TLS client's first record (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Refuse, with a reason an operator understands, a client that speaks
/// plain TCP (a gRPC client without TLS sends `PRI * HTTP/2.0`).
async fn check_tls_record(tcp: &TcpStream) -> Result<(), String> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => Err("closed before a TLS handshake".into()),
        Ok(_) if first[0] == TLS_HANDSHAKE_RECORD => Ok(()),
        Ok(_) => Err("not a TLS client (plain TCP): this listener requires mutual TLS".into()),
        Err(e) => Err(format!("reading the TLS handshake: {e}")),
    }
}

fn log_refusal(peer: SocketAddr, why: &str) {
    warn!(%peer, reason = why, "refused a connection: TLS handshake failed");
}

/// Dial `host:port` over TCP and, with `tls`, run the TLS handshake,
/// checking the server's certificate. Errors say which.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    tls: &ClientTls,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port)).await?;
    tcp.set_nodelay(true)?;
    let name = tls
        .server_name_for(host)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    tls.connector().connect(name, tcp).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("TLS handshake with {host}:{port} failed: {}", describe(&e)),
        )
    })
}

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

type Connecting = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<tonic::transport::Uri> for TlsChannelConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
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
