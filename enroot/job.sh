# shellcheck shell=bash
# Shared by train.sbatch and compile.sbatch (sourced, not run): builds the one srun line that starts
# `llama3-hyperpod train|compile CONFIG [overrides]` once per node, in the pyxis container (or the same through
# podman, or from a venv), runs it, removes the job's container from every node, and requeues the job when the
# trainer says it has checkpointed. See enroot/README.md for the knobs.

# The trainer's exit code for "I saved a checkpoint because I was asked to stop (USR1/TERM): requeue me".
# The one place this number is defined on the Slurm side; the trainer must exit with the same value.
L3HP_EXIT_REQUEUE=85

# Environment variables passed into the container with --container-env: pyxis lets the image's ENV win over the
# user's exports for every other name (shared/reference/slurm-enroot-pyxis.md), so tunables must be named here.
L3HP_ENV_PATTERN='^(NEURON_.*|XLA_.*|FI_.*|NCCL_.*|TORCH_.*|TORCHINDUCTOR_.*|L3HP_.*|HF_.*|OMP_NUM_THREADS|MALLOC_ARENA_MAX|MASTER_PORT|BUCKET_CAP_MB|HYDRA_FULL_ERROR|CUDA_VISIBLE_DEVICES|PYTHONFAULTHANDLER|LOGLEVEL)$'

l3hp_die() {
  echo "error: $*" >&2
  exit 2
}

# The node counts <cache>/manifest.json says the cache was compiled for (sorted, one per line; nothing when there is
# no manifest). Read without python (the batch host may not have one): the cache module's records carry
# "layout.num_nodes" in each compile record's graph fields; a bare top-level "num_nodes" is accepted too.
l3hp_manifest_nodes() {
  local manifest=$1/manifest.json
  [[ -f $manifest ]] || return 0
  grep -oE '"(layout\.)?num_nodes"[[:space:]]*:[[:space:]]*[0-9]+' "$manifest" | grep -oE '[0-9]+$' | sort -un \
    || true
}

# A compiled-graph cache holds graphs for the node counts it was compiled for (the data-parallel degree is part
# of every graph). Training on another count would recompile for hours on every node: refuse before srun.
# Compiling for a new count adds graphs beside the others (a cache may hold several), so compile only says so.
l3hp_check_cache_nodes() {
  local cache=$1 nodes=$2 mode=$3 cached
  [[ -n $cache ]] || return 0
  cached=$(l3hp_manifest_nodes "$cache" | paste -sd, -)
  [[ -z $cached || ,$cached, == *,"$nodes",* ]] && return 0
  if [[ $mode == compile ]]; then
    echo "note: compile cache $cache holds graphs for $cached nodes; adding graphs for $nodes nodes" >&2
    return 0
  fi
  l3hp_die "compile cache $cache was compiled for $cached nodes (layout.num_nodes in $cache/manifest.json) but" \
    "this job has $nodes: submit with -N ${cached%%,*}, or run compile.sbatch with -N $nodes first"
}

# Comma-separated names of the exported environment variables that must reach the program in the container.
l3hp_container_env() {
  local names=() extra=() name
  while IFS= read -r name; do
    [[ $name =~ $L3HP_ENV_PATTERN ]] && names+=("$name")
  done < <(compgen -e | sort)
  if [[ -n ${CONTAINER_ENV:-} ]]; then
    IFS=, read -r -a extra <<< "$CONTAINER_ENV"
    names+=("${extra[@]}")
  fi
  local IFS=,
  echo "${names[*]}"
}

# The container mounts: the shared filesystem and the node-local NVMe (when present) at the same paths inside,
# so data, checkpoints, logs and caches keep their host paths; then the user's CONTAINER_MOUNTS.
l3hp_container_mounts() {
  local mounts=() dir
  for dir in "$FSX" "$NVME"; do
    [[ -n $dir && -d $dir ]] && mounts+=("$dir:$dir")
  done
  [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=("$CONTAINER_MOUNTS")
  local IFS=,
  echo "${mounts[*]}"
}

# The image's launcher, called by absolute path: enroot starts the container through a login shell by default
# (ENROOT_LOGIN_SHELL, NVIDIA/enroot enroot.in:94), whose /etc/profile may reset PATH, and pyxis hands that PATH to
# the task, so a bare `python` may not be found. The wrapper execs the image's own interpreter on entrypoint.py.
L3HP_LAUNCHER=/usr/local/bin/llama3-hyperpod

# The enroot settings pyxis never takes from the job's environment (NVIDIA/pyxis pyxis_slurmstepd.c:368-389): the
# clean-up step drops them too, so its enroot sees the same data path as pyxis' enroot.
L3HP_PYXIS_DENIED_ENROOT=(ENROOT_LIBRARY_PATH ENROOT_SYSCONF_PATH ENROOT_RUNTIME_PATH ENROOT_CACHE_PATH
  ENROOT_DATA_PATH ENROOT_TEMP_PATH)

# The command that removes this job's named container on one node, given the --container-name value.
# pyxis names it pyxis_NAME (container_scope=global, its default) or pyxis_JOBID_NAME (container_scope=job)
# (pyxis_slurmstepd.c:1305-1309); `enroot remove` fails on a missing name, so the list is checked first.
l3hp_remove_command() {
  local name=$1 job_id=$2 unset_args=() var script
  for var in "${L3HP_PYXIS_DENIED_ENROOT[@]}"; do unset_args+=(-u "$var"); done
  # Run by bash on each node, with the name as $1 and the job id as $2.
  # shellcheck disable=SC2016
  script='for c in $(enroot list); do if [[ $c == "pyxis_$1" || $c == "pyxis_$2_$1" ]]; then'
  # shellcheck disable=SC2016
  script+=' enroot remove -f "$c" > /dev/null && echo "removed container $c on $(hostname)"; fi; done'
  case $CONTAINER in
    pyxis) printf '%q ' env "${unset_args[@]}" bash -c "$script" _ "$name" "$job_id" ;;
    podman) printf '%q ' "$L3HP_HOST_PYTHON" "$L3HP_PYXIS_PODMAN" --remove "$name" ;;
  esac
}

# Is PATH inside one of the comma-separated mount destinations (or the image)? Used to catch an output dir that
# the container would write into its own (lost) overlay.
l3hp_is_mounted() {
  local path=$1 list=$2 spec src dst
  local -a specs
  IFS=, read -r -a specs <<< "$list"
  for spec in "${specs[@]}"; do
    IFS=: read -r src dst _ <<< "$spec"
    dst=${dst:-$src}
    [[ $path == "$dst" || $path == "$dst"/* ]] && return 0
  done
  return 1
}

# l3hp_preflight MODE: one srun step before the job's own: every node runs `entrypoint.py preflight --mode MODE` for
# the same plan, where the job step will run (l3hp_job's srun_args and cli, read through bash's dynamic scope: same
# container, mounts, env and overrides). A failing node stops the job here, exit 2, with its name and reason
# ("preflight: FAIL on NODE (node R): CHECK: FIGURE — FIX"); nothing else starts. Each node's report is in
# <run dir>/preflight/MODE-nodeR.json, every line in $LOG_DIR/<job name>-<job id>-preflight-restartN.log.
# PREFLIGHT=0 skips it.
l3hp_preflight() {
  local mode=$1
  if [[ ${PREFLIGHT:-1} == 0 ]]; then
    echo "preflight: skipped (PREFLIGHT=0)" >&2
    return 0
  fi
  local -a step=() check=()
  local arg swapped=0
  for arg in "${srun_args[@]}"; do
    [[ $arg == --output=* ]] || step+=("$arg") # the lines come back here instead of the step's per-node logs
  done
  step+=(--label)
  for arg in "${cli[@]}"; do # the job's command line with its mode word replaced by `preflight --mode MODE`
    if ((!swapped)) && [[ $arg == "$mode" ]]; then
      check+=(preflight --mode "$mode")
      swapped=1
    else
      check+=("$arg")
    fi
  done
  if [[ -n ${DRY_RUN:-} ]]; then
    echo "preflight: + $(printf '%q ' "${step[@]}" "${check[@]}")" >&2
    return 0
  fi
  local log="$LOG_DIR/${SLURM_JOB_NAME:-llama3}-${job_id}-preflight-restart${restart}.log" rc=0 reason failures
  mkdir -p "$LOG_DIR"
  echo "preflight: $mode checks on $nodes nodes (PREFLIGHT=0 skips them)"
  local start end
  start=$(date +%s.%N)
  "${step[@]}" "${check[@]}" > "$log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  cat "$log"
  if ((rc == 0)); then
    echo "preflight: passed on $nodes nodes; the step took $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s"
    return 0
  fi
  # each failed node prints a summary ("FAIL on NODE (node R of N, ...): counts") and a reason ("FAIL on NODE (node R):
  # CHECK: FIGURE — FIX"): count the summaries, show the first reason
  failures=$(grep -cE '^ *[0-9]+: preflight: FAIL on [^ ]+ \(node [0-9]+ of ' "$log" || true)
  reason=$(grep -m 1 -E '^ *[0-9]+: preflight: FAIL on [^ ]+ \(node [0-9]+\): ' "$log" | sed -E 's/^ *[0-9]+: //' || true)
  [[ -n $reason ]] || reason="preflight: the step exited $rc without a verdict"
  if [[ -n ${cleanup:-} ]]; then # the preflight step unpacked the job's container on every node: remove it
    eval "timeout 300 $cleanup" > /dev/null 2>&1 || echo "preflight: warning: could not remove the job's" \
      "container from every node" >&2
  fi
  l3hp_die "$reason [$failures of $nodes nodes failed; job step not started; lines in $log]"
}

# l3hp_job MODE [CONFIG [OVERRIDES...]]: the body of train.sbatch / compile.sbatch.
l3hp_job() {
  local mode=$1
  shift
  local config=${1:-configs/llama3_8b_trn1.yaml}
  (($# > 0)) && shift
  local -a overrides=("$@")

  CONTAINER=${CONTAINER:-pyxis}
  FSX=${FSX:-/fsx}
  NVME=${NVME:-/opt/dlami/nvme}
  local hyperpod_marker=${L3HP_HYPERPOD_MARKER:-/opt/sagemaker_cluster}
  local job_id=${SLURM_JOB_ID:-0}
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local restart=${SLURM_RESTART_COUNT:-0}
  local submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
  local default_out=$submit_dir/runs
  [[ -d $FSX ]] && default_out=$FSX/llama3-hyperpod/runs
  OUTPUT_DIR=${OUTPUT_DIR:-$default_out}
  LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/slurm-logs}
  [[ $OUTPUT_DIR == /* ]] || l3hp_die "OUTPUT_DIR=$OUTPUT_DIR must be an absolute path (it is used on every node)"
  [[ $LOG_DIR == /* ]] || l3hp_die "LOG_DIR=$LOG_DIR must be an absolute path (it is used on every node)"
  if [[ -z ${CACHE_DIR:-} && -d $FSX ]]; then
    CACHE_DIR=$FSX/llama3-hyperpod/cache
  fi

  local launcher app container_name=llama3-hyperpod-$job_id
  local -a srun_args=(
    srun --nodes="$nodes" --ntasks-per-node=1
    # Let every node's trainer finish its own checkpoint-and-exit, but end the step soon after the first task
    # ends, so a crashed node fails the step (HyperPod's auto-resume needs the step to end, not hang).
    --kill-on-bad-exit=0 --wait="${STEP_EXIT_GRACE:-120}"
    # One log per job, restart and node (%t is the node rank with one task per node).
    --output="$LOG_DIR/%x-%j-restart${restart}-%N-node%t.log"
  )
  local -a container_args=() runner=()
  case $CONTAINER in
    pyxis | podman)
      IMAGE=${IMAGE:-$FSX/enroot/llama3-hyperpod.sqsh}
      [[ $IMAGE == /* ]] || l3hp_die "IMAGE=$IMAGE must be an absolute path to a .sqsh file: pyxis reads a" \
        "relative name as a Docker Hub image (use $PWD/$IMAGE)"
      [[ -f $IMAGE || -n ${DRY_RUN:-} ]] || l3hp_die "IMAGE=$IMAGE does not exist: make it with enroot/import.sh"
      app=${APP:-/opt/app}
      launcher=${LAUNCHER:-$L3HP_LAUNCHER}
      local mounts
      mounts=$(l3hp_container_mounts)
      l3hp_is_mounted "$OUTPUT_DIR" "$mounts" || l3hp_die "OUTPUT_DIR=$OUTPUT_DIR is not under a container mount" \
        "($mounts): checkpoints would be lost with the container; put it under $FSX or add it to CONTAINER_MOUNTS"
      container_args+=(
        --container-image="$IMAGE"
        # Named per job: a re-run of the step in this job (HyperPod's auto-resume) reuses the unpacked rootfs on
        # the nodes that still have it; the job removes it from every node when the step ends (below).
        --container-name="$container_name"
        --container-workdir="$app"
        --no-container-entrypoint
        --no-container-mount-home
      )
      [[ -n $mounts ]] && container_args+=(--container-mounts="$mounts")
      local env_names
      env_names=$(l3hp_container_env)
      [[ -n $env_names ]] && container_args+=(--container-env="$env_names")
      if [[ $CONTAINER == podman ]]; then
        # The same --container-* options, run by podman the way pyxis + enroot would (login shell, the image's
        # /etc/environment, read-only rootfs, the job's uid): llama3_hyperpod/image/pyxis_podman.py.
        L3HP_HOST_PYTHON=${L3HP_HOST_PYTHON:-python3}
        L3HP_PYXIS_PODMAN=${L3HP_PYXIS_PODMAN:-$(cd "$L3HP_ENROOT_DIR/.." && pwd)/llama3_hyperpod/image/pyxis_podman.py}
        runner=("$L3HP_HOST_PYTHON" "$L3HP_PYXIS_PODMAN" "${container_args[@]}" --)
        container_args=()
      fi
      srun_args+=("${container_args[@]}")
      ;;
    none)
      app=${APP:-$(cd "$L3HP_ENROOT_DIR/.." && pwd)}
      VENV=${VENV:-$app/.venv}
      launcher=$VENV/bin/python
      [[ -x $launcher || -n ${DRY_RUN:-} ]] || l3hp_die "VENV=$VENV has no bin/python: CONTAINER=none runs the" \
        "entrypoint from a virtual environment with the project installed (set VENV=/path/to/venv)"
      srun_args+=(--chdir="$app")
      ;;
    *) l3hp_die "CONTAINER=$CONTAINER must be pyxis, podman or none" ;;
  esac
  [[ -d $hyperpod_marker ]] && srun_args+=(--auto-resume=1)

  if [[ -n ${CACHE_DIR:-} ]]; then
    [[ $CACHE_DIR == /* ]] || l3hp_die "CACHE_DIR=$CACHE_DIR must be an absolute path"
    [[ $CACHE_DIR != *"'"* && $CACHE_DIR != *\\* ]] || l3hp_die "CACHE_DIR=$CACHE_DIR: a quote or backslash in it" \
      "cannot be passed to NxDT's Hydra as is; use another directory"
    # Quoted for Hydra's override grammar (a `,` `(` `)` or space in the path would otherwise not parse).
    overrides+=("compiler_cache_url='$CACHE_DIR'")
  fi
  local -a cli=("${runner[@]}" "$launcher")
  [[ $CONTAINER == none ]] && cli+=("$app/entrypoint.py")
  cli+=("$mode" "$config" --output-dir "$OUTPUT_DIR")
  [[ -n ${RUN_NAME:-} ]] && cli+=(--run-name "$RUN_NAME")
  [[ -n ${BACKEND:-} ]] && cli+=(--backend "$BACKEND")
  cli+=("${overrides[@]}")

  l3hp_check_cache_nodes "${CACHE_DIR:-}" "$nodes" "$mode"
  local line cleanup=
  line=$(printf '%q ' "${srun_args[@]}" "${cli[@]}")
  if [[ $CONTAINER != none ]]; then
    # One task per node, outside the container: what removes the job's named container (a step of its own, so
    # it runs after a failed or checkpointed step too, before any requeue; and after a failed preflight).
    cleanup="$(printf '%q ' srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0)$(
      l3hp_remove_command "$container_name" "$job_id")"
  fi
  l3hp_preflight "$mode"
  if [[ -n ${DRY_RUN:-} ]]; then
    echo "${line% }"
    [[ -n $cleanup ]] && echo "${cleanup% }"
    return 0
  fi
  mkdir -p "$LOG_DIR" "$OUTPUT_DIR"
  echo "job $job_id ($mode, $nodes nodes, restart $restart) on ${SLURM_JOB_NODELIST:-?}; node logs in $LOG_DIR"
  echo "+ ${line% }"
  local rc=0
  "${srun_args[@]}" "${cli[@]}" || rc=$?
  echo "job $job_id: step exited $rc"
  if [[ -n $cleanup ]]; then
    # A node that died cannot answer: pyxis' container_scope=job (an admin setting, enroot/README.md) covers it.
    echo "job $job_id: removing container $container_name from the job's nodes"
    eval "timeout 300 $cleanup" || echo "job $job_id: warning: could not remove $container_name from every node" \
      "(exit $?); an admin's container_scope=job removes it at the end of the job" >&2
  fi
  if ((rc == L3HP_EXIT_REQUEUE)) && [[ $mode == train ]]; then
    # The trainer checkpointed on USR1/TERM (time limit, preemption): put the job back in the queue; the next
    # run (SLURM_RESTART_COUNT+1) resumes from that checkpoint under the same run name.
    echo "job $job_id: checkpointed (exit $L3HP_EXIT_REQUEUE), requeueing"
    scontrol requeue "$job_id"
    return 0
  fi
  return "$rc"
}
