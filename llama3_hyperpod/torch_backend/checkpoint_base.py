"""What the checkpointer's save, load and retention paths share: its state on one rank, the collectives the ranks
agree with, the errors, and what DCP saves and loads.

Checkpointer (checkpoint.py) is this base plus one class per path: checkpoint_retention.py (rank 0: which dirs stay),
checkpoint_save.py and checkpoint_load.py; the files on disk are checkpoint_files.py's.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from llama3_hyperpod.fsutil import PathError, link_message
from llama3_hyperpod.torch_backend.checkpoint_files import CHECKPOINTS, run_identity

# What a save or load can raise: OS errors, and DCP's CheckpointException (a BaseException) gathering every rank's.
SaveErrors = (Exception, CheckpointException)
# Optimizer state keyed per parameter FQN ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): independent of how the
# parameters are grouped, which differs between layouts (DTensor and plain parameters go in separate groups).
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

# DCP says so on every single-process save/load; a one-process run is not a mistake here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(Exception):
    """A checkpoint could not be saved or a requested one cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class Restored:
    """Where a resumed run continues: the checkpoint it loaded and the trainer position stored in it."""

    path: Path
    step: int
    consumed_samples: int
    weights_only: bool = False  # imported weights: the optimizer and LR schedule start fresh


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def app_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, consumed: int
) -> dict[str, Any]:
    """What DCP saves and loads; get_state_dict gives FQN keys that do not depend on the TP/FSDP wrapping.

    Note: on an optimizer without state, get_state_dict first creates it (one zero-lr step: torch 2.13
    distributed/checkpoint/state_dict.py:629 `_init_optim_state`); `Checkpointer.load` undoes that when the load fails.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": scheduler.state_dict(),
        "trainer": {"step": step, "consumed_samples": consumed},
    }


def root_cause(exc: BaseException) -> str:
    """The innermost error behind DCP's wrappers (e.g. `[Errno 28] No space left on device`), one line."""
    seen: BaseException = exc
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: exception}
    if isinstance(failures, dict) and failures:
        seen = next(iter(failures.values()))
        if isinstance(seen, tuple):  # (exception, traceback) in some versions
            seen = seen[0]
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[0] if text else ''}"


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CheckpointerBase:
    """One run's checkpoints as one rank sees them: where, whose, what is known about them, the async save running."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        world_size: int,
        keep: int,
        async_save: bool,
        hf_config: dict[str, Any] | None = None,
        layout: dict[str, int] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = run_dir / CHECKPOINTS
        if self.root.is_symlink():
            raise PathError(str(self.root), link_message())
        self.hf_config = hf_config
        self.identity = run_identity(hf_config or {})
        self.layout = layout or {"world_size": world_size}
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.async_save = async_save
        self.log = log
        self.saved_step: int | None = None
        self.last_stall_s = 0.0
        self.last_hash_s = 0.0  # time the last save spent hashing its files (this rank's share)
        self.last_verify_s = 0.0  # time the last resume spent verifying hashes (this rank's share)
        self._intact: dict[Path, int] = {}  # checkpoints known intact: path -> mtime_ns of their done marker
        self._bad: dict[Path, str] = {}  # found corrupt or unloadable (and said so): never counted or deleted
        self._pending: tuple[int, Future[Any]] | None = None  # an async save: (step, future of this rank's digests)
        self._hasher: ThreadPoolExecutor | None = None
        self._stager: Any = None  # the async save's DefaultStager, which keeps its host copy for the next save
        self._pg: Any = None
        if async_save and world_size > 1:
            # The background save runs collectives; on its own gloo group they cannot interleave with training's.
            self._pg = dist.new_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _all_ok(self, ok: bool) -> bool:
        if self.world_size == 1:
            return ok
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces device tensors only
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # default group: the async save's group may be busy
        return int(flag.item()) == 0

    def _gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (default group, like _all_ok)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
