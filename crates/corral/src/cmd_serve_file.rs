//! `corral serve-file`: the frontends over one local file, no replication.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use corral_block::{BlockDevice, FileDevice};
use tracing::info;

use crate::frontends::{FrontendListeners, read_chap_file};

#[derive(clap::Args, Debug)]
pub struct ServeFileArgs {
    /// The file to serve (created when missing).
    #[arg(long)]
    pub file: PathBuf,
    /// Size to create or grow the file to (e.g. 1GiB).
    #[arg(long, value_parser = crate::units::parse_size)]
    pub size: Option<u64>,
    /// NBD listen address.
    #[arg(long)]
    pub nbd: Option<SocketAddr>,
    /// iSCSI listen address (target iqn.2026-11.io.corral:<name>, LUN 0).
    #[arg(long)]
    pub iscsi: Option<SocketAddr>,
    /// Require iSCSI CHAP, with the credentials in this file (`user = ...`,
    /// `secret = ...`; with `mutual_user` and `mutual_secret` too, initiators
    /// must also have the target prove itself: mutual CHAP).
    #[arg(long, value_name = "FILE", requires = "iscsi")]
    pub iscsi_chap: Option<PathBuf>,
    /// Export name (default: the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// Logical block size advertised to initiators (512 or 4096).
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// TLS on the NBD frontend: off, allow or require (default: allow
    /// when --tls-* files are given, else off).
    #[arg(long, value_enum, requires = "nbd")]
    pub nbd_tls: Option<crate::tls::NbdTlsMode>,
}

pub async fn run(args: ServeFileArgs, tls: crate::tls::TlsArgs) -> anyhow::Result<()> {
    let ServeFileArgs {
        file,
        size,
        nbd,
        iscsi,
        iscsi_chap,
        name,
        block_size,
        nbd_tls,
    } = args;
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
    let server_tls = tls.install()?;
    let listeners = FrontendListeners::bind(nbd, iscsi)
        .await?
        .with_nbd_tls(crate::tls::nbd_tls(nbd_tls, server_tls.as_ref())?);
    let serving = listeners.serve(&name, Arc::clone(&device), chap, &shutdown)?;
    for uri in &serving.uris {
        info!(file = %file.display(), size = device.size(), "serving {uri}");
    }
    if let Some(e) = serving.wait().await?.into_iter().next() {
        return Err(e);
    }
    Ok(())
}
