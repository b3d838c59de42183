"""`smoke` trains the tiny model on real text (the embedded stdlib dataset) and `report` plots the run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama3_hyperpod.torch_backend.commands import report, smoke
from tests.conftest import REPO
from tests.token_data import write_byte_text_dataset


@pytest.mark.integration
def test_smoke_loss_falls_on_real_text_and_report_plots_it(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        smoke,
        ["--steps", "20", "--device", "cpu", "--output-dir", str(out), "model.encoder_seq_length=128"],
    )
    assert result.exit_code == 0, result.output
    assert "smoke: PASS (cpu)" in result.output
    drop = re.search(r"evidence: loss ([\d.]+) -> ([\d.]+) \(drop ([\d.]+)", result.output)
    assert drop and float(drop.group(3)) >= 1.0, result.output
    print(result.output.splitlines()[-6:])  # the evidence, shown with pytest -s

    (run_dir,) = out.glob("smoke-*")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 20
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    shown = CliRunner().invoke(report, [str(run_dir)])
    assert shown.exit_code == 0, shown.output
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_a_folder_without_metrics(tmp_path: Path) -> None:
    result = CliRunner().invoke(report, [str(tmp_path)])
    assert result.exit_code == 2
    assert "has no metrics.jsonl" in result.output


@pytest.mark.integration
def test_smoke_plans_like_train_and_honours_the_run_time_cache_dir(tmp_path: Path) -> None:
    """`smoke` goes through build_plan: L3HP_CACHE_DIR (node-local disk) replaces the config's compiler_cache_url,
    so its compiled graphs land there and the next smoke reads them back from there (every graph a cache hit, and
    no vector-ISA probe run again)."""
    configured, runtime, out = tmp_path / "configured", tmp_path / "runtime", tmp_path / "runs"
    write_byte_text_dataset(tmp_path / "data", seq_len=64, max_bytes=64 * 8 * 10)  # no BPE to train: faster
    args = ["smoke", "--steps", "10", "--device", "cpu", "--output-dir", str(out), "model.encoder_seq_length=64",
            f"data.train_dir={tmp_path / 'data'}", "torch_backend.compile=true", f"compiler_cache_url={configured}"]
    # No TORCHINDUCTOR_CACHE_DIR and no Slurm: the plan decides where Inductor's cache goes.
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR" and not k.startswith("SLURM_")}
    env |= {"L3HP_CACHE_DIR": str(runtime), "OMP_NUM_THREADS": "2"}

    def run_smoke(extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *args], capture_output=True, text=True,
                              env=env | (extra or {}), cwd=REPO, timeout=900, check=False)

    cold = run_smoke()
    assert "summary:" in cold.stdout, cold.stdout + cold.stderr
    assert list((runtime / "inductor").rglob("*")), "nothing compiled into L3HP_CACHE_DIR"
    assert not configured.exists(), "the config's compiler_cache_url was written although L3HP_CACHE_DIR is set"
    assert f"cache {runtime / 'inductor'}" in cold.stdout
    cold_probes = re.search(r"vec-isa probes run (\d+) remembered (\d+)", cold.stdout)
    assert cold_probes and int(cold_probes.group(1)) > 0 and cold_probes.group(2) == "0", cold.stdout

    # inside a 2-node allocation (srun smoke on node 1): smoke is still one process on this node
    warm = run_smoke({"SLURM_JOB_NODELIST": "l3hp-absent[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                      "SLURM_JOB_ID": "7"})
    assert warm.returncode == 0, warm.stdout + warm.stderr
    counters = re.search(r"fx graph hit (\d+) miss (\d+)", warm.stdout)
    assert counters, warm.stdout + warm.stderr
    assert int(counters.group(1)) > 0 and int(counters.group(2)) == 0, counters.group(0)
    # Inductor's vector-ISA probes (an interpreter each) answered from the record the cold run left (vec_isa.py);
    # only one that failed (not recorded) would run again
    probes = re.search(r"vec-isa probes run (\d+) remembered (\d+)", warm.stdout)
    assert probes and int(probes.group(2)) > 0, warm.stdout
    assert int(probes.group(1)) + int(probes.group(2)) == int(cold_probes.group(1)), (cold_probes[0], probes[0])
    assert not configured.exists()
