"""The torch backend's checkpoint dirs as files: what is complete, intact and of which run (no torch import).

Layout, under `<run_dir>/checkpoints/`:

    step_0000100/            one complete checkpoint (the step count it was taken after)
        .metadata, __0_0.distcp, ...   DCP: model + optimizer (FQN-keyed, flattened: reshardable), LR scheduler,
                                       trainer position (step, consumed samples)
        rng/rank_00000.pt    each rank's RNG states
        model_config.json    the HF config of the model (what `checkpoint export` writes as config.json)
        identity.json        what must match to resume: the model shape and this format (see run_identity)
        done                 JSON written last: format, step, layout, and size + digest of every file above
    .tmp-step_0000200/       a save in progress (or one a crash interrupted); never read
    setaside-step_0000100-T/ a dir that stood where a new save had to go (corrupt, or another run's): kept

A checkpoint is *complete* when its done marker parses, lists .metadata and identity.json, is for its own step, and
every listed file is a regular file of the listed size; it is *intact* when every file also has the listed digest
(`problem(verify=True)`, what resume and export check before reading a byte of it). Nothing here deletes: which dirs
may be deleted is decided in checkpoint_retention.Retention.prune.

A file's digest (DIGEST) is the sha256 of the sha256 digests of its 16 MiB blocks, in order: as sure a sign of changed
content as a plain sha256 of the file, and its blocks are hashed by parallel threads (hashlib releases the GIL), so
the one large shard each rank writes is hashed at the speed of all the cores that rank has, not of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.graphkey import NON_GRAPH_HF_KEYS
from llama3_hyperpod.torch_backend.rundir import CHECKPOINTS

__all__ = ["CHECKPOINTS"]  # re-exported: where the checkpoints live in a run dir
DONE = "done"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
SETASIDE_PREFIX = "setaside-"
MODEL_CONFIG = "model_config.json"
IDENTITY = "identity.json"
FORMAT = "llama3_hyperpod.torch_checkpoint/2"  # 2: content hashes, identity, flattened (reshardable) optimizer state
REQUIRED = (".metadata", IDENTITY)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DIGEST = "sha256 of the sha256 of each 16 MiB block"
BLOCK = 16 * 2**20
# Marker key of a checkpoint made by `checkpoint import` from Hugging Face weights: it holds the model and the trainer
# position (step 0) only, so a run starting from it builds its optimizer and LR schedule from its own config.
WEIGHTS_ONLY = "weights_only"


class IdentityError(ConfigError):
    """The run dir holds checkpoints of another model (or format): refusing to resume or overwrite them."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step_N entry that is a dir or a link to one (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := step_of(p)) is not None and p.is_dir()]
    return sorted(found)


# ---- identity ----------------------------------------------------------------------------------------------------


def run_identity(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint must share with the run that loads it.

    The model: every HF config key that shapes or defines the weights (token ids, init and provenance keys aside,
    as for the compile cache's model hash). The format: this trainer's DCP layout. Not the TP / DP degrees: DCP
    reshards FQN-keyed DTensor state between any (dp, tp) split, which tests/integration/test_checkpoint_resume.py
    checks against the losses of an uninterrupted run. Pipeline parallelism does not exist on this backend.
    """
    model = {k: hf_config[k] for k in sorted(hf_config) if k not in NON_GRAPH_HF_KEYS}
    return {"format": FORMAT, "model": json.loads(json.dumps(model))}


def read_identity(path: Path) -> dict[str, Any] | None:
    """The identity.json of a checkpoint dir (None when absent or unreadable)."""
    file = path / IDENTITY
    try:
        if file.is_symlink() or not file.is_file():
            return None
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    return data


def identity_difference(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
    """None when a checkpoint of identity `theirs` may be loaded by a run of identity `ours`, else what differs."""
    if theirs.get("format") != ours.get("format"):
        return f"checkpoint format {theirs.get('format')!r} there, {ours.get('format')!r} here"
    a, b = ours.get("model", {}), theirs.get("model", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} {b.get(key, 'unset')!r} there, {a.get(key, 'unset')!r} here"
    return None


def check_identity(root: Path, identity: Mapping[str, Any]) -> None:
    """Refuse (IdentityError, one line) when any checkpoint under `root` belongs to another model or format."""
    for _, path in list_step_dirs(root):
        theirs = read_identity(path)
        why = identity_difference(identity, theirs) if theirs is not None else None
        if why is not None:
            raise IdentityError(str(root), f"holds checkpoints of another model ({path.name}: {why}): use another "
                                "--run-name (or exp_manager.explicit_log_dir), or move those checkpoints away; "
                                "nothing was deleted")


# ---- the done marker ---------------------------------------------------------------------------------------------


def make_marker(step: int, files: Mapping[str, Mapping[str, Any]], *, world_size: int, layout: Mapping[str, Any],
                **extra: Any) -> dict[str, Any]:
    """The done marker's content: format, digest scheme, step, every file's size and digest, who wrote it."""
    return {"format": FORMAT, "digest": DIGEST, "step": step, "files": dict(sorted(files.items())),
            "time": time.time(), "world_size": world_size, "layout": dict(layout), **extra}


def _safe_rel(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not PurePosixPath(rel).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def _good_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    size, digest = entry.get("bytes"), entry.get("digest")
    return (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(digest, str)
            and _SHA256.match(digest) is not None)


def read_marker(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) when `path/done` is a well-formed marker of this format for this step, else (None, why)."""
    marker_file = path / DONE
    if marker_file.is_symlink():
        return None, "the done marker is a symbolic link"
    if not marker_file.is_file():
        return None, "no done marker (the save did not finish)"
    try:
        marker = json.loads(marker_file.read_bytes())
    except (OSError, ValueError) as exc:
        return None, f"unreadable done marker ({type(exc).__name__})"
    if not isinstance(marker, dict):
        return None, "unreadable done marker (not a JSON object)"
    if marker.get("format") != FORMAT or marker.get("digest") != DIGEST:
        return None, (f"done marker of format {marker.get('format')!r}, not {FORMAT!r} (saved by another version "
                      "without content hashes): not verifiable, left as it is")
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None, "the done marker lists no files"
    for rel, entry in files.items():
        if not _safe_rel(rel):
            return None, f"the done marker lists a bad file name {rel!r}"
        if not _good_entry(entry):
            return None, f"the done marker's entry for {rel} is malformed"
    for rel in REQUIRED:
        if rel not in files:
            return None, f"the done marker does not list {rel}"
    step = marker.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step != step_of(path):
        return None, f"the done marker is for step {step!r}, not for {path.name}"
    return marker, None


def hash_threads() -> int:
    """Threads for hashing: this process's share of the node's cores (torchrun starts LOCAL_WORLD_SIZE per node)."""
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(2, (os.cpu_count() or 2) // per_node)


def file_digests(paths: Iterable[Path], threads: int | None = None) -> dict[Path, str]:
    """The DIGEST of each file; all their blocks are read (pread) and hashed by a pool of threads."""
    todo = list(paths)
    fds: dict[Path, int] = {}
    try:
        for p in todo:
            fds[p] = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        jobs = [(p, offset) for p in todo for offset in range(0, max(os.fstat(fds[p]).st_size, 1), BLOCK)]

        def block(job: tuple[Path, int]) -> bytes:
            return hashlib.sha256(os.pread(fds[job[0]], BLOCK, job[1])).digest()

        with ThreadPoolExecutor(max_workers=threads or hash_threads()) as pool:
            blocks = list(pool.map(block, jobs))
    finally:
        for fd in fds.values():
            os.close(fd)
    per_file: dict[Path, list[bytes]] = {p: [] for p in todo}
    for (p, _), digest in zip(jobs, blocks, strict=True):
        per_file[p].append(digest)
    return {p: hashlib.sha256(b"".join(digests)).hexdigest() for p, digests in per_file.items()}


def check_files(path: Path, files: Mapping[str, Mapping[str, Any]], *, verify: bool) -> str | None:
    """Why the listed files are not all there with their sizes (and, with verify, their digest); None if they are."""
    for rel, entry in files.items():
        file = path / rel
        try:
            st = file.lstat()
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as exc:
            return f"{rel} cannot be read ({exc.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return f"{rel} is not a regular file"
        if st.st_size != entry["bytes"]:
            return f"{rel} has {st.st_size} bytes, the done marker says {entry['bytes']} (truncated or overwritten)"
    if verify:
        try:
            digests = file_digests(path / rel for rel in files)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        for rel, entry in files.items():
            if digests[path / rel] != entry["digest"]:
                return f"{rel} does not have the content the done marker records (its digest differs: corrupt)"
    return None


def problem(path: Path, *, verify: bool = True) -> str | None:
    """Why `path` is not a complete (verify: and intact) checkpoint; None when it is."""
    if path.is_symlink():
        return "is a symbolic link (not written by this run; never read as one of its checkpoints)"
    marker, why = read_marker(path)
    if marker is None:
        return why
    return check_files(path, marker["files"], verify=verify)


def complete_checkpoints(root: Path, *, verify: bool = False) -> list[tuple[int, Path]]:
    """The complete (verify: and intact) step_N dirs, oldest first."""
    return [(s, p) for s, p in list_step_dirs(root) if problem(p, verify=verify) is None]


def newest_complete(root: Path, warn: Callable[[str], None], *, verify: bool = True) -> Path | None:
    """The newest complete and intact checkpoint; `warn` names every newer one that is skipped and why."""
    for _, path in reversed(list_step_dirs(root)):
        why = problem(path, verify=verify)
        if why is None:
            return path
        warn(f"skipping checkpoint {path}: {why}")
    return None
