"""Checkpoints for real: `entrypoint.py train` (CLI -> launcher -> torchrun, 2 ranks, gloo) killed with SIGKILL,
stopped with SIGUSR1 / SIGINT / SIGHUP / SIGTERM (an early USR1 too), its launcher killed; resumed; half-written and
corrupt checkpoints skipped and kept; another model's checkpoints refused; a second train on the same run dir
refused; two nodes sharing a run dir; a full disk keeps the last checkpoint intact.

Run A trains 30 steps straight through. Every interrupted and resumed run of the same config must log the same
loss at every step, bit for bit, and end with identical weights (CPU, one thread per rank: deterministic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from llama3_hyperpod.errors import EXIT_REQUEUE, REQUEUE_MARKER
from llama3_hyperpod.launch import catches
from llama3_hyperpod.runlock import LOCK_NAME, read_holder
from llama3_hyperpod.torch_backend import train as train_module
from llama3_hyperpod.torch_backend.checkpoint_commands import load_model_state
from llama3_hyperpod.torch_backend.checkpoint_files import (
    CHECKPOINTS,
    DONE,
    SETASIDE_PREFIX,
    complete_checkpoints,
    file_digests,
    list_step_dirs,
    problem,
    step_dir,
)
from llama3_hyperpod.torch_backend.metrics import read_metrics
from tests.conftest import CONFIG_TINY, REPO, run_cli
from tests.token_data import write_byte_text_dataset

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


def cli_argv(out: Path, run_name: str, dataset: Path, *extra: str, devices: int = 2) -> list[str]:
    return [sys.executable, str(REPO / "entrypoint.py"), "train", str(CONFIG_TINY), "--backend", "torch-cpu",
            "--output-dir", str(out), "--run-name", run_name, *COMMON, f"trainer.devices={devices}",
            f"data.train_dir={dataset}", *extra]


def start_cli(out: Path, run_name: str, dataset: Path, *extra: str, env: dict[str, str] | None = None,
              log_name: str | None = None, devices: int = 2) -> subprocess.Popen[str]:
    """`entrypoint.py train` with 2 CPU ranks (data parallel 2), as a user or job.sh would start it; devices=1:
    one process, which the launcher starts directly (no torchrun)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env |= {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()), **(env or {})}
    log = (out / f"{log_name or run_name}.log").open("a")
    return subprocess.Popen(cli_argv(out, run_name, dataset, *extra, devices=devices), cwd=REPO, env=full_env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


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


def wait_for_holder(run_dir: Path, pid: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while read_holder(run_dir / LOCK_NAME).get("pid") != pid:
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "the launcher never took the run dir's lock"
        time.sleep(0.05)


def test_sigkill_then_restart_continues_bit_for_bit(run_a: Path, dataset: Path) -> None:
    """A node crash (SIGKILL of everything) after a checkpoint; the restart resumes and matches run A. While it runs,
    a second `train` on the same run dir (another port, as a careless second submission) refuses in one line naming
    the holder, and changes nothing."""
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
    wait_for_holder(run, proc.pid, proc)
    second = subprocess.run(cli_argv(out, "B", dataset), cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())},
                            check=False)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [second.stderr.strip()], second.stderr  # one line
    assert second.stderr.startswith(f"error: {run}: is in use by train pid {proc.pid} on "), second.stderr
    assert finish(proc, out / "B.log") == 0, (out / "B.log").read_text()[-4000:]
    log = (out / "B.log").read_text()
    assert f"resumed from {run / CHECKPOINTS}/step_{max(saved):07d} (step {max(saved)}," in log
    assert_same_run(run, run_a)  # the first run's metrics and checkpoints are intact


def wait_until_it_catches(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    """Until entrypoint.py has its early-signal handler: a signal before that kills it as it would any program
    (a fixed sleep raced the interpreter's start on a busy machine)."""
    deadline = time.monotonic() + 60
    while not catches(proc.pid, sig):
        assert proc.poll() is None and time.monotonic() < deadline, "the launcher never installed its handler"
        time.sleep(0.01)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


STOPS = (  # (how, after which logged step; None: as soon as the launcher runs, before any worker exists)
    (signal.SIGUSR1, None, EXIT_REQUEUE),
    (signal.SIGINT, 4, 130),
    (signal.SIGHUP, 8, 129),
    (signal.SIGTERM, 14, EXIT_REQUEUE),
    (signal.SIGKILL, 20, None),  # of the launcher alone: torchrun and the workers must not outlive it
)


def test_every_stop_checkpoints_with_its_exit_code_and_resumes(run_a: Path, dataset: Path) -> None:
    """The time-limit warning (USR1, here even before the workers exist), Ctrl-C (INT), a lost terminal (HUP) and a
    preemption (TERM) each stop the run at the next step boundary with a checkpoint of that step, exiting 85 / 130 /
    129 / 85 from `entrypoint.py train`; a SIGKILL of the launcher leaves no process behind; every restart continues
    where the last stopped, and the whole run equals run A bit for bit."""
    out = run_a.parent
    run = out / "C"
    stops = []
    for sig, at, code in STOPS:
        proc = start_cli(out, "C", dataset)
        if at is None:
            wait_until_it_catches(proc, signal.SIGUSR1)  # the launcher is still planning; no torchrun yet
            seen = steps_logged(run)
        else:
            wait_for_step(run, at, proc)
            seen = steps_logged(run)
        tree = descendants(proc.pid)
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)
            _, alive = psutil.wait_procs(tree, timeout=60)
            assert not alive, f"still running after the launcher was killed: {alive}"
            assert tree, "torchrun and its workers should have been running"
        else:
            assert finish(proc, out / "C.log") == code, (out / "C.log").read_text()[-4000:]
        newest = complete_checkpoints(run / CHECKPOINTS)[-1][0]
        assert seen <= newest <= seen + 2, (sig, seen, newest)  # the next step boundary, not the next every-N save
        assert steps_logged(run) == newest  # and no step after it
        if sig != signal.SIGKILL:
            assert not list(run.glob(f"{REQUEUE_MARKER}*"))  # the launcher consumed it
        stops.append(newest)
    proc = start_cli(out, "C", dataset)
    assert finish(proc, out / "C.log") == 0
    log = (out / "C.log").read_text()
    for name in ("SIGUSR1", "SIGINT", "SIGHUP", "SIGTERM"):
        assert f"got {name}" in log
    assert "launch: stopped by SIGINT (exit 130)" in log and "launch: stopped by SIGHUP (exit 129)" in log
    for stop in stops:
        assert f"(step {stop}," in log  # each restart resumed from the checkpoint of the stop before it
    assert stops[0] == 1  # the early USR1 was not lost: it stopped the run after its first step
    assert_same_run(run, run_a)


DIRECT_STOPS = (
    (signal.SIGUSR1, None, EXIT_REQUEUE),  # before the trainer has its handlers
    (signal.SIGTERM, 6, EXIT_REQUEUE),
    (signal.SIGINT, 12, 130),
    (signal.SIGKILL, 18, None),  # of the launcher alone: the trainer must not outlive it
)


def test_one_process_without_torchrun_stops_requeues_and_resumes_bit_for_bit(dataset: Path,
                                                                            tmp_path: Path) -> None:
    """trainer.devices=1 on one node: the launcher runs the trainer itself, no torchrun in between. Signals still
    reach it (an early USR1 too), each stop checkpoints at the next step boundary with its exit code, the requeue
    marker becomes 85, the run dir's lock is held, a SIGKILL of the launcher takes the trainer with it, and the
    interrupted run equals an uninterrupted one bit for bit."""
    reference = start_cli(tmp_path, "R", dataset, devices=1)
    assert finish(reference, tmp_path / "R.log") == 0, (tmp_path / "R.log").read_text()[-4000:]
    log_text = (tmp_path / "R.log").read_text()
    assert "torch.distributed.run" not in log_text and "tp 1 x dp 1" in log_text
    run = tmp_path / "D"
    stops = []
    for sig, at, code in DIRECT_STOPS:
        proc = start_cli(tmp_path, "D", dataset, devices=1)
        if at is None:
            wait_until_it_catches(proc, signal.SIGUSR1)
        else:
            wait_for_step(run, at, proc)
            assert read_holder(run / LOCK_NAME).get("pid") == proc.pid  # the launcher holds the run dir
        seen = steps_logged(run)
        tree = descendants(proc.pid)
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)
            _, alive = psutil.wait_procs(tree, timeout=60)
            assert not alive and tree, f"still running after the launcher was killed: {alive}"
            assert all("torch.distributed.run" not in " ".join(p.cmdline()) for p in tree if p.is_running())
        else:
            assert finish(proc, tmp_path / "D.log") == code, (tmp_path / "D.log").read_text()[-4000:]
            assert not list(run.glob(f"{REQUEUE_MARKER}*"))
        newest = complete_checkpoints(run / CHECKPOINTS)[-1][0]
        assert seen <= newest <= seen + 2, (sig, seen, newest)
        stops.append(newest)
    proc = start_cli(tmp_path, "D", dataset, devices=1)
    assert finish(proc, tmp_path / "D.log") == 0
    assert stops[0] == 1  # the early USR1 stopped the run after its first step
    assert_same_run(run, tmp_path / "R")


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(LOCK_NAME, "*.log"))
    return dest


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_with_done_marker_is_skipped_and_kept(run_a: Path, dataset: Path) -> None:
    """4 MB of the newest checkpoint's shard zeroed, done marker untouched: list, export and resume all see it, resume
    continues from the previous complete checkpoint with run A's losses, and the zeroed bytes are kept."""
    out = run_a.parent
    run = copy_run(run_a, out / "F")
    broken = step_dir(run / CHECKPOINTS, STEPS)
    shard = broken / "__0_0.distcp"
    with shard.open("r+b") as f:
        f.seek(shard.stat().st_size // 4)
        f.write(b"\0" * (4 * 2**20))
    zeroed = shard.read_bytes()

    listed = run_cli("checkpoint", "list", str(run))
    assert listed.returncode == 0, listed.stderr
    assert f"{broken}  SKIPPED: __0_0.distcp does not have the content the done marker records" in listed.stdout
    refused = run_cli("checkpoint", "export", str(broken), str(out / "F-hf"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "is not a complete, intact checkpoint" in refused.stderr and not (out / "F-hf").exists()

    proc = start_cli(out, "F", dataset)
    assert finish(proc, out / "F.log") == 0, (out / "F.log").read_text()[-4000:]
    log = (out / "F.log").read_text()
    assert f"skipping {broken}: __0_0.distcp does not have the content the done marker records" in log
    assert f"resumed from {step_dir(run / CHECKPOINTS, 25)} (step 25," in log
    assert_same_run(run, run_a)
    (aside,) = (run / CHECKPOINTS).glob(f"{SETASIDE_PREFIX}step_{STEPS:07d}-*")  # moved out of the new save's way
    assert (aside / "__0_0.distcp").read_bytes() == zeroed and (aside / DONE).is_file()
    assert f"moved it to {aside}" in log


def test_another_model_in_the_run_dir_is_refused_and_nothing_deleted(run_a: Path, dataset: Path) -> None:
    """The same run name with another hidden size or layer count: one line, exit 2, every file as it was (before:
    a hidden-size change started over and retention deleted the old run's checkpoints; a layer-count change resumed
    with half the layers)."""
    out = run_a.parent
    run = copy_run(run_a, out / "H")
    before = snapshot(run)
    for override, what in (("+model.hidden_size=128", "hidden_size 256 there, 128 here"),
                           ("+model.num_layers=2", "num_hidden_layers 4 there, 2 here")):
        result = subprocess.run(cli_argv(out, "H", dataset, override), cwd=REPO, capture_output=True, text=True,
                                timeout=120, env={**os.environ, "MASTER_PORT": str(_free_port())}, check=False)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"error: {run / CHECKPOINTS}: holds checkpoints of another model ")
        assert what in result.stderr and "nothing was deleted" in result.stderr
    direct = subprocess.run(  # the trainer refuses too when started without the launcher
        [sys.executable, "-m", "llama3_hyperpod.torch_backend.train", "--config", str(CONFIG_TINY), "--run-dir",
         str(run), "--device", "cpu", *COMMON, f"data.train_dir={dataset}", "+model.num_layers=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert direct.returncode == 2, direct.stderr
    assert "holds checkpoints of another model (step_0000025: num_hidden_layers 4 there, 2 here)" in direct.stderr
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before  # every file there, unchanged
    assert set(after) - set(before) == {LOCK_NAME}  # only the owner lock was added


def test_a_checkpoint_that_fails_to_load_leaves_nothing_behind(dataset: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose done marker matches its (broken) files passes verification but fails half way through the
    load: it is skipped, and the run that starts fresh has exactly the losses and weights of a fresh start (before:
    the half-loaded weights, optimizer state and schedule stayed and the run continued from step 0 with them)."""
    torch.set_num_threads(1)
    rc = load_config(CONFIG_TINY, _tiny(dataset, "trainer.max_steps=6", "exp_manager.checkpoint_callback_params"
                                        ".every_n_train_steps=3"))
    fresh = train_module.train(rc, tmp_path / "fresh", echo=False)
    # A checkpoint of a later step, made to fail at load: half its shard cut off, the marker rewritten to match.
    run = tmp_path / "G"
    bad = step_dir(run / CHECKPOINTS, 9)
    shutil.copytree(step_dir(tmp_path / "fresh" / CHECKPOINTS, 6), bad)
    shard = bad / "__0_0.distcp"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    marker = json.loads((bad / DONE).read_text())
    marker["step"] = 9
    marker["files"]["__0_0.distcp"] = {"bytes": shard.stat().st_size, "digest": file_digests([shard])[shard]}
    (bad / DONE).write_text(json.dumps(marker))
    assert problem(bad) is None  # it verifies: only loading it can fail
    capfd.readouterr()
    again = train_module.train(rc, run, echo=True)
    err = capfd.readouterr().err
    assert f"skipping {bad}: cannot be loaded" in err
    assert again.start_step == 0
    assert again.losses == fresh.losses  # bit for bit: nothing of the failed load was applied
    a = load_model_state(step_dir(tmp_path / "fresh" / CHECKPOINTS, 6))
    b = load_model_state(step_dir(run / CHECKPOINTS, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert bad.is_dir() and problem(bad) is None  # skipped, left in place, not deleted by retention


def test_two_nodes_share_one_run_dir_and_requeue(dataset: Path, tmp_path: Path) -> None:
    """Two launchers as two nodes of one job (NODE_RANK 0 and 1, one rank each) on one run dir: node 0 owns it, node 1
    does not take the lock; a USR1 to both checkpoints and both exit 85 (one marker per node), and the requeued pair
    resumes and finishes."""
    port = str(_free_port())
    env = {"MASTER_PORT": port, "MASTER_ADDR": "127.0.0.1"}
    extra = ("trainer.devices=1", "trainer.num_nodes=2", "trainer.max_steps=8")

    def pair() -> list[subprocess.Popen[str]]:
        return [start_cli(tmp_path, "N", dataset, *extra, env={**env, "NODE_RANK": str(rank)}, log_name=f"N{rank}")
                for rank in (0, 1)]

    procs = pair()
    wait_for_step(tmp_path / "N", 3, procs[0])
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    codes = [finish(p, tmp_path / f"N{i}.log") for i, p in enumerate(procs)]
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], [(tmp_path / f"N{i}.log").read_text()[-3000:] for i in (0, 1)]
    stopped = steps_logged(tmp_path / "N")
    procs = pair()
    codes = [finish(p, tmp_path / f"N{i}.log") for i, p in enumerate(procs)]
    assert codes == [0, 0], [(tmp_path / f"N{i}.log").read_text()[-3000:] for i in (0, 1)]
    assert [s for s, _ in losses(tmp_path / "N")] == list(range(1, 9))
    assert f"(step {stopped}," in (tmp_path / "N0.log").read_text()
    assert (tmp_path / "N" / "plan-train-node1.json").is_file()


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
    assert f"skipping {root}/step_0000014: the done marker is for step 10, not for step_0000014" in err
    assert f"resumed from {root}/step_0000010" in err
    # Our own interrupted save (15: no marker, this run's identity) goes; the corrupt one (14) stays, named.
    assert [s for s, _ in list_step_dirs(root)] == [5, 10, 12, 14]


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


def test_async_saves_are_hashed_in_the_background_and_resume_bit_for_bit(dataset: Path, tmp_path: Path) -> None:
    """exp_manager.async_checkpointing: the digests are computed off the training loop once DCP has written; every
    checkpoint verifies, and a run stopped after step 4 and resumed gives the losses of one straight run."""
    torch.set_num_threads(1)
    extra = ["exp_manager.async_checkpointing=true", "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
             "model.optim.sched.min_lr=3.0e-3"]  # = lr: the schedule (spanning max_steps, as NxDT's) is flat
    straight = train_module.train(load_config(CONFIG_TINY, _tiny(dataset, "trainer.max_steps=8", *extra)),
                                  tmp_path / "straight", echo=False)
    first = train_module.train(load_config(CONFIG_TINY, _tiny(dataset, "trainer.max_steps=4", *extra)),
                               tmp_path / "resumed", echo=False)
    root = tmp_path / "resumed" / CHECKPOINTS
    assert [s for s, _ in complete_checkpoints(root, verify=True)] == [2, 4]
    second = train_module.train(load_config(CONFIG_TINY, _tiny(dataset, "trainer.max_steps=8", *extra)),
                                tmp_path / "resumed", echo=False)
    assert second.start_step == 4
    assert first.losses + second.losses == straight.losses
    assert [s for s, _ in complete_checkpoints(root, verify=True)] == [2, 4, 6, 8]
