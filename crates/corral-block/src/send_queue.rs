//! The reply side of a frontend connection: encoded replies waiting for the
//! socket, in wire order, written with one non-blocking `writev` per turn.
//!
//! Both frontends (NBD and iSCSI) serve a connection from one task: requests
//! run as futures polled by that task, and each finished request's reply is
//! encoded into a [`SendQueue`]. Headers and small payloads are copied
//! together into one buffer; large read payloads are queued as their own
//! `Bytes` and go out from where they are, without a copy. Once per loop turn
//! the task calls [`SendQueue::write_to`], so the replies of requests that
//! finished together share one system call.
//!
//! The queue knows nothing of either protocol: a frontend writes its header
//! bytes into [`SendQueue::buf`] and hands payloads to
//! [`SendQueue::payload`].

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// Payloads up to this size are copied next to their header.
pub const COPY_MAX: usize = 16 << 10;
/// Capacity the gathering buffer is (re)filled to.
const GATHER_CHUNK: usize = 256 << 10;
/// Room kept for headers beyond a copied payload.
const HEADER_ROOM: usize = 1024;
/// Buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// Encoded replies waiting for the socket, in the order they were queued.
#[derive(Default)]
pub struct SendQueue {
    /// Headers and small payloads being gathered.
    gather: BytesMut,
    /// Sealed gathered buffers and large payloads, in wire order.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    queued: usize,
}

impl SendQueue {
    /// An empty queue.
    pub fn new() -> Self {
        SendQueue::default()
    }

    /// Whether nothing waits for the socket.
    pub fn is_empty(&self) -> bool {
        self.gather.is_empty() && self.chunks.is_empty()
    }

    /// Bytes waiting for the socket.
    pub fn len(&self) -> usize {
        self.queued + self.gather.len()
    }

    /// The buffer to append header bytes (and small payloads) to, with room
    /// for at least `payload` more bytes than a header needs.
    pub fn buf(&mut self, payload: usize) -> &mut BytesMut {
        if self.gather.capacity() - self.gather.len() < HEADER_ROOM + payload.min(COPY_MAX) {
            // Reclaims the old allocation once every sealed part of it is written.
            self.gather.reserve(GATHER_CHUNK);
        }
        &mut self.gather
    }

    /// Queue a payload after the bytes already gathered: copied when small,
    /// queued by reference when large.
    pub fn payload(&mut self, data: &Bytes) {
        if data.len() <= COPY_MAX {
            self.buf(data.len()).extend_from_slice(data);
        } else {
            self.seal();
            self.queued += data.len();
            self.chunks.push_back(data.clone());
        }
    }

    fn seal(&mut self) {
        if !self.gather.is_empty() {
            let b = self.gather.split().freeze();
            self.queued += b.len();
            self.chunks.push_back(b);
        }
    }

    /// Write as much as the socket takes without blocking. Returns once the
    /// queue is empty or the socket would block (wait for
    /// `stream.writable()` and call again).
    pub fn write_to(&mut self, stream: &TcpStream) -> io::Result<()> {
        self.seal();
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (s, c) in slices.iter_mut().zip(self.chunks.iter()) {
                *s = IoSlice::new(c);
                n += 1;
            }
            let written = match stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            self.consume(written);
        }
        Ok(())
    }

    /// Write as much as `w` takes, for a connection that is not a bare
    /// socket (a TLS stream: the payloads are copied into its records
    /// anyway). `Ready(Ok(()))` once the queue is empty; `Pending` (with
    /// the waker registered) when `w` takes no more for now. A writer that
    /// buffers (TLS) must still be flushed after the queue empties.
    pub fn poll_write_to<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        self.seal();
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (s, c) in slices.iter_mut().zip(self.chunks.iter()) {
                *s = IoSlice::new(c);
                n += 1;
            }
            let written = match w.as_mut().poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => written,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.consume(written);
        }
        Poll::Ready(Ok(()))
    }

    /// Drop `written` bytes from the front of the sealed chunks.
    fn consume(&mut self, written: usize) {
        self.queued -= written;
        let mut left = written;
        while left > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }

    /// Drop everything queued (the peer is gone).
    pub fn clear(&mut self) {
        self.gather.clear();
        self.chunks.clear();
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn replies_arrive_whole_and_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            all
        });
        let (server, _) = listener.accept().await.unwrap();
        let mut q = SendQueue::new();
        let mut expect = Vec::new();
        for i in 0..200u32 {
            let header = i.to_be_bytes();
            q.buf(0).extend_from_slice(&header);
            expect.extend_from_slice(&header);
            // Alternate small (copied) and large (referenced) payloads.
            let len = if i % 3 == 0 { COPY_MAX * 2 + 7 } else { 100 };
            let payload = Bytes::from(vec![i as u8; len]);
            q.payload(&payload);
            expect.extend_from_slice(&payload);
        }
        assert_eq!(q.len(), expect.len());
        while !q.is_empty() {
            q.write_to(&server).unwrap();
            if !q.is_empty() {
                server.writable().await.unwrap();
            }
        }
        drop(server);
        assert_eq!(client.await.unwrap(), expect);
    }

    #[tokio::test]
    async fn poll_write_to_drains_through_a_small_pipe() {
        // A pipe smaller than the queue: the writer blocks, and the queue
        // keeps what is left until it is polled again.
        let (mut w, mut r) = tokio::io::duplex(4096);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut q = SendQueue::new();
        let mut expect = Vec::new();
        for i in 0..50u32 {
            q.buf(0).extend_from_slice(&i.to_be_bytes());
            expect.extend_from_slice(&i.to_be_bytes());
            let payload = Bytes::from(vec![i as u8; if i % 2 == 0 { 100 } else { COPY_MAX + 1 }]);
            q.payload(&payload);
            expect.extend_from_slice(&payload);
        }
        std::future::poll_fn(|cx| q.poll_write_to(cx, Pin::new(&mut w)))
            .await
            .unwrap();
        assert!(q.is_empty());
        drop(w);
        assert_eq!(reader.await.unwrap(), expect);
    }
}
