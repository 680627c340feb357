//! The process's TLS, from the flags every command takes: `--tls-cert`,
//! `--tls-key`, `--tls-ca` (mutual TLS on every gRPC listener and channel
//! of the process; without them, plain TCP), and `--tls-server-name` (the
//! name every server's certificate must carry, instead of the host
//! dialled). See docs/security.md.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use corral_tls::{ClientTls, ServerTls, TlsFiles};

#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate (PEM, chain leaf first): mutual TLS on
    /// every gRPC listener and channel. Needs --tls-key and --tls-ca.
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signs every peer this process trusts (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Check servers' certificates for this name instead of the host dialled.
    #[arg(long, global = true, value_name = "NAME", requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The files named, made absolute (child processes may run elsewhere).
    pub fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        let Some(files) = TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )?
        else {
            return Ok(None);
        };
        let absolute = |p: PathBuf| {
            std::path::absolute(&p).with_context(|| format!("TLS file {}", p.display()))
        };
        Ok(Some(TlsFiles {
            cert: absolute(files.cert)?,
            key: absolute(files.key)?,
            ca: absolute(files.ca)?,
        }))
    }

    /// Set this process's TLS up: every channel it dials from now on runs
    /// mutual TLS, and the returned configuration is for its listeners.
    /// `None`: plain TCP everywhere.
    pub fn install(&self) -> anyhow::Result<Option<ServerTls>> {
        let Some(files) = self.files()? else {
            return Ok(None);
        };
        install_files(files, self.tls_server_name.clone()).map(Some)
    }

    /// The same flags, for a child process (an engine started by a node
    /// daemon, the processes of `corral dev`).
    pub fn child_args(&self) -> anyhow::Result<Vec<String>> {
        let Some(files) = self.files()? else {
            return Ok(Vec::new());
        };
        let mut args = files.flags();
        if let Some(name) = &self.tls_server_name {
            args.push("--tls-server-name".into());
            args.push(name.clone());
        }
        Ok(args)
    }
}

/// [`TlsArgs::install`] for files already chosen.
pub fn install_files(files: TlsFiles, server_name: Option<String>) -> anyhow::Result<ServerTls> {
    let client = ClientTls::new(files.clone())?.with_server_name(server_name);
    corral_client::use_tls(client)?;
    Ok(ServerTls::new(files)?)
}

/// Whether a process's NBD frontend offers TLS (NBD_OPT_STARTTLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NbdTlsMode {
    /// Plain NBD only.
    Off,
    /// Each client chooses (fio, nbdfuse and the kernel client stay plain).
    Allow,
    /// Every client must upgrade to TLS with a certificate the CA signed.
    Require,
}

/// The NBD frontend's TLS: `mode` (default: `allow` when the process has
/// TLS files, `off` when not) with the process's files.
pub fn nbd_tls(
    mode: Option<NbdTlsMode>,
    server: Option<&ServerTls>,
) -> anyhow::Result<Option<corral_nbd::NbdTls>> {
    let mode = mode.unwrap_or(if server.is_some() {
        NbdTlsMode::Allow
    } else {
        NbdTlsMode::Off
    });
    match (mode, server) {
        (NbdTlsMode::Off, _) => Ok(None),
        (_, None) => bail!("--nbd-tls allow|require needs --tls-cert, --tls-key and --tls-ca"),
        (mode, Some(server)) => Ok(Some(corral_nbd::NbdTls::new(
            server.clone(),
            mode == NbdTlsMode::Require,
        ))),
    }
}
