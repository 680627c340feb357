//! Serving the plugin: the services this process was asked for, on the
//! unix socket the CO names (`unix:///path/csi.sock`), until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::csi::v1 as csi;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::attach::AttachMethod;
use crate::controller::ControllerService;
use crate::daemons::Daemons;
use crate::host::{Host, SystemHost};
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::reconcile::Reconciler;
use crate::staging::NodeVolumes;

/// What `corral csi` runs.
#[derive(Clone, Debug)]
pub struct CsiConfig {
    /// `unix:///path/csi.sock` (or a plain path).
    pub endpoint: String,
    pub node_id: String,
    /// Serve the controller service, over these node daemons.
    pub controller: Option<Vec<String>>,
    /// Serve the node service: how volumes attach, where state is kept.
    pub node: Option<(AttachMethod, PathBuf)>,
    /// Bound on each call to a node daemon.
    pub daemon_timeout: Duration,
    /// How often the controller looks for stale replicas to replace.
    pub reconcile_interval: Duration,
}

/// Why the plugin could not serve.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("endpoint {0:?}: use unix:///path/to/csi.sock")]
    Endpoint(String),
    #[error("serve neither --controller nor --node: give at least one")]
    NoService,
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The socket path of an endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    if !path.starts_with('/') {
        return Err(CsiError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Serve until `shutdown` is cancelled; the socket is removed after.
pub async fn serve(config: CsiConfig, shutdown: CancellationToken) -> Result<(), CsiError> {
    serve_on_host(config, Arc::new(SystemHost), shutdown).await
}

/// Like [`serve`], with the node service acting on `host`.
pub async fn serve_on_host(
    config: CsiConfig,
    host: Arc<dyn Host>,
    shutdown: CancellationToken,
) -> Result<(), CsiError> {
    if config.controller.is_none() && config.node.is_none() {
        return Err(CsiError::NoService);
    }
    let path = socket_path(&config.endpoint)?;
    let socket_err = |source| CsiError::Socket {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(socket_err)?;
    }
    // A socket left by a previous run (the kubelet restarts plugins).
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(socket_err)?;
    let mut router = tonic::transport::Server::builder().add_service(
        csi::identity_server::IdentityServer::new(IdentityService {
            controller: config.controller.is_some(),
        }),
    );
    if let Some(daemons) = &config.controller {
        let daemons = Daemons::new(daemons.clone(), config.daemon_timeout);
        let reconciler = Reconciler {
            daemons: daemons.clone(),
            interval: config.reconcile_interval,
        };
        tokio::spawn(reconciler.run(shutdown.clone()));
        router = router.add_service(csi::controller_server::ControllerServer::new(
            ControllerService::new(daemons),
        ));
    }
    if let Some((method, state_dir)) = &config.node {
        std::fs::create_dir_all(state_dir).map_err(|source| CsiError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let volumes = NodeVolumes::new(host, state_dir.clone(), *method);
        router = router.add_service(csi::node_server::NodeServer::new(NodeService::new(
            config.node_id.clone(),
            volumes,
        )));
    }
    tracing::info!(
        endpoint = %path.display(),
        node_id = %config.node_id,
        controller = config.controller.is_some(),
        node = config.node.is_some(),
        "CSI plugin serving"
    );
    let served = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
        .await;
    let _ = std::fs::remove_file(&path);
    served.map_err(CsiError::from)
}
