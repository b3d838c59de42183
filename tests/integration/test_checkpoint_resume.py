"""Checkpoints for real: `entrypoint.py train` (CLI -> launcher -> torchrun, 2 ranks, gloo) killed with SIGKILL,
stopped with SIGUSR1 / SIGTERM, resumed; half-written checkpoints skipped; a full disk keeps the last one intact.

Run A trains 30 steps straight through. Every interrupted and resumed run of the same config must log the same
loss at every step, bit for bit, and end with identical weights (CPU, one thread per rank: deterministic).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from llama3_hyperpod.config import load_config
from llama3_hyperpod.exitcodes import EXIT_REQUEUE, REQUEUE_MARKER
from llama3_hyperpod.torch_backend import train as train_module
from llama3_hyperpod.torch_backend.checkpoint import CHECKPOINTS, complete_checkpoints, list_step_dirs, problem
from llama3_hyperpod.torch_backend.checkpoint_commands import load_model_state
from llama3_hyperpod.torch_backend.data import write_byte_text_dataset
from llama3_hyperpod.torch_backend.metrics import read_metrics
from tests.conftest import CONFIG_TINY, REPO

pytestmark = pytest.mark.integration

STEPS = 30
EVERY = 5
COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "model.encoder_seq_length=64",
    "data.micro_batch_size=4",
    "data.global_batch_size=8",
    "model.optim.sched.warmup_steps=3",
    f"exp_manager.checkpoint_callback_params.every_n_train_steps={EVERY}",
    "exp_manager.checkpoint_callback_params.save_top_k=2",
]
TIMEOUT = 240


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib64"
    write_byte_text_dataset(out, seq_len=64, max_bytes=64 * 8 * STEPS)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cli(out: Path, run_name: str, dataset: Path, *extra: str) -> subprocess.Popen[str]:
    """`entrypoint.py train` with 2 CPU ranks (data parallel 2), as a user or job.sh would start it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, str(REPO / "entrypoint.py"), "train", str(CONFIG_TINY), "--backend", "torch-cpu",
            "--output-dir", str(out), "--run-name", run_name, *COMMON, "trainer.devices=2",
            f"data.train_dir={dataset}", *extra]
    log = (out / f"{run_name}.log").open("a")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], log: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail(f"run did not end in {TIMEOUT} s:\n{log.read_text()[-4000:]}")


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher, torchrun and every worker at once: what a node crash does to them."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while steps_logged(run_dir) < step:
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(m["step"]), m["loss"]) for m in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(run_dir / CHECKPOINTS / f"step_{STEPS:07d}")


@pytest.fixture(scope="module")
def run_a(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 steps without interruption."""
    out = tmp_path_factory.mktemp("runs")
    proc = start_cli(out, "A", dataset)
    code = finish(proc, out / "A.log")
    assert code == 0, (out / "A.log").read_text()[-4000:]
    run = out / "A"
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
    assert [s for s, _ in complete_checkpoints(run / CHECKPOINTS)] == [25, 30]  # save_top_k 2
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    assert losses(run) == losses(reference)  # every step once, same loss bit for bit
    a, b = final_weights(reference), final_weights(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


def test_sigkill_then_restart_continues_bit_for_bit(run_a: Path, dataset: Path) -> None:
    out = run_a.parent
    kill_at = random.Random().randint(EVERY + 1, STEPS - 3)
    print(f"SIGKILL after step {kill_at}")
    proc = start_cli(out, "B", dataset)
    run = out / "B"
    wait_for_step(run, kill_at, proc)
    kill_tree(proc.pid)
    saved = [s for s, _ in complete_checkpoints(run / CHECKPOINTS)]
    assert saved and max(saved) <= kill_at

    proc = start_cli(out, "B", dataset)
    assert finish(proc, out / "B.log") == 0, (out / "B.log").read_text()[-4000:]
    log = (out / "B.log").read_text()
    assert f"resumed from {run / CHECKPOINTS}/step_{max(saved):07d} (step {max(saved)}," in log
    assert_same_run(run, run_a)


def test_usr1_and_sigterm_checkpoint_exit_85_and_resume(run_a: Path, dataset: Path) -> None:
    """The time-limit warning (USR1) and a preemption (TERM) each stop the run at the next step boundary with a
    checkpoint of that step and exit 85 from `entrypoint.py train`; the restart continues from there."""
    out = run_a.parent
    run = out / "C"
    stops = []
    for sig, at in ((signal.SIGUSR1, 3), (signal.SIGTERM, 14)):
        proc = start_cli(out, "C", dataset)
        wait_for_step(run, at, proc)
        seen = steps_logged(run)
        proc.send_signal(sig)
        assert finish(proc, out / "C.log") == EXIT_REQUEUE, (out / "C.log").read_text()[-4000:]
        newest = complete_checkpoints(run / CHECKPOINTS)[-1][0]
        assert seen <= newest <= seen + 2, (seen, newest)  # the next step boundary, not the next every-N save
        assert steps_logged(run) == newest  # and no step after it
        assert not list(run.glob(f"{REQUEUE_MARKER}*"))  # the launcher consumed it
        stops.append(newest)
    proc = start_cli(out, "C", dataset)
    assert finish(proc, out / "C.log") == 0
    log = (out / "C.log").read_text()
    assert "got SIGUSR1" in log and "got SIGTERM" in log
    assert f"(step {stops[0]}," in log and f"(step {stops[1]}," in log  # each restart resumed from its stop
    assert_same_run(run, run_a)


def _tiny(dataset: Path, *extra: str) -> list[str]:
    return [*COMMON, f"data.train_dir={dataset}", "exp_manager.checkpoint_callback_params.save_top_k=-1", *extra]


def test_half_written_and_corrupt_checkpoints_are_skipped(dataset: Path, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    rc = load_config(CONFIG_TINY, _tiny(dataset, "trainer.max_steps=10"))
    train_module.train(rc, tmp_path, echo=False)
    root = tmp_path / CHECKPOINTS
    assert [s for s, _ in complete_checkpoints(root)] == [5, 10]
    # step 15: the save was cut short (no done marker, a truncated shard); step 14: marked done, then truncated.
    for step in (14, 15):
        broken = root / f"step_{step:07d}"
        shutil.copytree(root / "step_0000010", broken)
        shard = next(broken.glob("*.distcp"))
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    (root / "step_0000015" / "done").unlink()
    capfd.readouterr()

    rc = load_config(CONFIG_TINY, _tiny(dataset, "trainer.max_steps=12"))
    result = train_module.train(rc, tmp_path, echo=True)
    err = capfd.readouterr().err
    assert result.start_step == 10 and len(result.losses) == 2
    assert f"skipping {root}/step_0000015: no done marker" in err
    assert f"skipping {root}/step_0000014: __0_0.distcp has" in err and "truncated" in err
    assert f"resumed from {root}/step_0000010" in err
    assert [s for s, _ in list_step_dirs(root)] == [5, 10, 12]  # the broken ones are pruned after the next save


def test_disk_full_keeps_the_previous_checkpoint(dataset: Path, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """A tmpfs that holds one checkpoint (84 MiB) but not two: the second save fails with one clear line, the
    partial save is removed, and the first checkpoint is still complete and loadable."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(run_dir)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        torch.set_num_threads(1)
        argv = ["--config", str(CONFIG_TINY), "--run-dir", str(run_dir), "--device", "cpu",
                *_tiny(dataset, "trainer.max_steps=4", "exp_manager.checkpoint_callback_params.every_n_train_steps=2")]
        capfd.readouterr()
        assert train_module.main(argv) == 1
        err = capfd.readouterr().err
        root = run_dir / CHECKPOINTS
        assert f"error: checkpoint: saving the checkpoint of step 4 in {root} failed: " in err
        assert "No space left on device" in err
        assert f"the previous checkpoint {root}/step_0000002 is intact" in err
        assert "Traceback" not in err
        assert [p.name for p in root.iterdir()] == ["step_0000002"]  # no partial save left behind
        assert problem(root / "step_0000002") is None
        assert load_model_state(root / "step_0000002")
    finally:
        subprocess.run(["umount", "--lazy", str(run_dir)], check=False)
