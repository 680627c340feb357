//! `corral volume --engine ADDR ...`: inspect a running engine's volume.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use corral_client::EngineControl;
use corral_proto::v1::{RebuildStatus, ReplicaMode};
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
    /// Name, size, epoch, membership generation, state, write policy, rebuilds.
    Info,
    /// The volume's replicas.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Progress of rebuilds (a live progress bar on a terminal; --watch to follow).
    RebuildStatus {
        /// Keep printing until no rebuild is running.
        #[arg(long)]
        watch: bool,
    },
    /// Compare all RW replicas chunk by chunk (by checksum); exit 1 on any difference.
    Verify,
    /// Grow the volume online to SIZE (e.g. 2GiB): every replica, then the
    /// engine; iSCSI initiators are told, NBD clients see it on their next
    /// connection. Shrinking is refused.
    Expand {
        /// The new size: a multiple of 4096 and of the block size.
        #[arg(value_parser = crate::units::parse_size)]
        size: u64,
    },
    /// Snapshots of the volume: create, ls, rm.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Backups of the volume to a target (docs/backups.md).
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// A clone's fill (the volume was started with `corral engine
    /// --clone-from`): how far it is, and whether it still needs its source.
    Clone {
        #[command(subcommand)]
        command: CloneCommand,
    },
    /// While the engine waits to open the volume: trust this replica's data.
    Salvage {
        /// Required: salvage can lose writes that only the other replicas hold.
        #[arg(long)]
        force: bool,
        /// The replica daemon address to trust.
        replica: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot on every RW replica (writes pause for about one round
    /// trip). Idempotent by name.
    Create { name: String },
    /// The snapshots, oldest first, and the space each layer takes.
    Ls,
    /// Delete a snapshot; the replicas merge it away in the background.
    Rm { name: String },
    /// Make the volume's contents the snapshot's again (what was written
    /// since is dropped; later snapshots stay). No client may be attached and
    /// every replica must be RW.
    Revert { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Back a snapshot up (taking one if none is named), incremental
    /// against the newest older backup of the volume on the target. S3
    /// keys come from the engine (its --s3-credentials file or environment), never this command line.
    Create {
        /// `file:///DIR` or `s3://BUCKET/PREFIX`.
        #[arg(long)]
        target: String,
        /// The snapshot to back up (default: take one now).
        #[arg(long)]
        snapshot: Option<String>,
        /// The backup's name (default: the snapshot's).
        #[arg(long)]
        name: Option<String>,
        /// An S3-compatible endpoint, e.g. http://127.0.0.1:9000.
        #[arg(long)]
        s3_endpoint: Option<String>,
        /// Then keep only the newest N backups of the volume on the target
        /// and delete the data the others alone named (older than an hour).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        retain: Option<u32>,
        /// Give up after this long (e.g. 2h).
        #[arg(long, default_value = "24h", value_parser = crate::units::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum CloneCommand {
    /// Source, snapshot, bytes filled of the total, done or not; exit 1 for
    /// a volume that is not a clone.
    Status {
        /// Wait until the fill is done (printing progress), at most this long (e.g. 10m).
        #[arg(long, value_parser = crate::units::parse_duration)]
        wait: Option<Duration>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReplicaCommand {
    /// Each replica's address and mode (RW, WO, ERR).
    Ls,
    /// Add a replica (it joins in WO mode and is rebuilt), or retry one in ERR now.
    Add { address: String },
    /// Remove a replica from the volume.
    Rm { address: String },
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
    let client = EngineControl::connect(&args.engine, Duration::from_secs(30))
        .await
        .with_context(|| format!("cannot reach the engine at {}", args.engine))?;
    match args.command {
        VolumeCommand::Info => {
            let v = client.info().await?;
            if args.json {
                let out = json!({
                    "name": v.name, "size": v.size, "block_size": v.block_size,
                    "chunk_size": v.chunk_size, "epoch": v.epoch, "generation": v.generation,
                    "write_policy": v.write_policy, "state": v.state,
                    "replicas_total": v.replicas_total, "replicas_rw": v.replicas_rw,
                    "frontends": v.frontends, "writability": v.writability,
                    "repaired_blocks": v.repaired_blocks, "open_reason": v.open_reason,
                    "stale_replica_timeout_ms": v.stale_replica_timeout_ms,
                    "rebuilds": v.rebuilds.iter().map(rebuild_json).collect::<Vec<_>>(),
                    "clone": v.clone.as_ref().map(clone_json),
                    "layers": v.layers.iter().map(|l| json!({
                        "snapshot": (!l.snapshot.is_empty()).then_some(&l.snapshot),
                        "provisioned_bytes": l.provisioned_bytes,
                        "allocated_bytes": l.allocated_bytes, "deleting": l.deleting,
                    })).collect::<Vec<_>>(),
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
                println!("repaired:     {} block(s)", v.repaired_blocks);
                if !v.open_reason.is_empty() {
                    println!("waiting for:  {}", v.open_reason);
                }
                for r in &v.rebuilds {
                    println!("rebuild:      {}", rebuild_line(r));
                }
                if let Some(c) = &v.clone {
                    println!("clone:        {}", clone_line(c));
                }
                for l in &v.layers {
                    let name = if l.snapshot.is_empty() {
                        "(head)"
                    } else {
                        l.snapshot.as_str()
                    };
                    println!(
                        "layer:        {name}: {} of {} bytes allocated{}",
                        l.allocated_bytes,
                        l.provisioned_bytes,
                        if l.deleting { " (merging away)" } else { "" }
                    );
                }
            }
        }
        VolumeCommand::Replica {
            command: ReplicaCommand::Add { address },
        } => {
            println!("{}", client.add_replica(&address).await?);
        }
        VolumeCommand::Replica {
            command: ReplicaCommand::Rm { address },
        } => {
            println!("{}", client.remove_replica(&address).await?);
        }
        VolumeCommand::RebuildStatus { watch } => {
            let tty = std::io::stdout().is_terminal() && !args.json;
            let live = watch || tty;
            let mut drawn = 0;
            loop {
                let list = client.rebuild_status().await?;
                let running = list.iter().any(|r| r.state == "running");
                if args.json {
                    let items: Vec<_> = list.iter().map(rebuild_json).collect();
                    println!("{}", serde_json::Value::Array(items));
                } else if list.is_empty() {
                    println!("no rebuild since the engine started");
                } else if tty {
                    // Redraw in place: one line per rebuild.
                    if drawn > 0 {
                        print!("\x1b[{drawn}A\x1b[J");
                    }
                    for r in &list {
                        println!("{}", progress_bar(r));
                    }
                    drawn = list.len();
                } else {
                    for r in &list {
                        println!("{}", rebuild_line(r));
                    }
                }
                if !live || !running {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        VolumeCommand::Verify => {
            let r = client.verify().await?;
            if args.json {
                let diffs: Vec<_> = r
                    .differences
                    .iter()
                    .map(
                        |d| json!({"offset": d.offset, "length": d.length, "replicas": d.replicas}),
                    )
                    .collect();
                println!(
                    "{}",
                    json!({"replicas_compared": r.replicas_compared, "chunks_compared": r.chunks_compared, "differences": diffs})
                );
            } else {
                println!(
                    "compared {} chunk(s) across {} RW replica(s): {} difference(s)",
                    r.chunks_compared,
                    r.replicas_compared,
                    r.differences.len()
                );
                for d in r.differences.iter().take(50) {
                    println!(
                        "  [{}, +{}) differs on {}",
                        d.offset,
                        d.length,
                        d.replicas.join(", ")
                    );
                }
            }
            if !r.differences.is_empty() {
                anyhow::bail!("replicas differ in {} chunk(s)", r.differences.len());
            }
        }
        VolumeCommand::Clone {
            command: CloneCommand::Status { wait },
        } => {
            let deadline = wait.map(|w| std::time::Instant::now() + w);
            loop {
                let v = client.info().await?;
                // An engine still opening its volume does not know yet.
                if v.state == "opening" && deadline.is_some_and(|d| std::time::Instant::now() < d) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                let Some(c) = v.clone else {
                    anyhow::bail!(
                        "volume {} is not a clone (or its fill finished before this engine started)",
                        v.name
                    );
                };
                // With --json, one document: the status the wait ended on
                // (the text form prints a progress line per poll).
                let last = deadline.is_none() || c.done;
                if args.json {
                    if last {
                        println!("{}", clone_json(&c));
                    }
                } else {
                    println!("{}", clone_line(&c));
                }
                match deadline {
                    None => break,
                    Some(_) if c.done => break,
                    Some(d) if std::time::Instant::now() >= d => {
                        anyhow::bail!(
                            "the clone is not filled yet ({} of {} bytes)",
                            c.filled_bytes,
                            c.total_bytes
                        )
                    }
                    Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        VolumeCommand::Expand { size } => {
            let r = client.expand(size).await?;
            if args.json {
                println!(
                    "{}",
                    json!({"old_size": r.old_size, "new_size": r.new_size,
                        "generation": r.generation, "grown": r.grown, "failed": r.failed,
                        "message": r.message})
                );
            } else {
                println!("{}", r.message);
            }
        }
        VolumeCommand::Backup {
            command:
                BackupCommand::Create {
                    target,
                    snapshot,
                    name,
                    s3_endpoint,
                    retain,
                    timeout,
                },
        } => {
            let request = corral_proto::v1::CreateBackupRequest {
                target,
                snapshot: snapshot.unwrap_or_default(),
                name: name.unwrap_or_default(),
                s3_endpoint: s3_endpoint.unwrap_or_default(),
                retain: retain.unwrap_or(0),
            };
            // On a terminal, a progress line redrawn on stderr while the
            // engine works (from `volume info`); scripts get --json.
            let watcher = (!args.json && std::io::stderr().is_terminal()).then(|| {
                let client = client.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(info) = client.info().await
                            && let Some(b) = info.backup
                        {
                            eprint!("\r\x1b[K{}", backup_progress_line(&b));
                        }
                    }
                })
            });
            let r = client.create_backup(request, timeout).await;
            if let Some(w) = watcher {
                w.abort();
                eprint!("\r\x1b[K");
            }
            let r = r?;
            if args.json {
                println!(
                    "{}",
                    json!({"name": r.name, "snapshot": r.snapshot,
                        "parent": (!r.parent.is_empty()).then_some(&r.parent),
                        "blocks_read": r.blocks_read, "blocks_stored": r.blocks_stored,
                        "blocks_deduplicated": r.blocks_deduplicated,
                        "zero_blocks": r.zero_blocks, "bytes_put": r.bytes_put,
                        "packs_put": r.packs_put, "pages_put": r.pages_put,
                        "removed": r.removed, "gc_bytes_freed": r.gc_bytes_freed,
                        "gc_skipped": (!r.gc_skipped.is_empty()).then_some(&r.gc_skipped)})
                );
            } else {
                let kind = if r.parent.is_empty() {
                    "full".to_string()
                } else {
                    format!("incremental on {}", r.parent)
                };
                println!(
                    "backup {} of snapshot {} ({kind}): {} blocks of 64 KiB read, {} stored, {} already there, {} zero; {:.1} MiB put",
                    r.name,
                    r.snapshot,
                    r.blocks_read,
                    r.blocks_stored,
                    r.blocks_deduplicated,
                    r.zero_blocks,
                    r.bytes_put as f64 / (1 << 20) as f64
                );
                if !r.removed.is_empty() {
                    println!(
                        "removed {} (keeping the last {}); {:.1} MiB of their data deleted{}",
                        r.removed.join(", "),
                        retain.unwrap_or(0),
                        r.gc_bytes_freed as f64 / (1 << 20) as f64,
                        if r.gc_skipped.is_empty() {
                            String::new()
                        } else {
                            format!(" (collection skipped: {})", r.gc_skipped)
                        }
                    );
                }
            }
        }
        VolumeCommand::Snapshot { command } => match command {
            SnapshotCommand::Create { name } => {
                let r = client.create_snapshot(&name).await?;
                if args.json {
                    let s = r.snapshot.unwrap_or_default();
                    println!(
                        "{}",
                        json!({"name": s.name, "created_unix_ms": s.created_unix_ms,
                            "size": s.size, "replicas": r.done, "failed": r.failed})
                    );
                } else {
                    println!("{}", r.message);
                    for f in &r.failed {
                        println!("  failed (now ERR): {f}");
                    }
                }
            }
            SnapshotCommand::Revert { name } => {
                let r = client.revert_snapshot(&name).await?;
                if args.json {
                    println!(
                        "{}",
                        json!({"name": name, "replicas": r.done, "failed": r.failed})
                    );
                } else {
                    println!("{}", r.message);
                    for f in &r.failed {
                        println!("  failed (now ERR, copied in full when it returns): {f}");
                    }
                }
            }
            SnapshotCommand::Rm { name } => {
                let r = client.delete_snapshot(&name).await?;
                if args.json {
                    println!("{}", json!({"name": name, "replicas": r.done}));
                } else {
                    println!("{}", r.message);
                }
            }
            SnapshotCommand::Ls => {
                let r = client.list_snapshots().await?;
                if args.json {
                    let snaps: Vec<_> = r
                        .snapshots
                        .iter()
                        .map(|s| {
                            json!({"name": s.name, "created_unix_ms": s.created_unix_ms,
                            "size": s.size, "allocated_bytes": s.allocated_bytes})
                        })
                        .collect();
                    let layers: Vec<_> = r
                        .layers
                        .iter()
                        .map(|l| {
                            json!({"snapshot": (!l.snapshot.is_empty()).then_some(&l.snapshot),
                            "provisioned_bytes": l.provisioned_bytes,
                            "allocated_bytes": l.allocated_bytes, "deleting": l.deleting})
                        })
                        .collect();
                    println!(
                        "{}",
                        json!({"snapshots": snaps, "layers": layers, "merge_pending": r.merge_pending,
                        "merge_error": (!r.merge_error.is_empty()).then_some(&r.merge_error)})
                    );
                } else {
                    println!(
                        "{:<32} {:>14} {:>14} {:>14}",
                        "LAYER", "CREATED(ms)", "SIZE", "ALLOCATED"
                    );
                    for l in &r.layers {
                        let created = r
                            .snapshots
                            .iter()
                            .find(|s| s.name == l.snapshot)
                            .map(|s| s.created_unix_ms.to_string())
                            .unwrap_or_else(|| "-".into());
                        let name = if l.snapshot.is_empty() {
                            "(head)".to_string()
                        } else if l.deleting {
                            format!("{} (merging)", l.snapshot)
                        } else {
                            l.snapshot.clone()
                        };
                        println!(
                            "{:<32} {:>14} {:>14} {:>14}",
                            name, created, l.provisioned_bytes, l.allocated_bytes
                        );
                    }
                    if !r.merge_error.is_empty() {
                        println!("merge stuck (retried until it goes on): {}", r.merge_error);
                    }
                }
            }
        },
        VolumeCommand::Salvage { force, replica } => {
            if !force {
                anyhow::bail!(
                    "salvage trusts {replica} and rebuilds every other replica from it, losing writes only they hold; add --force"
                );
            }
            println!("{}", client.salvage(&replica).await?);
        }
        VolumeCommand::Replica {
            command: ReplicaCommand::Ls,
        } => {
            let replicas = client.replicas().await?;
            if args.json {
                let items: Vec<_> = replicas
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
                for r in replicas {
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rebuild_json(r: &RebuildStatus) -> serde_json::Value {
    json!({
        "address": r.address, "kind": r.kind, "state": r.state,
        "total_bytes": r.total_bytes, "done_bytes": r.done_bytes,
        "copied_bytes": r.copied_bytes, "skipped_bytes": r.skipped_bytes,
        "elapsed_ms": r.elapsed_ms, "eta_ms": r.eta_ms, "error": r.error,
        "snapshots_total": r.snapshots_total, "snapshots_done": r.snapshots_done,
        "snapshot": r.snapshot,
    })
}

fn rebuild_line(r: &RebuildStatus) -> String {
    if r.snapshots_total > 0 {
        // A snapshot replay, before the rebuild: counted in snapshots.
        return format!(
            "{} {} {}: snapshot {} of {} ({}), {:.1} MiB compared, {:.1} MiB copied, {:.1}s",
            r.address,
            r.kind,
            r.state,
            (r.snapshots_done + 1).min(r.snapshots_total),
            r.snapshots_total,
            r.snapshot,
            mib(r.done_bytes),
            mib(r.copied_bytes),
            r.elapsed_ms as f64 / 1000.0
        );
    }
    let pct = if r.total_bytes == 0 {
        100.0
    } else {
        r.done_bytes as f64 * 100.0 / r.total_bytes as f64
    };
    let mut line = format!(
        "{} {} {}: {:.1}% of {:.1} MiB walked, {:.1} MiB copied, {:.1} MiB identical, {:.1}s",
        r.address,
        r.kind,
        r.state,
        pct,
        mib(r.total_bytes),
        mib(r.copied_bytes),
        mib(r.skipped_bytes),
        r.elapsed_ms as f64 / 1000.0
    );
    if r.state == "running" && r.eta_ms > 0 {
        line.push_str(&format!(", ETA {:.0}s", r.eta_ms as f64 / 1000.0));
    }
    if !r.error.is_empty() {
        line.push_str(&format!(" ({})", r.error));
    }
    line
}

fn progress_bar(r: &RebuildStatus) -> String {
    const WIDTH: usize = 30;
    let frac = if r.snapshots_total > 0 {
        f64::from(r.snapshots_done) / f64::from(r.snapshots_total)
    } else if r.total_bytes == 0 {
        1.0
    } else {
        r.done_bytes as f64 / r.total_bytes as f64
    };
    let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
    format!(
        "[{}{}] {}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        rebuild_line(r)
    )
}

fn backup_progress_line(b: &corral_proto::v1::BackupProgress) -> String {
    const WIDTH: usize = 30;
    let done = if b.blocks_total == 0 {
        0
    } else {
        ((b.blocks_done as f64 / b.blocks_total as f64) * WIDTH as f64) as usize
    };
    format!(
        "[{}{}] backup {}: {} of {} blocks of 64 KiB read, {:.1} MiB put",
        "#".repeat(done.min(WIDTH)),
        "-".repeat(WIDTH - done.min(WIDTH)),
        b.name,
        b.blocks_done,
        b.blocks_total,
        b.bytes_put as f64 / (1 << 20) as f64
    )
}

fn clone_json(c: &corral_proto::v1::CloneStatus) -> serde_json::Value {
    json!({"source_engine": c.source_engine, "snapshot": c.snapshot,
        "backup": (!c.backup.is_empty()).then_some(&c.backup),
        "filled_bytes": c.filled_bytes, "total_bytes": c.total_bytes, "done": c.done,
        "error": (!c.error.is_empty()).then_some(&c.error)})
}

fn clone_line(c: &corral_proto::v1::CloneStatus) -> String {
    let state = if c.done { "done" } else { "filling" };
    let from = if c.backup.is_empty() {
        format!("snapshot {} of {}", c.snapshot, c.source_engine)
    } else {
        format!("backup {}", c.backup)
    };
    let mut line = format!(
        "{state}: {} of {} bytes from {from}",
        c.filled_bytes, c.total_bytes
    );
    if !c.error.is_empty() {
        line.push_str(&format!(" (last error: {})", c.error));
    }
    line
}
