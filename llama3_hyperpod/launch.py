"""Execute a planned launch: start it, forward the signals Slurm and users send, pass its exit code through.

torchrun is in the way of two things the sbatch scripts rely on: it dies of SIGUSR1 (Slurm's `--signal=USR1@N`
time-limit warning) and it turns a worker's exit code into 1. So the launched process starts with USR1/USR2 ignored
(the trainer installs its own handlers), signals go to the workers, and a trainer that checkpointed for a requeue
says so with a marker file in the run dir, which becomes exit code 85 here. SIGINT / SIGHUP received here end the
launch with 130 / 129 (the trainer checkpoints on them like on SIGTERM).

A launch of one process on one node runs the trainer as the child itself (no torchrun): signals then go to it the
same way, and its own exit code (85 after a requeue checkpoint) is the launch's. A forwarded signal reaches each
worker once it has a handler for it (its SigCgt mask in /proc): a USR1 that comes
while the workers are still starting (importing torch, or not yet spawned) waits for them instead of being dropped
on the inherited SIG_IGN. TERM/INT/HUP go to a worker that has no handler yet after a short grace period (they then
end it, as the sender asked); with no worker started yet they go to torchrun, which then stops starting them.

The signal handler only notes a signal; the launcher's wait loop delivers it (within POLL_S), so a handler that
interrupts the delivery, or another signal that interrupts the handler, cannot break it.

The launched process runs under a single-threaded guard (guard.py), so it gets one SIGTERM when the launcher dies
(PR_SET_PDEATHSIG, procs.py); it inherits the run dir's lock (runlock.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from llama3_hyperpod import guard
from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.errors import EXIT_REQUEUE
from llama3_hyperpod.plan import Launch
from llama3_hyperpod.procs import take_early

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
IGNORED_BY_LAUNCHER_CHILD = guard.IGNORED
GUARD = [sys.executable, "-I", "-S", guard.__file__]  # -I -S: only the stdlib, nothing from the launch's env
EXIT_ON_SIGNAL = (signal.SIGINT, signal.SIGHUP)  # the launch then ends with 128 + N, whatever torchrun says
GRACE_S = 10.0  # how long a TERM/INT/HUP waits for a worker still starting to install its handler
POLL_S = 0.2


def raise_nofile(limit: int) -> None:
    """`ulimit -n` as NxDT's scripts do, capped at the hard limit (raising that needs root on the host)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: the SigCgt mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return False
    return not sys.platform.startswith("linux")


class Forwarder:
    """Signals received by the launcher, delivered to every worker once it can take them.

    The workers are the launched process itself (`direct`) or its descendants; it is the guard's child."""

    def __init__(self, direct: bool = False) -> None:
        self.direct = direct  # the launched process is the worker itself (no torchrun in between)
        self.guard_pid: int | None = None
        self.received: list[int] = []
        self._inbox: list[tuple[int, float]] = []  # (signum, received at), filled by the signal handler
        self._launched: psutil.Process | None = None
        self._pending: dict[int, tuple[float, set[int]]] = {}  # signum -> (received at, pids delivered to)

    def receive(self, signum: int) -> None:
        """Note a signal; the launcher's loop delivers it (deliver). Safe in a signal handler: it only appends, so
        a handler that interrupts deliver(), or a second signal that interrupts this one, breaks nothing (doing
        the delivery in the handler did: a USR1 arriving during its lazy import of the ascii codec crashed it)."""
        self._inbox.append((signum, time.monotonic()))

    def take_received(self) -> None:
        """Move what the handler noted into `received` and the pending deliveries."""
        while self._inbox:
            signum, at = self._inbox.pop(0)
            self.received.append(signum)
            self._pending.setdefault(signum, (at, set()))

    def attach(self, guard_pid: int) -> None:
        self.guard_pid = guard_pid
        self.deliver()

    def launched(self) -> psutil.Process | None:
        """The guard's child, once it has forked it."""
        if self._launched is None and self.guard_pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._launched = next(iter(psutil.Process(self.guard_pid).children()), None)
        return self._launched

    def deliver(self) -> None:
        """Send each pending signal to the workers that have not had it yet and can take it now. Never called from
        a signal handler."""
        self.take_received()
        launched = self.launched() if self._pending else None
        if launched is None:
            return
        try:
            workers = [launched] if self.direct else launched.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for signum, (since, done) in self._pending.items():
            late = time.monotonic() - since > GRACE_S
            for proc in workers:
                if proc.pid in done:
                    continue
                if catches(proc.pid, signum) or (signum not in IGNORED_BY_LAUNCHER_CHILD and late):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.send_signal(signum)
                    done.add(proc.pid)
            if not workers and signum not in IGNORED_BY_LAUNCHER_CHILD and launched.pid not in done:
                with contextlib.suppress(psutil.NoSuchProcess):  # nothing started yet: torchrun stops
                    launched.send_signal(signum)
                done.add(launched.pid)


def check_port_free(port: int) -> None:
    """Node 0 hosts torchrun's rendezvous store on MASTER_PORT: say so in one line if something listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            probe.bind(("", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError("MASTER_PORT", f"port {port} is already in use on this host (another run, or set "
                                  "MASTER_PORT to a free port)") from None
            raise ConfigError("MASTER_PORT", f"cannot listen on port {port}: {exc.strerror}") from None


def _restore(handlers: Mapping[signal.Signals, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run(
    launch: Launch,
    rlimits: Mapping[str, int] | None = None,
    base_env: Mapping[str, str] | None = None,
    requeue_marker: Path | None = None,
    keep_fds: Sequence[int] = (),
) -> int:
    """Run `launch` to completion and return its exit code (128 + N when it died of signal N).

    When `requeue_marker` exists after the run, the trainer saved a checkpoint and asked for a requeue: return 85
    whatever torchrun returned. `keep_fds` stay open in the child (the run dir's lock).
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
    if shutil.which(launch.argv[0], path=env.get("PATH", os.defpath)) is None:
        print(f"error: {launch.argv[0]}: command not found (is this the right image/backend?)", file=sys.stderr)
        return 127
    forwarder = Forwarder(direct=launch.direct)

    def forward(signum: int, _frame: FrameType | None) -> None:
        forwarder.receive(signum)

    # Installed before the child exists, so no signal is lost while it starts; the launched process ignores USR1/USR2
    # (guard.py; an ignored disposition survives exec: torchrun outlives a USR1, the trainer installs its handlers).
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    for early in take_early():  # what came while the launch was being prepared (entrypoint.py)
        forwarder.receive(early)
    child = subprocess.Popen([*GUARD, str(os.getpid()), *launch.argv], env=env, cwd=launch.cwd,
                             start_new_session=True, pass_fds=keep_fds)
    try:
        forwarder.attach(child.pid)
        while True:
            try:
                code = child.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                forwarder.deliver()
    finally:
        _restore(previous)
        forwarder.take_received()
    if requeue_marker is not None and requeue_marker.exists():
        requeue_marker.unlink(missing_ok=True)
        print(f"launch: the trainer checkpointed and asks for a requeue (exit {EXIT_REQUEUE})", file=sys.stderr)
        return EXIT_REQUEUE
    stopped = next((s for s in forwarder.received if s in EXIT_ON_SIGNAL), None)
    if stopped is not None:
        print(f"launch: stopped by {signal.Signals(stopped).name} (exit {128 + stopped})", file=sys.stderr)
        return 128 + stopped
    return 128 - code if code < 0 else code
