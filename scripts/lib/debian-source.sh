# shellcheck shell=bash
# Debian source packages for the scripts that build a test tool from one
# (build-fio-libiscsi.sh, build-nbdkit-iscsi.sh). Sourced, not run; sets
# SUDO ("" as root, else "sudo") for the callers' own apt-get calls too.
# Everything but the path a caller prints goes to stderr.

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# A deb-src entry mirroring the machine's own Debian sources, when none
# exists, and fresh package lists to go with it. The status is apt-get
# update's: a caller with a fallback may carry on without it. A failure to
# write the entries ends the script.
debian_deb_src() {
    if grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    echo "adding deb-src entries mirroring the configured deb sources" >&2
    local entries f
    entries="$(mktemp)" || exit 1
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        sed 's/^Types:[[:space:]]*deb$/Types: deb-src/' "$f" || exit 1
        echo
    done >"$entries"
    $SUDO install -m 0644 "$entries" /etc/apt/sources.list.d/corral-deb-src.sources || exit 1
    if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb[[:space:]]/deb-src /p' /etc/apt/sources.list >"$entries" || exit 1
        $SUDO install -m 0644 "$entries" /etc/apt/sources.list.d/corral-deb-src.list || exit 1
    fi
    rm -f "$entries"
    $SUDO apt-get update -qq >&2
}

# debian_source PACKAGE[=VERSION] DIR: download Debian's source package into
# the current directory and unpack it into DIR (needs debian_deb_src first).
# Non-zero when the mirror has no such source or it does not unpack.
debian_source() {
    local package="$1" dir="$2"
    apt-get source -qq --download-only "$package" >&2 2>&1 ||
        apt-get source --download-only "$package" >&2 || return 1
    dpkg-source -x --no-check "${package%%=*}"_*.dsc "$dir" >/dev/null 2>&1
}
