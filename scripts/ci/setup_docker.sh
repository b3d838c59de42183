#!/usr/bin/env bash
# A real Docker Engine for the image tests, beside podman, on this (Debian 12, root, systemd-less) CI machine:
# Debian's docker.io (dockerd 20.10 with BuildKit built in, and its /usr/bin/docker CLI), one daemon on private
# paths under the CI state dir (socket, data root, exec root, pidfile, CLI config), overlay2, no bridge and no
# iptables rules (builds and containers use --network host or none), and the local Debian base image imported from
# the debootstrap tarball that podman's setup uses too (no registry is reachable from CI).
#   setup_docker.sh          idempotent: install, start (unless it answers already), import; prints `export` lines
#                            (L3HP_DOCKERD_STARTED=1 when this call started the daemon); logs go to stderr
#   setup_docker.sh --stop   stop the daemon started here, by the pid in its pidfile
set -euo pipefail

STATE_DIR="${LLAMA3_CI_STATE_DIR:-/var/tmp/llama3-hyperpod-ci}"
BASE_IMAGE="${LLAMA3_CI_BASE_IMAGE:-localhost/debian:bookworm}"
DIR="${STATE_DIR}/docker"
SOCK="${DIR}/docker.sock"
PIDFILE="${DIR}/dockerd.pid"
DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd

log() { echo "setup_docker: $*" >&2; }
ping_api() { curl -fsS --max-time 5 --unix-socket "${SOCK}" http://d/_ping >/dev/null 2>&1; }
# Running, and not a zombie waiting for init to reap it (the daemon's parent, this script, is gone by then).
alive() { [ -r "/proc/$1/stat" ] && [ "$(cut -d')' -f2 "/proc/$1/stat" | cut -d' ' -f2)" != Z ]; }

if [ "${1:-}" = "--stop" ]; then
  if [ ! -s "${PIDFILE}" ]; then
    log "no pidfile at ${PIDFILE}: nothing to stop"
    exit 0
  fi
  pid="$(cat "${PIDFILE}")"
  if alive "${pid}"; then
    log "stopping dockerd (pid ${pid})"
    kill -TERM "${pid}"
    for _ in $(seq 1 60); do
      alive "${pid}" || break
      sleep 0.5
    done
    if alive "${pid}"; then
      log "dockerd (pid ${pid}) is still running after 30 s"
      exit 1
    fi
  fi
  rm -f "${PIDFILE}"
  exit 0
fi

mkdir -p "${DIR}"
if [ ! -x "${DOCKERD}" ] || [ ! -x "${DOCKER}" ]; then
  log "installing docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends docker.io >&2
fi

started=
if ! ping_api; then
  log "starting dockerd on ${SOCK}"
  rm -f "${SOCK}"
  nohup setsid "${DOCKERD}" --host "unix://${SOCK}" --data-root "${DIR}/data" --exec-root "${DIR}/exec" \
    --pidfile "${PIDFILE}" --storage-driver overlay2 --bridge none --iptables=false --ip6tables=false \
    </dev/null >"${DIR}/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    ping_api && break
    sleep 0.5
  done
  ping_api || { log "dockerd did not come up; see ${DIR}/dockerd.log"; exit 1; }
  started=1
fi

export DOCKER_HOST="unix://${SOCK}" DOCKER_CONFIG="${DIR}/config"
if ! "${DOCKER}" image inspect "${BASE_IMAGE}" >/dev/null 2>&1; then
  tarball="$(bash "$(dirname "${BASH_SOURCE[0]}")/debian_rootfs.sh")"
  log "importing ${BASE_IMAGE}"
  "${DOCKER}" import --change 'CMD ["/bin/bash"]' "${tarball}" "${BASE_IMAGE}" >&2
fi

echo "export DOCKER_HOST=${DOCKER_HOST}"
echo "export DOCKER_CONFIG=${DOCKER_CONFIG}"
echo "export LLAMA3_CI_BASE_IMAGE=${BASE_IMAGE}"
echo "export L3HP_DOCKER_CLI=${DOCKER}"
echo "export L3HP_DOCKERD_STARTED=${started}"
