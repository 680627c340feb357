#!/usr/bin/env bash
# Build an nbdkit iSCSI plugin (a libiscsi initiator behind nbdkit: iSCSI
# in, NBD out) for the installed nbdkit, whose Debian binary package ships
# none, and cache it as target/nbdkit-iscsi/nbdkit-iscsi-plugin.so.
# Idempotent: prints the plugin's path and exits at once when it is cached,
# built by this script for this nbdkit, and loadable.
#
# First choice: nbdkit's own plugins/iscsi from Debian's source package of
# the installed nbdkit version (the way build-fio-libiscsi.sh builds fio).
# When that source cannot be had (some Debian mirrors serve no source
# tarballs) or does not build, a small plugin of our own
# (tests/nbdkit-iscsi/iscsi-bridge.c) is built
# against the same nbdkit's plugin headers (nbdkit-plugin-dev) and libiscsi.
# Both take the same parameters:
#   nbdkit PLUGIN portal=HOST:PORT target=IQN lun=N [initiator=IQN]
#          [user=NAME password=SECRET]
# Needs root (or sudo) to add a deb-src entry and install build dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${CARGO_TARGET_DIR:-$ROOT/target}/nbdkit-iscsi"
SO="$OUT/nbdkit-iscsi-plugin.so"
STAMP="$OUT/built-for"
# shellcheck source=scripts/lib/debian-source.sh
. "$ROOT/scripts/lib/debian-source.sh"

# What the cached plugin must have been built for: this nbdkit, this script
# and what it builds from (the sourced lib, our own plugin).
want_stamp() {
    echo "$(nbdkit --version 2>/dev/null) $(cat "$ROOT/scripts/build-nbdkit-iscsi.sh" "$ROOT/scripts/lib/debian-source.sh" "$ROOT/tests/nbdkit-iscsi/iscsi-bridge.c" | sha256sum | cut -d' ' -f1)"
}

loadable() {
    nbdkit --dump-plugin "$1" 2>/dev/null | grep -qx 'name=iscsi'
}

if command -v nbdkit >/dev/null && [ -f "$SO" ] && [ -f "$STAMP" ] &&
    [ "$(cat "$STAMP")" = "$(want_stamp)" ] && loadable "$SO"; then
    echo "$SO"
    exit 0
fi

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
apt_install() {
    echo "installing: $*" >&2
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2; then
        $SUDO apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
    fi
}
installed nbdkit || apt_install nbdkit
need=()
for p in dpkg-dev build-essential pkg-config libiscsi-dev; do
    installed "$p" || need+=("$p")
done
# The plugin headers of exactly the installed nbdkit.
NBDKIT_VERSION="$(dpkg-query -W -f='${Version}' nbdkit)"
if [ "$(dpkg-query -W -f='${Status} ${Version}' nbdkit-plugin-dev 2>/dev/null)" != \
    "install ok installed $NBDKIT_VERSION" ]; then
    need+=("nbdkit-plugin-dev=$NBDKIT_VERSION")
fi
if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
fi

debian_deb_src || true

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VERSION="$(dpkg-query -W -f='${source:Version}' nbdkit)"

# nbdkit's own plugin from Debian's source of the installed version.
debian_plugin() {
    (
        cd "$WORK"
        debian_source "nbdkit=$VERSION" src || return 1
        cd src
        ./configure --with-iscsi --disable-perl --disable-python --disable-ocaml \
            --disable-rust --disable-ruby --disable-tcl --disable-lua --disable-golang \
            --disable-libguestfs-tests >&2 || return 1
        # The helper libraries the plugin links, then the plugin alone.
        for d in common/*/; do
            if [ -f "$d/Makefile" ]; then
                make -j"$(nproc)" -C "$d" >&2 || true
            fi
        done
        make -j"$(nproc)" -C plugins/iscsi >&2 || return 1
        cp plugins/iscsi/.libs/nbdkit-iscsi-plugin.so "$WORK/plugin.so"
    )
}

# Our own plugin: one libiscsi session per NBD connection, synchronous
# READ(16)/WRITE(16) (FUA passed through), SYNCHRONIZE CACHE(10) for flush
# and UNMAP for trim when the LUN is thin-provisioned; unaligned requests are
# read-modify-written in whole logical blocks.
own_plugin() {
    # shellcheck disable=SC2046
    cc -std=gnu11 -O2 -g -Wall -Wextra -Wno-unused-parameter -Werror -fPIC -shared \
        $(pkg-config --cflags nbdkit libiscsi) \
        -o "$WORK/plugin.so" "$ROOT/tests/nbdkit-iscsi/iscsi-bridge.c" \
        $(pkg-config --libs libiscsi) >&2
}

if debian_plugin && [ -f "$WORK/plugin.so" ] && loadable "$WORK/plugin.so"; then
    echo "built nbdkit's iscsi plugin from Debian's nbdkit $VERSION source" >&2
else
    echo "Debian's nbdkit $VERSION source could not be fetched or built;" \
        "building corral's own libiscsi plugin against nbdkit-plugin-dev $VERSION" >&2
    rm -f "$WORK/plugin.so"
    own_plugin
fi
if ! loadable "$WORK/plugin.so"; then
    nbdkit --dump-plugin "$WORK/plugin.so" >&2 || true
    echo "the installed nbdkit does not load the built plugin" >&2
    exit 1
fi
mkdir -p "$OUT"
cp "$WORK/plugin.so" "$SO.tmp"
mv "$SO.tmp" "$SO"
want_stamp >"$STAMP"
echo "$SO"
