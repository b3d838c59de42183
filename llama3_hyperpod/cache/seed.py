"""Make the read-only baked cache (in the image) available in a writable run-time cache dir.

Neuron needs a writable cache (it writes locks), and nothing may be written into image paths. Every rank of every
node may call this at once: one lock file serialises seeding per run-time dir, each Neuron MODULE_* entry is
copied into a temp name and renamed into place (so no reader ever sees half an entry), every other file is copied
to a temp name and renamed, and what is already there is left alone, so a second seed copies nothing.
Hard links are used instead of copies when both dirs are on one filesystem (and the kernel allows it).

Only regular files that live inside the baked cache are copied or linked: a symbolic link in it (to /etc/passwd, to
a dir elsewhere) is skipped and counted, never followed. On the run-time side, a link where a dir or entry would go
is refused: nothing is written through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama3_hyperpod.cache.manifest import (
    MANIFEST_NAME,
    NEURON_VERSION_PREFIX,
    is_bookkeeping,
    merge_manifest,
    read_manifest,
)
from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.fsutil import LockTimeoutError, link_message, locked, tmp_name

ENV_RUNTIME_DIR = "L3HP_CACHE_DIR"
ENV_BAKED_DIR = "L3HP_BAKED_CACHE"
DEFAULT_BAKED_DIR = "/opt/app/neuron_cache"
LOCK_NAME = ".seed.lock"
DONE_MARKERS = ("model.done",)  # copied last inside an entry: the marker Neuron trusts


class SeedError(ConfigError):
    """Seeding could not be done (lock timeout, unwritable run-time dir, a link in the way, a broken manifest)."""


@dataclass
class SeedReport:
    baked: str
    runtime: str
    entries_copied: int = 0
    files_copied: int = 0
    files_linked: int = 0
    files_skipped: int = 0
    links_skipped: int = 0  # symbolic links (and other non-regular files) in the baked cache: never followed
    bytes_copied: int = 0
    lock_wait_s: float = 0.0
    seconds: float = 0.0
    manifest_merged: bool = False

    @property
    def changed(self) -> int:
        return self.files_copied + self.files_linked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[float]:
    """fsutil.locked, its timeout said as a SeedError."""
    try:
        with locked(path, timeout) as waited:
            yield waited
    except LockTimeoutError:
        raise SeedError(str(path), f"still locked by another seeding process after {timeout:.0f} s") from None


def _regular(path: Path) -> bool:
    """A regular file itself, not a link to one (lstat)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _no_link(path: Path) -> None:
    if path.is_symlink():
        raise SeedError(str(path), link_message())


def _place_file(src: Path, dest: Path, link: bool, report: SeedReport) -> None:
    """Copy (or hard-link) src to a temp name beside dest, then rename: dest is whole or absent."""
    tmp = tmp_name(dest)
    if link:
        try:
            os.link(src, tmp)
            os.replace(tmp, dest)
            report.files_linked += 1
            return
        except OSError:  # other filesystem, protected_hardlinks, read-only source owner: copy instead
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)
    report.files_copied += 1
    report.bytes_copied += src.stat().st_size


def _seed_entry(src: Path, dest: Path, link: bool, report: SeedReport) -> None:
    """One Neuron MODULE_* dir: whole into a temp dir then renamed; an existing one only gets its missing files."""
    _no_link(dest)
    entries = [p for p in src.iterdir() if not is_bookkeeping(Path(p.name))]
    files = sorted((p for p in entries if _regular(p)), key=lambda p: (p.name in DONE_MARKERS, p.name))
    report.links_skipped += sum(1 for p in entries if not _regular(p) and not (p.is_dir() and not p.is_symlink()))
    if not dest.exists():
        tmp = tmp_name(dest)
        tmp.mkdir(parents=True)
        inner = SeedReport(report.baked, report.runtime)
        for f in files:
            _place_file(f, tmp / f.name, link, inner)
        try:
            os.rename(tmp, dest)
        except OSError as exc:  # another process placed it first (only possible without our lock, e.g. NFS)
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            report.files_skipped += len(files)
            return
        report.entries_copied += 1
        report.files_copied += inner.files_copied
        report.files_linked += inner.files_linked
        report.bytes_copied += inner.bytes_copied
        return
    for f in files:
        target = dest / f.name
        if target.exists() or target.is_symlink():
            report.files_skipped += 1
        else:
            _place_file(f, target, link, report)


def _walk(baked: Path, runtime: Path, link: bool, report: SeedReport) -> None:
    for dirpath, dirnames, filenames in os.walk(baked):
        here = Path(dirpath)
        rel = here.relative_to(baked)
        dirnames.sort()
        out_dir = runtime / rel
        linked_dirs = [d for d in dirnames if (here / d).is_symlink()]  # os.walk lists them but does not enter
        report.links_skipped += len(linked_dirs)
        dirnames[:] = [d for d in dirnames if d not in linked_dirs]
        _no_link(out_dir)
        in_neuron_version = len(rel.parts) == 1 and rel.parts[0].startswith(NEURON_VERSION_PREFIX)
        if in_neuron_version:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in [d for d in dirnames if d.startswith("MODULE_")]:
                _seed_entry(here / name, out_dir / name, link, report)
            dirnames[:] = [d for d in dirnames if not d.startswith("MODULE_")]
        for name in sorted(filenames):
            rel_file = rel / name
            if is_bookkeeping(rel_file) or rel_file.as_posix() == MANIFEST_NAME:
                continue
            if not _regular(here / name):
                report.links_skipped += 1
                continue
            dest = out_dir / name
            if dest.is_symlink() or (dest.exists() and dest.stat().st_size == (here / name).stat().st_size):
                report.files_skipped += 1  # a link there is not ours to replace or write through
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            _place_file(here / name, dest, link, report)


def _merge_baked_manifest(baked: Path, runtime: Path, report: SeedReport) -> None:
    """Add the baked manifest's compile records to the run-time one (a broken manifest is a one-line SeedError)."""
    try:
        baked_manifest = read_manifest(baked)
        if baked_manifest is None:
            return
        current = read_manifest(runtime) or {"compiles": []}
        if not all(isinstance(c, dict) for c in (*baked_manifest["compiles"], *current["compiles"])):
            raise ValueError("its 'compiles' list holds something other than records")
        known = {c.get("key") for c in current["compiles"]}
        if report.changed or any(c.get("key") not in known for c in baked_manifest["compiles"]):
            merge_manifest(runtime, baked_manifest)
            report.manifest_merged = True
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SeedError(f"{baked}/{MANIFEST_NAME}", f"malformed cache manifest ({exc}): rebuild the image's cache "
                        "(build.sh --cache) or remove the manifest") from None
    except OSError as exc:
        raise SeedError(str(exc.filename or runtime), f"cannot write the run-time manifest ({exc.strerror})") from None


def seed_cache(baked: Path, runtime: Path, *, link: bool | None = None, lock_timeout: float = 1800) -> SeedReport:
    """Fill `runtime` from `baked` (read-only), copying only what is missing; merge the baked manifest's records.

    Safe to call from every rank at once: the first does the work under the lock, the others wait and find nothing
    left to copy. link=None hard-links when both are on one filesystem.
    """
    start = time.monotonic()
    baked, runtime = Path(baked), Path(runtime)
    report = SeedReport(str(baked), str(runtime))
    if not baked.is_dir():
        report.seconds = round(time.monotonic() - start, 3)
        return report
    try:
        runtime.mkdir(parents=True, exist_ok=True)
        lock_path = runtime / LOCK_NAME
        _no_link(lock_path)
        lock_path.touch(exist_ok=True)
    except OSError as exc:
        raise SeedError(str(runtime), f"cannot create the run-time cache dir ({exc.strerror}): point "
                        f"{ENV_RUNTIME_DIR} (or compiler_cache_url) at a writable dir") from None
    if link is None:
        link = baked.stat().st_dev == runtime.stat().st_dev
    with _locked(lock_path, lock_timeout) as waited:
        report.lock_wait_s = round(waited, 3)
        try:
            _walk(baked, runtime, link, report)
        except OSError as exc:
            where = exc.filename or runtime
            raise SeedError(str(where), f"cannot seed the run-time cache {runtime} ({exc.strerror}): point "
                            f"{ENV_RUNTIME_DIR} (or compiler_cache_url) at a writable dir") from None
        _merge_baked_manifest(baked, runtime, report)
    report.seconds = round(time.monotonic() - start, 3)
    return report
