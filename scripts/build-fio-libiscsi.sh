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
# shellcheck source=scripts/lib/debian-source.sh
. "$ROOT/scripts/lib/debian-source.sh"

if [ -x "$BIN" ] && "$BIN" --enghelp 2>/dev/null | grep -qw libiscsi; then
    echo "$BIN"
    exit 0
fi

debian_deb_src

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
    debian_source fio src
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
