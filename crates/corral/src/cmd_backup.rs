//! `corral backup`: what a backup target holds, without an engine — list
//! the backups, remove one, collect the data no backup names
//! (corral-backup's catalog). Backing up is `corral volume backup create`
//! (through the engine that serves the volume); restoring is `corral engine
//! --from-backup`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use corral_backup::catalog::{self, GcReport};
use corral_backup::target::{S3Settings, Target};
use serde_json::json;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// `file:///DIR` or `s3://BUCKET/PREFIX`.
    #[arg(long, global = true)]
    pub target: Option<String>,
    /// An S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO, Ceph RGW, s3s-fs).
    #[arg(long, global = true, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// A file of KEY=VALUE lines (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION) instead of the environment.
    #[arg(long, global = true, value_name = "FILE")]
    pub s3_credentials: Option<PathBuf>,
    /// One JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// The backups on the target, per volume, oldest first.
    Ls {
        /// Only this volume's.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Remove a backup (VOLUME/BACKUP), then collect the data only it named
    /// (unless a backup or restore of the volume is in progress, or
    /// --keep-data).
    Rm {
        /// VOLUME/BACKUP, as `backup ls` shows it.
        backup: String,
        /// Remove the backup only; leave its data for a later `backup gc`.
        #[arg(long)]
        keep_data: bool,
        /// Data younger than this is kept (a backup in progress puts it
        /// before the manifest naming it).
        #[arg(long, default_value = "1h", value_parser = crate::units::parse_duration)]
        min_age: Duration,
    },
    /// Delete the packs and pages no backup names (all volumes, or one);
    /// a volume with a backup or restore in progress is skipped.
    Gc {
        #[arg(long)]
        volume: Option<String>,
        /// Data younger than this is kept.
        #[arg(long, default_value = "1h", value_parser = crate::units::parse_duration)]
        min_age: Duration,
    },
}

fn gc_json(g: &GcReport) -> serde_json::Value {
    json!({"volume": g.volume, "backups": g.backups, "live_packs": g.live_packs,
        "live_pages": g.live_pages, "deleted_packs": g.deleted_packs,
        "deleted_pages": g.deleted_pages, "bytes_freed": g.bytes_freed,
        "kept_young": g.kept_young, "skipped": g.skipped})
}

fn gc_line(g: &GcReport) -> String {
    match &g.skipped {
        Some(why) => format!("volume {}: skipped: {why}", g.volume),
        None => format!(
            "volume {}: {} backups name {} packs and {} pages; deleted {} packs and {} pages ({:.1} MiB); kept {} younger than the minimum age",
            g.volume,
            g.backups,
            g.live_packs,
            g.live_pages,
            g.deleted_packs,
            g.deleted_pages,
            g.bytes_freed as f64 / (1 << 20) as f64,
            g.kept_young
        ),
    }
}

pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    let Some(url) = args.target.as_deref() else {
        bail!("--target URL is needed (file:///DIR or s3://BUCKET/PREFIX)");
    };
    let settings = S3Settings {
        endpoint: args.s3_endpoint.clone(),
        credentials_file: args.s3_credentials.clone(),
        ..Default::default()
    };
    let target = Target::open(url, &settings)?;
    match args.command {
        BackupCommand::Ls { volume } => {
            let volumes = match volume {
                Some(v) => vec![v],
                None => catalog::volumes(&target).await?,
            };
            let mut rows = Vec::new();
            for v in &volumes {
                for m in catalog::backups(&target, v).await? {
                    rows.push(m);
                }
            }
            if args.json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|m| {
                        json!({"volume": m.volume, "name": m.name, "size": m.size,
                            "snapshot": m.snapshot, "created_unix_ms": m.created_unix_ms,
                            "parent": m.parent,
                            "url": format!("{}/{}/{}", url.trim_end_matches('/'), m.volume, m.name)})
                    })
                    .collect();
                println!("{}", json!({ "backups": list }));
            } else if rows.is_empty() {
                println!("no backups on {url}");
            } else {
                println!(
                    "{:<40} {:>12} {:<24} {:<16}",
                    "VOLUME/BACKUP", "SIZE", "SNAPSHOT", "PARENT"
                );
                for m in rows {
                    println!(
                        "{:<40} {:>12} {:<24} {:<16}",
                        format!("{}/{}", m.volume, m.name),
                        m.size,
                        m.snapshot,
                        m.parent.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        BackupCommand::Rm {
            backup,
            keep_data,
            min_age,
        } => {
            let (volume, name) = backup
                .split_once('/')
                .context("name the backup as VOLUME/BACKUP")?;
            catalog::remove_backup(&target, volume, name).await?;
            let gc = if keep_data {
                None
            } else {
                Some(catalog::collect_garbage(&target, volume, min_age).await?)
            };
            if args.json {
                println!(
                    "{}",
                    json!({"removed": backup, "gc": gc.as_ref().map(gc_json)})
                );
            } else {
                println!("removed backup {backup}");
                if let Some(g) = &gc {
                    println!("{}", gc_line(g));
                }
            }
        }
        BackupCommand::Gc { volume, min_age } => {
            let volumes = match volume {
                Some(v) => vec![v],
                None => catalog::volumes(&target).await?,
            };
            let mut reports = Vec::new();
            for v in &volumes {
                reports.push(catalog::collect_garbage(&target, v, min_age).await?);
            }
            if args.json {
                let list: Vec<_> = reports.iter().map(gc_json).collect();
                println!("{}", json!({ "volumes": list }));
            } else {
                for g in &reports {
                    println!("{}", gc_line(g));
                }
            }
        }
    }
    Ok(())
}
