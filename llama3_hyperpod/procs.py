"""Processes that die with their parent (Linux PR_SET_PDEATHSIG), so a killed launcher leaves nothing running.

The launcher starts torchrun (under guard.py) in a session of its own (so a terminal's Ctrl-C reaches only the
launcher, which forwards it); without this a `kill -9` of the launcher left torchrun and its workers training and
checkpointing.
torchrun gets SIGTERM when the launcher dies: its handler (torch 2.13, distributed/elastic/multiprocessing/api.py:539,
TORCHELASTIC_SIGNALS_TO_HANDLE default SIGTERM,SIGINT,SIGHUP,SIGQUIT) makes the agent shut its workers down
(agent/server/api.py:752-754: SIGTERM to each, SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s,
launcher/api.py:146-149), which covers NxDT's workers too; torchrun starts them in sessions of their own
(subprocess_handler.py:66), so nothing else would reach them. The torch trainer's workers also ask for SIGKILL
should torchrun itself die.

prctl(2): the signal is sent when the parent *thread* exits, and again for each thread the child is handed to as the
rest of a multi-threaded parent exits: the launcher's child is therefore a single-threaded guard (guard.py). A parent
that died before the child's prctl is caught by comparing getppid() afterwards.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover (a libc-less Linux)
        _libc = None


def die_with_parent(sig: int, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits; True when it is in place.

    When the parent is already gone (getppid() is no longer `expected_parent`; without one: we were re-parented to
    init), the signal is raised at once.
    """
    if _libc is None:
        return False
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    parent = os.getppid()
    if (parent != expected_parent) if expected_parent is not None else parent == 1:
        os.kill(os.getpid(), sig)
    return True


_early: list[int] = []


def record_early(*signals: int) -> None:
    """Record these signals from now on instead of dying of them (their default action), until a launch takes them
    over (`take_early`). For `train` / `compile`: Slurm's time-limit USR1 may come before the launcher is ready."""
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: _early.append(signum))


def take_early() -> list[int]:
    """The signals recorded so far (then forgotten)."""
    taken = list(_early)
    _early.clear()
    return taken
