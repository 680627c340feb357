//! `corral serve-file`: the frontends over one local file, no replication.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use corral_block::{BlockDevice, FileDevice};
use tracing::info;

use crate::frontends::{FrontendListeners, read_chap_file};

pub async fn run(
    file: PathBuf,
    size: Option<u64>,
    nbd: Option<SocketAddr>,
    iscsi: Option<SocketAddr>,
    iscsi_chap: Option<PathBuf>,
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
    let shutdown = crate::shutdown::install()?;
    let chap = iscsi_chap.as_deref().map(read_chap_file).transpose()?;
    let listeners = FrontendListeners::bind(nbd, iscsi).await?;
    let serving = listeners.serve(&name, Arc::clone(&device), chap, &shutdown)?;
    for uri in &serving.uris {
        info!(file = %file.display(), size = device.size(), "serving {uri}");
    }
    if let Some(e) = serving.wait().await?.into_iter().next() {
        return Err(e);
    }
    Ok(())
}
