#!/usr/bin/env bash
# Build fio with its libiscsi engine (Debian's fio binary lacks it) from
# Debian's source package, and cache the binary under target/fio-libiscsi/fio.
# Idempotent: prints the binary's path and exits at once when it is cached.
# Needs root (or sudo) to add a deb-src entry and install build dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${CARGO_TARGET_DIR:-$ROOT/target}/fio-libiscsi"
BIN="$OUT/fio"

if [ -x "$BIN" ] && "$BIN" --enghelp 2>/dev/null | grep -qw libiscsi; then
    echo "$BIN"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# A deb-src entry mirroring the machine's own Debian sources, when none exists.
if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "adding deb-src entries mirroring the configured deb sources" >&2
    entries="$(mktemp)"
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        sed 's/^Types:[[:space:]]*deb$/Types: deb-src/' "$f"
        echo
    done >"$entries"
    $SUDO install -m 0644 "$entries" /etc/apt/sources.list.d/corral-deb-src.sources
    if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb[[:space:]]/deb-src /p' /etc/apt/sources.list >"$entries"
        $SUDO install -m 0644 "$entries" /etc/apt/sources.list.d/corral-deb-src.list
    fi
    rm -f "$entries"
    $SUDO apt-get update -qq >&2
fi

need=()
for p in dpkg-dev build-essential libiscsi-dev pkg-config zlib1g-dev libaio-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(
    cd "$WORK"
    apt-get source -qq --download-only fio >&2 2>&1 || apt-get source --download-only fio >&2
    dpkg-source -x --no-check fio_*.dsc src >/dev/null 2>&1
    cd src
    ./configure --enable-libiscsi --disable-native >&2
    make -j"$(nproc)" fio >&2
)
mkdir -p "$OUT"
cp "$WORK/src/fio" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
if ! "$BIN" --enghelp | grep -qw libiscsi; then
    echo "built fio lacks the libiscsi engine" >&2
    exit 1
fi
echo "$BIN"
