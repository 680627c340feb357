//! Graceful shutdown: SIGINT/SIGTERM cancel one token that every server of
//! the process stops on ([`corral_block::accept::Shutdown`], level-triggered:
//! a signal that arrives before a part has started is not lost on it).

use corral_block::accept::Shutdown;
use tokio::signal::unix::{SignalKind, signal};

/// Install the signal handlers; the returned token is cancelled at the
/// first SIGTERM or SIGINT.
pub fn install() -> anyhow::Result<Shutdown> {
    let token = Shutdown::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}
