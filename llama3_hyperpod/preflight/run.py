"""Which checks a plan needs on this node, in order, and the report they make. Measures, never starts anything:
the only things written are a probe file (removed) in the run dir and the compile cache dir, and the report itself
in <run dir>/preflight/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llama3_hyperpod.preflight import checks, host
from llama3_hyperpod.preflight.parsers import ParseError, parse_core_list
from llama3_hyperpod.preflight.result import Check, Report, failed, warned
from llama3_hyperpod.preflight.tools import ToolError, run_tool

if TYPE_CHECKING:
    from llama3_hyperpod.plan import Plan

MODES = ("train", "compile")
RESULT_DIR = "preflight"
NEURON_APT_PACKAGES = ("aws-neuronx-runtime-lib", "aws-neuronx-collectives", "aws-neuronx-tools")


@dataclass(frozen=True)
class Roots:
    """Where host facts are read (tests point these at their own files)."""

    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"
    cgroup: str = "/sys/fs/cgroup"
    container_root: str = "/"


def launch_env_value(plan: Plan, mode: str, name: str) -> str | None:
    """The value `name` will have in the launched process: what the plan sets, or the caller's own value it keeps."""
    launch = plan.commands[mode]
    return launch.env.get(name, launch.env_kept.get(name))


def _arg_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def neuron_checks(plan: Plan, mode: str, env: Mapping[str, str], roots: Roots) -> list[Check]:
    from llama3_hyperpod.sdkinfo import load_pins, pins_file

    needed = plan.layout.devices_per_node
    visible: set[int] | None = None
    bad_visible: Check | None = None
    raw_visible = env.get("NEURON_RT_VISIBLE_CORES")
    if raw_visible:
        try:
            visible = parse_core_list(raw_visible)
        except ParseError as exc:
            bad_visible = failed("neuroncores free", str(exc), "fix or unset NEURON_RT_VISIBLE_CORES")
    try:
        listing = run_tool(["neuron-ls", "--json-output"], package="aws-neuronx-tools")
    except ToolError as exc:
        devices_check, free_check, _ = checks.check_neuron_devices(exc, needed, visible)
    else:
        devices_check, free_check, _ = checks.check_neuron_devices(listing, needed, visible)
    out = [devices_check, bad_visible or free_check]

    try:
        versions = load_pins()
        apt = {p: str(versions["apt"][p]) for p in NEURON_APT_PACKAGES}
        driver_min, sdk = str(versions["host"]["aws-neuronx-dkms"]), str(versions["neuron_sdk"])
    except (OSError, ValueError, KeyError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else exc.args[0] if exc.args else exc
        why = f"the pins ({pins_file()}) are unreadable here: {detail}"
        out += [warned("neuron driver", f"cannot tell: {why}"), warned("neuron runtime", f"cannot tell: {why}")]
    else:
        out.append(checks.check_neuron_driver(host.neuron_driver_version(roots.sys), driver_min, sdk,
                                              apt["aws-neuronx-runtime-lib"]))
        try:
            dpkg = run_tool(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *apt], package="dpkg")
        except ToolError as exc:
            out.append(checks.check_neuron_runtime(exc, apt))
        else:
            out.append(checks.check_neuron_runtime(dpkg, apt))

    nodes = plan.cluster["num_nodes"]
    if nodes > 1:
        out.append(checks.check_efa_devices(host.efa_device_files(roots.dev), nodes))
        try:
            fi = run_tool(["fi_info", "-p", "efa", "-t", "FI_EP_RDM"], package="libfabric (the EFA installer)")
        except ToolError as exc:
            out.append(checks.check_efa_provider(exc, None))
        else:
            out.append(checks.check_efa_provider(fi, launch_env_value(plan, mode, "FI_PROVIDER")))
    if mode == "compile":
        info = host.meminfo(roots.proc)
        explicit = _arg_value(plan.commands["compile"].argv, "--num_parallel")
        out.append(checks.check_compile_parallelism(
            info["MemTotal"], host.cgroup_memory_limit(roots.proc, roots.cgroup),
            int(explicit) if explicit and explicit.isdigit() else None))
    return out


def torch_checks(plan: Plan, mode: str, roots: Roots) -> list[Check]:
    ranks = plan.layout.devices_per_node
    if plan.device == "cuda":
        try:
            smi = run_tool(["nvidia-smi", "--query-gpu=index,memory.total,memory.used",
                            "--format=csv,noheader,nounits"], package="the NVIDIA driver")
            gpus: list[checks.Gpu] | str = (checks.parse_nvidia_smi(smi.stdout) if smi.returncode == 0
                                            else f"nvidia-smi exited {smi.returncode}: {smi.stderr.strip()[:120]}")
        except (ToolError, ParseError) as exc:
            gpus = str(exc)
        return [checks.check_gpus(gpus, ranks, plan.memory.total)]
    threads = launch_env_value(plan, mode, "OMP_NUM_THREADS")
    info = host.meminfo(roots.proc)
    return [checks.check_cpus(host.usable_cpus(), ranks, int(threads) if threads and threads.isdigit() else None),
            checks.check_ram(plan.memory.total * ranks, info.get("MemAvailable", info["MemTotal"]),
                             host.cgroup_memory_limit(roots.proc, roots.cgroup), ranks)]


def rendezvous_check(plan: Plan) -> Check:
    cluster = plan.cluster
    addr, port, rank = cluster["master_addr"], int(cluster["master_port"]), cluster["node_rank"]
    probe = host.probe_bind(addr, port) if rank == 0 else host.probe_connect(addr, port)
    return checks.check_rendezvous(probe, rank, cluster["num_nodes"], plan.process_group_backend or "torchrun")


def data_check(plan: Plan) -> Check:
    train_dir = plan.train_dir
    if plan.uses_default_dataset or train_dir is None or train_dir.startswith("s3://"):
        return checks.check_data(train_dir, plan.uses_default_dataset, False, False, 0)
    path = Path(train_dir)
    exists = path.exists()
    readable = exists and os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))
    try:
        entries = len(os.listdir(path)) if readable and path.is_dir() else int(readable)
    except OSError:
        readable, entries = False, 0
    return checks.check_data(train_dir, False, exists, readable, entries)


def checkpoint_need(plan: Plan) -> checks.CheckpointNeed:
    from llama3_hyperpod.memory import bytes_per_param

    ck = plan.checkpoints
    b = bytes_per_param(plan.backend, plan.device, plan.memory.precision)
    count = checks.checkpoint_count(int(ck.get("keep", 1)), ck.get("every_n_train_steps"),
                                    int(ck.get("max_steps") or 0))
    return checks.CheckpointNeed(int(plan.model["parameters"]), b.weight + b.optimizer, count,
                                 host.tree_bytes(Path(ck["dir"])), bool(ck.get("enabled")))


def cache_check(plan: Plan, mode: str, label: str) -> Check:
    from llama3_hyperpod.cache.seed import DEFAULT_BAKED_DIR, ENV_BAKED_DIR
    from llama3_hyperpod.cache.verify import verify

    cache_dir = plan.compile_cache_dir
    verdict = verify(plan)
    local = not cache_dir.startswith("s3://")
    writable = host.probe_write(Path(cache_dir), label) if local and verdict.status != "unused" else None
    baked: tuple[str, str] | None = None
    baked_dir = Path(os.environ.get(ENV_BAKED_DIR, DEFAULT_BAKED_DIR))
    if mode == "train" and verdict.status in ("miss", "unknown") and baked_dir.is_dir() \
            and baked_dir.resolve() != Path(cache_dir).resolve():
        other = verify(plan, baked_dir)
        baked = (other.status, f"{baked_dir}: {other.reason}")
    return checks.check_compile_cache(mode, verdict.status, verdict.reason, verdict.expected_cost, cache_dir,
                                      writable, baked)


def run_preflight(plan: Plan, mode: str = "train", env: Mapping[str, str] | None = None,
                  roots: Roots | None = None) -> Report:
    """Every check `mode` needs for `plan` on this node, in order (all run; the first FAIL is the one named)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    env = os.environ if env is None else env
    roots = roots or Roots()
    start = time.perf_counter()
    rank = int(plan.cluster["node_rank"])
    report = Report(host.node_name(env), rank, int(plan.cluster["num_nodes"]), plan.backend, plan.device, mode,
                    plan.run_dir)
    label = f"node{rank}"
    found = (neuron_checks(plan, mode, env, roots) if plan.backend == "neuron"
             else torch_checks(plan, mode, roots))
    found.append(rendezvous_check(plan))
    found.append(data_check(plan))
    run_dir = Path(plan.run_dir)
    found.append(checks.check_run_dir(plan.run_dir, host.probe_write(run_dir, label)))
    if mode == "train":  # a compile run saves no checkpoints (COMPILE=1 turns them off in NxDT's orchestrator)
        found.append(checks.check_checkpoint_space(checkpoint_need(plan), host.disk_space(plan.checkpoints["dir"],
                                                                                           roots.proc)))
    found.append(checks.check_container_disk(host.disk_space(roots.container_root, roots.proc)))
    found.append(cache_check(plan, mode, label))
    report.checks = found
    report.seconds = time.perf_counter() - start
    return report


def result_path(plan: Plan, mode: str) -> Path:
    return Path(plan.run_dir) / RESULT_DIR / f"{mode}-node{plan.cluster['node_rank']}.json"


def write_result(report: Report, path: Path) -> str | None:
    """Write the report as JSON (atomically); returns why not when it cannot (the run dir may be what failed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return exc.strerror or str(exc)
    return None
