"""Sharded, atomic, resumable training checkpoints (torch.distributed.checkpoint) for the torch backend.

Layout, under `<run_dir>/checkpoints/`:

    step_0000100/            one complete checkpoint (the step count it was taken after)
        .metadata, __0_0.distcp, ...   DCP: model + optimizer (sharded as trained: DTensor TP / FSDP2), LR
                                       scheduler and trainer position (step, consumed samples)
        rng/rank_00000.pt    each rank's RNG states (python, numpy, torch CPU, CUDA when present)
        model_config.json    the HF config of the model (what `checkpoint export` writes as config.json)
        done                 JSON written last: step and the size of every file above
    .tmp-step_0000200/       a save in progress (or one a crash interrupted); never read

A save writes into the temp dir (DCP fsyncs its files), fsyncs, renames it to step_N and then writes `done`.
So a crash or a full disk at any moment leaves the previous checkpoints as they were. Resume takes the newest
step_N whose `done` lists files that all exist with those sizes, and names every newer one it skips.
Only the newest `keep` complete checkpoints stay (save_top_k; -1 keeps all).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CHECKPOINTS = "checkpoints"
DONE = "done"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MODEL_CONFIG = "model_config.json"

# What a save or load can raise: OS errors, and DCP's CheckpointException (a BaseException) gathering every rank's.
SaveErrors = (Exception, CheckpointException)

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


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step_N dir (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return sorted(found)


def problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (None when it is): no done marker, missing or truncated files."""
    marker = path / DONE
    if not marker.is_file():
        return "no done marker (the save did not finish)"
    try:
        listing = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable done marker ({exc})"
    for rel, size in listing.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, the done marker says {size} (truncated or overwritten)"
    if ".metadata" not in listing:
        return "no DCP .metadata"
    return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The complete step_N dirs, oldest first."""
    return [(s, p) for s, p in list_step_dirs(root) if problem(p) is None]


def newest_complete(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint; `warn` names every newer one that is skipped and why."""
    for _, path in reversed(list_step_dirs(root)):
        why = problem(path)
        if why is None:
            return path
        warn(f"skipping checkpoint {path}: {why}")
    return None


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def _app_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, consumed: int
) -> dict[str, Any]:
    """What DCP saves and loads; get_state_dict gives FQN keys that do not depend on the TP/FSDP wrapping."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": scheduler.state_dict(),
        "trainer": {"step": step, "consumed_samples": consumed},
    }


class Checkpointer:
    """Saves (sync or async), finalises, prunes and resumes one run's checkpoints; every rank holds one.

    Collective calls (save, load, sync_pending) must be made by every rank at the same step.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        world_size: int,
        keep: int,
        async_save: bool,
        hf_config: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = run_dir / CHECKPOINTS
        self.hf_config = hf_config
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.async_save = async_save
        self.log = log
        self.saved_step: int | None = None
        self.last_stall_s = 0.0
        self._pending: tuple[int, Future[Any]] | None = None
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
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # default group: the async save's group may be busy
        return int(flag.item()) == 0

    # ---- save ----------------------------------------------------------------------------------------------------

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, consumed: int
    ) -> None:
        """Checkpoint the state after `step` steps: blocks until durable, or (async) until staged in memory."""
        started = time.perf_counter()
        self.wait()  # one save at a time: the previous one is finalised (or has failed) before the next starts
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error: BaseException | None = None
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
                if self.hf_config is not None:
                    _write_durably(tmp / MODEL_CONFIG, json.dumps(self.hf_config, indent=1).encode())
        except OSError as exc:
            error = exc
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self._barrier()
        state = _app_state(model, optimizer, scheduler, step, consumed)
        try:
            buf = _torch_bytes(rng_state())
            _write_durably(tmp / "rng" / f"rank_{self.rank:05d}.pt", buf)
            if self.async_save:
                self._pending = (step, _as_future(dcp.async_save(
                    state, checkpoint_id=tmp, process_group=self._pg, no_dist=self.world_size == 1)))
            else:
                dcp.save(state, checkpoint_id=tmp, no_dist=self.world_size == 1)
        except SaveErrors as exc:  # OSError, or DCP's CheckpointException wrapping one
            error = exc
        if not self._all_ok(error is None):
            self._pending = None
            self._fail(step, tmp, error)
        if not self.async_save:
            self._finalize(step)
        self.last_stall_s = time.perf_counter() - started

    @property
    def pending(self) -> Future[Any] | None:
        """The running async save's future (None when none runs)."""
        return None if self._pending is None else self._pending[1]

    def pending_not_done(self) -> int:
        """1 when this rank's async save is still writing (for the step-boundary all_reduce), else 0."""
        return int(self._pending is not None and not self._pending[1].done())

    def finish_pending(self) -> None:
        """Finalise an async save that every rank reported done (call on all ranks)."""
        if self._pending is not None:
            self.wait()

    def wait(self) -> None:
        """Block until the pending async save (if any) is written, then finalise it; raises CheckpointError."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        error: BaseException | None = None
        try:
            future.result()
        except SaveErrors as exc:
            error = exc
        tmp = self.root / f"{TMP_PREFIX}{step_dir(self.root, step).name}"
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self._finalize(step)

    def _finalize(self, step: int) -> None:
        """Rank 0, after every rank's data is written: fsync, rename, done marker, prune."""
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error: BaseException | None = None
        if self.is_main:
            try:
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                listing = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
                for p in files:
                    _fsync_path(p)
                for d in {tmp, *(p.parent for p in files)}:
                    _fsync_path(d, directory=True)
                if final.exists():  # a leftover of an earlier attempt at the same step (e.g. no done marker)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_path(self.root, directory=True)
                marker = {"step": step, "files": listing, "time": time.time(), "world_size": self.world_size}
                _write_durably(final / DONE, json.dumps(marker, indent=1).encode())
                _fsync_path(final, directory=True)
            except OSError as exc:
                error = exc
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self.saved_step = step
        if self.is_main:
            size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
            self.log(f"checkpoint: saved {final} ({size / 2**20:.1f} MiB)")
            self.prune()

    def _fail(self, step: int, tmp: Path, error: BaseException | None) -> None:
        """Remove the partial save (frees the space it took) and raise one clear error on every rank."""
        full = _disk_full(self.root)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(self.root)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier checkpoint"
        reason = _root_cause(error) if error is not None else "another rank failed"
        if full and "No space left" not in reason:
            reason = f"{full} ({reason})"
        raise CheckpointError(
            f"saving the checkpoint of step {step} in {self.root} failed: {reason}; {kept}. "
            "Free space there (or point exp_manager.explicit_log_dir at a larger filesystem) and restart: the run "
            "resumes from the newest complete checkpoint"
        )

    def prune(self) -> None:
        """Rank 0: keep the newest `keep` complete checkpoints; drop older ones, broken step dirs and stale temps."""
        complete = complete_checkpoints(self.root)
        keep = {p for _, p in complete[-self.keep:]} if self.keep > 0 else {p for _, p in complete}
        for _, path in list_step_dirs(self.root):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            if self._pending is None or path.name != f"{TMP_PREFIX}{step_dir(self.root, self._pending[0]).name}":
                shutil.rmtree(path, ignore_errors=True)

    # ---- load ----------------------------------------------------------------------------------------------------

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> Restored:
        """Load `path` into the (already sharded) model, optimizer and scheduler; restore this rank's RNG."""
        state = _app_state(model, optimizer, scheduler, 0, 0)
        dcp.load(state, checkpoint_id=path, no_dist=self.world_size == 1)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif self.is_main:
            self.log(f"checkpoint: warning: {rng_file} missing (saved with another world size); RNG not restored")
        trainer = state["trainer"]
        return Restored(path, int(trainer["step"]), int(trainer["consumed_samples"]))

    def resume(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        explicit: str | None = None,
    ) -> Restored | None:
        """Load `explicit` (resume_from_checkpoint) or the newest complete checkpoint that loads; None if none."""
        warn = self.log if self.is_main else (lambda _msg: None)
        if explicit:
            path = Path(explicit)
            why = problem(path)
            if why is not None:
                raise CheckpointError(f"exp_manager.resume_from_checkpoint: {path} is not a complete checkpoint: {why}")
            restored = self.load(path, model, optimizer, scheduler)
        else:
            restored = None
            for _, path in reversed(list_step_dirs(self.root)):
                why = problem(path)
                if why is None:
                    try:
                        restored = self.load(path, model, optimizer, scheduler)
                        break
                    except SaveErrors as exc:  # DCP raises the same error on every rank
                        why = f"cannot be loaded: {_root_cause(exc)}"
                warn(f"checkpoint: warning: skipping {path}: {why}")
        if restored is not None:
            self.saved_step = restored.step
            if self.is_main:
                self.log(f"checkpoint: resumed from {restored.path} (step {restored.step}, "
                         f"{restored.consumed_samples} samples consumed)")
        return restored


def _as_future(response: Any) -> Future[Any]:
    """dcp.async_save returns a Future, or an AsyncSaveResponse holding one (upload_completion)."""
    return response if isinstance(response, Future) else response.upload_completion


def _disk_full(path: Path) -> str:
    """'No space left on device: ...' when the filesystem of `path` is (nearly) full, else ''.

    torch.save into a full disk reports a zip-writer position error rather than ENOSPC, so say it ourselves.
    """
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return ""
    if usage.free < max(16 * 2**20, usage.total // 1000):
        return f"No space left on device: {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB"
    return ""


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _root_cause(exc: BaseException) -> str:
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
