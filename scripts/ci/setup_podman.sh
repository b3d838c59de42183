#!/usr/bin/env bash
# Make this (Debian 12, root, daemon-less) machine able to build and run the project's images:
# podman + buildah + runc, a local Debian base image (no registry is reachable from CI), a containers.conf that works
# with cgroup v1 hybrid hosts and their rlimits, and podman's Docker-compatible API on a unix socket for the Docker SDK.
# Idempotent: every step checks first. Prints the environment to use as `export` lines on stdout (logs go to stderr).
set -euo pipefail

STATE_DIR="${LLAMA3_CI_STATE_DIR:-/var/tmp/llama3-hyperpod-ci}"
BASE_IMAGE="${LLAMA3_CI_BASE_IMAGE:-localhost/debian:bookworm}"
SOCK="${STATE_DIR}/podman.sock"
CONF="${STATE_DIR}/containers.conf"

log() { echo "setup_podman: $*" >&2; }

mkdir -p "${STATE_DIR}"

need=()
for tool in podman buildah runc; do
  command -v "${tool}" >/dev/null 2>&1 || need+=("${tool}")
done
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq podman buildah runc >&2
fi

# The default runtime (crun + systemd cgroups) fails on this kind of host; these settings are what works.
cat >"${CONF}.tmp" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "${CONF}.tmp" "${CONF}"
export CONTAINERS_CONF="${CONF}"
export BUILDAH_ISOLATION=chroot

if ! podman image exists "${BASE_IMAGE}"; then
  tarball="$(bash "$(dirname "${BASH_SOURCE[0]}")/debian_rootfs.sh")"
  log "importing ${BASE_IMAGE}"
  podman import --change 'CMD ["/bin/bash"]' "${tarball}" "${BASE_IMAGE}" >&2
fi

ping_api() { curl -fsS --max-time 5 --unix-socket "${SOCK}" http://d/_ping >/dev/null 2>&1; }
if ! ping_api; then
  log "starting podman system service on ${SOCK}"
  rm -f "${SOCK}"
  nohup setsid podman system service --time=0 "unix://${SOCK}" >"${STATE_DIR}/podman-service.log" 2>&1 &
  echo $! >"${STATE_DIR}/podman-service.pid"
  for _ in $(seq 1 60); do
    ping_api && break
    sleep 0.5
  done
  ping_api || { log "podman API did not come up; see ${STATE_DIR}/podman-service.log"; exit 1; }
fi

echo "export CONTAINERS_CONF=${CONF}"
echo "export BUILDAH_ISOLATION=chroot"
echo "export DOCKER_HOST=unix://${SOCK}"
echo "export LLAMA3_CI_BASE_IMAGE=${BASE_IMAGE}"
