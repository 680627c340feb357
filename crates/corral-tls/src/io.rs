//! The byte path of a TLS connection, shaped so that TLS costs crypto and
//! little else: [`TlsIo`] is what every corral TLS connection (gRPC both
//! ways, NBD) reads and writes through.
//!
//! ```text
//!   caller (HTTP/2, the NBD transmission loop)
//!   TlsIo / BufWriter   writes: gathered (64 KiB) until flushed
//!   TlsStream           rustls: seals and opens records
//!   BufReader           reads: up to 64 KiB per read(2)
//!   TcpStream
//! ```
//!
//! - **A read buffer under TLS.** rustls pulls ciphertext from its
//!   transport at most 4 KiB at a time (its deframer's read size),
//!   whatever has arrived: straight on the socket, a 16 KiB record cost
//!   five `recvfrom` calls, and a burst of replies to 32 requests of 4 KiB
//!   over thirty. The [`BufReader`] between the socket and rustls takes up
//!   to [`READ_BUFFER`] bytes per system call and hands rustls its 4 KiB
//!   pieces from memory. It is filled only when rustls asks for more and it
//!   is empty, so it never holds back bytes that arrived (rustls is handed
//!   them at once), and the TLS handshake sees the socket's bytes exactly
//!   as they came (nothing is read before it starts). A read that comes
//!   back short clears the socket's readiness, so the next one costs no
//!   system call until more arrives.
//! - **Writes gathered above TLS.** rustls seals one record per write it
//!   is handed and tokio-rustls sends it at once; HTTP/2 writes frame heads
//!   and payloads as separate pieces and the NBD server one reply header
//!   and payload after another. Gathered into a [`BufWriter`] of
//!   [`WRITE_BUFFER`] bytes, a burst costs a few full records and one
//!   `writev`. Callers flush after every burst (HTTP/2 does; the NBD server
//!   once per loop turn), so nothing waits.
//!
//! Reads above TLS need nothing more: tokio-rustls's `poll_read` already
//! returns the plaintext of every record that has arrived (not one record
//! per call), as a plain socket's read returns every byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter, ReadBuf};
use tokio::net::TcpStream;

/// Bytes taken from the socket per `read` under TLS.
pub const READ_BUFFER: usize = 64 << 10;

/// Bytes of plaintext gathered before rustls seals them (four full TLS
/// records).
pub const WRITE_BUFFER: usize = 64 << 10;

/// The socket as rustls sees it: reads buffered (see the module's docs).
pub type BufferedTcp = BufReader<TcpStream>;

/// A server's side of a corral TLS connection.
pub type ServerStream = TlsIo<tokio_rustls::server::TlsStream<BufferedTcp>>;

/// A client's side of a corral TLS connection.
pub type ClientStream = TlsIo<tokio_rustls::client::TlsStream<BufferedTcp>>;

/// The socket wrapped for a TLS handshake: what [`crate::ServerTls`]'s
/// acceptors and [`crate::ClientTls`]'s connector are handed.
pub fn buffered(tcp: TcpStream) -> BufferedTcp {
    BufReader::with_capacity(READ_BUFFER, tcp)
}

/// A TLS stream with corral's read and write shaping (see the module's
/// docs). Writes wait in a buffer until flushed: flush after every burst.
pub struct TlsIo<T> {
    io: BufWriter<T>,
}

impl<T: AsyncWrite> std::fmt::Debug for TlsIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("unflushed", &self.io.buffer().len())
            .finish()
    }
}

impl<T: AsyncRead + AsyncWrite> TlsIo<T> {
    /// Shape `stream`, an established TLS stream.
    pub fn new(stream: T) -> TlsIo<T> {
        TlsIo {
            io: BufWriter::with_capacity(WRITE_BUFFER, stream),
        }
    }

    /// The TLS stream.
    pub fn get_ref(&self) -> &T {
        self.io.get_ref()
    }
}

impl ServerStream {
    /// The socket below.
    pub fn tcp(&self) -> &TcpStream {
        self.get_ref().get_ref().0.get_ref()
    }
}

impl ClientStream {
    /// The socket below.
    pub fn tcp(&self) -> &TcpStream {
        self.get_ref().get_ref().0.get_ref()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
