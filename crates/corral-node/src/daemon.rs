//! Running the node daemon: its configuration ([`NodeConfig`]), where its
//! own files live in the data dir, and [`serve`], which puts the replica
//! services and the engine manager on one listener (and on its unix
//! socket, which the engines it starts use to reach its replicas).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_proto::v1::engine_manager_server::EngineManagerServer;
use corral_replica::server::ReplicaDaemon;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing::info;

use crate::error::NodeError;
use crate::manager::{EngineManager, ManagerConfig};
use crate::ports::PortRange;
use crate::process::Launcher;
use crate::record::{EngineBook, RecordFile};
use crate::service::EngineManagerService;
use crate::spec::LocalReplica;
use crate::spec::check_engine_args;
use crate::supervision::RestartPolicy;
use crate::supervisor::SupervisorContext;

/// The node daemon's own directory in its data dir. The leading dot keeps
/// it apart from replica directories: no volume name may start with one.
pub const STATE_DIR: &str = ".engines";
/// The record of engines, in [`STATE_DIR`].
pub const RECORD_FILE: &str = "engines.json";
/// The directory of the daemon's unix socket in its data dir (made
/// owner-only; dotted like [`STATE_DIR`]).
pub const SOCKET_DIR: &str = ".sockets";
/// The daemon's unix socket, in [`SOCKET_DIR`].
pub const SOCKET_FILE: &str = "replica.sock";

/// How a node daemon runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// The unix socket it also serves on (`None`: TCP only). Engines it
    /// starts with its replica among theirs reach that replica over it.
    pub unix_socket: Option<PathBuf>,
    pub node_id: String,
    pub engine_ports: PortRange,
    /// Engines serve their control service and frontends on this address.
    pub frontend_ip: IpAddr,
    /// This daemon's replica address as engines should name it.
    pub replica_address: String,
    /// The `corral` binary engines run from.
    pub engine_binary: PathBuf,
    /// Extra arguments for every engine.
    pub engine_args: Vec<String>,
    pub policy: RestartPolicy,
    /// How long StartEngine waits for a new engine to serve.
    pub start_timeout: Duration,
    /// How often an adopted engine (not our child) is checked.
    pub adopted_poll: Duration,
    /// Serve over mutual TLS (engines it starts get the same files through
    /// `engine_args`; its own channels follow `corral_client::use_tls`).
    pub tls: Option<corral_tls::ServerTls>,
}

impl NodeConfig {
    /// The record file of the engines.
    pub fn record_path(data_dir: &Path) -> PathBuf {
        data_dir.join(STATE_DIR).join(RECORD_FILE)
    }

    /// The unix socket a daemon serves on unless told otherwise.
    pub fn default_socket(data_dir: &Path) -> PathBuf {
        data_dir.join(SOCKET_DIR).join(SOCKET_FILE)
    }

    /// The directory of the engines' log files.
    pub fn log_dir(data_dir: &Path) -> PathBuf {
        data_dir.join(STATE_DIR)
    }

    /// Refuse a configuration that cannot work, with a one-line reason.
    pub fn check(&self) -> Result<(), NodeError> {
        let id = &self.node_id;
        if id.is_empty()
            || id.len() > 128
            || id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(NodeError::Config(format!(
                "--node-id {id:?}: give 1-128 characters without spaces"
            )));
        }
        check_engine_args(&self.engine_args)?;
        if !self.engine_binary.is_file() {
            return Err(NodeError::Config(format!(
                "--engine-binary {}: no such file",
                self.engine_binary.display()
            )));
        }
        let p = &self.policy;
        if p.first_delay.is_zero() || p.max_delay < p.first_delay {
            return Err(NodeError::Config(
                "--restart-delay must be more than 0 and at most --restart-delay-max".into(),
            ));
        }
        Ok(())
    }
}

/// The frontend address and the replica address a daemon listening on
/// `listen` uses when not told. Engines serve on loopback (127.0.0.1):
/// their frontends and control service are for this node's initiators and
/// daemons, not the network (a node's IP is opt-in, `--frontend-address`).
/// The replica address is `listen`, or for a wildcard `listen` the frontend
/// address with `listen`'s port.
pub fn default_addresses(
    listen: SocketAddr,
    frontend: Option<IpAddr>,
    replica: Option<String>,
) -> (IpAddr, String) {
    let frontend = frontend.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let replica = replica.unwrap_or_else(|| {
        if listen.ip().is_unspecified() {
            SocketAddr::new(frontend, listen.port()).to_string()
        } else {
            listen.to_string()
        }
    });
    (frontend, replica)
}

/// Run a node daemon on `listener` until `shutdown` is cancelled: the
/// replica services and the engine manager. Engines keep running after it
/// returns; the next start adopts them.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    config.check()?;
    let book = Arc::new(EngineBook::open(RecordFile::new(NodeConfig::record_path(
        &config.data_dir,
    )))?);
    let replicas = ReplicaDaemon::open(config.data_dir.clone()).await?;
    let context = SupervisorContext {
        launcher: Arc::new(Launcher {
            binary: config.engine_binary.clone(),
            extra_args: config.engine_args.clone(),
            log_dir: NodeConfig::log_dir(&config.data_dir),
            local_replica: config.unix_socket.clone().map(|socket| LocalReplica {
                address: config.replica_address.clone(),
                socket,
            }),
        }),
        book,
        policy: config.policy,
        adopted_poll: config.adopted_poll,
        shutdown: shutdown.clone(),
    };
    let manager_config = ManagerConfig {
        node_id: config.node_id.clone(),
        data_dir: config.data_dir.clone(),
        frontend_ip: config.frontend_ip,
        replica_address: config.replica_address.clone(),
        engine_ports: config.engine_ports,
        start_timeout: config.start_timeout,
    };
    let manager =
        EngineManager::open(manager_config, context, Arc::clone(replicas.registry())).await;
    info!(
        node_id = %config.node_id,
        engine_ports = %config.engine_ports,
        frontend = %config.frontend_ip,
        replica_address = %config.replica_address,
        unix_socket = ?config.unix_socket.as_ref().map(|p| p.display().to_string()),
        "node daemon serving the engine manager"
    );
    let routes = Routes::new(EngineManagerServer::new(EngineManagerService::new(manager)));
    replicas
        .with_tls(config.tls.clone())
        .with_unix(config.unix_socket.clone())
        .serve(listener, metrics, routes, shutdown)
        .await?;
    info!("node daemon stopped; its engines keep running");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_the_listen_address() {
        let specific: SocketAddr = "10.1.2.3:9500".parse().unwrap();
        assert_eq!(
            default_addresses(specific, None, None),
            ("127.0.0.1".parse().unwrap(), "10.1.2.3:9500".to_string()),
            "engines serve on loopback unless told otherwise"
        );
        let wildcard: SocketAddr = "0.0.0.0:9500".parse().unwrap();
        assert_eq!(
            default_addresses(wildcard, None, None),
            ("127.0.0.1".parse().unwrap(), "127.0.0.1:9500".to_string())
        );
        assert_eq!(
            default_addresses(wildcard, Some("10.9.9.9".parse().unwrap()), None),
            ("10.9.9.9".parse().unwrap(), "10.9.9.9:9500".to_string())
        );
        assert_eq!(
            default_addresses(specific, None, Some("node-0.corral:9500".into())).1,
            "node-0.corral:9500"
        );
    }

    #[test]
    fn a_bad_configuration_is_refused_with_a_reason() {
        let good = NodeConfig {
            data_dir: "/tmp/x".into(),
            unix_socket: None,
            node_id: "node-0".into(),
            engine_ports: "10000-10999".parse().unwrap(),
            frontend_ip: "127.0.0.1".parse().unwrap(),
            replica_address: "127.0.0.1:9500".into(),
            engine_binary: "/bin/sh".into(),
            engine_args: vec![],
            policy: RestartPolicy::default(),
            start_timeout: Duration::from_secs(30),
            adopted_poll: Duration::from_secs(1),
            tls: None,
        };
        good.check().unwrap();
        let mut bad = good.clone();
        bad.node_id = "two words".into();
        assert!(bad.check().unwrap_err().to_string().contains("--node-id"));
        let mut bad = good.clone();
        bad.engine_binary = "/nonexistent/corral".into();
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("--engine-binary")
        );
        let mut bad = good.clone();
        bad.engine_args = vec!["--listen".into(), "1.2.3.4:5".into()];
        assert!(bad.check().unwrap_err().to_string().contains("--listen"));
        let mut bad = good;
        bad.policy.first_delay = Duration::ZERO;
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("--restart-delay")
        );
    }
}
