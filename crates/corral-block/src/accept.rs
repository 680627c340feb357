//! The accept loop both frontends share, and the one cancellation primitive
//! every corral server stops on.
//!
//! [`Shutdown`] is `tokio_util`'s [`CancellationToken`]: cancelling it is
//! level-triggered — a task that starts listening after the cancellation
//! sees it at once — so a signal that arrives while a process is still
//! starting up is never lost, and child tokens stop one part of a process
//! without the rest.
//!
//! [`serve_connections`] accepts TCP connections until its token is
//! cancelled, with at most `max_connections` at once (further clients wait
//! in the listen backlog), sets TCP_NODELAY and hands each connection to
//! the protocol's handler together with the token; once cancelled it stops
//! accepting, closes the listener and waits until every handler has
//! returned (handlers finish what is in flight on their own terms).
//!
//! [`live_connections`] counts the frontend connections open in this
//! process: an engine serves one volume, so it is the number of clients
//! attached to it (snapshot revert refuses while it is not zero).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Frontend connections being served in this process, all servers together.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Frontend (NBD, iSCSI) connections open in this process now.
pub fn live_connections() -> usize {
    LIVE.load(Ordering::Acquire)
}

/// Counts one live connection while it exists.
struct LiveConnection;

impl LiveConnection {
    fn new() -> Self {
        LIVE.fetch_add(1, Ordering::AcqRel);
        LiveConnection
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serve connections accepted on `listener` with `handler` until `stop` is
/// cancelled, then wait for the handlers to finish. `what` names the server
/// in logs ("NBD server", "iSCSI target"); each handler runs in a span
/// named `span` with the peer's address.
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    stop: Shutdown,
    what: &'static str,
    span: &'static str,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, Shutdown) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    info!(?local, "{what} listening");
    let limit = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        while let Some(done) = conns.try_join_next() {
            report_join(done);
        }
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE or a connection reset before accept.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let live = LiveConnection::new();
        let served = handler(stream, peer, stop.clone());
        conns.spawn(
            async move {
                let _permit = permit;
                let _live = live;
                served.await;
            }
            .instrument(tracing::info_span!("conn", kind = span, %peer)),
        );
    }
    drop(listener);
    // Reap connections that already ended, so the count is of live ones.
    while let Some(done) = conns.try_join_next() {
        report_join(done);
    }
    info!(
        connections = conns.len(),
        "{what} shutting down; draining connections"
    );
    while let Some(done) = conns.join_next().await {
        report_join(done);
    }
    info!("{what} stopped");
}

fn report_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        warn!(error = %e, "connection task failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_until_cancelled_then_drains_what_is_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Shutdown::new();
        // An echo handler that ends its connection when told to stop.
        let server = tokio::spawn(serve_connections(
            listener,
            4,
            stop.clone(),
            "echo server",
            "echo",
            |mut s: TcpStream, _peer, stop: Shutdown| async move {
                let mut b = [0u8; 4];
                tokio::select! {
                    r = s.read_exact(&mut b) => if r.is_ok() { let _ = s.write_all(&b).await; },
                    _ = stop.cancelled() => {}
                }
            },
        ));
        let mut a = TcpStream::connect(addr).await.unwrap();
        a.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // A connection still open when the server stops is ended by its
        // handler, and the server returns.
        let _b = TcpStream::connect(addr).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server drains and returns")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn a_cancellation_before_the_server_starts_is_not_lost() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = Shutdown::new();
        stop.cancel();
        let served =
            serve_connections(listener, 1, stop, "late server", "late", |_, _, _| async {});
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("returns at once");
    }
}
