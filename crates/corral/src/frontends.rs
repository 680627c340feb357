//! The frontends a process serves one block device on: NBD and iSCSI
//! listeners, bound up front (a busy port is an immediate, clear error) and
//! then served until shutdown. Shared by `corral engine` and `corral serve-file`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use corral_block::BlockDevice;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::shutdown::Shutdown;

/// Bound, not yet serving, frontend listeners.
pub struct FrontendListeners {
    nbd: Option<TcpListener>,
    iscsi: Option<TcpListener>,
}

/// Serving frontends: their URIs and the tasks that serve them.
pub struct Frontends {
    pub uris: Vec<String>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("{what} listener on {addr}"))?,
        )),
        None => Ok(None),
    }
}

impl FrontendListeners {
    pub async fn bind(nbd: Option<SocketAddr>, iscsi: Option<SocketAddr>) -> anyhow::Result<Self> {
        Ok(FrontendListeners {
            nbd: bind(nbd, "NBD").await?,
            iscsi: bind(iscsi, "iSCSI").await?,
        })
    }

    /// Serve `device` as export `name` (NBD) and target
    /// `iqn.2026-11.io.corral:<name>` LUN 0 (iSCSI) until `shutdown`.
    pub fn serve<D: BlockDevice>(
        self,
        name: &str,
        device: Arc<D>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Frontends> {
        let mut uris = Vec::new();
        let mut tasks = Vec::new();
        if let Some(listener) = self.nbd {
            let addr = listener.local_addr()?;
            uris.push(format!("nbd://{addr}/{name}"));
            let exports = Arc::new(corral_nbd::Exports::single(
                name.to_string(),
                Arc::clone(&device),
            ));
            let stop = shutdown.subscribe();
            tasks.push(tokio::spawn(async move {
                corral_nbd::serve(listener, exports, stop)
                    .await
                    .map_err(anyhow::Error::from)
            }));
        }
        if let Some(listener) = self.iscsi {
            let addr = listener.local_addr()?;
            let target = Arc::new(corral_iscsi::IscsiTarget::for_volume(name, device));
            uris.push(format!("iscsi://{addr}/{}/0", target.name()));
            let stop = shutdown.subscribe();
            tasks.push(tokio::spawn(async move {
                corral_iscsi::serve(listener, target, stop)
                    .await
                    .map_err(anyhow::Error::from)
            }));
        }
        Ok(Frontends { uris, tasks })
    }
}

impl Frontends {
    /// Wait for every frontend to stop; returns the errors they stopped with.
    pub async fn wait(self) -> anyhow::Result<Vec<anyhow::Error>> {
        let mut errors = Vec::new();
        for t in self.tasks {
            if let Err(e) = t.await? {
                errors.push(e);
            }
        }
        Ok(errors)
    }
}
