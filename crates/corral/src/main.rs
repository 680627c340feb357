//! `corral`: the command-line binary. Each subcommand wires library crates
//! together and does nothing else:
//! - `replica`: a replica daemon (corral-replica);
//! - `node`: the per-node daemon: replica daemon + engine manager (corral-node);
//! - `csi`: the CSI plugin (corral-csi);
//! - `engine`: one volume's engine with its frontends (corral-engine, corral-nbd);
//! - `volume`: talk to a running engine's control service;
//! - `backup`: list, remove and collect backups on a target (corral-backup);
//! - `serve-file`: the frontends over a plain file, no replication;
//! - `dev`: three replica daemons and an engine on loopback, for trying it out.

mod cmd_backup;
mod cmd_csi;
mod cmd_dev;
mod cmd_engine;
mod cmd_node;
mod cmd_serve_file;
mod cmd_volume;
mod copy_tuning;
mod frontends;
mod shutdown;
mod tls;
mod units;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "corral", version, about = "A replicated block-storage engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads that run this process's network and protocol work (the async
    /// runtime's workers; blocking disk I/O has its own pool). Default: 1 for
    /// `engine` and `serve-file`, whose connections each run on one task
    /// anyway and which a node runs one per volume; one per core for the
    /// others. See docs/decisions.md, decision 26.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    io_threads: Option<u16>,
    #[command(flatten)]
    tls: tls::TlsArgs,
}

impl Command {
    /// Runtime worker threads when `--io-threads` is not given.
    fn default_io_threads(&self) -> usize {
        match self {
            Command::Engine(_) | Command::ServeFile(_) => 1,
            _ => std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a replica daemon hosting many replicas under one data dir.
    Replica {
        /// Address to serve gRPC on.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory holding one subdirectory per replica.
        #[arg(long)]
        data_dir: PathBuf,
        /// Also serve the same gRPC services on a unix socket at PATH, for
        /// an engine on this node (`corral engine --local-replica`): no TLS,
        /// the file is owner-only (0600), a stale one is replaced, and it
        /// is removed at exit.
        #[arg(long, value_name = "PATH")]
        listen_unix: Option<PathBuf>,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
    /// Run the per-node daemon: a replica daemon plus the engine manager
    /// that runs the engines of the volumes attached on this node.
    Node(cmd_node::NodeArgs),
    /// Run the CSI plugin (Identity, Controller and/or Node services).
    Csi(cmd_csi::CsiArgs),
    /// Run the engine of one volume.
    Engine(cmd_engine::EngineArgs),
    /// Inspect a running engine's volume.
    Volume(cmd_volume::VolumeArgs),
    /// The backups on a target: ls, rm, gc.
    Backup(cmd_backup::BackupArgs),
    /// Serve a local file over the frontends, without replication.
    ServeFile(cmd_serve_file::ServeFileArgs),
    /// Start three replica daemons and an engine on loopback.
    Dev(cmd_dev::DevArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Parse the command line; a bad one gets a one-line error and exit code 2.
fn parse_cli() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                let text = e.to_string();
                let summary: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                    .filter(|l| !l.is_empty())
                    .collect();
                let line = summary.join(" ");
                eprintln!(
                    "corral: {} (see corral --help)",
                    line.strip_prefix("error: ").unwrap_or(&line)
                );
                std::process::exit(2);
            }
        },
    }
}

fn main() {
    copy_tuning::restart_with_vector_copies();
    let cli = parse_cli();
    init_logging();
    let threads = cli
        .io_threads
        .map_or_else(|| cli.command.default_io_threads(), usize::from);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corral: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = result {
        eprintln!("corral: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = cli.tls;
    match cli.command {
        Command::Replica {
            listen,
            data_dir,
            listen_unix,
            metrics,
        } => {
            let server_tls = tls.install()?;
            let shutdown = shutdown::install()?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("listen on {listen}: {e}"))?;
            let metrics = match metrics {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow::anyhow!("metrics listener on {addr}: {e}"))?,
                ),
                None => None,
            };
            corral_replica::server::ReplicaDaemon::open(data_dir)
                .await?
                .with_tls(server_tls)
                .with_unix(listen_unix)
                .serve(
                    listener,
                    metrics,
                    tonic::service::Routes::default(),
                    shutdown,
                )
                .await?;
            Ok(())
        }
        Command::Node(args) => cmd_node::run(args, tls).await,
        Command::Csi(args) => {
            tls.install()?;
            cmd_csi::run(args).await
        }
        Command::Engine(args) => cmd_engine::run(args, tls).await,
        Command::Volume(args) => {
            tls.install()?;
            cmd_volume::run(args).await
        }
        Command::ServeFile(args) => cmd_serve_file::run(args, tls).await,
        Command::Dev(args) => cmd_dev::run(args, tls).await,
        Command::Backup(args) => cmd_backup::run(args).await,
    }
}

/// mimalloc as the allocator: the data path allocates a few small buffers
/// and futures per I/O on one thread and frees them on another, where glibc's
/// malloc spent several per cent of the engine's time (measured in
/// docs/benchmarks.md, decision 26).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
