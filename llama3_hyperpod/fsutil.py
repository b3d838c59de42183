"""Files, the one place for it: atomic writes that never follow links, sha256 digests, exclusive flocks.

The project writes into dirs it owns (a run dir, a dataset folder, a run-time cache, an export folder). A link
planted in one of them (`metrics.jsonl -> ~/.bashrc`, `checkpoints -> /data`) must not redirect a write or a
delete. So: final files are written to a fresh temp name (O_CREAT | O_EXCL | O_NOFOLLOW) and renamed over the
target, which replaces a link instead of writing through it; appends open with O_NOFOLLOW; and the dirs we
write into are checked component by component below their root (`refuse_links`).

Digests (`sha256_file`, `sha256_json`) and the advisory lock (`locked`) live here too, so that every cache, dataset
and image helper hashes and locks the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from llama3_hyperpod.errors import ConfigError


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


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file, or a directory (so the names renamed into it survive a crash)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def create_durably(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet (O_EXCL: never over another file, never through a link) and fsync it.

    For the files of a dir that is itself written under a temp name and renamed into place (a checkpoint): the dir's
    rename is the atomic step, so each file needs no temp name of its own, only to be on disk before that rename.
    """
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (what `sha256sum` prints), read in blocks: bounded memory, the GIL released."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of `obj` as canonical JSON (sorted keys, no spaces): equal data, equal hash, on every machine."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class LockTimeoutError(TimeoutError):
    """`locked` waited its whole timeout."""


@contextlib.contextmanager
def locked(path: Path, timeout: float | None = None) -> Iterator[float]:
    """Hold an exclusive flock on `path` (made if missing) for the block; yields the seconds waited.

    Without a timeout it waits as long as it takes; with one it raises LockTimeoutError once `timeout` seconds passed.
    """
    start = time.monotonic()
    with path.open("a") as fh:
        if timeout is None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - start > timeout:
                        raise LockTimeoutError(f"{path}: still locked after {timeout:.0f} s") from None
                    time.sleep(0.05)
        try:
            yield time.monotonic() - start
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
