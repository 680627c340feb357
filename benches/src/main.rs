//! `corral-bench`: measurements that are not tests (no timing is asserted
//! anywhere in the test suite). Each subcommand builds nothing itself: run
//! it through `scripts/bench.sh`, which builds the release binaries and
//! points `CORRAL_BIN` at them.
//!
//! - `fio`: the fio matrix (systems × jobs) with baselines in the same run;
//! - `rebuild`: full-rebuild throughput of a volume against the disk's own
//!   sequential write speed (fio, same run), and the time of a partial
//!   rebuild after a short outage;
//! - `memory`: idle RSS with a large sparse volume;
//! - `csi`: CreateVolume to a mounted filesystem, and node loss to the
//!   volume mounted on another node, through the CSI plugin;
//! - `floor`: CPU per replicated 4 KiB write of tonic alone (a three-way
//!   fan-out to null replicas in one process) next to the engine's and the
//!   replica daemons' under fio, in the same run (issue 13, item 1);
//! - `durable`: 4 KiB writes with a flush after each, one client and many,
//!   beside the disk's own durable rate, and one replica's syscalls per
//!   durable write (issue 15);
//! - `backup`: backup and restore throughput against raw object-store PUT
//!   and GET to s3s-fs, incremental backups, objects per GiB (issue 12).

mod backup;
mod csi;
mod durable;
mod floor;
mod matrix;
mod memory;
mod rebuild;
mod snapshots;
mod stages;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "corral-bench", about = "corral's benchmark runner")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rebuild throughput and partial-rebuild time.
    Rebuild(rebuild::RebuildArgs),
    /// fio against every system and baseline; markdown tables.
    Fio(matrix::MatrixArgs),
    /// Create→mounted and node-loss→mounted times through the CSI plugin.
    Csi(csi::CsiArgs),
    /// Idle RSS of an engine and a replica daemon serving a large sparse volume.
    Memory(memory::MemoryArgs),
    /// CPU per replicated write: tonic's floor vs the engine and replicas.
    Floor(floor::FloorArgs),
    /// Durable writes (a flush after each) against the disk's own rate.
    Durable(durable::DurableArgs),
    /// Snapshot create latency under load, reads through a chain, delete speed.
    Snapshots(snapshots::SnapshotArgs),
    /// Backup and restore against the object store's own PUT and GET rates.
    Backup(backup::BackupArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Rebuild(args) => rebuild::run(&args),
        Command::Fio(args) => matrix::run(&args),
        Command::Memory(args) => memory::run(&args),
        Command::Csi(args) => csi::run(&args),
        Command::Floor(args) => floor::run(&args),
        Command::Durable(args) => durable::run(&args),
        Command::Snapshots(args) => snapshots::run(&args),
        Command::Backup(args) => backup::run(&args),
    }
}
