"""`compile`/`train` execute the plan's launch: exit codes pass through and signals reach the whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from llama3_hyperpod.launch import run
from llama3_hyperpod.plan import Launch
from tests.conftest import REPO

CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    # a grandchild in the same process group, like torchrun's workers
    worker = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
        "signal.signal(signal.SIGUSR1, lambda *a: (open(sys.argv[1], 'w').write('worker'), sys.exit(0)))\\n"
        "time.sleep(60)", sys.argv[1] + ".worker"])
    def on_usr1(*_):
        worker.wait()
        open(sys.argv[1], "w").write(os.environ["MARK"])
        sys.exit(17)
    signal.signal(signal.SIGUSR1, on_usr1)
    open(sys.argv[1] + ".ready", "w").close()
    time.sleep(60)
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


def test_signal_forwarded_through_the_cli_process(tmp_path: Path) -> None:
    """A real `python -c` parent running launch.run; SIGUSR1 to it reaches the child and its worker."""
    mark = tmp_path / "mark"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    driver = textwrap.dedent(f"""
        import sys
        from llama3_hyperpod.launch import run
        from llama3_hyperpod.plan import Launch
        sys.exit(run(Launch([sys.executable, {str(script)!r}, {str(mark)!r}], {{"MARK": "forwarded"}}, {{}},
                            {str(tmp_path)!r})))
    """)
    parent = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for(Path(f"{mark}.ready"))
    parent.send_signal(signal.SIGUSR1)
    assert parent.wait(timeout=30) == 17
    assert mark.read_text() == "forwarded"
    assert Path(f"{mark}.worker").read_text() == "worker"
    assert parent.stderr is not None and "+ MARK=forwarded" in parent.stderr.read()


def test_cli_train_passes_exit_code_of_the_neuron_launch(tmp_path: Path) -> None:
    """On a machine without the Neuron SDK the planned `torchrun` + orchestrator fails; the CLI says so, no hang."""
    examples = tmp_path / "examples"
    examples.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # A stand-in `torchrun` that records its argv proves the CLI executes exactly the planned command.
    (fake_bin / "torchrun").write_text("#!/bin/sh\necho \"$@\" > \"$RECORD\"\nexit 3\n")
    (fake_bin / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RECORD": str(tmp_path / "argv")}
    result = subprocess.run(
        [sys.executable, str(REPO / "entrypoint.py"), "train", str(REPO / "configs/llama3_8b_trn1.yaml"),
         "--backend", "neuron", "--nxdt-examples", str(examples), "--output-dir", str(tmp_path / "runs"),
         f"data.train_dir={data}"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    recorded = (tmp_path / "argv").read_text().split()
    assert recorded[:2] == ["--nproc_per_node", "32"] and f"{examples}/training_orchestrator.py" in recorded
    assert (tmp_path / "runs" / "llama3_8b_trn1" / "plan-train-node0.json").is_file()
