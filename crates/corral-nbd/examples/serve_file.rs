//! Serve one file over NBD until Ctrl-C: a manual-testing aid.
//!
//! ```text
//! cargo run -p corral-nbd --example serve_file -- disk.img 1073741824 127.0.0.1:10809 vol0
//! nbdinfo nbd://127.0.0.1:10809/vol0
//! ```
//!
//! With TLS (`TLS_REQUIRE=1` to refuse plaintext clients; `RUST_LOG=debug`
//! for the server's log):
//!
//! ```text
//! TLS_CERT=server.pem TLS_KEY=server-key.pem TLS_CA=ca.pem TLS_REQUIRE=1 \
//!     cargo run -p corral-nbd --example serve_file -- disk.img 1073741824
//! nbdinfo 'nbds://127.0.0.1:10809/vol0?tls-certificates=DIR'
//! ```

use std::sync::Arc;

use corral_block::FileDevice;
use corral_nbd::{Exports, NbdServer, NbdTls};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let usage = "usage: serve_file PATH SIZE_BYTES [ADDR] [EXPORT]";
    let path = args.next().ok_or(usage)?;
    let size: u64 = args.next().ok_or(usage)?.parse()?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let name = args.next().unwrap_or_else(|| "vol0".into());
    let env = |k: &str| std::env::var_os(k).map(Into::into);
    let tls =
        match corral_tls::TlsFiles::from_flags(env("TLS_CERT"), env("TLS_KEY"), env("TLS_CA"))? {
            Some(files) => Some(NbdTls::new(
                corral_tls::ServerTls::new(files)?,
                std::env::var("TLS_REQUIRE").is_ok_and(|v| v == "1"),
            )),
            None => None,
        };

    let device = FileDevice::open(path.as_ref(), Some(size), 512)?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    eprintln!(
        "serving {path} as {scheme}://{}/{name}",
        listener.local_addr()?
    );
    let stop = corral_block::accept::Shutdown::new();
    let server = NbdServer::new(Arc::new(Exports::single(name, Arc::new(device)))).with_tls(tls);
    let server = tokio::spawn(server.run(listener, stop.clone()));
    tokio::signal::ctrl_c().await?;
    stop.cancel();
    server.await??;
    Ok(())
}
