//! `corral csi`: the CSI plugin (corral-csi) — its flags, nothing more.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use corral_csi::attach::AttachMethod;

use crate::units::parse_duration;

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// Where to serve: unix:///PATH/csi.sock.
    #[arg(long)]
    pub endpoint: String,
    /// This node's name (Kubernetes' node name).
    #[arg(long)]
    pub node_id: String,
    /// Serve the Controller service.
    #[arg(long)]
    pub controller: bool,
    /// Serve the Node service.
    #[arg(long)]
    pub node: bool,
    /// The node daemons (controller): ADDR or NAME:PORT; a name resolving
    /// to several addresses (a headless Service) stands for all of them.
    #[arg(long = "daemons", value_name = "ADDR|NAME:PORT")]
    pub daemons: Vec<String>,
    /// How the node attaches volumes: iscsi (open-iscsi), nbd (kernel NBD
    /// client) or fuse (nbdfuse and a loop device).
    #[arg(long, default_value = "iscsi")]
    pub attach: AttachMethod,
    /// Where the node service records what it staged.
    #[arg(long, default_value = "/var/lib/corral/csi")]
    pub state_dir: PathBuf,
    /// Bound on each call to a node daemon.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub daemon_timeout: Duration,
    /// How often the controller looks for replicas that have been away
    /// longer than their volume's staleReplicaTimeout, to replace them.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
}

pub async fn run(args: CsiArgs) -> anyhow::Result<()> {
    if !args.controller && !args.node {
        bail!("give --controller, --node or both");
    }
    if args.controller && args.daemons.is_empty() {
        bail!("--controller needs at least one --daemons ADDR");
    }
    if args.reconcile_interval.is_zero() {
        bail!("--reconcile-interval must be more than 0");
    }
    if args.node_id.trim().is_empty() {
        bail!("--node-id must not be empty");
    }
    let config = corral_csi::CsiConfig {
        endpoint: args.endpoint,
        node_id: args.node_id,
        controller: args.controller.then_some(args.daemons),
        node: args.node.then_some((args.attach, args.state_dir)),
        daemon_timeout: args.daemon_timeout,
        reconcile_interval: args.reconcile_interval,
    };
    let shutdown = crate::shutdown::install()?;
    corral_csi::serve(config, shutdown).await?;
    Ok(())
}
