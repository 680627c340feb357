#!/usr/bin/env bash
# Install the system packages the test suite drives corral with (Debian).
# Idempotent: only missing packages are fetched.
set -euo pipefail

PACKAGES=(fio libnbd-bin nbdkit nbdkit-plugin-dev libiscsi-dev build-essential pkg-config fuse3 e2fsprogs util-linux mount libiscsi-bin tgt)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
