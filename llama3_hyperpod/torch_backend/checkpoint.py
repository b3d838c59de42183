"""Sharded, atomic, verified, resumable training checkpoints (torch.distributed.checkpoint) for the torch backend.

The layout and what counts as complete / intact: checkpoint_files.py. A save writes into a temp dir (DCP, one file per
writer thread); every rank then hashes the files it wrote while fsyncing them (checkpoint_files.DIGEST; for an async
save in the background, off the training loop), rank 0 gathers the digests, fsyncs the directories, renames the dir
to step_N and writes the `done` marker last.
So a crash or a full disk at any moment leaves the previous checkpoints as they were, and any later change to a byte
of a checkpoint is seen before it is loaded.

Resume refuses a run dir holding checkpoints of another model (identity.json, one line, nothing deleted), then takes
the newest checkpoint that is complete and intact (each rank hashes a share of its files) and loads it into fresh
tensors: the model, optimizer and scheduler are changed only once the whole load has succeeded, so a checkpoint that
fails half way leaves nothing behind and the run continues from the next older one (or starts fresh). Every skipped
checkpoint is named with the reason and left where it is. DCP reshards between any (dp, tp) split on load.

Retention keeps the newest `keep` intact checkpoints of this run and deletes only older complete ones of this run and
this run's own interrupted saves; never one it could not read, a corrupt one, a link, or another run's.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from llama3_hyperpod.fsutil import PathError, create_durably, fsync_path, link_message
from llama3_hyperpod.torch_backend.checkpoint_files import (
    CHECKPOINTS,
    DONE,
    IDENTITY,
    MODEL_CONFIG,
    PREFIX,
    SETASIDE_PREFIX,
    TMP_PREFIX,
    WEIGHTS_ONLY,
    IdentityError,
    check_files,
    check_identity,
    complete_checkpoints,
    file_digests,
    hash_threads,
    identity_difference,
    list_step_dirs,
    make_marker,
    newest_complete,
    problem,
    read_identity,
    read_marker,
    run_identity,
    step_dir,
)

__all__ = [
    "CHECKPOINTS", "DONE", "MODEL_CONFIG", "PREFIX", "TMP_PREFIX", "CheckpointError", "Checkpointer",
    "IdentityError", "Restored", "complete_checkpoints", "list_step_dirs", "newest_complete", "problem",
    "run_identity", "step_dir",
]  # fmt: skip

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


def _writer(tmp: Path) -> dcp.FileSystemWriter:
    """DCP's file writer with one writer thread per core of this rank (hash_threads: its share of the node): the
    state is split by size into that many files (`__<rank>_<n>.distcp`, written in parallel) instead of one file
    written by one thread (DCP's default, about half the disk's bandwidth here; bench/checkpoint.py). DCP does not
    fsync them: _hash_own does, once each, overlapped with hashing them."""
    return dcp.FileSystemWriter(tmp, thread_count=hash_threads(), sync_files=False)  # fsynced in _hash_own


def _fsync_each(paths: list[Path]) -> None:
    for path in paths:
        fsync_path(path)


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


def _fresh(tree: Any) -> Any:
    """The same structure with new, uninitialised tensors (DTensors keep their mesh and placements)."""
    if isinstance(tree, dict):
        return {k: _fresh(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fresh(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    return copy.deepcopy(tree)


class Checkpointer:
    """Saves (sync or async), finalises, prunes and resumes one run's checkpoints; every rank holds one.

    Collective calls (save, load, resume, sync_pending) must be made by every rank at the same step.
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
                if tmp.is_symlink():  # not ours: removed as a link, never written through
                    tmp.unlink()
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
                if self.hf_config is not None:
                    create_durably(tmp / MODEL_CONFIG, json.dumps(self.hf_config, indent=1).encode())
                create_durably(tmp / IDENTITY, json.dumps(self.identity, indent=1).encode())
        except OSError as exc:
            error = exc
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self._barrier()
        state = _app_state(model, optimizer, scheduler, step, consumed)
        try:
            buf = _torch_bytes(rng_state())
            create_durably(tmp / "rng" / f"rank_{self.rank:05d}.pt", buf)
            if self.async_save:
                written = _as_future(dcp.async_save(
                    state, storage_writer=_writer(tmp), process_group=self._pg, no_dist=self.world_size == 1))
                if self._hasher is None:
                    self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digests")
                self._pending = (step, self._hasher.submit(self._hash_when_written, written, tmp))
            else:
                dcp.save(state, storage_writer=_writer(tmp), no_dist=self.world_size == 1)
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
        own: dict[str, dict[str, Any]] | None = None
        try:
            own = future.result()
        except SaveErrors as exc:
            error = exc
        tmp = self.root / f"{TMP_PREFIX}{step_dir(self.root, step).name}"
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self._finalize(step, own)

    def _hash_when_written(self, written: Future[Any], tmp: Path) -> dict[str, dict[str, Any]]:
        """Background thread of an async save: wait for DCP's write, then hash this rank's files."""
        written.result()
        return self._hash_own(tmp)

    def _own_files(self, tmp: Path) -> list[Path]:
        """The files this rank wrote: its DCP shards (`__<rank>_<n>.distcp`: FileSystemWriter's naming, torch 2.13
        distributed/checkpoint/filesystem.py:666 and :690) and RNG state; rank 0 also the metadata and config files.
        Rank 0 hashes whatever else it finds, so another naming costs time, never coverage."""
        own = [tmp / "rng" / f"rank_{self.rank:05d}.pt", *sorted(tmp.glob(f"__{self.rank}_*.distcp"))]
        if self.is_main:
            own += [tmp / name for name in (".metadata", MODEL_CONFIG, IDENTITY)]
        return [p for p in own if p.is_file()]

    def _hash_own(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """Digests of this rank's files, while another thread fsyncs them: the hashing (CPU, from the page cache)
        overlaps the flush to disk (waiting on the device), each file fsynced once, by the rank that wrote it."""
        t0 = time.perf_counter()
        own = self._own_files(tmp)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-fsync") as flusher:
            flushed = flusher.submit(_fsync_each, own)
            digests = file_digests(own)
            flushed.result()
        self.last_hash_s = time.perf_counter() - t0
        return {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "digest": h} for p, h in digests.items()}

    def _finalize(self, step: int, own: dict[str, dict[str, Any]] | None = None) -> None:
        """After every rank's data is written and hashed (`own`: this rank's digests; None: hash them now), rank 0
        fsyncs, renames and writes the marker."""
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error: BaseException | None = None
        if own is None:
            try:
                own = self._hash_own(tmp)
            except OSError as exc:
                error, own = exc, {}
        listings = self._gather(own)
        if self.is_main and error is None:
            try:
                files: dict[str, dict[str, Any]] = {}
                for listing in listings:
                    files.update(listing)
                on_disk = sorted(p for p in tmp.rglob("*") if p.is_file())
                rest = [p for p in on_disk if str(p.relative_to(tmp)) not in files]
                files |= {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "digest": h}
                          for p, h in file_digests(rest).items()}
                for p in rest:  # the listed files were fsynced by the ranks that wrote them (_hash_own)
                    fsync_path(p)
                for d in {tmp, *(p.parent for p in on_disk)}:
                    fsync_path(d, directory=True)
                self._clear_slot(final)
                os.rename(tmp, final)
                fsync_path(self.root, directory=True)
                marker = make_marker(step, files, world_size=self.world_size, layout=self.layout)
                create_durably(final / DONE, json.dumps(marker, indent=1).encode())
                fsync_path(final, directory=True)
                self._intact[final] = (final / DONE).stat().st_mtime_ns
            except OSError as exc:
                error = exc
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self.saved_step = step
        if self.is_main:
            size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
            self.log(f"checkpoint: saved {final} ({size / 2**20:.1f} MiB)")
            self.prune()

    def _ours(self, path: Path) -> bool:
        """Whether `path` was written by a run of this identity (its identity.json says so)."""
        theirs = read_identity(path)
        return theirs is not None and identity_difference(self.identity, theirs) is None

    def _clear_slot(self, final: Path) -> None:
        """Rank 0, before renaming a save to `final`: an interrupted save of ours there goes; anything else (corrupt,
        another run's, a link) is moved aside under a name no resume or prune reads, and named."""
        if not final.exists() and not final.is_symlink():
            return
        marker, why = read_marker(final)
        if not final.is_symlink() and marker is None and why and why.startswith("no done marker") and self._ours(final):
            shutil.rmtree(final)
            return
        aside = self.root / f"{SETASIDE_PREFIX}{final.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.rename(final, aside)
        self.log(f"checkpoint: warning: {final} was in the way of the new save; moved it to {aside} (kept: inspect "
                 "or delete it yourself)")

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

    def _is_intact(self, path: Path, files: dict[str, Any]) -> str | None:
        """Hash-check `path` once per process (rank 0's retention); None when intact."""
        try:
            stamp = (path / DONE).stat().st_mtime_ns
        except OSError:
            return "the done marker cannot be read"
        if self._intact.get(path) == stamp:
            return None
        why = check_files(path, files, verify=True)
        if why is None:
            self._intact[path] = stamp
        return why

    def prune(self) -> None:
        """Rank 0: keep the newest `keep` intact checkpoints of this run; delete older complete ones of this run, this
        run's interrupted saves and stale temp dirs. Anything unreadable, corrupt, a link or another run's stays."""
        kept = 0
        for _, path in reversed(list_step_dirs(self.root)):
            if path.is_symlink():
                continue
            marker, why = read_marker(path)
            ours = self._ours(path)
            if marker is None:
                if ours and why is not None and why.startswith("no done marker"):
                    shutil.rmtree(path, ignore_errors=True)  # our own save, interrupted after its rename
                continue
            if not ours or path in self._bad or self.keep < 0:
                continue
            if check_files(path, marker["files"], verify=False) is not None:
                continue
            if kept < self.keep:
                bad = self._is_intact(path, marker["files"])
                if bad is None:
                    kept += 1
                else:
                    self._bad[path] = bad
                    self.log(f"checkpoint: warning: {path} is corrupt ({bad}); left in place, not counted as kept")
                continue
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            if path.is_symlink():
                continue
            if self._pending is None or path.name != f"{TMP_PREFIX}{step_dir(self.root, self._pending[0]).name}":
                shutil.rmtree(path, ignore_errors=True)

    # ---- load ----------------------------------------------------------------------------------------------------

    def verify(self, path: Path) -> str | None:
        """Why `path` is not a complete, intact checkpoint of this run (None when it is); every rank hashes a share of
        its files and all agree. Collective."""
        t0 = time.perf_counter()
        marker, why = read_marker(path)
        if path.is_symlink():
            why = "is a symbolic link (not written by this run)"
        elif marker is not None:
            theirs = read_identity(path)
            why = ("its identity.json cannot be read" if theirs is None else identity_difference(self.identity, theirs))
            if why is None:
                files = marker["files"]
                why = check_files(path, files, verify=False)
                if why is None:
                    share = sorted(files)[self.rank::self.world_size]
                    why = check_files(path, {rel: files[rel] for rel in share}, verify=True)
        found = [w for w in self._gather(why) if w is not None]
        self.last_verify_s = time.perf_counter() - t0
        if not found and marker is not None:
            self._intact[path] = (path / DONE).stat().st_mtime_ns
        return found[0] if found else None

    def load(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> Restored:
        """Load `path` (already verified) into fresh tensors; only when every rank has all of it, copy it into the
        model, optimizer and scheduler and restore this rank's RNG. On failure they are as they were.

        A weights-only checkpoint (`checkpoint import`) sets the model alone: the optimizer and LR schedule stay as
        this run's config made them, as for a fresh start.
        """
        marker, _ = read_marker(path)
        if marker is not None and marker.get(WEIGHTS_ONLY):
            return self._load_weights(path, model)
        fresh_optimizer = not optimizer.state
        live = _app_state(model, optimizer, scheduler, 0, 0)
        target = _fresh(live)
        error: BaseException | None = None
        rng: dict[str, Any] | None = None
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        try:
            dcp.load(target, checkpoint_id=path, no_dist=self.world_size == 1)
            if rng_file.is_file():
                rng = torch.load(rng_file, weights_only=False)
        except SaveErrors as exc:  # DCP raises the same error on every rank; a bad RNG file only on its own
            error = exc
        if not self._all_ok(error is None):
            if fresh_optimizer:
                optimizer.state.clear()  # the state get_state_dict created: a fresh start must not inherit it
                optimizer.zero_grad(set_to_none=True)
            if error is None:
                raise CheckpointError("another rank could not load it")
            raise error
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                       options=STATE_DICT_OPTIONS)
        scheduler.load_state_dict(_per_group(target["scheduler"], len(optimizer.param_groups)))
        if rng is not None:
            set_rng_state(rng)
        elif self.is_main:
            self.log(f"checkpoint: warning: {rng_file} missing (saved with another world size); RNG not restored")
        trainer = target["trainer"]
        return Restored(path, int(trainer["step"]), int(trainer["consumed_samples"]))

    def _load_weights(self, path: Path, model: torch.nn.Module) -> Restored:
        """The model (and trainer position) of a weights-only checkpoint, into fresh tensors first, then the model."""
        target = {"model": _fresh(get_model_state_dict(model, options=STATE_DICT_OPTIONS)),
                  "trainer": {"step": 0, "consumed_samples": 0}}
        error: BaseException | None = None
        try:
            dcp.load(target, checkpoint_id=path, no_dist=self.world_size == 1)
        except SaveErrors as exc:
            error = exc
        if not self._all_ok(error is None):
            if error is None:
                raise CheckpointError("another rank could not load it")
            raise error
        set_model_state_dict(model, target["model"], options=STATE_DICT_OPTIONS)
        trainer = target["trainer"]
        return Restored(path, int(trainer["step"]), int(trainer["consumed_samples"]), weights_only=True)

    def resume(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        explicit: str | None = None,
    ) -> Restored | None:
        """Load `explicit` (resume_from_checkpoint) or the newest intact checkpoint that loads; None if none.

        Raises IdentityError (before reading anything else) when the run dir holds another model's checkpoints.
        """
        warn = self.log if self.is_main else (lambda _msg: None)
        check_identity(self.root, self.identity)
        if explicit:
            path = Path(explicit)
            why = self.verify(path)
            if why is not None:
                raise CheckpointError(f"exp_manager.resume_from_checkpoint: {path} is not a complete, intact "
                                      f"checkpoint of this model: {why}")
            restored = self._load_logged(path, model, optimizer, scheduler)
        else:
            restored = None
            for _, path in reversed(list_step_dirs(self.root)):
                why = self.verify(path)
                if why is None:
                    try:
                        restored = self._load_logged(path, model, optimizer, scheduler)
                        break
                    except SaveErrors as exc:  # every rank agreed in load(): all skip it
                        why = f"cannot be loaded: {_root_cause(exc)}"
                        self._intact.pop(path, None)
                self._bad[path] = why
                warn(f"checkpoint: warning: skipping {path}: {why}; left in place")
        if restored is not None:
            self.saved_step = restored.step
        return restored

    def _load_logged(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> Restored:
        restored = self.load(path, model, optimizer, scheduler)
        if self.is_main:
            marker, _ = read_marker(path)
            saved = marker.get("layout") if marker else None
            resharded = (f", resharded from {_layout_text(saved)} to {_layout_text(self.layout)}"
                         if isinstance(saved, dict) and saved != self.layout else "")
            if restored.weights_only:
                source = marker.get("source") if marker else None
                self.log(f"checkpoint: started from imported weights {restored.path}"
                         + (f" (from {source})" if source else "")
                         + f": optimizer and LR schedule fresh from the config{resharded}; verified in "
                         f"{self.last_verify_s:.2f} s")
            else:
                self.log(f"checkpoint: resumed from {restored.path} (step {restored.step}, "
                         f"{restored.consumed_samples} samples consumed{resharded}; verified in "
                         f"{self.last_verify_s:.2f} s)")
        return restored


def _per_group(scheduler_state: dict[str, Any], groups: int) -> dict[str, Any]:
    """The LR scheduler's state for `groups` parameter groups.

    How parameters are grouped depends on the layout (DTensor and plain parameters go in separate groups), so a
    checkpoint of another layout has per-group lists (`base_lrs`, `_last_lr`) of another length. Every group shares
    the schedule and the base lr here (groups differ only in weight decay), so one value stands for all; lists whose
    values differ cannot be mapped and are an error.
    """
    out = dict(scheduler_state)
    for key, value in scheduler_state.items():
        if isinstance(value, list) and len(value) != groups and value:
            if any(v != value[0] for v in value):
                raise CheckpointError(f"the LR scheduler's {key} differs between parameter groups ({value}): it "
                                      f"cannot be mapped onto this layout's {groups} group(s)")
            out[key] = [value[0]] * groups
    return out


def _layout_text(layout: dict[str, Any]) -> str:
    return " x ".join(f"{k} {v}" for k, v in layout.items())


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
