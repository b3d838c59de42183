"""`compile`/`train` execute the plan's launch: exit codes pass through and signals reach the whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from llama3_hyperpod.exitcodes import EXIT_REQUEUE
from llama3_hyperpod.launch import run
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
