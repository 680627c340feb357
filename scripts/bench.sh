#!/usr/bin/env bash
# Benchmarks (not tests): builds release binaries and runs corral-bench.
#   scripts/bench.sh rebuild [--size 4GiB --written 3g ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --release -p corral -p corral-bench
export CORRAL_BIN="$PWD/target/release/corral"
exec target/release/corral-bench "$@"
