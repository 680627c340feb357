#!/usr/bin/env bash
# Benchmarks (not tests): builds release binaries and runs corral-bench.
#   scripts/bench.sh fio [--runtime 15 --size-mib 1024 | --quick]   # the fio matrix with baselines
#   scripts/bench.sh fio --rounds 5 [--jobs qd32]                  # only the TLS pairs, interleaved rounds, medians
#   scripts/bench.sh rebuild [--size 4GiB --written 3g ...]        # rebuild throughput
#   scripts/bench.sh memory                                         # idle RSS with a 1 TiB volume
#   scripts/bench.sh csi [--runs 10]                                # create→mounted, node loss→mounted (root)
#   scripts/bench.sh floor [--seconds 10 --perf]                    # CPU per replicated write: gRPC floor vs engine/replicas (--perf: split by stage)
#   scripts/bench.sh durable [--seconds 15 --clients 8 --before BIN --without-write-through] # durable writes (flush after each) vs the disk
#   scripts/bench.sh durable --rounds 5 --before BIN [--without-write-through] # only the laid-out durable rows, builds in turns, medians
#   scripts/bench.sh backup [--size-mib 2048] [--rounds 3]         # backup/restore vs raw S3 PUT/GET (s3s-fs), incrementals
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --release -p corral -p corral-bench
export CORRAL_BIN="$PWD/target/release/corral"
exec target/release/corral-bench "$@"
