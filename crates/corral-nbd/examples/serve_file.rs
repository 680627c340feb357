//! Serve one file over NBD until Ctrl-C: a manual-testing aid.
//!
//! ```text
//! cargo run -p corral-nbd --example serve_file -- disk.img 1073741824 127.0.0.1:10809 vol0
//! nbdinfo nbd://127.0.0.1:10809/vol0
//! ```

use std::sync::Arc;

use corral_block::FileDevice;
use corral_nbd::{Exports, serve};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: serve_file PATH SIZE_BYTES [ADDR] [EXPORT]";
    let path = args.next().ok_or(usage)?;
    let size: u64 = args.next().ok_or(usage)?.parse()?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let name = args.next().unwrap_or_else(|| "vol0".into());

    let device = FileDevice::open(path.as_ref(), Some(size), 512)?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("serving {path} as nbd://{}/{name}", listener.local_addr()?);
    let stop = corral_block::accept::Shutdown::new();
    let server = tokio::spawn(serve(
        listener,
        Arc::new(Exports::single(name, Arc::new(device))),
        stop.clone(),
    ));
    tokio::signal::ctrl_c().await?;
    stop.cancel();
    server.await??;
    Ok(())
}
