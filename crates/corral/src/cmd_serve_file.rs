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
    name: Option<String>,
    block_size: u32,
) -> anyhow::Result<()> {
    let Some(nbd) = nbd else {
        bail!("give a frontend to serve on: --nbd ADDR");
    };
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
    let listener = TcpListener::bind(nbd)
        .await
        .with_context(|| format!("NBD listener on {nbd}"))?;
    let addr = listener.local_addr()?;
    info!(file = %file.display(), size = device.size(), "serving nbd://{addr}/{name}");
    let exports = Arc::new(corral_nbd::Exports::single(name, device));
    corral_nbd::serve(listener, exports, shutdown.subscribe()).await?;
    Ok(())
}
