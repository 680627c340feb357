//! `corral volume --engine ADDR ...`: inspect a running engine's volume.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use corral_proto::v1::{
    ListEngineReplicasRequest, ReplicaMode, VolumeInfoRequest,
    engine_control_client::EngineControlClient,
};
use serde_json::json;

#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// The engine's control address (host:port).
    #[arg(long)]
    pub engine: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Name, size, epoch, membership generation, state and write policy.
    Info,
    /// The volume's replicas.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReplicaCommand {
    /// Each replica's address and mode (RW, WO, ERR).
    Ls,
}

fn mode_name(mode: i32) -> &'static str {
    match ReplicaMode::try_from(mode) {
        Ok(ReplicaMode::Rw) => "RW",
        Ok(ReplicaMode::Wo) => "WO",
        Ok(ReplicaMode::Err) => "ERR",
        _ => "UNKNOWN",
    }
}

pub async fn run(args: VolumeArgs) -> anyhow::Result<()> {
    let uri = if args.engine.contains("://") {
        args.engine.clone()
    } else {
        format!("http://{}", args.engine)
    };
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .with_context(|| format!("bad engine address {:?}", args.engine))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach the engine at {}", args.engine))?;
    let mut client = EngineControlClient::new(channel);
    match args.command {
        VolumeCommand::Info => {
            let v = client
                .get_volume_info(VolumeInfoRequest {})
                .await
                .context("volume info")?
                .into_inner();
            if args.json {
                let out = json!({
                    "name": v.name, "size": v.size, "block_size": v.block_size,
                    "chunk_size": v.chunk_size, "epoch": v.epoch, "generation": v.generation,
                    "write_policy": v.write_policy, "state": v.state,
                    "replicas_total": v.replicas_total, "replicas_rw": v.replicas_rw,
                    "frontends": v.frontends, "writability": v.writability,
                });
                println!("{out}");
            } else {
                println!("name:         {}", v.name);
                println!("size:         {} bytes", v.size);
                println!("block size:   {}", v.block_size);
                println!("chunk size:   {}", v.chunk_size);
                println!("state:        {}", v.state);
                println!("epoch:        {}", v.epoch);
                println!("generation:   {}", v.generation);
                println!("replicas:     {} RW of {}", v.replicas_rw, v.replicas_total);
                println!("write policy: {}", v.write_policy);
                println!("writability:  {}", v.writability);
                println!("frontends:    {}", v.frontends);
            }
        }
        VolumeCommand::Replica {
            command: ReplicaCommand::Ls,
        } => {
            let list = client
                .list_replicas(ListEngineReplicasRequest {})
                .await
                .context("replica list")?
                .into_inner();
            if args.json {
                let items: Vec<_> = list
                    .replicas
                    .iter()
                    .map(|r| {
                        json!({
                            "address": r.address, "mode": mode_name(r.mode),
                            "instance_id": r.instance_id, "last_error": r.last_error,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(items));
            } else {
                println!(
                    "{:<24} {:<5} {:<38} LAST ERROR",
                    "ADDRESS", "MODE", "INSTANCE"
                );
                for r in list.replicas {
                    println!(
                        "{:<24} {:<5} {:<38} {}",
                        r.address,
                        mode_name(r.mode),
                        r.instance_id,
                        r.last_error
                    );
                }
            }
        }
    }
    Ok(())
}
