#!/usr/bin/env bash
# A long randomized fault campaign: `scripts/campaign.sh [MINUTES] [SEED]`
# (default 30 minutes, a new random seed every two-minute round). Builds
# corral, then runs rounds until the time is spent; prints each round's
# seed and fault counts, and stops at the first that finds lost data.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
args=(--minutes "$minutes")
if [[ $# -ge 2 ]]; then args+=(--seed "$2"); fi
cargo build -p corral -p corral-tests --bins
exec target/debug/corral-campaign "${args[@]}"
