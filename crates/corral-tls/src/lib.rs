//! Mutual TLS for corral: every gRPC hop (engine ↔ replica daemons, CLI ↔
//! engine, CSI plugin and node daemons ↔ node daemons) and the NBD
//! frontend's STARTTLS.
//!
//! A process is given three PEM files (`--tls-cert`, `--tls-key`,
//! `--tls-ca`): its own certificate chain, its private key, and the CA that
//! signs every peer it trusts. Both ends of every connection present a
//! certificate and check the other's against that CA: a listener refuses a
//! client without a certificate, with one the CA did not sign, or with an
//! expired one; a client refuses a server likewise and also checks that the
//! server's certificate names the host it dialled (or the name given with
//! `--tls-server-name`).
//!
//! The files are looked at again (their size and modification time) at
//! every new connection and read again when they changed, so certificates
//! rotate without restarts: connections made after the change use the new
//! files, connections already open keep the session they have. A changed
//! set of files that does not load (a certificate written before its key,
//! say) leaves the last good configuration in place and logs a warning; the
//! next change is tried again.
//!
//! - [`ServerTls`] and [`ClientTls`]: the reloading rustls configurations;
//! - [`grpc`]: a tonic listener stream and a channel connector over them;
//! - [`io`]: the byte path every TLS connection reads and writes through
//!   (a read buffer under rustls, writes gathered above it);
//! - [`pki`]: a throwaway CA and certificates, for `corral dev` and tests.
//!
//! rustls runs on the `ring` provider, chosen per configuration (never the
//! process-wide default), with TLS 1.2 and 1.3. AES-128-GCM is preferred
//! over AES-256-GCM and ChaCha20-Poly1305, and a listener applies its own
//! order rather than the client's: on machines with AES instructions
//! (AES-NI, ARMv8 crypto) AES-GCM is the cheapest AEAD, and AES-128 does 10
//! rounds per block to AES-256's 14 on a path where every byte a volume
//! moves is sealed once per hop. A client offering only AES-256 or
//! ChaCha20-Poly1305 still gets it.

pub mod grpc;
pub mod io;
pub mod pki;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{info, warn};

/// What went wrong loading or using TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS needs all three of --tls-cert, --tls-key and --tls-ca ({missing} is missing)")]
    Incomplete { missing: &'static str },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Pem { path: PathBuf, why: String },
    #[error("TLS configuration from {cert} and {key}: {why}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("{name:?} cannot be checked against a certificate: {why}")]
    ServerName { name: String, why: String },
    #[error("making certificates: {0}")]
    Generate(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The three PEM files of a process's TLS identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This process's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates that sign every peer this process trusts.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files from the three command-line flags: all three or none.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, _) => Err(TlsError::Incomplete {
                missing: if cert.is_none() {
                    "--tls-cert"
                } else if key.is_none() {
                    "--tls-key"
                } else {
                    "--tls-ca"
                },
            }),
        }
    }

    /// The command-line flags that name these files, for a child process
    /// (`--tls-cert C --tls-key K --tls-ca A`).
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }

    /// What the files look like now: size and modification time of each
    /// (`None` for one that cannot be looked at).
    fn stamp(&self) -> Stamp {
        let one = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        [one(&self.cert), one(&self.key), one(&self.ca)]
    }
}

type Stamp = [Option<(u64, Option<SystemTime>)>; 3];

/// A configuration built from [`TlsFiles`], built again when they change.
struct Reloading<T> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<T, TlsError>,
    current: Mutex<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(files: TlsFiles, build: fn(&TlsFiles) -> Result<T, TlsError>) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let built = build(&files)?;
        Ok(Reloading {
            files,
            build,
            current: Mutex::new((stamp, Arc::new(built))),
        })
    }

    /// The configuration for a new connection: rebuilt first if the files
    /// changed since it was last looked at.
    fn get(&self) -> Arc<T> {
        let stamp = self.files.stamp();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if stamp != current.0 {
            current.0 = stamp;
            match (self.build)(&self.files) {
                Ok(built) => {
                    info!(cert = %self.files.cert.display(), "TLS files changed: new connections use them");
                    current.1 = Arc::new(built);
                }
                Err(e) => warn!(
                    error = %e,
                    "TLS files changed but do not load; new connections keep the previous ones"
                ),
            }
        }
        Arc::clone(&current.1)
    }
}

/// The cipher suites in the order corral prefers them: AES-128-GCM, then
/// AES-256-GCM, then ChaCha20-Poly1305 (each TLS 1.3 before TLS 1.2).
fn suite_rank(suite: rustls::SupportedCipherSuite) -> (u8, u8) {
    use rustls::CipherSuite as C;
    let version = match suite {
        rustls::SupportedCipherSuite::Tls13(_) => 0,
        _ => 1,
    };
    let cipher = match suite.suite() {
        C::TLS13_AES_128_GCM_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384
        | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    (version, cipher)
}

fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| suite_rank(*s));
    Arc::new(provider)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            why: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            why: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        why: format!("no private key in PEM form: {e}"),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn config_error(files: &TlsFiles, e: impl std::fmt::Display) -> TlsError {
    TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        why: e.to_string(),
    }
}

/// ALPN for gRPC (HTTP/2).
const H2: &[u8] = b"h2";

/// A listener's configurations: with ALPN `h2` for gRPC, without for NBD.
struct ServerConfigs {
    grpc: Arc<rustls::ServerConfig>,
    plain: Arc<rustls::ServerConfig>,
}

fn build_server(files: &TlsFiles) -> Result<ServerConfigs, TlsError> {
    let roots = load_roots(&files.ca)?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| config_error(files, e))?;
    let plain = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(files, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| config_error(files, e))?;
    let mut plain = plain;
    // Our order (AES-128-GCM first), not the client's: see the crate docs.
    plain.ignore_client_order = true;
    let mut grpc = plain.clone();
    grpc.alpn_protocols = vec![H2.to_vec()];
    Ok(ServerConfigs {
        grpc: Arc::new(grpc),
        plain: Arc::new(plain),
    })
}

fn build_client(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(files, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| config_error(files, e))?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}

/// A listener's TLS: requires a client certificate signed by the CA.
/// Cheap to clone; every clone sees reloads.
#[derive(Clone)]
pub struct ServerTls {
    configs: Arc<Reloading<ServerConfigs>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.configs.files)
            .finish()
    }
}

impl ServerTls {
    /// Load the files (an error now if they do not load).
    pub fn new(files: TlsFiles) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            configs: Arc::new(Reloading::new(files, build_server)?),
        })
    }

    /// The acceptor for a new gRPC connection (ALPN `h2`).
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.configs.get().grpc))
    }

    /// The acceptor for a new connection of a protocol without ALPN (NBD's
    /// STARTTLS).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.configs.get().plain))
    }

    /// Run the server's side of a TLS handshake (no ALPN: NBD's STARTTLS)
    /// on `tcp`, which must not have been read from since the client began
    /// its handshake; the stream shaped as [`io`] describes.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<io::ServerStream> {
        let tls = self.acceptor().accept(io::buffered(tcp)).await?;
        Ok(io::TlsIo::new(tls))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.configs.files
    }
}

/// A client's TLS: presents this process's certificate and checks the
/// server's against the CA and the name dialled. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<Reloading<Arc<rustls::ClientConfig>>>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.config.files)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Load the files (an error now if they do not load).
    pub fn new(files: TlsFiles) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            config: Arc::new(Reloading::new(files, build_client)?),
            server_name: None,
        })
    }

    /// Check every server's certificate for `name` instead of the host
    /// dialled (a cluster whose daemons share one service name).
    pub fn with_server_name(mut self, name: Option<String>) -> ClientTls {
        self.server_name = name;
        self
    }

    /// The connector for a new connection.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&*self.config.get()))
    }

    /// The name a server reached at `host` must have in its certificate.
    pub fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(bare.to_string()).map_err(|e| TlsError::ServerName {
            name: name.to_string(),
            why: e.to_string(),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.config.files
    }
}

/// A readable description of a failed TLS handshake or connection, with
/// every cause in the chain ("invalid peer certificate: UnknownIssuer").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests;
