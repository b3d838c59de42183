"""NxD checkpoints on disk, and a resume that never starts from a half-written one.

Layout (aws-neuron/neuronx-distributed src/neuronx_distributed/trainer/checkpoint.py, save_checkpoint): NxDT saves
each checkpoint as a directory `<dirpath>/<filename>.ckpt/` (PTL's ModelCheckpoint path, used as NxD's tag:
neuronx-distributed-training lightning_modules/nlp_overrides.py:617-626) holding
`model/dp_rank_XX_tp_rank_XX_pp_rank_XX.pt`
(+ `.tensors/` with xser), `optim/...` and `user_content.pt`. NxD writes a `checkpoint` file into the tag when the
save begins (checkpoint.py:146-148) and `done` when every rank has finished (checkpoint.py:194, 230-236).

NxDT's resume ignores `done`: with resume_if_exists it takes the newest `*.ckpt` under
`checkpoint_callback_params.dirpath` or `<log dir>/checkpoints` by modification time (utils/exp_manager.py:357-385),
so a job killed mid-save resumes from the broken one. But `exp_manager.resume_from_checkpoint` wins
(examples/training.py:94 passes it to trainer.fit), so `train` pins the newest complete checkpoint there and moves
incomplete newer ones aside (renamed into a sibling folder, never deleted).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_STEP = re.compile(r"step=(\d+)")
ASIDE_DIR = "checkpoints-incomplete"


@dataclass(frozen=True)
class NxdCheckpoint:
    path: Path
    step: int | None  # from `step=N` in the name (NxDT's filename pattern carries it); None when absent
    complete: bool  # has NxD's `done` marker
    mtime: float

    @property
    def order(self) -> tuple[int, float]:
        return (self.step if self.step is not None else -1, self.mtime)


def scan(checkpoint_dir: Path) -> list[NxdCheckpoint]:
    """Every `*.ckpt` directory under `checkpoint_dir` (the same rglob NxDT resumes with), oldest first."""
    found: list[NxdCheckpoint] = []
    if not checkpoint_dir.is_dir():
        return found
    for path in checkpoint_dir.rglob("*.ckpt"):
        try:
            if not path.is_dir():
                continue
            mtime = path.stat().st_mtime
            complete = (path / "done").is_file()
        except OSError:  # removed by another node's retention while we looked
            continue
        match = _STEP.search(path.name)
        found.append(NxdCheckpoint(path, int(match.group(1)) if match else None, complete, mtime))
    return sorted(found, key=lambda c: c.order)


@dataclass(frozen=True)
class ResumeChoice:
    resume_from: NxdCheckpoint | None  # the newest complete checkpoint
    incomplete_newer: tuple[NxdCheckpoint, ...]  # what NxDT's own mtime rule could pick instead: moved aside


def choose(checkpoint_dir: Path) -> ResumeChoice:
    ckpts = scan(checkpoint_dir)
    complete = [c for c in ckpts if c.complete]
    chosen = complete[-1] if complete else None
    newer = tuple(c for c in ckpts if not c.complete and (chosen is None or c.order > chosen.order
                                                           or c.mtime >= chosen.mtime))
    return ResumeChoice(chosen, newer)


def move_aside(choice: ResumeChoice, checkpoint_dir: Path) -> list[Path]:
    """Rename the incomplete newer checkpoints into `<checkpoint_dir>/../checkpoints-incomplete/`; returns the new
    paths. Safe to race with another node doing the same (a rename that lost the race is skipped)."""
    aside = checkpoint_dir.parent / ASIDE_DIR
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for ckpt in choice.incomplete_newer:
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{ckpt.path.name}.moved-{stamp}-{os.getpid()}"
        try:
            ckpt.path.rename(target)
        except FileNotFoundError:
            continue
        moved.append(target)
        print(f"resume: moved incomplete checkpoint {ckpt.path} (no 'done' marker) to {target}", file=sys.stderr)
    return moved
