"""Writing files without following symbolic links out of the project's own dirs, and saying so in one line.

The project writes into dirs it owns (a run dir, a dataset folder, a run-time cache, an export folder). A link
planted in one of them (`metrics.jsonl -> ~/.bashrc`, `checkpoints -> /data`) must not redirect a write or a
delete. So: final files are written to a fresh temp name (O_CREAT | O_EXCL | O_NOFOLLOW) and renamed over the
target, which replaces a link instead of writing through it; appends open with O_NOFOLLOW; and the dirs we
write into are checked component by component below their root (`refuse_links`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from llama3_hyperpod.config import ConfigError


class PathError(ConfigError):
    """A path the project would write through is a symbolic link (or otherwise unusable): one line, exit 2."""


def link_message() -> str:
    return "is a symbolic link; nothing is written through links: remove it or use the real path"


def refuse_links(root: Path, *paths: Path) -> None:
    """Raise PathError when `root` itself is fine but a component of any `path` below it is a symlink.

    `root` is the user's choice (e.g. --output-dir, resolved by the plan); what lies below it is ours.
    """
    for path in paths:
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise PathError(str(path), f"is outside {root}") from None
        here = root
        for part in rel.parts:
            here = here / part
            if here.is_symlink():
                raise PathError(str(here), link_message())


def tmp_name(path: Path) -> Path:
    """A fresh hidden name beside `path` that nothing else uses."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes(path: Path, data: bytes, *, durable: bool = False, mode: int = 0o644) -> None:
    """Write `path` whole or not at all: a temp file opened O_EXCL | O_NOFOLLOW, then renamed over `path`."""
    tmp = tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def open_append(path: Path) -> IO[str]:
    """Open a log for appending; a symlink there is refused instead of followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathError(str(path), link_message()) from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def replace_from(tmp: Path, path: Path) -> None:
    """Move a finished temp file (written by a library that takes a path) over `path` (a link there is replaced)."""
    os.replace(tmp, path)


def is_inside(path: Path, roots: Iterable[Path]) -> Path | None:
    """The first of `roots` that `path` equals or lies inside (both resolved), else None."""
    resolved = path.resolve()
    for root in roots:
        r = root.resolve()
        if resolved == r or r in resolved.parents:
            return root
    return None
