#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/ for a bounded time (docs/fuzzing.md).
#
#   scripts/fuzz.sh                 # 20 s per target (what scripts/test.sh runs)
#   scripts/fuzz.sh 600             # ten minutes per target
#   scripts/fuzz.sh 600 scsi_cdb    # only some targets
#   scripts/fuzz.sh --merge 600     # then fold new interesting inputs into fuzz/corpus/
#   scripts/fuzz.sh --cmin          # only minimise the committed corpus (no run)
#
# Each target starts from its committed corpus (fuzz/corpus/<target>/) and
# writes what it finds to a scratch directory (fuzz/corpus-new/<target>/,
# not committed), so a run never changes the repository unless --merge is
# given. Limits: -timeout (a hang), -rss_limit_mb and -malloc_limit_mb (an
# unbounded allocation), -max_len per target. Exits non-zero if any target
# crashed, hung or ran out of memory; the input is in fuzz/artifacts/<target>/.
#
# The machine's stable toolchain runs cargo-fuzz through RUSTC_BOOTSTRAP=1.
# CORRAL_FUZZ_SANITIZER picks the sanitizer (default address; `none` is
# faster and enough to find panics, hangs and allocations).
set -euo pipefail
cd "$(dirname "$0")/.."

merge=0
cmin=0
seconds=20
targets=()
for arg in "$@"; do
    case "$arg" in
        --merge) merge=1 ;;
        --cmin) cmin=1 ;;
        -h | --help)
            sed -n '2,20p' "$0"
            exit 0
            ;;
        [0-9]*) seconds="$arg" ;;
        *) targets+=("$arg") ;;
    esac
done
all_targets=(iscsi_pdu iscsi_login scsi_cdb nbd_handshake nbd_transmission replica_data_batch)
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${all_targets[@]}")
fi

max_len() {
    case "$1" in
        replica_data_batch) echo 32768 ;;
        iscsi_login | nbd_transmission) echo 16384 ;;
        *) echo 8192 ;;
    esac
}

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

sanitizer="${CORRAL_FUZZ_SANITIZER:-address}"
# Release code with debug assertions (and so overflow checks) on.
flags=(--fuzz-dir fuzz -O -a --sanitizer "$sanitizer")

start=$SECONDS
echo "== fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)"
if [ ${#targets[@]} -eq ${#all_targets[@]} ]; then
    cargo fuzz build "${flags[@]}"
else
    for t in "${targets[@]}"; do
        cargo fuzz build "${flags[@]}" "$t"
    done
fi
echo "   built in $((SECONDS - start)) s"

if [ "$cmin" = 1 ]; then
    for t in "${targets[@]}"; do
        echo "== fuzz: minimising fuzz/corpus/$t"
        cargo fuzz cmin "${flags[@]}" "$t" "fuzz/corpus/$t" -- -max_len="$(max_len "$t")"
    done
    exit 0
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    scratch="fuzz/corpus-new/$t"
    rm -rf "$scratch"
    mkdir -p "$scratch" "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/corpus-new/$t.log"
    echo "== fuzz: $t for ${seconds} s"
    if cargo fuzz run "${flags[@]}" "$t" "$scratch" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -max_len="$(max_len "$t")" -print_final_stats=1 >"$log" 2>&1; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        summary+=("$(printf '%-20s %8s execs in %ss, %s new inputs' "$t" "${execs:-?}" "$seconds" \
            "$(find "$scratch" -type f | wc -l)")")
    else
        failed+=("$t")
        summary+=("$(printf '%-20s FAILED (log: %s)' "$t" "$log")")
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written|Crash|timeout|out-of-memory' "$log" | head -20 || true
    fi
done

if [ "$merge" = 1 ]; then
    for t in "${targets[@]}"; do
        echo "== fuzz: merging new inputs of $t into fuzz/corpus/$t"
        cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/corpus-new/$t" -- \
            -merge=1 -max_len="$(max_len "$t")" >"fuzz/corpus-new/$t.merge.log" 2>&1
    done
fi

echo "== fuzz summary ($((SECONDS - start)) s in all)"
printf '   %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${failed[*]} failed; reproduce with" >&2
    echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -O -a <target> fuzz/artifacts/<target>/<file>" >&2
    exit 1
fi
