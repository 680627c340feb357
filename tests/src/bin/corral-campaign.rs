//! `corral-campaign [--minutes N] [--seed S] [--round-secs N] [--no-racing-opens]`: randomized
//! fault campaigns against real corral processes, one round after another
//! with a new random seed each (or the one given), until the time is spent.
//! Every round prints its seed and fault counts; the first round that finds
//! lost data or diverged replicas stops the run with exit status 1.
//! `--no-racing-opens` leaves out one fault: two engines opening the
//! volume at the same moment.
//!
//! Needs the `corral` debug binary (`cargo build -p corral`) or `$CORRAL_BIN`;
//! `scripts/campaign.sh` builds it and runs this.

use std::time::{Duration, Instant};

use corral_tests::campaign::{self, CampaignConfig};

fn main() {
    let mut minutes = 30u64;
    let mut seed: Option<u64> = None;
    let mut round_secs = 120u64;
    let mut racing_opens = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--no-racing-opens" {
            racing_opens = false;
            continue;
        }
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--minutes", Some(v)) => minutes = v,
            ("--seed", Some(v)) => seed = Some(v),
            ("--round-secs", Some(v)) if v > 0 => round_secs = v,
            _ => {
                eprintln!(
                    "corral-campaign: usage: corral-campaign [--minutes N] [--seed S] [--round-secs N] [--no-racing-opens]"
                );
                std::process::exit(2);
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let mut rounds = 0;
    while Instant::now() < end {
        let seed = seed.unwrap_or_else(rand::random);
        let left = end.saturating_duration_since(Instant::now());
        let length = Duration::from_secs(round_secs)
            .min(left)
            .max(Duration::from_secs(10));
        let cfg = CampaignConfig {
            racing_opens,
            ..CampaignConfig::new(seed, length)
        };
        match campaign::run(&cfg) {
            Ok(report) => {
                rounds += 1;
                println!("round {rounds}: {report}");
            }
            Err(e) => {
                println!("round {}: FAILED: {e:#}", rounds + 1);
                std::process::exit(1);
            }
        }
    }
    println!("{rounds} round(s), nothing lost");
}
