"""Measured figure -> PASS / WARN / FAIL with what to do. Pure functions of what `host`, `tools` and the plan give
them, so every rule is tested with the figures it judges. The rules' sources: docs/preflight-facts.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama3_hyperpod.preflight.host import DiskSpace, PortProbe, WriteProbe
from llama3_hyperpod.preflight.parsers import (
    NeuronDevice,
    ParseError,
    fi_info_error,
    parse_dpkg_versions,
    parse_fi_info,
    parse_neuron_ls,
    parse_version,
)
from llama3_hyperpod.preflight.result import Check, failed, passed, warned
from llama3_hyperpod.preflight.tools import ToolError, ToolResult

GIB = 2**30
# neuron_parallel_compile's default --num_parallel is ceil(total RAM / 64 GiB), "keeping about 64GB for each of the
# compiler process" (torch_neuronx/parallel_compile/neuron_parallel_compile.py, _get_default_parallel_worker_count).
COMPILER_PROCESS_RAM = 64 * GIB
RAM_WARN_FRACTION = 0.9  # as the plan's own memory warning: little headroom left above this
# enroot unpacks the image under its data path and pyxis keeps named containers: the root filesystem a container
# sees needs room for what the run writes there (/tmp, default caches) beyond the image itself (cpu image 2.2 GB).
CONTAINER_DISK_WARN = 10 * GIB


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else suffix}"


def _tool_failure(name: str, outcome: ToolResult | ToolError, fix: str) -> Check | None:
    if isinstance(outcome, ToolError):
        return failed(name, str(outcome), fix)
    if outcome.returncode != 0:
        err = " ".join(outcome.stderr.split())[:160] or "no message"
        return failed(name, f"{outcome.argv[0]} exited {outcome.returncode}: {err}", fix)
    return None


# ------------------------------------------------------------------------------------------------------ Neuron


def planned_cores(all_ids: Sequence[int], needed: int, visible: set[int] | None) -> set[int]:
    """The NeuronCores the plan's ranks will take: NEURON_RT_VISIBLE_CORES when set, else the first `needed`."""
    if visible is not None:
        return visible
    return set(sorted(all_ids)[:needed])


def check_neuron_devices(outcome: ToolResult | ToolError, needed: int,
                         visible: set[int] | None) -> tuple[Check, Check, list[NeuronDevice]]:
    """'neuron devices' (enough NeuronCores for trainer.devices) and 'neuroncores free' (no other process holds one
    the plan will use) from `neuron-ls --json-output`."""
    fix = ("run in the neuron image on a Trainium node with its /dev/neuron* devices passed in "
           "(docker --device=/dev/neuronN; enroot bind-mounts the host's /dev)")
    broken = _tool_failure("neuron devices", outcome, fix)
    unknown = "unknown: neuron-ls gave no device list"
    if broken is not None:
        return broken, failed("neuroncores free", unknown, "see 'neuron devices'"), []
    assert isinstance(outcome, ToolResult)
    try:
        devices = parse_neuron_ls(outcome.stdout)
    except ParseError as exc:
        return (failed("neuron devices", str(exc), "is aws-neuronx-tools in the image the pinned one?"),
                failed("neuroncores free", unknown, "see 'neuron devices'"), [])
    cores = [c for d in devices for c in d.core_ids]
    per = sorted({d.nc_count for d in devices})
    shape = f"{len(devices)} devices x {'/'.join(map(str, per)) or 0} NeuronCores = {len(cores)}"
    if len(cores) < needed:
        first = failed("neuron devices", f"{shape}, the plan needs {needed} (trainer.devices)",
                       "use an instance with enough NeuronCores or lower trainer.devices (and the layout with it)")
    else:
        first = passed("neuron devices", f"{shape}; the plan uses {needed}")
    used = planned_cores(cores, needed, visible)
    missing = sorted(used - set(cores))
    if missing:
        return first, failed("neuroncores free", f"NEURON_RT_VISIBLE_CORES names cores {missing} this node does "
                             "not have", "fix NEURON_RT_VISIBLE_CORES or unset it"), devices
    busy: list[str] = []
    elsewhere: list[str] = []
    for d in devices:
        for p in d.processes:
            text = f"pid {p.pid} ({p.command.strip() or '?'}) on device {d.index} (cores {_ranges(d.core_ids)})"
            (busy if used & set(d.core_ids) else elsewhere).append(text)
    if busy:
        return first, failed("neuroncores free", f"{len(busy)} process(es) hold NeuronCores this plan uses: "
                             + "; ".join(busy[:4]) + (f" and {len(busy) - 4} more" if len(busy) > 4 else ""),
                             "stop them (a NeuronCore serves one process: the runtime fails with 'NeuronCore(s) "
                             "not available') or wait for them"), devices
    note = f"; not used by this plan: {'; '.join(elsewhere[:2])}" if elsewhere else ""
    return first, passed("neuroncores free", f"no other process on cores {_ranges(sorted(used))}{note}"), devices


def _ranges(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    if not ids:
        return "none"
    out, start, prev = [], ids[0], ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def check_neuron_driver(loaded: str | None, minimum: str, sdk: str, runtime: str) -> Check:
    """The loaded driver against the one released with the image's SDK: the driver is backwards compatible with
    older runtimes, but a newer runtime may need a newer driver (neuron-runtime/nrt-troubleshoot.rst)."""
    fix = f"install aws-neuronx-dkms >= {minimum} on the host and reload it (no process may hold a device)"
    if loaded is None:
        return failed("neuron driver", "not loaded: /sys/module/neuron/version is missing", fix)
    try:
        older = parse_version(loaded) < parse_version(minimum)
    except ParseError as exc:
        return warned("neuron driver", f"cannot compare: {exc}", fix)
    measured = f"{loaded} loaded; Neuron {sdk} (runtime {runtime}) was released with driver {minimum}"
    return failed("neuron driver", measured, fix) if older else passed("neuron driver", measured)


def check_neuron_runtime(outcome: ToolResult | ToolError, pins: Mapping[str, str]) -> Check:
    """The Neuron user-space packages in this image against versions/neuron.json (apt pins)."""
    if isinstance(outcome, ToolError):
        return warned("neuron runtime", f"cannot tell: {outcome}", "the neuron image is Ubuntu with dpkg")
    try:
        installed = parse_dpkg_versions(outcome.stdout)
    except ParseError as exc:
        return warned("neuron runtime", f"cannot tell: {exc}")
    missing = [p for p in pins if p not in installed]
    if missing:
        return failed("neuron runtime", f"{', '.join(missing)} not installed in this image",
                      "run the neuron flavor of the image (./build.sh --flavor neuron)")
    wrong = [f"{p} {installed[p]} (pinned {v})" for p, v in pins.items()
             if installed[p] != v and not installed[p].startswith((f"{v}-", f"{v}+", f"{v}~"))]
    if wrong:
        return failed("neuron runtime", "; ".join(wrong),
                      "rebuild the image: its Neuron packages must be the ones versions/neuron.json pins")
    return passed("neuron runtime", ", ".join(f"{p} {installed[p]}" for p in pins) + " as pinned")


def check_efa_devices(files: Sequence[str], num_nodes: int) -> Check:
    if files:
        return passed("efa devices", f"{len(files)} ({', '.join(files[:2])}{', ...' if len(files) > 2 else ''}) for "
                                     f"{num_nodes} nodes")
    return failed("efa devices", f"no /dev/infiniband/uverbs* here, and the job has {num_nodes} nodes",
                  "attach EFA to the instances and pass the devices in (enroot bind-mounts the host's /dev unless "
                  "ENROOT_RESTRICT_DEV; docker needs --device=/dev/infiniband/uverbsN): without EFA the collectives "
                  "fall back or hang")


def check_efa_provider(outcome: ToolResult | ToolError, fi_provider: str | None) -> Check:
    """libfabric's efa provider answers `fi_info -p efa -t FI_EP_RDM` with one block per EFA interface."""
    fix = "the image's libfabric (EFA installer, /opt/amazon/efa) must see the EFA devices"
    if isinstance(outcome, ToolError):
        return failed("efa provider", str(outcome), fix)
    if outcome.returncode != 0:
        return failed("efa provider", fi_info_error(outcome.returncode, outcome.stderr), fix)
    try:
        interfaces = parse_fi_info(outcome.stdout)
    except ParseError as exc:
        return failed("efa provider", str(exc), fix)
    efa = [i for i in interfaces if i.provider.split(";")[0] == "efa"]
    if not efa:
        return failed("efa provider", f"fi_info listed {len(interfaces)} interfaces, none of provider efa", fix)
    domains = ", ".join(i.domain for i in efa[:2]) + (", ..." if len(efa) > 2 else "")
    measured = f"{len(efa)} {efa[0].ep_type} interfaces ({domains}), provider version {efa[0].version}"
    if fi_provider is not None and fi_provider != "efa":
        return warned("efa provider", f"{measured}, but FI_PROVIDER={fi_provider} (yours) selects another provider",
                      "unset FI_PROVIDER (the plan sets efa) unless you mean to bypass EFA")
    return passed("efa provider", measured)


def default_num_parallel(mem_total: int) -> int:
    return math.ceil(mem_total / COMPILER_PROCESS_RAM)


def check_compile_parallelism(mem_total: int, limit: int | None, num_parallel: int | None) -> Check:
    """neuron_parallel_compile sizes its pool from the host's total RAM (psutil reads the host's, not a cgroup's):
    inside a smaller memory limit the same pool would each get far less than the 64 GiB it plans for."""
    usable = min(mem_total, limit) if limit else mem_total
    workers = num_parallel or default_num_parallel(mem_total)
    source = "--num_parallel" if num_parallel else f"ceil({gib(mem_total)} / 64 GiB), its default"
    fit = max(1, math.ceil(usable / COMPILER_PROCESS_RAM))
    measured = (f"{plural(workers, 'compiler process', 'es')} ({source}) in {gib(usable)}"
                f"{' (cgroup limit)' if limit and limit < mem_total else ''}: {gib(usable / workers)} each")
    if workers > fit:
        return failed("compile parallelism", measured,
                      f"give the job the node's memory (sbatch --exclusive / --mem=0) or {fit} compiler processes "
                      f"fit: compilers killed for memory fail their graphs")
    return passed("compile parallelism", measured)


# ---------------------------------------------------------------------------------------------------- torch


def check_cpus(cpus: int, ranks: int, threads_per_rank: int | None) -> Check:
    threads = threads_per_rank or max(1, cpus // ranks)
    measured = f"{cpus} usable CPUs for {plural(ranks, 'rank')} x {plural(threads, 'thread')}"
    if cpus < ranks:
        return warned("cpus", measured, "fewer CPUs than ranks: lower trainer.devices or expect a slow run")
    if ranks * threads > cpus:
        return warned("cpus", measured + " (oversubscribed)", "lower OMP_NUM_THREADS")
    return passed("cpus", measured)


def check_ram(needed: int, available: int, limit: int | None, ranks: int) -> Check:
    """The plan's per-rank estimate x ranks against memory this node can still give (MemAvailable, cgroup limit)."""
    usable = min(available, limit) if limit else available
    measured = (f"estimate {gib(needed)} ({plural(ranks, 'rank')}) of {gib(usable)} available"
                f"{' (cgroup limit)' if limit and limit < available else ''}")
    if needed > usable:
        return failed("ram", measured, "lower the micro batch, sequence length or trainer.devices, or free memory")
    if needed > RAM_WARN_FRACTION * usable:
        return warned("ram", measured, "little headroom: the estimate leaves out allocator and library overhead")
    return passed("ram", measured)


@dataclass(frozen=True)
class Gpu:
    index: int
    total: int  # bytes
    used: int


def check_gpus(gpus: Sequence[Gpu] | str, ranks: int, per_rank: int) -> Check:
    """GPU count and free memory against the plan's per-rank estimate (`gpus` is an error text when none answered)."""
    if isinstance(gpus, str):
        return failed("gpus", gpus, "run on a node with NVIDIA GPUs and their driver, or use --backend torch-cpu")
    if len(gpus) < ranks:
        return failed("gpus", f"{len(gpus)} GPUs, the plan needs {ranks} (trainer.devices)", "lower trainer.devices")
    short = [g for g in gpus[:ranks] if g.total - g.used < per_rank]
    measured = (f"{len(gpus)} GPUs, {gib(min(g.total - g.used for g in gpus[:ranks]))} free on the fullest used one; "
                f"estimate {gib(per_rank)} per rank")
    if short:
        return failed("gpus", measured + f" (GPU {short[0].index} has {gib(short[0].total - short[0].used)} free)",
                      "stop what uses it, or lower the micro batch / sequence length")
    return passed("gpus", measured)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,memory.total,memory.used --format=csv,noheader,nounits` (MiB)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not all(p.replace(".", "", 1).isdigit() for p in parts):
            raise ParseError(f"nvidia-smi line {number} is not 'index, total MiB, used MiB': {line.strip()[:60]!r}")
        out.append(Gpu(int(parts[0]), int(float(parts[1])) * 2**20, int(float(parts[2])) * 2**20))
    return out


# ------------------------------------------------------------------------------------------------ both backends


def check_rendezvous(probe: PortProbe, node_rank: int, num_nodes: int, backend: str) -> Check:
    """Node 0 must be able to host the rendezvous (the port free, the address its own); the others must reach it:
    refused means the host answered, a timeout or 'no route' means nothing gets there."""
    what = {"gloo": "gloo", "nccl": "nccl"}.get(backend, backend)
    if probe.action == "bind":
        if probe.outcome == "bound":
            if num_nodes > 1 and probe.ip and probe.ip.startswith("127."):
                return warned("rendezvous", f"{probe.address} -> {probe.ip} bindable, but that is loopback and "
                              f"{num_nodes - 1} other nodes must reach it",
                              "make the master's name resolve to an address the other nodes reach")
            return passed("rendezvous", f"{probe.address} ({probe.ip}) free on node 0 for the {what} rendezvous")
        if probe.outcome == "in-use":
            holder = f" by {probe.holder}" if probe.holder else ""
            return failed("rendezvous", f"{probe.address} is taken{holder}",
                          "stop the stale job holding it, or set MASTER_PORT to a free port")
        if probe.outcome == "not-local":
            return failed("rendezvous", f"{probe.address} resolves to {probe.ip}, which is not an address of node 0",
                          "node 0 is the master: fix MASTER_ADDR or the host's name resolution")
        return failed("rendezvous", f"{probe.address}: {probe.detail}", "fix MASTER_ADDR / MASTER_PORT")
    if probe.outcome in ("refused", "accepted"):
        return passed("rendezvous", f"master {probe.address} ({probe.ip}) reachable from node {node_rank}: "
                                    f"{probe.detail}")
    fix = ("open TCP to the master's port between the nodes (security group / firewall) and check MASTER_ADDR; "
           f"the {what} rendezvous would hang until its timeout")
    return failed("rendezvous", f"master {probe.address} from node {node_rank}: {probe.detail}", fix)


def check_data(train_dir: str | None, uses_default: bool, exists: bool, readable: bool, entries: int) -> Check:
    if uses_default:
        return passed("data", f"the embedded default dataset, built at start under {train_dir}")
    if train_dir is None:
        return failed("data", "data.train_dir is not set", "point it at a dataset made by `data prepare`")
    if train_dir.startswith("s3://"):
        return warned("data", f"{train_dir} is on S3: not checked from here")
    if not exists:
        return failed("data", f"{train_dir} does not exist on this node",
                      "mount the shared filesystem on every node, or fix data.train_dir")
    if not readable or entries == 0:
        return failed("data", f"{train_dir} is {'not readable' if not readable else 'empty'} on this node",
                      "fix its permissions or point data.train_dir at the prepared dataset")
    return passed("data", f"{train_dir} ({entries} entries)")


def check_run_dir(run_dir: str, probe: WriteProbe) -> Check:
    if probe.ok:
        return passed("run dir", f"{run_dir} writable ({probe.detail})")
    return failed("run dir", f"{run_dir} is not writable: {probe.detail}",
                  "use a writable --output-dir / OUTPUT_DIR (a shared filesystem every node mounts read-write)")


@dataclass(frozen=True)
class CheckpointNeed:
    parameters: int
    bytes_per_parameter: int  # weights + optimizer states
    count: int  # checkpoints on disk at the peak: the kept ones + the one being written
    existing: int  # bytes the run's checkpoints already take
    enabled: bool

    @property
    def per_checkpoint(self) -> int:
        return self.parameters * self.bytes_per_parameter

    @property
    def more(self) -> int:
        return max(0, self.per_checkpoint * self.count - self.existing)


def checkpoint_count(save_top_k: int, every: int | None, max_steps: int) -> int:
    """Checkpoints on disk at once: the newest `save_top_k` plus the one being written (the oldest goes after it is
    done); never more than the run saves (every `every` steps and at the end)."""
    saves = (max_steps // every if every else 0) + 1
    if save_top_k < 0:  # keep all
        return saves
    return min(save_top_k + 1, saves)


def check_checkpoint_space(need: CheckpointNeed, space: DiskSpace) -> Check:
    if not need.enabled:
        return passed("checkpoint space", f"checkpoints are off; {gib(space.free)} free on {space.filesystem}")
    measured = (f"{gib(space.free)} free on {space.filesystem}, {gib(need.more)} more needed: {need.count} "
                f"checkpoints x {need.parameters / 1e6:,.1f}M parameters x {need.bytes_per_parameter} B"
                + (f" - {gib(need.existing)} already there" if need.existing else ""))
    if need.more > space.free:
        return failed("checkpoint space", measured,
                      "free space there or lower exp_manager.checkpoint_callback_params.save_top_k")
    return passed("checkpoint space", measured)


def check_container_disk(space: DiskSpace, threshold: int = CONTAINER_DISK_WARN) -> Check:
    measured = f"{gib(space.free)} free on {space.filesystem} of {gib(space.total)}"
    if space.free < threshold:
        return warned("container disk", measured + f", below {gib(threshold)}",
                      "enroot unpacks each image (and pyxis keeps named containers) under its data path: move "
                      "ENROOT_DATA_PATH to the NVMe or remove old containers (enroot list / enroot remove)")
    return passed("container disk", measured)


def check_compile_cache(mode: str, status: str, reason: str, cost: str | None, cache_dir: str,
                        writable: WriteProbe | None, baked: tuple[str, str] | None) -> Check:
    """train: the plan's graphs must be in the cache (or the image's baked one, seeded at start); compile: the cache
    must be writable, a miss is what it is for. `status` is cache verify's hit | miss | unknown | unused."""
    if writable is not None and not writable.ok:
        return failed("compile cache", f"{cache_dir} is not writable: {writable.detail}",
                      "point compiler_cache_url (or L3HP_CACHE_DIR) at a writable dir")
    if status == "unused":
        return passed("compile cache", reason)
    if mode == "compile":
        verb = {"hit": "already holds this plan's graphs", "miss": "will be filled"}.get(status, "checked after")
        return passed("compile cache", f"{cache_dir} writable; {verb} ({reason})")
    if status == "hit":
        return passed("compile cache", f"hit: {reason}")
    if baked is not None and baked[0] == "hit":
        return passed("compile cache", f"hit in the image's baked cache ({baked[1]}); train seeds it into {cache_dir}")
    fix = f"run `compile` with this config and node count first{f' (a miss costs {cost})' if cost else ''}"
    if status == "miss":
        return failed("compile cache", f"will MISS: {reason}", fix)
    return warned("compile cache", f"cannot tell: {reason}", fix)
