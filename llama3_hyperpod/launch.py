"""Execute a planned launch: start it, forward the signals Slurm and users send, pass its exit code through.

torchrun is in the way of two things the sbatch scripts rely on: it dies of SIGUSR1 (Slurm's `--signal=USR1@N`
time-limit warning) and it turns a worker's exit code into 1. So the launched process starts with USR1/USR2 ignored
(the trainer installs its own handlers), signals go to the workers, and a trainer that checkpointed for a requeue
says so with a marker file in the run dir, which becomes exit code 85 here.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from llama3_hyperpod.exitcodes import EXIT_REQUEUE
from llama3_hyperpod.plan import Launch

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
IGNORED_BY_LAUNCHER_CHILD = (signal.SIGUSR1, signal.SIGUSR2)


def raise_nofile(limit: int) -> None:
    """`ulimit -n` as NxDT's scripts do, capped at the hard limit (raising that needs root on the host)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _signal_workers(pid: int, signum: int) -> None:
    """Send `signum` to every descendant of `pid` (torchrun's workers); to `pid` itself when it has none."""
    try:
        targets = psutil.Process(pid).children(recursive=True) or [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for proc in targets:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signum)


def _restore(handlers: Mapping[signal.Signals, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run(
    launch: Launch,
    rlimits: Mapping[str, int] | None = None,
    base_env: Mapping[str, str] | None = None,
    requeue_marker: Path | None = None,
) -> int:
    """Run `launch` to completion and return its exit code (128 + N when it died of signal N).

    When `requeue_marker` exists after the run, the trainer saved a checkpoint and asked for a requeue: return 85
    whatever torchrun returned.
    """
    if rlimits and "nofile" in rlimits:
        raise_nofile(rlimits["nofile"])
    if requeue_marker is not None:
        requeue_marker.unlink(missing_ok=True)  # a marker from an earlier attempt says nothing about this one
    env = {**(os.environ if base_env is None else base_env), **launch.env}
    print(f"+ {launch.shell()}", file=sys.stderr, flush=True)
    if not os.path.isdir(launch.cwd):
        print(f"error: working directory {launch.cwd} does not exist (is this the right image/backend?)",
              file=sys.stderr)
        return 127
    # An ignored disposition survives fork and exec: with USR1/USR2 ignored while the child starts, torchrun outlives
    # a USR1, while the trainer's own handlers still receive it.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in FORWARDED_SIGNALS}
    try:
        for sig in FORWARDED_SIGNALS:
            if sig not in IGNORED_BY_LAUNCHER_CHILD:
                signal.signal(sig, previous[sig])
        child = subprocess.Popen(launch.argv, env=env, cwd=launch.cwd, start_new_session=True)
    except FileNotFoundError:
        _restore(previous)
        print(f"error: {launch.argv[0]}: command not found (is this the right image/backend?)", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        _signal_workers(child.pid, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        _restore(previous)
    if requeue_marker is not None and requeue_marker.exists():
        requeue_marker.unlink(missing_ok=True)
        print(f"launch: the trainer checkpointed and asks for a requeue (exit {EXIT_REQUEUE})", file=sys.stderr)
        return EXIT_REQUEUE
    return 128 - code if code < 0 else code
