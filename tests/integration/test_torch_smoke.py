"""`smoke` trains the tiny model on real text (the embedded stdlib dataset) and `report` plots the run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama3_hyperpod.torch_backend.commands import report, smoke


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
