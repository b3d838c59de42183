"""Stop requests from SIGTERM / SIGUSR1 (Slurm's time-limit warning, preemption, scancel): checkpoint and requeue.

The handler only records the request (idempotent: Slurm may signal a rank directly and through the launcher);
the loop acts at the next step boundary, after every rank agrees on that step (all_reduce MAX of the flag).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Install with `with StopRequest() as stop:`; `stop.signum` is the first signal received (0 = none)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum:
            return
        self.signum = signum
        if self.announce:
            print(f"train: got {signal.Signals(signum).name}: checkpoint at the next step boundary, then exit "
                  "for a requeue", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
