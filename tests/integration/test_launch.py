"""`compile`/`train` execute the plan's launch: exit codes pass through and signals reach the whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.errors import EXIT_REQUEUE
from llama3_hyperpod.launch import check_port_free, run
from llama3_hyperpod.plan import Launch
from tests.conftest import REPO

# Shaped like torchrun: a parent that would die of SIGUSR1 (it installs no handler) runs a worker that handles it,
# checkpoints (here: writes files), leaves the requeue marker and exits 85, which the parent turns into 1.
TORCHRUN_LIKE = textwrap.dedent("""
    import subprocess, sys
    mark, marker = sys.argv[1], sys.argv[2]
    worker = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\\n"
        "def on_usr1(*_):\\n"
        "    open(sys.argv[1], 'w').write(os.environ['MARK'])\\n"
        "    open(sys.argv[2], 'w').close()\\n"
        "    sys.exit(85)\\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\\n"
        "open(sys.argv[1] + '.ready', 'w').close()\\n"
        "time.sleep(60)\\n"), mark, marker])
    sys.exit(1 if worker.wait() != 0 else 0)
""")


def wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_exit_code_passes_through(tmp_path: Path) -> None:
    launch = Launch([sys.executable, "-c", "import sys; sys.exit(42)"], {}, {}, str(tmp_path))
    assert run(launch) == 42


def test_killed_child_reports_128_plus_signal(tmp_path: Path) -> None:
    launch = Launch([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], {}, {},
                    str(tmp_path))
    assert run(launch) == 128 + signal.SIGKILL


def test_env_is_added_and_user_env_kept(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    code = "import os, sys; open(sys.argv[1], 'w').write(os.environ['ADDED'] + ' ' + os.environ['MINE'])"
    launch = Launch([sys.executable, "-c", code, str(out)], {"ADDED": "plan"}, {"MINE": "user"}, str(tmp_path))
    assert run(launch, base_env={**os.environ, "MINE": "user"}) == 0
    assert out.read_text() == "plan user"


def test_missing_program_is_a_clear_error(tmp_path: Path, capsys: object) -> None:
    assert run(Launch(["neuron_parallel_compile_not_here"], {}, {}, str(tmp_path))) == 127


def test_usr1_reaches_the_worker_and_requeue_code_survives_torchrun(tmp_path: Path) -> None:
    """A real parent process running launch.run gets SIGUSR1 (as from Slurm's --signal): the torchrun-like child
    survives it, the worker checkpoints and asks for a requeue, and the launcher exits 85 although the child said 1."""
    mark, marker = tmp_path / "mark", tmp_path / ".requeue"
    script = tmp_path / "torchrun_like.py"
    script.write_text(TORCHRUN_LIKE)
    driver = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from llama3_hyperpod.launch import run
        from llama3_hyperpod.plan import Launch
        launch = Launch([sys.executable, {str(script)!r}, {str(mark)!r}, {str(marker)!r}], {{"MARK": "forwarded"}},
                        {{}}, {str(tmp_path)!r})
        sys.exit(run(launch, requeue_marker=Path({str(marker)!r})))
    """)
    parent = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for(Path(f"{mark}.ready"))
    parent.send_signal(signal.SIGUSR1)
    assert parent.wait(timeout=30) == EXIT_REQUEUE
    assert mark.read_text() == "forwarded"
    assert not marker.exists()  # consumed, so a later attempt starts clean
    assert parent.stderr is not None and "asks for a requeue" in parent.stderr.read()


def test_term_reaches_the_worker_and_its_exit_code_passes_through(tmp_path: Path) -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
            "open(sys.argv[1], 'w').close(); time.sleep(60)")
    ready = tmp_path / "ready"
    driver = textwrap.dedent(f"""
        import sys
        from llama3_hyperpod.launch import run
        from llama3_hyperpod.plan import Launch
        sys.exit(run(Launch([sys.executable, "-c", {code!r}, {str(ready)!r}], {{}}, {{}}, {str(tmp_path)!r})))
    """)
    parent = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stderr=subprocess.DEVNULL)
    wait_for(ready)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 7


def test_cli_train_passes_exit_code_of_the_neuron_launch(tmp_path: Path) -> None:
    """On a machine without the Neuron SDK the planned `torchrun` + orchestrator fails; the CLI says so, no hang."""
    examples = tmp_path / "examples"
    examples.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # A stand-in for the SDK's `torchrun` that records its argv, working dir and COMPILE proves the CLI executes
    # exactly the planned command, from the run dir, in NxDT's training mode.
    (fake_bin / "torchrun").write_text('#!/bin/sh\necho "$@" > "$RECORD"\npwd >> "$RECORD"\n'
                                       'echo "COMPILE=$COMPILE" >> "$RECORD"\nexit 3\n')
    (fake_bin / "torchrun").chmod(0o755)
    env = {**os.environ, "L3HP_SDK_PYTHON": str(fake_bin / "python"), "RECORD": str(tmp_path / "argv"),
           "L3HP_CACHE_DIR": str(tmp_path / "cache"), "COMPILE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "entrypoint.py"), "train", str(REPO / "configs/llama3_8b_trn1.yaml"),
         "--backend", "neuron", "--nxdt-examples", str(examples), "--output-dir", str(tmp_path / "runs"),
         f"data.train_dir={data}"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    argv, cwd, compile_flag = (tmp_path / "argv").read_text().splitlines()
    recorded = argv.split()
    assert recorded[:2] == ["--nproc_per_node", "32"] and f"{examples}/training_orchestrator.py" in recorded
    assert cwd == str(tmp_path / "runs" / "llama3_8b_trn1") and compile_flag == "COMPILE=0"
    assert (tmp_path / "runs" / "llama3_8b_trn1" / "plan-train-node0.json").is_file()


# A torchrun-like parent whose worker installs its USR1 handler only after a while (a trainer importing torch).
LATE_HANDLER = textwrap.dedent("""
    import subprocess, sys
    mark, marker = sys.argv[1], sys.argv[2]
    worker = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\\n"
        "open(sys.argv[1] + '.started', 'w').close()\\n"
        "time.sleep(1.5)\\n"
        "def on_usr1(*_):\\n"
        "    open(sys.argv[1], 'w').write('late handler got it')\\n"
        "    open(sys.argv[2], 'w').close()\\n"
        "    sys.exit(85)\\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\\n"
        "time.sleep(60)\\n"), mark, marker])
    sys.exit(1 if worker.wait() != 0 else 0)
""")


def _driver(tmp_path: Path, argv: list[str], marker: Path | None = None) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from llama3_hyperpod.launch import run
        from llama3_hyperpod.plan import Launch
        marker = {str(marker) if marker else None!r}
        sys.exit(run(Launch({argv!r}, {{}}, {{}}, {str(tmp_path)!r}),
                     requeue_marker=Path(marker) if marker else None))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_an_early_usr1_waits_for_the_workers_handler(tmp_path: Path) -> None:
    """USR1 arrives while the worker is still starting (its disposition is the inherited SIG_IGN): the launcher
    keeps it and delivers it once the worker has a handler, so it checkpoints and the launch exits 85 (before: the
    signal was dropped and the run went on to the end)."""
    mark, marker = tmp_path / "mark", tmp_path / ".requeue"
    script = tmp_path / "late.py"
    script.write_text(LATE_HANDLER)
    parent = _driver(tmp_path, [sys.executable, str(script), str(mark), str(marker)], marker)
    wait_for(Path(f"{mark}.started"))
    parent.send_signal(signal.SIGUSR1)
    assert parent.wait(timeout=30) == EXIT_REQUEUE
    assert mark.read_text() == "late handler got it"


# A torchrun-like parent whose worker counts USR1/USR2 until the stop file appears.
COUNTING = textwrap.dedent("""
    import subprocess, sys
    ready, stop = sys.argv[1], sys.argv[2]
    worker = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\\n"
        "got = []\\n"
        "signal.signal(signal.SIGUSR1, lambda n, _f: got.append(n))\\n"
        "signal.signal(signal.SIGUSR2, lambda n, _f: got.append(n))\\n"
        "open(sys.argv[1], 'w').close()\\n"
        "while not os.path.exists(sys.argv[2]):\\n"
        "    if got:\\n"
        "        open(sys.argv[1] + '.got', 'w').close()\\n"
        "    time.sleep(0.05)\\n"
        "sys.exit(0)\\n"), ready, stop])
    sys.exit(worker.wait())
""")


def test_a_storm_of_signals_leaves_the_launcher_standing(tmp_path: Path) -> None:
    """Hundreds of USR1/USR2 in a burst (srun, podman's sig-proxy and scancel may each pass one on): the launcher's
    handler interrupts itself and its own delivery loop, yet it forwards and exits with the worker's code (before:
    the delivery ran inside the handler and a nested one crashed it, e.g. `LookupError: unknown encoding: ascii`
    from a half-done codec import, and the job step exited 1 instead of checkpointing)."""
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    parent = _driver(tmp_path, [sys.executable, str(script), str(ready), str(stop)])
    wait_for(ready)
    for i in range(1000):  # spread out, so that some land while the handler (or the loop) is mid-delivery
        parent.send_signal(signal.SIGUSR1 if i % 2 else signal.SIGUSR2)
        time.sleep(0.0005)
    wait_for(Path(f"{ready}.got"))
    stop.touch()
    assert parent.wait(timeout=30) == 0
    assert parent.stderr is not None
    err = parent.stderr.read()
    assert "Traceback" not in err, err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_int_and_hup_end_the_launch_with_128_plus_n(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    """The worker stops cleanly (as the trainer does after its checkpoint), torchrun would say 0 or 1: the launch
    reports the signal that stopped it, as Ctrl-C / a lost terminal would for a plain process."""
    ready = tmp_path / "ready"
    worker = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(0)); "
              "signal.signal(signal.SIGHUP, lambda *a: sys.exit(0)); open(sys.argv[1], 'w').close(); time.sleep(60)")
    parent = _driver(tmp_path, [sys.executable, "-c", worker, str(ready)])
    wait_for(ready)
    parent.send_signal(sig)
    assert parent.wait(timeout=30) == code
    assert parent.stderr is not None and f"stopped by {sig.name} (exit {code})" in parent.stderr.read()


def test_a_killed_launcher_takes_its_child_with_it(tmp_path: Path) -> None:
    """kill -9 of the launcher: its child (torchrun) gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and ends, though
    it runs in a session of its own (before: it trained on, unowned)."""
    ready, got = tmp_path / "ready", tmp_path / "got-term"
    child = ("import os, signal, sys, time\n"
             "def on_term(*_):\n"
             "    open(sys.argv[2], 'w').close()\n"
             "    sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, on_term)\n"
             "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
             "time.sleep(60)\n")
    parent = _driver(tmp_path, [sys.executable, "-c", child, str(ready), str(got)])
    wait_for(ready)
    while not ready.read_text():
        time.sleep(0.05)
    pid = int(ready.read_text())
    parent.kill()
    parent.wait(timeout=10)
    wait_for(got)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child outlived its launcher"
        time.sleep(0.05)


def test_a_killed_many_threaded_launcher_sends_one_sigterm(tmp_path: Path) -> None:
    """The launcher has threads (pyarrow's, torch's): the kernel re-sends PR_SET_PDEATHSIG each time the child is
    handed to the next of them, and torchrun aborts its graceful shutdown on the second SIGTERM, so the workers died
    before their checkpoint (before: 2 SIGTERMs with 5 threads). Under the guard the child counts exactly one."""
    ready, count = tmp_path / "ready", tmp_path / "count"
    child = textwrap.dedent("""
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))
        open(sys.argv[1], 'w').write(str(os.getpid()))
        while not got:
            time.sleep(0.01)
        time.sleep(1.0)  # any later SIGTERM arrives well within this
        open(sys.argv[2], 'w').write(str(len(got)))
    """)
    code = textwrap.dedent(f"""
        import sys, threading, time
        from llama3_hyperpod.launch import run
        from llama3_hyperpod.plan import Launch
        for _ in range(8):
            threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
        sys.exit(run(Launch([sys.executable, "-c", {child!r}, {str(ready)!r}, {str(count)!r}], {{}}, {{}},
                            {str(tmp_path)!r})))
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.DEVNULL)
    wait_for(ready)
    while not ready.read_text():
        time.sleep(0.05)
    parent.kill()
    parent.wait(timeout=10)
    wait_for(count)
    assert count.read_text() == "1"


def test_a_taken_master_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            check_port_free(port)
    assert err.value.key == "MASTER_PORT" and f"port {port} is already in use" in err.value.message
    check_port_free(port)  # free again (TIME_WAIT leftovers do not count)
