//! Graceful shutdown: SIGINT/SIGTERM become one broadcast that every server
//! of the process listens to.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::broadcast;

/// The process-wide shutdown signal.
#[derive(Clone)]
pub struct Shutdown {
    tx: broadcast::Sender<()>,
}

impl Shutdown {
    /// Install the signal handlers.
    pub fn install() -> anyhow::Result<Self> {
        let (tx, _) = broadcast::channel(4);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let notify = tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            let _ = notify.send(());
        });
        Ok(Shutdown { tx })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.tx.subscribe()
    }

    /// A future that resolves when shutdown is signalled.
    pub fn signalled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    }
}
