#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the system packages it
# needs, checks formatting and lints, builds, and runs every test — unit,
# property, and end-to-end (real processes on loopback driven by fio,
# nbdinfo, nbdcopy, nbdfuse, libiscsi's tools and a real ext4 filesystem
# over NBD and over iSCSI).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
echo "== iSCSI test tools (built once, cached under target/)"
scripts/build-fio-libiscsi.sh >/dev/null
scripts/build-nbdkit-iscsi.sh >/dev/null

echo "== format"
cargo fmt --all -- --check
echo "== lint"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
cargo build --workspace --bins
echo "== unit and property tests"
cargo test --workspace --exclude corral-tests
echo "== fuzzing (every cargo-fuzz target, 20 s each; docs/fuzzing.md)"
scripts/fuzz.sh 20
echo "== end-to-end tests (one at a time: each starts a cluster of processes)"
cargo test -p corral-tests -- --test-threads=1
