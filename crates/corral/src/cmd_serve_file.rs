//! `corral serve-file`: the frontends over one local file, no replication.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use corral_block::{BlockDevice, FileDevice};
use tokio::net::TcpListener;
use tracing::info;

use crate::shutdown::Shutdown;

pub async fn run(
    file: PathBuf,
    size: Option<u64>,
    nbd: Option<SocketAddr>,
    iscsi: Option<SocketAddr>,
    name: Option<String>,
    block_size: u32,
) -> anyhow::Result<()> {
    if nbd.is_none() && iscsi.is_none() {
        bail!("give a frontend to serve on: --nbd ADDR and/or --iscsi ADDR");
    }
    let name = match name {
        Some(n) => n,
        None => file
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .context("cannot derive an export name from the file name; give --name")?,
    };
    let device = Arc::new(FileDevice::open(&file, size, block_size)?);
    let shutdown = Shutdown::install()?;
    // Bind every listener first: a busy port is an immediate, clear error.
    let nbd = match nbd {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("NBD listener on {addr}"))?,
        ),
        None => None,
    };
    let iscsi = match iscsi {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("iSCSI listener on {addr}"))?,
        ),
        None => None,
    };
    let mut tasks = Vec::new();
    if let Some(listener) = nbd {
        let addr = listener.local_addr()?;
        info!(file = %file.display(), size = device.size(), "serving nbd://{addr}/{name}");
        let exports = Arc::new(corral_nbd::Exports::single(
            name.clone(),
            Arc::clone(&device),
        ));
        let stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            corral_nbd::serve(listener, exports, stop)
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    if let Some(listener) = iscsi {
        let addr = listener.local_addr()?;
        let target = Arc::new(corral_iscsi::IscsiTarget::for_volume(&name, device));
        info!(file = %file.display(), "serving iscsi://{addr}/{}/0", target.name());
        let stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            corral_iscsi::serve(listener, target, stop)
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
