"""The run dir's owner lock with real processes: one holder, named to a contender; kept by a child that inherits it;
accepted by the holder's descendants; released by the kernel when the holder is killed; a partial metrics line left
by a killed run does not stop the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llama3_hyperpod.runlock import LOCK_NAME, RunDirBusyError, acquire, hold_or_inherit, read_holder
from tests.conftest import REPO

HOLDER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from llama3_hyperpod.runlock import acquire
    lock = acquire(Path(sys.argv[1]), purpose="train")
    # A child that inherits the descriptor (as torchrun does) and one that checks it (as the trainer's rank 0 does).
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], pass_fds=[lock.fd])
    print("held", flush=True)
    child.wait()
    time.sleep(60)
""")
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llama3_hyperpod.runlock import hold_or_inherit
    print("inherited" if hold_or_inherit(Path(sys.argv[1]), purpose="train") is None else "took it", flush=True)
""")


def start_holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), CHILD], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    assert proc.stdout.readline().strip() == "inherited"  # its own descendant accepts the lock as its launcher's
    return proc


def test_one_owner_named_to_a_contender_and_released_on_sigkill(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        info = read_holder(tmp_path / LOCK_NAME)
        assert info["pid"] == holder.pid and info["purpose"] == "train" and info["host"]
        t0 = time.monotonic()
        with pytest.raises(RunDirBusyError) as err:
            acquire(tmp_path, purpose="train")  # a live holder on this host: refused at once, not after the wait
        assert time.monotonic() - t0 < 5
        assert f"is in use by train pid {holder.pid} on {info['host']}" in err.value.message
        assert "\n" not in str(err.value)
        with pytest.raises(RunDirBusyError):
            hold_or_inherit(tmp_path, purpose="train")  # not our ancestor: refused
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    lock = acquire(tmp_path, purpose="train", wait_s=10)  # the kernel released it with the holder
    assert lock is not None
    assert read_holder(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    lock.release()


def test_the_lock_lives_as_long_as_a_process_holding_its_descriptor(tmp_path: Path) -> None:
    """The launcher dies, torchrun (which inherited the descriptor) lives on: the run dir stays owned until it ends."""
    code = textwrap.dedent("""
        import os, subprocess, sys
        from pathlib import Path
        from llama3_hyperpod.runlock import acquire
        lock = acquire(Path(sys.argv[1]), purpose="train")
        child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                 pass_fds=[lock.fd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        print(child.pid, flush=True)
        child.stdout.readline()
        print("ready", flush=True)
        os._exit(0)  # the launcher is gone; its child keeps the lock
    """)
    launcher = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=True)
    child = int(launcher.stdout.split()[0])
    try:
        with pytest.raises(RunDirBusyError):
            acquire(tmp_path, purpose="train", wait_s=1)  # the holder recorded is dead, but the lock is not free
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            lock = acquire(tmp_path, purpose="train", wait_s=0)
            break
        except RunDirBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert lock is not None
    lock.release()


def test_a_metrics_line_cut_short_does_not_stop_the_resume(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from llama3_hyperpod.torch_backend.metrics import MetricsWriter, read_metrics

    rows = [json.dumps({"step": s, "loss": 1.0, "lr": 0.1, "tokens_per_s": 5.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')  # killed while writing step 4
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=2).close()  # before: a JSONDecodeError
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "dropped 1 unreadable line(s)" in capfd.readouterr().err
