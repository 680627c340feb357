//! `corral-bench`: measurements that are not tests (no timing is asserted
//! anywhere in the test suite). Each subcommand builds nothing itself: run
//! it through `scripts/bench.sh`, which builds the release binaries and
//! points `CORRAL_BIN` at them.
//!
//! - `rebuild`: full-rebuild throughput of a volume against the disk's own
//!   sequential write speed (fio, same run), and the time of a partial
//!   rebuild after a short outage.

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Rebuild(args) => rebuild::run(&args),
    }
}
