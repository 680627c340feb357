#!/usr/bin/env bash
# iSCSI benchmark: corral serve-file vs tgt (Longhorn v1's frontend) over the
# same preallocated file, in one run, driven by fio's libiscsi engine.
# Jobs: 4 KiB random read and write at QD32 and QD1, 1 MiB sequential write.
# Both targets serve at once and each job runs against corral then tgt, so
# the two sides of a row ran seconds apart (the machine may be shared).
# Prints a markdown table (IOPS, MiB/s, p99 completion latency) for
# docs/benchmarks.md. Needs root for tgtd; builds corral in release mode and
# fio with libiscsi (scripts/build-fio-libiscsi.sh).
#
#   scripts/bench-iscsi.sh [RUNTIME_SECONDS=20] [SIZE_MIB=1024]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
RUNTIME="${1:-20}"
SIZE_MIB="${2:-1024}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

scripts/install-test-deps.sh >/dev/null
FIO="$(scripts/build-fio-libiscsi.sh)"
cargo build --release -p corral >&2
CORRAL="$TARGET_DIR/release/corral"

WORK="$(mktemp -d /var/tmp/corral-bench-XXXXXX)"
FILE="$WORK/bench.img"
CORRAL_PORT=$((20000 + RANDOM % 5000))
TGT_PORT=$((CORRAL_PORT + 1))
TGT_CTL=$((100 + RANDOM % 100))
CORRAL_PID=""
TGT_PID=""

cleanup() {
    if [ -n "$CORRAL_PID" ]; then kill "$CORRAL_PID" 2>/dev/null || true; wait "$CORRAL_PID" 2>/dev/null || true; fi
    if [ -n "$TGT_PID" ]; then
        tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
        tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
        for _ in $(seq 50); do kill -0 "$TGT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$TGT_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

echo "preallocating a ${SIZE_MIB} MiB file" >&2
dd if=/dev/zero of="$FILE" bs=1M count="$SIZE_MIB" conv=fsync status=none

JOBS=(
    "randread-4k-qd32 randread 4k 32"
    "randread-4k-qd1 randread 4k 1"
    "randwrite-4k-qd32 randwrite 4k 32"
    "randwrite-4k-qd1 randwrite 4k 1"
    "seqwrite-1m-qd8 write 1m 8"
)

run_job() { # $1 = label, $2 = fio filename, $3 = job
    local label="$1" filename="$2" name rw bs qd
    read -r name rw bs qd <<<"$3"
    "$FIO" --name="$name" --ioengine=libiscsi --filename="$filename" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MIB}m" \
        --runtime="$RUNTIME" --time_based --ramp_time=2 --randrepeat=0 \
        --output-format=json >"$WORK/$label-$name.json"
}

"$CORRAL" serve-file --file "$FILE" --iscsi "127.0.0.1:$CORRAL_PORT" --name bench \
    >"$WORK/corral.log" 2>&1 &
CORRAL_PID=$!
wait_port "$CORRAL_PORT"
tgtd -f --iscsi "portal=127.0.0.1:$TGT_PORT" -C "$TGT_CTL" >"$WORK/tgtd.log" 2>&1 &
TGT_PID=$!
wait_port "$TGT_PORT"
tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op new --tid 1 --targetname iqn.2026-11.io.tgt:bench
tgtadm -C "$TGT_CTL" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 \
    --backing-store "$FILE" --bstype rdwr
tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
for job in "${JOBS[@]}"; do
    echo "== ${job%% *}" >&2
    run_job corral "iscsi\\://127.0.0.1\\:$CORRAL_PORT/iqn.2026-11.io.corral\\:bench/0" "$job"
    run_job tgt "iscsi\\://127.0.0.1\\:$TGT_PORT/iqn.2026-11.io.tgt\\:bench/1" "$job"
done

python3 - "$WORK" <<'EOF'
import json, sys, os
work = sys.argv[1]
jobs = ["randread-4k-qd32", "randread-4k-qd1", "randwrite-4k-qd32", "randwrite-4k-qd1", "seqwrite-1m-qd8"]
def stats(label, job):
    text = open(os.path.join(work, f"{label}-{job}.json")).read()
    # fio may print notes (e.g. from libiscsi) before the JSON document.
    d = json.loads(text[text.index("{"):])["jobs"][0]
    side = d["read"] if d["read"]["io_bytes"] > 0 else d["write"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    return side["iops"], side["bw_bytes"] / 1048576.0, p99
print("| job | corral IOPS | tgt IOPS | corral / tgt | corral MiB/s | tgt MiB/s | corral p99 µs | tgt p99 µs |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    c, t = stats("corral", j), stats("tgt", j)
    ratio = c[0] / t[0] if t[0] else float("nan")
    print(f"| {j} | {c[0]:.0f} | {t[0]:.0f} | {ratio:.2f}× | {c[1]:.1f} | {t[1]:.1f} | {c[2]:.0f} | {t[2]:.0f} |")
EOF
