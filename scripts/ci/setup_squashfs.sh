#!/usr/bin/env bash
# squashfs-tools (mksquashfs, unsquashfs) for the tests of the enroot image format (llama3_hyperpod/image/sqsh.py)
# and the pyxis-like podman runner (llama3_hyperpod/image/pyxis_podman.py). Idempotent; installs only as root.
set -euo pipefail
if command -v mksquashfs > /dev/null && command -v unsquashfs > /dev/null; then
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "setup_squashfs: squashfs-tools are missing and this is not root: apt-get install squashfs-tools" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=${TMPDIR:-/tmp}/l3hp-squashfs-apt.log
if ! apt-get install -y --no-install-recommends squashfs-tools > "$log" 2>&1; then
  apt-get update > /dev/null 2>&1 || true
  apt-get install -y --no-install-recommends squashfs-tools > "$log" 2>&1 \
    || { echo "setup_squashfs: apt-get install squashfs-tools failed (see $log)" >&2; exit 1; }
fi
