#!/usr/bin/env bash
# Install the system packages the test suite drives corral with (Debian).
# Idempotent: only missing packages are fetched.
set -euo pipefail

PACKAGES=(fio libnbd-bin nbdkit nbdkit-plugin-dev libiscsi-dev build-essential pkg-config fuse3 e2fsprogs xfsprogs util-linux mount libiscsi-bin tgt open-iscsi nbd-client strace)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
if [ ${#missing[@]} -ne 0 ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# ---- Kubernetes manifests (tests/tests/deploy.rs) --------------------------
# kubectl renders deploy/ (`kubectl kustomize`); kubernetes-validate, from
# PyPI into a virtualenv, checks the result against Kubernetes' schemas.
# A kubectl already on the machine (e.g. from Kubernetes' own packages) is
# used as is; otherwise Debian's kubernetes-client provides one (kubectl
# 1.20: its older kustomize renders deploy/ to the same objects).
if ! command -v kubectl >/dev/null 2>&1; then
    echo "installing: kubernetes-client (kubectl)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kubernetes-client
fi
CORRAL_VENV="${CORRAL_VENV:-/opt/corral-venv}"
KUBERNETES_VALIDATE_VERSION=1.37.0
if [ "$("$CORRAL_VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "installing: python3 python3-venv"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv
    fi
    echo "installing: kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $CORRAL_VENV"
    $SUDO python3 -m venv "$CORRAL_VENV"
    $SUDO "$CORRAL_VENV/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
# ---- end of the Kubernetes manifests section -------------------------------

# ---- s3s-fs (tests/tests/backup_s3.rs) -------------------------------------
# The backup tests run a real S3 server on loopback: s3s-fs, built from
# crates.io into $CORRAL_S3S_ROOT (the tests run $CORRAL_S3S_ROOT/bin/s3s-fs
# from the default root, another binary with CORRAL_S3S_FS). Pinned to
# 0.14.1: later versions need rustc 1.96. Built only when the binary there
# is missing or another version (--force: also over a different version
# cargo still tracks there).
CORRAL_S3S_ROOT="${CORRAL_S3S_ROOT:-/opt/corral-s3s}"
S3S_FS_VERSION=0.14.1
if [ "$("$CORRAL_S3S_ROOT/bin/s3s-fs" --version 2>/dev/null)" != "s3s-fs $S3S_FS_VERSION" ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "s3s-fs: cargo is needed to build it (install Rust, e.g. with rustup)" >&2
        exit 1
    fi
    echo "installing: s3s-fs $S3S_FS_VERSION into $CORRAL_S3S_ROOT"
    S3S_INSTALL=(install --locked --force s3s-fs --version "$S3S_FS_VERSION" --features binary)
    if [ -z "$SUDO" ] || { mkdir -p "$CORRAL_S3S_ROOT" 2>/dev/null && [ -w "$CORRAL_S3S_ROOT" ]; }; then
        cargo "${S3S_INSTALL[@]}" --root "$CORRAL_S3S_ROOT"
    else
        # Built with this user's Rust toolchain, installed as root.
        S3S_BUILD_ROOT="$(mktemp -d)"
        cargo "${S3S_INSTALL[@]}" --root "$S3S_BUILD_ROOT"
        $SUDO install -D -m 0755 "$S3S_BUILD_ROOT/bin/s3s-fs" "$CORRAL_S3S_ROOT/bin/s3s-fs"
        rm -rf "$S3S_BUILD_ROOT"
    fi
    if [ "$("$CORRAL_S3S_ROOT/bin/s3s-fs" --version 2>/dev/null)" != "s3s-fs $S3S_FS_VERSION" ]; then
        echo "s3s-fs: $CORRAL_S3S_ROOT/bin/s3s-fs does not report version $S3S_FS_VERSION after the install" >&2
        exit 1
    fi
fi
# ---- end of the s3s-fs section ---------------------------------------------
