//! `corral node`: the per-node daemon — the replica services plus the
//! engine manager (corral-node). This only parses flags and binds the
//! listeners.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use corral_node::{NodeConfig, PortRange, RestartPolicy};
use tokio::net::TcpListener;

use crate::units::parse_duration;

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Address to serve gRPC on (ReplicaControl, ReplicaData, EngineManager).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory holding one subdirectory per replica, and the engines'
    /// record and logs in `.engines/`.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Also serve the gRPC services on this unix socket, for the engines
    /// started here whose replicas include this daemon's (they get
    /// `--local-replica`): owner-only, no TLS. Default:
    /// DATA_DIR/.sockets/replica.sock; `off`: TCP only.
    #[arg(long, value_name = "PATH|off")]
    pub listen_unix: Option<PathBuf>,
    /// This node's name (the Kubernetes node name on a cluster).
    #[arg(long)]
    pub node_id: String,
    /// Ports engines started here serve on (control and frontends).
    #[arg(long, default_value = "10000-10999", value_parser = clap::value_parser!(PortRange))]
    pub engine_ports: PortRange,
    /// Address engines serve their frontends and control service on
    /// (default: the --listen address, or 127.0.0.1 when that is a wildcard).
    #[arg(long)]
    pub frontend_address: Option<IpAddr>,
    /// This daemon's replica address as engines should name it (default:
    /// --listen, or --frontend-address with --listen's port when --listen
    /// is a wildcard).
    #[arg(long, value_name = "HOST:PORT")]
    pub replica_address: Option<String>,
    /// The corral binary engines run from (default: this one).
    #[arg(long)]
    pub engine_binary: Option<PathBuf>,
    /// Extra arguments for every engine, separated by spaces
    /// (e.g. "--open-timeout 30s --rebuild-bandwidth 100MiB").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub engine_args: String,
    /// How long StartEngine waits for an engine to serve before answering
    /// with its status as it is.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub start_timeout: Duration,
    /// How long a stopping engine has to flush and exit before SIGKILL.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
    /// Delay before restarting an engine that exited; doubles at each
    /// restart in a row...
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub restart_delay: Duration,
    /// ...up to this...
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub restart_delay_max: Duration,
    /// ...and starts over once an engine has run this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub restart_reset_after: Duration,
    /// Serve Prometheus metrics (the replica daemon's) on http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

/// How often an adopted engine (one started before the daemon restarted,
/// so not its child) is checked for having ended.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

impl NodeArgs {
    fn config(&self, tls: &crate::tls::TlsArgs) -> anyhow::Result<NodeConfig> {
        let engine_binary = match &self.engine_binary {
            Some(p) => p.clone(),
            None => current_binary()?,
        };
        let (frontend_ip, replica_address) = corral_node::default_addresses(
            self.listen,
            self.frontend_address,
            self.replica_address.clone(),
        );
        let unix_socket = match &self.listen_unix {
            None => {
                let path = NodeConfig::default_socket(&self.data_dir);
                if path.as_os_str().len() > corral_replica::unix::MAX_PATH_LEN {
                    // Too long for a unix socket: give --listen-unix a
                    // shorter path to have one.
                    tracing::warn!(path = %path.display(),
                        "the data dir's path is too long for a unix socket: engines here reach this daemon over TCP; give --listen-unix a shorter path");
                    None
                } else {
                    Some(path)
                }
            }
            Some(p) if p.as_os_str() == "off" => None,
            Some(p) => Some(p.clone()),
        };
        let config = NodeConfig {
            data_dir: self.data_dir.clone(),
            unix_socket,
            node_id: self.node_id.clone(),
            engine_ports: self.engine_ports,
            frontend_ip,
            replica_address,
            engine_binary,
            // Engines it starts use the node's TLS files.
            engine_args: tls
                .child_args()?
                .into_iter()
                .chain(self.engine_args.split_whitespace().map(String::from))
                .collect(),
            policy: RestartPolicy {
                first_delay: self.restart_delay,
                max_delay: self.restart_delay_max,
                reset_after: self.restart_reset_after,
                stop_timeout: self.stop_timeout,
            },
            start_timeout: self.start_timeout,
            adopted_poll: ADOPTED_POLL,
            tls: tls.install()?,
        };
        config.check()?;
        Ok(config)
    }
}

/// This executable's path. Once the file is replaced (an upgrade, a
/// rebuild), Linux reports it with " (deleted)": engines then start from
/// the new file at the same path.
fn current_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()
        .context("cannot tell which binary this is; give --engine-binary")?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

pub async fn run(args: NodeArgs, tls: crate::tls::TlsArgs) -> anyhow::Result<()> {
    let config = args.config(&tls)?;
    let shutdown = crate::shutdown::install()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let metrics = match args.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics listener on {addr}"))?,
        ),
        None => None,
    };
    corral_node::serve(config, listener, metrics, shutdown).await?;
    Ok(())
}
