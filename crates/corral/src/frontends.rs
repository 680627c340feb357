//! The frontends a process serves one block device on: NBD and iSCSI
//! listeners, bound up front (a busy port is an immediate, clear error) and
//! then served until shutdown. Shared by `corral engine` (as the engine's
//! [`corral_engine::Frontends`]) and `corral serve-file`.

use std::net::SocketAddr;
use std::sync::Arc;

use std::path::Path;

use anyhow::{Context, bail};
use corral_block::BlockDevice;
use corral_iscsi::ChapConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use corral_block::accept::Shutdown;

/// Bound, not yet serving, frontend listeners.
pub struct FrontendListeners {
    nbd: Option<TcpListener>,
    iscsi: Option<TcpListener>,
    nbd_tls: Option<corral_nbd::NbdTls>,
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
            nbd_tls: None,
        })
    }

    /// Offer (or require) TLS on the NBD listener.
    pub fn with_nbd_tls(mut self, tls: Option<corral_nbd::NbdTls>) -> Self {
        self.nbd_tls = tls;
        self
    }

    /// Serve `device` as export `name` (NBD) and target
    /// `iqn.2026-11.io.corral:<name>` LUN 0 (iSCSI, behind CHAP when `chap`
    /// is given) until `shutdown`.
    pub fn serve<D: BlockDevice>(
        self,
        name: &str,
        device: Arc<D>,
        chap: Option<ChapConfig>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Frontends> {
        let mut uris = Vec::new();
        let mut tasks = Vec::new();
        if let Some(listener) = self.nbd {
            let addr = listener.local_addr()?;
            match &self.nbd_tls {
                Some(tls) if tls.require => uris.push(format!("nbds://{addr}/{name}")),
                Some(_) => {
                    uris.push(format!("nbd://{addr}/{name}"));
                    uris.push(format!("nbds://{addr}/{name}"));
                }
                None => uris.push(format!("nbd://{addr}/{name}")),
            }
            let exports = Arc::new(corral_nbd::Exports::single(
                name.to_string(),
                Arc::clone(&device),
            ));
            let stop = shutdown.clone();
            let server = corral_nbd::NbdServer::new(exports).with_tls(self.nbd_tls);
            tasks.push(tokio::spawn(async move {
                server
                    .run(listener, stop)
                    .await
                    .map_err(anyhow::Error::from)
            }));
        }
        if let Some(listener) = self.iscsi {
            let addr = listener.local_addr()?;
            let mut target = corral_iscsi::IscsiTarget::for_volume(name, device);
            if let Some(chap) = chap {
                target = target.with_chap(chap);
            }
            let target = Arc::new(target);
            uris.push(format!("iscsi://{addr}/{}/0", target.name()));
            let stop = shutdown.clone();
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

/// The NBD and iSCSI frontends of an engine, bound and waiting for the
/// volume to open.
pub struct EngineFrontends {
    pub listeners: FrontendListeners,
    pub name: String,
    pub chap: Option<ChapConfig>,
}

impl corral_engine::Frontends for EngineFrontends {
    fn serve(
        self: Box<Self>,
        volume: Arc<corral_engine::metrics::Metered<corral_engine::Volume>>,
        stop: Shutdown,
    ) -> Result<corral_engine::ServingFrontends, corral_engine::EngineError> {
        let serving = self
            .listeners
            .serve(&self.name, volume, self.chap, &stop)
            .map_err(|e| corral_engine::EngineError::Frontend(format!("{e:#}")))?;
        let uris = serving.uris.clone();
        Ok(corral_engine::ServingFrontends {
            uris,
            stopped: Box::pin(async move {
                match serving.wait().await {
                    Ok(errors) => errors.iter().map(|e| format!("{e:#}")).collect(),
                    Err(e) => vec![format!("{e:#}")],
                }
            }),
        })
    }
}

/// Read the iSCSI CHAP settings from `path`: `key = value` lines, `#`
/// comments. `user` and `secret` are what initiators must log in with;
/// `mutual_user` and `mutual_secret`, given together, are what the target
/// answers with when the initiator asks it to authenticate itself too. A
/// file (not flags) keeps the secrets out of the process list.
pub fn read_chap_file(path: &Path) -> anyhow::Result<ChapConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the CHAP file {}", path.display()))?;
    parse_chap(&text).with_context(|| format!("in the CHAP file {}", path.display()))
}

fn parse_chap(text: &str) -> anyhow::Result<ChapConfig> {
    let (mut user, mut secret, mut mutual_user, mut mutual_secret) = (None, None, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: expected `key = value`", n + 1);
        };
        let value = value.trim().to_string();
        if value.is_empty() {
            bail!("line {}: empty value", n + 1);
        }
        let slot = match key.trim() {
            "user" => &mut user,
            "secret" => &mut secret,
            "mutual_user" => &mut mutual_user,
            "mutual_secret" => &mut mutual_secret,
            other => bail!(
                "line {}: unknown key {other:?} (user, secret, mutual_user, mutual_secret)",
                n + 1
            ),
        };
        if slot.replace(value).is_some() {
            bail!("line {}: {} given twice", n + 1, key.trim());
        }
    }
    let (Some(user), Some(secret)) = (user, secret) else {
        bail!("`user` and `secret` are required");
    };
    let mutual = match (mutual_user, mutual_secret) {
        (Some(u), Some(s)) => Some((u, s)),
        (None, None) => None,
        _ => bail!("`mutual_user` and `mutual_secret` go together"),
    };
    Ok(ChapConfig {
        user,
        secret,
        mutual,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_chap;

    #[test]
    fn chap_files_parse_or_say_what_is_wrong() {
        let c = parse_chap("# one-way\nuser = alice\nsecret = s3cret-s3cret\n").unwrap();
        assert_eq!(
            (c.user.as_str(), c.secret.as_str()),
            ("alice", "s3cret-s3cret")
        );
        assert!(c.mutual.is_none());
        let c =
            parse_chap("user=a\nsecret=b\nmutual_user=tgt\nmutual_secret=other-secret\n").unwrap();
        assert_eq!(c.mutual, Some(("tgt".into(), "other-secret".into())));
        for bad in [
            "",
            "user = a\n",
            "user = a\nsecret = b\nmutual_user = t\n",
            "user = a\nsecret = b\ncolour = blue\n",
            "user = a\nuser = b\nsecret = c\n",
            "user a\nsecret = b\n",
            "user = \nsecret = b\n",
        ] {
            assert!(parse_chap(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
