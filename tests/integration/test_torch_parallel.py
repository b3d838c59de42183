"""TP x DP over real torchrun processes (gloo, CPU) gives the same losses as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_hyperpod.config import load_config
from llama3_hyperpod.torch_backend.train import train
from tests.token_data import write_byte_text_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
STEPS = 10
COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "model.encoder_seq_length=64",
    "data.micro_batch_size=2",
    "data.global_batch_size=8",
    "model.optim.sched.warmup_steps=2",
    # min_lr = lr: after the warmup the LR no longer depends on max_steps, which (as in NxDT) the schedule spans, so a
    # run stopped at max_steps=5 and continued to 10 follows one straight run's schedule.
    "model.optim.sched.min_lr=3.0e-3",
    "torch_backend.compile=false",
    # Stored data order. With the default shuffled order the same runs differ by up to 1.3e-5 relative at steps 6-7:
    # the same summation-order rounding, amplified by Adam on a faster-falling loss (4.2 after 7 steps here).
    "torch_backend.shuffle=false",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib64"
    write_byte_text_dataset(out, seq_len=64, max_bytes=64 * 8 * STEPS)
    return out


@pytest.fixture(scope="module")
def reference_losses(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """One process, micro batch 2 x 4 accumulation steps = the same global batch of 8."""
    rc = load_config(TINY, [*COMMON, f"data.train_dir={dataset}"])
    assert rc.grad_accum_steps == 4
    return train(rc, tmp_path_factory.mktemp("ref"), echo=False).losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
@pytest.mark.parametrize(
    ("tp", "dp", "sequence_parallel"),
    [(2, 2, True), (4, 1, False), (1, 4, False)],
    ids=["tp2xdp2-sp", "tp4xdp1", "tp1xdp4"],
)
def test_parallel_losses_match_single_process(
    tp: int, dp: int, sequence_parallel: bool, dataset: Path, reference_losses: list[float], tmp_path: Path
) -> None:
    overrides = [
        *COMMON,
        f"data.train_dir={dataset}",
        "trainer.devices=4",
        f"distributed_strategy.tensor_model_parallel_size={tp}",
        f"distributed_strategy.sequence_parallel={str(sequence_parallel).lower()}",
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "llama3_hyperpod.torch_backend.train", "--config", str(TINY), "--run-dir", str(tmp_path),
        "--device", "cpu", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"tp {tp} x dp {dp}" in proc.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    # Same math, different summation order (sharded matmuls, reduce-scatter): equal to 1e-5 relative.
    assert losses == pytest.approx(reference_losses, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.integration
@pytest.mark.parametrize(("before", "after"), [((2, 1), (1, 2))], ids=["tp2xdp1-to-tp1xdp2"])  # also ran: the reverse
def test_a_checkpoint_resumes_under_another_layout(before: tuple[int, int], after: tuple[int, int], dataset: Path,
                                                   reference_losses: list[float], tmp_path: Path) -> None:
    """Steps 1-5 under one (tp, dp) split, a checkpoint, steps 6-10 under another: DCP reshards model and optimizer
    state (FQN-keyed, flattened) on load, and every loss stays within the equivalence tolerance of one process."""
    for (tp, dp), steps in ((before, 5), (after, STEPS)):
        overrides = [*COMMON, f"data.train_dir={dataset}", "trainer.devices=2", f"trainer.max_steps={steps}",
                     f"distributed_strategy.tensor_model_parallel_size={tp}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "llama3_hyperpod.torch_backend.train", "--config", str(TINY),
               "--run-dir", str(tmp_path), "--device", "cpu", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"tp {tp} x dp {dp}" in proc.stdout
    assert f"resharded from tp {before[0]} x dp {before[1]} to tp {after[0]} x dp {after[1]}" in proc.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference_losses, rel=1e-5, abs=1e-6)
