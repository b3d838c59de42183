"""The load path: verify a checkpoint (every rank hashes a share of its files), load it into fresh tensors and only
then into the model, optimizer and scheduler, and resume from the newest one that loads (checkpoint.py says why).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict, set_state_dict

from llama3_hyperpod.torch_backend.checkpoint_base import (
    STATE_DICT_OPTIONS,
    CheckpointerBase,
    CheckpointError,
    Restored,
    SaveErrors,
    app_state,
    root_cause,
    set_rng_state,
)
from llama3_hyperpod.torch_backend.checkpoint_files import (
    DONE,
    WEIGHTS_ONLY,
    check_files,
    check_identity,
    identity_difference,
    list_step_dirs,
    read_identity,
    read_marker,
)


def _fresh(tree: Any) -> Any:
    """The same structure with new, uninitialised tensors (DTensors keep their mesh and placements)."""
    if isinstance(tree, dict):
        return {k: _fresh(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fresh(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    return copy.deepcopy(tree)


class LoadPath(CheckpointerBase):
    """verify, load and resume (collective)."""

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
        live = app_state(model, optimizer, scheduler, 0, 0)
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
                        why = f"cannot be loaded: {root_cause(exc)}"
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
