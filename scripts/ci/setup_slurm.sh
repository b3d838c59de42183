#!/usr/bin/env bash
# A real Slurm cluster (Debian's slurm-wlm 22.05 + munge) with several slurmd "nodes" on this one machine, for the
# integration tests of enroot/*.sbatch. Option 1 of shared/reference/test-infra.md: multiple slurmd on one host with
# distinct ports, all reached at 127.0.0.1; the node names are aliased to 127.0.0.1 in /etc/hosts because the
# training entrypoint uses the first node name as the torchrun master address.
#
#   scripts/ci/setup_slurm.sh install only install slurm-wlm + munge when missing (CI can do it up front)
#   scripts/ci/setup_slurm.sh up      install if missing, start munged + slurmctld + N slurmd (idempotent)
#   scripts/ci/setup_slurm.sh down    stop everything `up` started, remove the /etc/hosts aliases and the state dir
#   scripts/ci/setup_slurm.sh status  exit 0 when the cluster answers and every node is usable
#
# Everything lives under $L3HP_SLURM_DIR (default /tmp/l3hp-slurm): its own munge key and socket, slurm.conf,
# state, spool, logs and pid files, so nothing in /etc/slurm or the system munged is touched.
# Clients use it with `. $L3HP_SLURM_DIR/env.sh` (sets SLURM_CONF and PATH).
# Knobs: L3HP_SLURM_NODES (2), L3HP_SLURM_CPUS (CPUs per node, 2), L3HP_SLURM_PORT (first port, 17817: slurmctld,
# then one per slurmd), L3HP_SLURM_PREFIX (node name prefix, l3hp-n).
set -euo pipefail

DIR=${L3HP_SLURM_DIR:-/tmp/l3hp-slurm}
NODES=${L3HP_SLURM_NODES:-2}
CPUS=${L3HP_SLURM_CPUS:-2}
PORT=${L3HP_SLURM_PORT:-17817}
PREFIX=${L3HP_SLURM_PREFIX:-l3hp-n}
HOSTS_MARK="# l3hp-slurm ${DIR}"
SBIN=/usr/sbin

log() { echo "setup_slurm: $*" >&2; }
die() { echo "setup_slurm: error: $*" >&2; exit 1; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "${PREFIX}${i}"; done; }

install_packages() {
  if [[ -x $SBIN/slurmctld && -x $SBIN/slurmd && -x $SBIN/munged ]] && command -v sbatch > /dev/null; then
    return
  fi
  [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge"
  log "installing slurm-wlm and munge from Debian"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends slurm-wlm munge > "${TMPDIR:-/tmp}/l3hp-slurm-apt.log" 2>&1; then
    apt-get update > /dev/null 2>&1 || true
    apt-get install -y --no-install-recommends slurm-wlm munge > "${TMPDIR:-/tmp}/l3hp-slurm-apt.log" 2>&1 \
      || die "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/l3hp-slurm-apt.log)"
  fi
}

# Kill the process whose id is in FILE (only that one: never by name) and wait for it to go.
stop_pidfile() {
  local file=$1 pid i
  [[ -f $file ]] || return 0
  pid=$(cat "$file" 2> /dev/null || true)
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2> /dev/null; then
    kill "$pid" 2> /dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2> /dev/null && kill -9 "$pid" 2> /dev/null || true
  fi
  rm -f "$file"
}

# /etc/hosts is edited in place (it may be a bind mount that cannot be renamed over).
remove_hosts_aliases() {
  [[ -w /etc/hosts ]] || return 0
  if grep -qF "$HOSTS_MARK" /etc/hosts; then
    local kept
    kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
  fi
}

# Always our own line (even when another cluster's line names the same nodes), so `down` of one cluster never
# takes the names away from another.
add_hosts_aliases() {
  local names
  names=$(node_names | tr '\n' ' ')
  if [[ ! -w /etc/hosts ]]; then
    local name
    for name in $names; do
      getent hosts "$name" > /dev/null || die "node name $name does not resolve and /etc/hosts is not writable"
    done
    return 0
  fi
  printf '127.0.0.1 %s%s\n' "$names" "$HOSTS_MARK" >> /etc/hosts
}

write_config() {
  local host nodes last_port
  host=$(hostname)
  nodes="${PREFIX}[1-${NODES}]"
  last_port=$((PORT + NODES))
  mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
  chmod 700 "$DIR/munge"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  cat > "$DIR/etc/slurm.conf" << EOF
# Written by scripts/ci/setup_slurm.sh: ${NODES} slurmd on one host ($host), each its own port at 127.0.0.1.
ClusterName=l3hp
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORT}
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again: 20 s here, and the
# tests let Slurm start it then. Forcing StartTime=now skips the wait that guards the revocation of the job's old
# credential (src/common/slurm_cred.c: a credential created in the same second as the revocation counts as revoked,
# and slurmd refuses that batch launch as "already killed"); a job started that way once ended FAILED 1:0 in CI.
AuthInfo=socket=${DIR}/munge/munge.socket,cred_expire=20
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Fast turnaround for tests: notice dead nodes and finished jobs quickly, keep finished jobs visible for 10 min.
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
MessageTimeout=20
JobRequeue=1
# Start a requeued job within ~2 s of its begin time (the default passes are 60 s and 30 s apart).
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=${nodes} NodeHostname=${host} NodeAddr=127.0.0.1 Port=[$((PORT + 1))-${last_port}] CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=${nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat > "$DIR/env.sh" << EOF
# Source this to talk to the test cluster started by scripts/ci/setup_slurm.sh.
export SLURM_CONF=${DIR}/etc/slurm.conf
EOF
}

cluster_ok() {
  [[ -f $DIR/etc/slurm.conf ]] || return 1
  local states
  SLURM_CONF=$DIR/etc/slurm.conf timeout 10 scontrol ping > /dev/null 2>&1 || return 1
  states=$(SLURM_CONF=$DIR/etc/slurm.conf timeout 10 sinfo -h -N -o '%N %t' 2> /dev/null) || return 1
  [[ $(grep -cE ' (idle|alloc|mix|comp)$' <<< "$states") -ge $NODES ]]
}

start() {
  install_packages
  if cluster_ok; then
    log "already running ($DIR)"
    return 0
  fi
  stop quiet
  write_config
  add_hosts_aliases
  export SLURM_CONF=$DIR/etc/slurm.conf
  $SBIN/munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" \
    || die "munged did not start (see $DIR/log/munged.log)"
  $SBIN/slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  local name i
  for name in $(node_names); do
    mkdir -p "$DIR/spool/$name"
    $SBIN/slurmd -N "$name" -f "$SLURM_CONF" || die "slurmd $name did not start (see $DIR/log/slurmd-$name.log)"
  done
  for ((i = 0; i < 60; i++)); do
    if cluster_ok; then
      log "up: $NODES nodes ($(node_names | tr '\n' ' ')) in $DIR; use: . $DIR/env.sh"
      return 0
    fi
    sleep 0.5
  done
  sinfo -N >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
  die "the cluster did not become ready within 30 s (logs in $DIR/log)"
}

stop() {
  local name
  for name in $(node_names); do stop_pidfile "$DIR/run/slurmd-$name.pid"; done
  stop_pidfile "$DIR/run/slurmctld.pid"
  stop_pidfile "$DIR/run/munged.pid"
  remove_hosts_aliases
  if [[ ${1:-} != quiet ]]; then
    # Keep the logs of a failed run when asked to (CI uploads them).
    if [[ -n ${L3HP_SLURM_KEEP_LOGS:-} ]]; then rm -rf "${DIR:?}"/{state,spool,run,munge}; else rm -rf "${DIR:?}"; fi
    log "down ($DIR)"
  fi
}

case ${1:-up} in
  install) install_packages ;;
  up) start ;;
  down) stop ;;
  status) cluster_ok ;;
  *) die "usage: $0 install|up|down|status" ;;
esac
