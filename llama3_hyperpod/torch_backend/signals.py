"""Stop requests: checkpoint at the next step boundary, then exit with what the signal means.

SIGTERM / SIGUSR1 (Slurm's time-limit warning, preemption, scancel) mean "requeue me": exit 85 after the checkpoint.
SIGINT (Ctrl-C) and SIGHUP (the terminal went away) checkpoint the same way and exit 130 / 129, as a process killed
by them would report, without asking for a requeue.

The handler only records the request (idempotent: Slurm may signal a rank directly and through the launcher);
the loop acts at the next step boundary, after every rank agrees on that step (all_reduce MAX of the flag).
`python -m llama3_hyperpod.torch_backend.train` installs it before importing torch (`install_early`), so a signal
that comes while the worker starts is not lost.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from llama3_hyperpod.errors import EXIT_REQUEUE

REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*REQUEUE_SIGNALS, signal.SIGINT, signal.SIGHUP)


def exit_code(signum: int) -> int:
    """The trainer's exit code after it stopped (and checkpointed) on `signum`."""
    return EXIT_REQUEUE if signum in REQUEUE_SIGNALS else 128 + signum


class StopRequest:
    """Install with `with StopRequest() as stop:`; `stop.signum` is the first signal received (0 = none)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requeue(self) -> bool:
        return self.signum in REQUEUE_SIGNALS

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum:
            return
        self.signum = signum
        if self.announce:
            then = "exit for a requeue" if self.requeue else f"exit {exit_code(signum)}"
            print(f"train: got {signal.Signals(signum).name}: checkpoint at the next step boundary, then {then}",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def install_early() -> StopRequest:
    """Install the handlers now, for the whole life of this worker process (the caller passes it to train())."""
    return StopRequest(announce=True).__enter__()
