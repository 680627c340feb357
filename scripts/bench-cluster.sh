#!/usr/bin/env bash
# The fio matrix's volume rows, cluster-shaped (issue 13, item 5).
#
#   scripts/bench-cluster.sh [--runtime 10] [--size-mib 1024]
#
# Three layouts in one run, each a 3-replica volume (NBD, fio's nbd engine)
# beside `corral serve-file` on the same cores:
#   loopback   every process on 127.0.0.1, unpinned: the fio matrix's layout;
#   netns      each replica daemon in a network namespace of its own, reached
#              over a veth pair like a node on a network; unpinned;
#   netns+pin  the same, with the replica daemons pinned to the last core and
#              the engine and fio to the others: the "nodes" stop taking CPU
#              from the engine's node. With a core per daemon and one for the
#              engine (5 or more cores) each daemon gets a core of its own.
# Every job runs after a sync(); CPU is user+system time from /proc per
# process over the job. Root only (namespaces, veth, taskset).
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=10
size_mib=1024
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime="$2"; shift 2 ;;
        --size-mib) size_mib="$2"; shift 2 ;;
        *) echo "usage: $0 [--runtime SECONDS] [--size-mib MIB]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-cluster: needs root (network namespaces)" >&2; exit 2; }
for tool in fio ip taskset python3; do
    command -v "$tool" > /dev/null || { echo "bench-cluster: $tool is not installed" >&2; exit 2; }
done

cargo build --release -p corral
bin="$PWD/target/release/corral"
work=$(mktemp -d /tmp/corral-bench-cluster.XXXXXX)
cores=$(nproc)
pids=()
prefix="cbench$$"

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    for i in 0 1 2; do
        ip netns del "${prefix}n$i" 2> /dev/null || true
        ip link del "${prefix}v$i" 2> /dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# Namespaces n0..n2, each with a veth pair to the host: 10.231.<i>.1 on
# the host side, 10.231.<i>.2 inside.
for i in 0 1 2; do
    ns="${prefix}n$i"
    ip netns add "$ns"
    ip link add "${prefix}v$i" type veth peer name "${prefix}p$i"
    ip link set "${prefix}p$i" netns "$ns"
    ip addr add "10.231.$i.1/24" dev "${prefix}v$i"
    ip link set "${prefix}v$i" up
    ip netns exec "$ns" ip addr add "10.231.$i.2/24" dev "${prefix}p$i"
    ip netns exec "$ns" ip link set "${prefix}p$i" up
    ip netns exec "$ns" ip link set lo up
done

# cpu_s PID: user + system seconds of a process.
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}

# wait_port HOST PORT [NS]: until something listens there (10 s at most).
wait_port() {
    for _ in $(seq 100); do
        if ${3:+ip netns exec "$3"} bash -c "exec 3<>/dev/tcp/$1/$2" 2> /dev/null; then return 0; fi
        sleep 0.1
    done
    echo "bench-cluster: nothing listens on $1:$2" >&2
    return 1
}

jobs=(
    "randread-4k-qd32 --rw=randread --bs=4k --iodepth=32"
    "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1"
    "randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32"
    "randwrite-4k-qd1 --rw=randwrite --bs=4k --iodepth=1"
    "seqwrite-1m-qd8 --rw=write --bs=1m --iodepth=8"
    "seqread-1m-qd8 --rw=read --bs=1m --iodepth=8"
)

results="$work/results.tsv"
: > "$results"

# run_jobs LAYOUT SYSTEM URI FIO_PIN ENGINE_PID DAEMON_PIDS...
run_jobs() {
    local layout="$1" system="$2" uri="$3" pin="$4" engine="$5"
    shift 5
    local daemons=("$@") name args
    ${pin:+taskset -c "$pin"} fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1m \
        --iodepth=8 --size="${size_mib}m" > /dev/null
    for job in "${jobs[@]}"; do
        read -r name args <<< "$job"
        sync
        local before_e before_d=()
        before_e=$(cpu_s "$engine")
        for d in "${daemons[@]}"; do before_d+=("$(cpu_s "$d")"); done
        # shellcheck disable=SC2086
        ${pin:+taskset -c "$pin"} fio --name="$name" --ioengine=nbd --uri="$uri" $args \
            --size="${size_mib}m" --runtime="$runtime" --time_based --randrepeat=0 \
            --output-format=json > "$work/fio.json"
        local after_e cpu_d=""
        after_e=$(cpu_s "$engine")
        local k=0
        for d in "${daemons[@]}"; do
            cpu_d+="$(awk -v a="$(cpu_s "$d")" -v b="${before_d[$k]}" 'BEGIN { printf "%.2f ", a - b }')"
            k=$((k + 1))
        done
        python3 - "$work/fio.json" "$layout" "$system" "$name" \
            "$(awk -v a="$after_e" -v b="$before_e" 'BEGIN { printf "%.2f", a - b }')" "$cpu_d" \
            >> "$results" << 'EOF'
import json, sys
path, layout, system, name, engine_cpu, daemon_cpu = sys.argv[1:]
text = open(path).read()  # fio's nbd engine prints a line before the JSON
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
pct = side["clat_ns"]["percentile"]
ios = side["total_ios"]
print("\t".join([layout, system, name, f'{side["iops"]:.0f}', f'{pct["50.000000"] / 1000:.0f}',
                 f'{pct["99.000000"] / 1000:.0f}', engine_cpu, daemon_cpu.strip(), str(ios)]))
EOF
        echo "   $layout $system $name: $(tail -1 "$results" | cut -f4) IOPS" >&2
    done
}

port=19500
# daemon_cpu I: the core replica daemon I is pinned to.
daemon_cpu() {
    if [ "$cores" -ge 5 ]; then echo $((cores - 3 + $1)); else echo $((cores - 1)); fi
}
# The cores of the engine, serve-file and fio when pinned.
if [ "$cores" -ge 5 ]; then front="0-$((cores - 4))"; elif [ "$cores" -ge 3 ]; then front="0-$((cores - 2))"; else front=0; fi

# layout LAYOUT NETNS(0/1) PIN(0/1)
layout() {
    local name="$1" netns="$2" pin="$3" fpin=""
    [ "$pin" = 1 ] && fpin="$front"
    echo "== $name" >&2
    # serve-file on the engine's cores: the one-machine reference.
    rm -f "$work/file.img"
    port=$((port + 10))
    ${fpin:+taskset -c "$fpin"} "$bin" serve-file --file "$work/file.img" --size "${size_mib}MiB" \
        --nbd "127.0.0.1:$port" --name bench > "$work/serve-file.log" 2>&1 &
    local sf=$!
    pids+=("$sf")
    wait_port 127.0.0.1 "$port"
    run_jobs "$name" serve-file "nbd://127.0.0.1:$port/bench" "$fpin" "$sf"
    kill "$sf"; wait "$sf" 2> /dev/null || true

    local replicas=() daemons=()
    for i in 0 1 2; do
        rm -rf "$work/r$i"; mkdir -p "$work/r$i"
        local host=127.0.0.1 ns=""
        if [ "$netns" = 1 ]; then host="10.231.$i.2"; ns="${prefix}n$i"; fi
        local rport=$((port + 1 + i)) dpin=""
        [ "$pin" = 1 ] && dpin="$(daemon_cpu "$i")"
        ${ns:+ip netns exec "$ns"} ${dpin:+taskset -c "$dpin"} "$bin" replica \
            --listen "$host:$rport" --data-dir "$work/r$i" --io-threads 1 > "$work/r$i.log" 2>&1 &
        daemons+=("$!")
        pids+=("$!")
        wait_port "$host" "$rport" "$ns"
        replicas+=(--replica "$host:$rport")
    done
    ${fpin:+taskset -c "$fpin"} "$bin" engine --volume bench --size "${size_mib}MiB" "${replicas[@]}" \
        --listen "127.0.0.1:$((port + 5))" --nbd "127.0.0.1:$((port + 6))" --replica-timeout 8s \
        > "$work/engine.log" 2>&1 &
    local engine=$!
    pids+=("$engine")
    wait_port 127.0.0.1 "$((port + 6))"
    run_jobs "$name" "3 replicas" "nbd://127.0.0.1:$((port + 6))/bench" "$fpin" "$engine" "${daemons[@]}"
    kill "$engine" "${daemons[@]}"
    wait "$engine" "${daemons[@]}" 2> /dev/null || true
}

layout loopback 0 0
layout netns 1 0
layout "netns+pin" 1 1

echo
echo "Cluster-shaped run: $cores cores; netns+pin puts the replica daemons on CPU $(daemon_cpu 0),$(daemon_cpu 1),$(daemon_cpu 2) and the engine, serve-file and fio on CPU $front; ${runtime} s per job, ${size_mib} MiB."
echo
echo "| layout | job | serve-file IOPS | 3 replicas IOPS | ratio | 3 replicas p50 µs | p99 µs | serve-file p50 µs | engine µs CPU/IO | each daemon µs CPU/IO |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
python3 - "$results" << 'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {(r[0], r[1], r[2]): r for r in rows}
for r in rows:
    layout, system, name = r[0], r[1], r[2]
    if system != "3 replicas":
        continue
    sf = by.get((layout, "serve-file", name))
    ios = max(int(r[8]), 1)
    engine_us = float(r[6]) * 1e6 / ios
    daemons = " / ".join(f"{float(c) * 1e6 / ios:.1f}" for c in r[7].split())
    ratio = f"{int(r[3]) / max(int(sf[3]), 1):.2f}×" if sf else "–"
    print(f"| {layout} | {name} | {sf[3] if sf else '–'} | {r[3]} | {ratio} | {r[4]} | {r[5]} | "
          f"{sf[4] if sf else '–'} | {engine_us:.1f} | {daemons} |")
EOF
