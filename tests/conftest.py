"""Shared test helpers: paths of the repo and of the reference facts, and a CLI runner on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CONFIG_8B = CONFIGS / "llama3_8b_trn1.yaml"
CONFIG_TINY = CONFIGS / "tiny_cpu.yaml"
REFERENCE = REPO.parent / "shared" / "reference"
NXDT_CONF = REPO.parent / "shared" / "nxdt" / "conf"  # NxDT's own example configs, unchanged (test data)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python entrypoint.py ARGS` as a user would, in a fresh process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def neuron_reference() -> str:
    """The Neuron/NxDT facts the plan must agree with (shared/reference/neuron-nxdt.md, beside the repo in CI)."""
    path = REFERENCE / "neuron-nxdt.md"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with shared/ beside the repository")
        pytest.skip(f"{path} not present in this checkout")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def nxdt_conf() -> Path:
    """NxDT's own example configs (shared/nxdt/conf, beside the repo in CI)."""
    if not NXDT_CONF.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{NXDT_CONF} is missing: CI must run with shared/ beside the repository")
        pytest.skip(f"{NXDT_CONF} not present in this checkout")
    return NXDT_CONF
