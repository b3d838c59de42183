#!/usr/bin/env bash
# The local Debian 12 base for image builds in CI (no registry is reachable there): a debootstrap minbase rootfs as a
# tarball under the CI state dir, made once and shared by podman (setup_podman.sh) and Docker Engine
# (setup_docker.sh), which each import it under the same name. Idempotent; prints the tarball's path on stdout.
set -euo pipefail

STATE_DIR="${LLAMA3_CI_STATE_DIR:-/var/tmp/llama3-hyperpod-ci}"
DEBIAN_MIRROR="${LLAMA3_CI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tarball="${STATE_DIR}/debian-bookworm-rootfs.tar"

log() { echo "debian_rootfs: $*" >&2; }

mkdir -p "${STATE_DIR}"
if [ ! -s "${tarball}" ]; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
  fi
  rootfs="${STATE_DIR}/rootfs-bookworm"
  rm -rf "${rootfs}"
  log "debootstrap bookworm (about a minute)"
  debootstrap --variant=minbase bookworm "${rootfs}" "${DEBIAN_MIRROR}" >&2
  rm -rf "${rootfs}/var/cache/apt/archives/"*.deb "${rootfs}/var/lib/apt/lists/"*
  tar -C "${rootfs}" -cf "${tarball}.tmp" .
  mv "${tarball}.tmp" "${tarball}"
  rm -rf "${rootfs}"
fi
echo "${tarball}"
