"""A real Slurm test cluster (scripts/ci/setup_slurm.sh: Debian's slurm-wlm and munge, slurmctld and 2 slurmd on this
host) for the tests that submit enroot/*.sbatch; the session fixture `slurm` is in tests/integration/conftest.py."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

SETUP = REPO / "scripts" / "ci" / "setup_slurm.sh"
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
        pytest.fail(f"job {job_id} did not end within {timeout} s; batch log:\n{read_log(log)}")


def read_log(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else f"({path} missing)"


@contextlib.contextmanager
def start_cluster(state: Path) -> Iterator[Cluster]:
    """munged + slurmctld + 2 slurmd in STATE, stopped again afterwards."""
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


