"""enroot/*.sbatch on a real Slurm cluster (Debian's slurm-wlm, 2 slurmd nodes) started by scripts/ci/setup_slurm.sh.

The jobs run with CONTAINER=none (the same srun line without pyxis: this machine has no enroot), so what is
exercised for real is Slurm's side: one task per node, SLURM_* -> torchrun rendezvous across two slurmd nodes,
per-node logs, exit codes, and the compile-cache node-count check.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

SETUP = REPO / "scripts" / "ci" / "setup_slurm.sh"
VENV = Path(sys.executable).parent.parent
# Small enough for 2 shared cores: 3 steps of 8 x 64 tokens. micro 4 so that 2 data-parallel ranks make batch 8.
TINY = ["configs/tiny_cpu.yaml", "trainer.max_steps=3", "model.encoder_seq_length=64", "data.micro_batch_size=4"]
JOB_TIMEOUT = 240


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on loopback."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range found")


@dataclass(frozen=True)
class Cluster:
    """A running test cluster: the env that points Slurm's clients at it."""

    dir: Path
    env: dict[str, str]

    def run(self, *argv: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env={**self.env, **(extra_env or {})}, capture_output=True, text=True,
                              cwd=REPO, timeout=60, check=False)

    def sbatch(self, script: str, *args: str, nodes: int, log: Path, env: dict[str, str]) -> str:
        result = self.run("sbatch", "--parsable", f"--nodes={nodes}", f"--output={log}", script, *args,
                          extra_env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def wait(self, job_id: str, log: Path, timeout: float = JOB_TIMEOUT) -> tuple[str, str]:
        """Poll until the job ends; returns (JobState, ExitCode). Cancels it and fails when it takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("scontrol", "show", "job", "-o", job_id).stdout
            state = re.search(r"JobState=(\S+)", out)
            code = re.search(r"ExitCode=(\S+)", out)
            if state and code and state.group(1) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                     "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}:
                return state.group(1), code.group(1)
            time.sleep(1)
        self.run("scancel", job_id)
        pytest.fail(f"job {job_id} did not end within {timeout} s; batch log:\n{_read(log)}")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else f"({path} missing)"


def _slurm_logs(out: Path) -> str:
    logs = sorted((out / "slurm-logs").glob("*.log")) if (out / "slurm-logs").is_dir() else []
    return "\n".join(f"== {p.name}\n{_read(p)[-3000:]}" for p in logs)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Start munged + slurmctld + 2 slurmd for this test session, and stop them afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"L3HP_SLURM_DIR": str(state), "L3HP_SLURM_NODES": "2", "L3HP_SLURM_PORT": str(free_ports(3))}
    try:
        started = subprocess.run(["bash", str(SETUP), "up"], env=env, capture_output=True, text=True, timeout=600,
                                 check=False)
    except subprocess.TimeoutExpired:
        started = subprocess.CompletedProcess([], 124, "", "setup_slurm.sh up timed out")
    try:
        if started.returncode != 0:
            message = f"could not start the Slurm test cluster:\n{started.stdout}{started.stderr}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        yield Cluster(state, {**env, "SLURM_CONF": str(state / "etc" / "slurm.conf")})
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["bash", str(SETUP), "down"], env=env, capture_output=True, timeout=120, check=False)


def job_env(out: Path, **extra: str) -> dict[str, str]:
    """The knobs of enroot/*.sbatch for a venv run on this machine, one thread per trainer process."""
    return {"CONTAINER": "none", "VENV": str(VENV), "OUTPUT_DIR": str(out), "BACKEND": "torch-cpu",
            "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_ports(1)), **extra}


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def test_two_nodes_train_like_one_node_with_the_same_global_batch(slurm: Cluster, tmp_path: Path) -> None:
    """sbatch -N2 train.sbatch: two torchrun agents (one per slurmd node, gloo across nodes) with data parallel 2
    give the same per-step losses as one node with 2 processes and the same global batch."""
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *TINY, nodes=2, log=log,
                       env=job_env(out, RUN_NAME="two-nodes"))
    batch_log = tmp_path / f"train-{job}.out"
    state, code = slurm.wait(job, batch_log)
    assert (state, code) == ("COMPLETED", "0:0"), f"{_read(batch_log)}\n{_slurm_logs(out)}"

    node_logs = {p.name: _read(p) for p in (out / "slurm-logs").glob(f"llama3-train-{job}-restart0-*.log")}
    assert sorted(re.sub(r".*-(node\d+)\.log", r"\1", n) for n in node_logs) == ["node0", "node1"], node_logs.keys()
    launches = sorted(re.findall(r"--nnodes (\d+) --node_rank (\d+) --master_addr (\S+)", "\n".join(
        node_logs.values())))
    assert launches == [("2", "0", "l3hp-n1"), ("2", "1", "l3hp-n1")], launches

    reference = run_cli("train", *TINY[:1], "--backend", "torch-cpu", "--output-dir", str(out),
                        "--run-name", "one-node", *TINY[1:], "trainer.devices=2",
                        env={"OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_ports(1))}, timeout=JOB_TIMEOUT)
    assert reference.returncode == 0, reference.stderr[-3000:]

    two, one = losses(out / "two-nodes"), losses(out / "one-node")
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


def test_train_refuses_a_cache_compiled_for_another_node_count(slurm: Cluster, tmp_path: Path) -> None:
    """A compile cache holds graphs for the node counts it was compiled for: a 2-node training job on a cache
    compiled for 1 node stops with one clear line before any step starts."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"compiles": [{"graph": {"layout.num_nodes": 1}}]}),
                                         encoding="utf-8")
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *TINY, nodes=2, log=log, env=job_env(out, CACHE_DIR=str(cache)))
    batch_log = tmp_path / f"train-{job}.out"
    state, code = slurm.wait(job, batch_log, timeout=60)
    text = _read(batch_log)
    assert (state, code) == ("FAILED", "2:0"), text
    assert f"error: compile cache {cache} was compiled for 1 nodes" in text
    assert "submit with -N 1" in text
    assert not (out / "slurm-logs").exists(), "no step may start"
