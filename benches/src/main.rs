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
//!   volume mounted on another node, through the CSI plugin.

mod csi;
mod matrix;
mod memory;
mod rebuild;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Rebuild(args) => rebuild::run(&args),
        Command::Fio(args) => matrix::run(&args),
        Command::Memory(args) => memory::run(&args),
        Command::Csi(args) => csi::run(&args),
    }
}
