"""The preflight step enroot/*.sbatch render before the job step (DRY_RUN=1): one srun step on every node, in the
same container with the same mounts, env and overrides as the step it guards, `preflight --mode <the job's mode>`;
PREFLIGHT=0 drops it. Running it on a real Slurm cluster: tests/integration/test_slurm.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.unit.test_sbatch import SCRIPTS, options, program, render


def preflight_line(stderr: str) -> list[str]:
    found = [line for line in stderr.splitlines() if line.startswith("preflight: + ")]
    assert len(found) == 1, stderr
    return shlex.split(found[0].removeprefix("preflight: + "))


@pytest.mark.parametrize("script", SCRIPTS)
def test_preflight_step_runs_where_the_job_step_runs(script: str, tmp_path: Path) -> None:
    result = render(script, tmp_path, "configs/tiny_cpu.yaml", "trainer.max_steps=5", IMAGE="/fsx-images/l3.sqsh",
                    OMP_NUM_THREADS="4")
    assert result.returncode == 0, result.stderr
    job = shlex.split(result.stdout.splitlines()[0])  # the job step (the container clean-up step follows it)
    check = preflight_line(result.stderr)
    mode = script.removesuffix(".sbatch")
    job_opts, check_opts = options(job), options(check)
    # Same allocation, container, mounts, env names and workdir; its lines come back to the batch log, labelled.
    assert {k: v for k, v in job_opts.items() if k != "--output"} == {k: v for k, v in check_opts.items()
                                                                        if k != "--label"}
    assert "--label" in check_opts and "--output" not in check_opts
    assert check_opts["--nodes"] == "2" and check_opts["--ntasks-per-node"] == "1"
    assert check_opts["--container-name"] == job_opts["--container-name"]  # the job step reuses the unpacked image
    # The same command with `preflight --mode MODE` in place of the mode.
    prog = program(job)
    i = prog.index(mode)
    assert program(check) == [*prog[:i], "preflight", "--mode", mode, *prog[i + 1:]]


def test_preflight_0_skips_the_step(tmp_path: Path) -> None:
    result = render("train.sbatch", tmp_path, IMAGE="/x.sqsh", PREFLIGHT="0")
    assert result.returncode == 0
    assert "preflight: skipped (PREFLIGHT=0)" in result.stderr and "preflight: + " not in result.stderr
    assert shlex.split(result.stdout)[0] == "srun"


def test_venv_mode_preflight_uses_the_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = render("train.sbatch", tmp_path, "configs/tiny_cpu.yaml", CONTAINER="none", VENV=str(venv),
                    OUTPUT_DIR=str(tmp_path / "out"), BACKEND="torch-cpu")
    check = preflight_line(result.stderr)
    assert program(check)[:5] == [f"{venv}/bin/python", program(check)[1], "preflight", "--mode", "train"]
    assert program(check)[5:] == ["configs/tiny_cpu.yaml", "--output-dir", str(tmp_path / "out"), "--backend",
                                  "torch-cpu", f"compiler_cache_url='{tmp_path}/fsx/llama3-hyperpod/cache'"]
