"""Execute a planned launch: start it, forward the signals Slurm and users send, pass its exit code through."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping
from types import FrameType

from llama3_hyperpod.plan import Launch

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def raise_nofile(limit: int) -> None:
    """`ulimit -n` as NxDT's scripts do, capped at the hard limit (raising that needs root on the host)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(launch: Launch, rlimits: Mapping[str, int] | None = None, base_env: Mapping[str, str] | None = None) -> int:
    """Run `launch` to completion and return its exit code (128 + N when it died of signal N).

    Signals sent to us go to the child's whole process group (torchrun and its workers), so a Slurm time-limit
    USR1 or a TERM reaches the trainer, which checkpoints and exits with its own code.
    """
    if rlimits and "nofile" in rlimits:
        raise_nofile(rlimits["nofile"])
    env = {**(os.environ if base_env is None else base_env), **launch.env}
    print(f"+ {launch.shell()}", file=sys.stderr, flush=True)
    if not os.path.isdir(launch.cwd):
        print(f"error: working directory {launch.cwd} does not exist (is this the right image/backend?)",
              file=sys.stderr)
        return 127
    try:
        child = subprocess.Popen(launch.argv, env=env, cwd=launch.cwd, start_new_session=True)
    except FileNotFoundError:
        print(f"error: {launch.argv[0]}: command not found (is this the right image/backend?)", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
