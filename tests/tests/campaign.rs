//! The randomized fault campaign in the suite: a few fixed seeds (each a
//! different schedule of kills, pauses, disk replacements, engine restarts,
//! partitions, slow links, takeovers by a second engine and two engines
//! opening the volume at once) and one random
//! seed, about two minutes of faults in all. The
//! seed of every run is printed; `CORRAL_CAMPAIGN_SEED=S` replays the
//! random one with seed S. A longer run: `scripts/campaign.sh 30`.

use std::time::Duration;

use corral_tests::campaign::{self, CampaignConfig};

const SECONDS_EACH: u64 = 30;

fn campaign(seed: u64) {
    match campaign::run(&CampaignConfig::new(
        seed,
        Duration::from_secs(SECONDS_EACH),
    )) {
        Ok(report) => eprintln!("{report}"),
        Err(e) => panic!("fault campaign with seed {seed} failed: {e:#}"),
    }
}

#[test]
fn campaign_seed_1() {
    campaign(1);
}

#[test]
fn campaign_seed_16() {
    campaign(16);
}

#[test]
fn campaign_seed_2026() {
    campaign(2026);
}

#[test]
fn campaign_random_seed() {
    let seed = std::env::var("CORRAL_CAMPAIGN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    campaign(seed);
}
