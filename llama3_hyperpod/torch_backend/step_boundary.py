"""Between two training steps: save a checkpoint? stop the run? Decided here, the same on every rank.

After each step every rank calls `StepBoundary.after_step` (one tiny all_reduce: was some rank asked to stop, is
every rank's async save written); at the end of a run that was not stopped, `at_end`. The loop only asks; the
cadence (every_n_train_steps, the last step), the async save's completion and the stop signal are all here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llama3_hyperpod.torch_backend.checkpoint import Checkpointer, stderr_log
from llama3_hyperpod.torch_backend.parallel import Dist
from llama3_hyperpod.torch_backend.signals import StopRequest


@dataclass
class StepBoundary:
    """Saves at the cadence, after the last step and before a stop; `save(step)` writes the state after `step`.

    `ckpt` None: checkpoints are off (the stop signal is still agreed on every step).
    """

    ckpt: Checkpointer | None
    save_state: Callable[[Checkpointer, int], None]
    every_n: int
    max_steps: int
    stop: StopRequest
    d: Dist
    device: str
    stall_s: list[float] = field(default_factory=list)  # time each save blocked the loop

    def _save(self, step: int) -> None:
        assert self.ckpt is not None
        self.save_state(self.ckpt, step)
        self.stall_s.append(self.ckpt.last_stall_s)

    def after_step(self, done: int) -> int:
        """Call on every rank after step `done` (1-based); returns the signal to stop on, 0 to go on."""
        ckpt = self.ckpt
        stop_now, saves_written = _agree(self.stop.signum, ckpt.pending_not_done() if ckpt else 0, self.d,
                                         self.device)
        if ckpt is not None and saves_written:
            ckpt.finish_pending()
        if stop_now and done < self.max_steps:
            if ckpt is not None and ckpt.saved_step != done:
                self._save(done)
            if ckpt is not None:
                ckpt.wait()
            elif self.d.is_main:
                stderr_log("train: warning: checkpoints are off (save_top_k 0): the next run starts over")
            return _stop_signal(self.stop.signum, self.d, self.device)
        if ckpt is not None and self.every_n and done % self.every_n == 0 and done < self.max_steps:
            self._save(done)
        return 0

    def at_end(self, start_step: int) -> None:
        """The run reached max_steps (from `start_step`): save the last step unless saved, and wait for the write."""
        if self.ckpt is None:
            return
        if self.max_steps > start_step and self.ckpt.saved_step != self.max_steps:
            self._save(self.max_steps)
        self.ckpt.wait()


def _agree(stop: int, pending: int, d: Dist, device: str) -> tuple[bool, bool]:
    """(some rank was asked to stop, every rank's async save is written): one tiny all_reduce per step."""
    if d.world_size == 1:
        return bool(stop), not pending
    flags = torch.tensor([int(bool(stop)), pending], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0].item()), not flags[1].item()


def _stop_signal(local: int, d: Dist, device: str) -> int:
    """The signal every rank stops on (a rank that got none takes the others'; the lowest number wins)."""
    if d.world_size == 1:
        return local
    flag = torch.tensor([local or 1000], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return int(flag.item())
