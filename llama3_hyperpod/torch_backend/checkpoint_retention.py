"""Retention (rank 0): which checkpoint dirs of a run stay and which go.

Keeps the newest `keep` intact checkpoints of this run and deletes only older complete ones of this run and this run's
own interrupted saves; never one it could not read, a corrupt one, a link, or another run's. A dir standing where a new
save must go is moved aside under a name nothing reads, never deleted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from llama3_hyperpod.torch_backend.checkpoint_base import CheckpointerBase
from llama3_hyperpod.torch_backend.checkpoint_files import (
    DONE,
    SETASIDE_PREFIX,
    TMP_PREFIX,
    check_files,
    identity_difference,
    list_step_dirs,
    read_identity,
    read_marker,
    step_dir,
)


class Retention(CheckpointerBase):
    """Prune after each save, and clear the slot a save is renamed into."""

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
