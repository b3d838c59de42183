"""Where this process runs: which node of how many (from SLURM_*), and which accelerator it has.

No `scontrol` (it is not in the container): the node list is expanded with python-hostlist.
Nothing here imports torch, so planning stays fast.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import hostlist

from llama3_hyperpod.config import ConfigError

DEFAULT_MASTER_PORT = 41000  # NxDT's train.sh uses 41000
NEURON_CORES_PER_DEVICE = 2  # trn1: each /dev/neuronN is one Trainium chip with 2 NeuronCores
NEURON_CORE_MEMORY = 16 * 2**30  # 32 GiB HBM per chip, 16 GiB per NeuronCore
BACKENDS = ("auto", "neuron", "torch-cuda", "torch-cpu")


@dataclass(frozen=True)
class Cluster:
    """The rendezvous facts for one node's launcher."""

    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "slurm" or "single-node"
    job_id: str | None
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Accelerator:
    """What one node offers: the backend to use, its device kind, how many devices and the memory of each."""

    backend: str  # "neuron" or "torch"
    device: str  # "neuron", "cuda" or "cpu"
    count: int | None  # devices seen on this node; None when not detectable here (planning for another machine)
    memory_per_device: int | None  # bytes
    detected: bool  # False when the backend was forced and the hardware is not on this machine


def cluster_from_env(env: Mapping[str, str]) -> Cluster:
    """Slurm when SLURM_JOB_NODELIST is set (the first expanded host is the master), else one node on loopback."""
    port = _int_env(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return Cluster(1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single-node", None, ())
    try:
        hosts = tuple(hostlist.expand_hostlist(nodelist))
    except hostlist.BadHostlist as exc:
        raise ConfigError("SLURM_JOB_NODELIST", f"cannot expand {nodelist!r}: {exc}") from None
    if not hosts:
        raise ConfigError("SLURM_JOB_NODELIST", f"{nodelist!r} names no hosts")
    num_nodes = _int_env(env, "SLURM_JOB_NUM_NODES", _int_env(env, "SLURM_NNODES", len(hosts)))
    node_rank = _int_env(env, "SLURM_NODEID", 0)
    if num_nodes != len(hosts):
        raise ConfigError("SLURM_JOB_NUM_NODES", f"is {num_nodes} but SLURM_JOB_NODELIST has {len(hosts)} hosts")
    if not 0 <= node_rank < num_nodes:
        raise ConfigError("SLURM_NODEID", f"{node_rank} is outside 0..{num_nodes - 1}")
    return Cluster(num_nodes, node_rank, hosts[0], port, "slurm", env.get("SLURM_JOB_ID"), hosts)


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None


def detect_accelerator(requested: str = "auto", dev_root: str = "/dev") -> Accelerator:
    """/dev/neuron* -> neuron; an NVIDIA GPU -> torch on CUDA; otherwise torch on CPU. `requested` forces one."""
    if requested not in BACKENDS:
        raise ConfigError("--backend", f"{requested!r} is not one of {', '.join(BACKENDS)}")
    neuron_devices = sorted(glob.glob(os.path.join(dev_root, "neuron[0-9]*")))
    gpus = _nvidia_gpus()
    if requested == "neuron" or (requested == "auto" and neuron_devices):
        count = len(neuron_devices) * NEURON_CORES_PER_DEVICE if neuron_devices else None
        return Accelerator("neuron", "neuron", count, NEURON_CORE_MEMORY, bool(neuron_devices))
    if requested == "torch-cuda" or (requested == "auto" and gpus):
        memory = min(gpus) if gpus else None
        return Accelerator("torch", "cuda", len(gpus) or None, memory, bool(gpus))
    return Accelerator("torch", "cpu", os.cpu_count() or 1, _host_memory(), True)


def _nvidia_gpus() -> list[int]:
    """Memory in bytes of each NVIDIA GPU, read with nvidia-smi (no torch import)."""
    if not Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(float(line)) * 2**20 for line in out.split() if line.strip()]


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
