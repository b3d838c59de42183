"""The cache manifest: what a compile cache was compiled for (graph-shaping fields, compiler) and what it holds.

`compile` writes `<cache>/manifest.json` after filling the cache; `cache verify` and `train` compare a plan with it
before anything runs. A cache may hold several compiles (other node counts, sequence lengths): each is one record.

Which fields shape graphs is graphkey.py's rule; the plan carries them (`plan.graph`), so this module takes plain
data and imports neither the config nor the plan.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from llama3_hyperpod.fsutil import locked, sha256_file, sha256_json, write_text
from llama3_hyperpod.sdkinfo import installed_version, load_pins

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
NEURON_VERSION_PREFIX = "neuronxcc-"
# Names in a cache dir that are bookkeeping, not compiled graphs: never listed, hashed or seeded.
BOOKKEEPING = (MANIFEST_NAME, ".manifest.lock", ".seed.lock")
TEMP_MARK = ".tmp-"
# The packages whose versions change the HLO NxDT produces (model code, lowering) beside the compiler itself.
NEURON_STACK = ("torch-neuronx", "neuronx-distributed", "neuronx-distributed-training")


class PlannedCompile(Protocol):
    """What the cache reads of a plan (plan.Plan carries these fields): plain data, so the cache imports no plan."""

    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def graph(self) -> dict[str, Any]: ...  # graphkey.graph_fields_from_config, derived once by the plan
    @property
    def model(self) -> dict[str, Any]: ...  # parameters, num_layers, hidden_size: what a miss costs
    @property
    def config_path(self) -> str: ...
    @property
    def overrides(self) -> list[str]: ...
    @property
    def compile_cache_dir(self) -> str: ...


# ------------------------------------------------------------------------------------------------------ toolchain


def _pinned_neuron() -> dict[str, Any]:
    """The pip pins of the versions file in effect (the checkout's, or the one baked into the image)."""
    try:
        pins = load_pins().get("pip", {})
    except (OSError, ValueError):
        return {}
    return pins if isinstance(pins, dict) else {}


def toolchain(backend: str) -> dict[str, Any]:
    """The compiler (and, for Neuron, the HLO-producing stack) this machine would compile with.

    `source` says whether a version was read from the installed package or from the pinned versions file (planning
    for Trainium off Trainium); it is informative and not compared.
    """
    if backend == "neuron":
        pins = _pinned_neuron()
        installed = installed_version("neuronx-cc")
        out: dict[str, Any] = {
            "compiler": "neuronx-cc",
            "compiler_version": installed or pins.get("neuronx-cc") or "unknown",
            "source": "installed" if installed else ("pinned" if pins.get("neuronx-cc") else "unknown"),
        }
        for dist in NEURON_STACK:
            out[dist] = installed_version(dist) if installed else pins.get(dist)
        return out
    torch_version = installed_version("torch") or "unknown"
    out = {"compiler": "inductor", "compiler_version": torch_version, "source": "installed"}
    triton = installed_version("triton") or installed_version("pytorch-triton")
    if triton:
        out["triton"] = triton
    return out


COMPARED_TOOLCHAIN_KEYS = ("compiler", "compiler_version", "triton", *NEURON_STACK)


def version_core(version: str) -> str:
    """'2.16.372.0+4a9b2326' -> '2.16.372.0': the cache dir adds a build hash the pip version lacks."""
    return version.split("+", 1)[0]


# ----------------------------------------------------------------------------------------------------- the listing


def is_bookkeeping(rel: Path) -> bool:
    return rel.name in BOOKKEEPING or rel.suffix == ".lock" or any(TEMP_MARK in part for part in rel.parts)


def iter_cache_files(root: Path) -> Iterator[Path]:
    """Every compiled-graph file under root (relative paths, sorted), bookkeeping and temp files left out."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if TEMP_MARK not in d)
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root)
            if not is_bookkeeping(rel):
                yield rel


def listing(root: Path, previous: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Path, size and sha256 of every file; hashes of files unchanged since `previous` (size, mtime) are reused."""
    known = {(f["path"], f["size"], f.get("mtime_ns")): f["sha256"] for f in previous or []}
    out = []
    for rel in iter_cache_files(root):
        st = (root / rel).stat()
        key = (rel.as_posix(), st.st_size, st.st_mtime_ns)
        sha = known.get(key) or sha256_file(root / rel)
        out.append({"path": rel.as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    return out


def layout_of(root: Path) -> str:
    """'neuron' (neuronxcc-* dirs), 'inductor' (an inductor/ dir or Inductor's own subdirs), 'empty' or 'unknown'."""
    if not root.is_dir():
        return "empty"
    names = {p.name for p in root.iterdir()}
    if any(n.startswith(NEURON_VERSION_PREFIX) for n in names):
        return "neuron"
    if "inductor" in names or names & {"fxgraph", "aotautograd", "triton"}:
        return "inductor"
    return "empty" if not names - set(BOOKKEEPING) else "unknown"


def neuron_entries(root: Path, compiler_version: str | None = None) -> list[str]:
    """`neuronxcc-<v>/MODULE_*` names, all versions or only the one given."""
    out = []
    for vdir in sorted(root.glob(f"{NEURON_VERSION_PREFIX}*")):
        if compiler_version and version_core(vdir.name[len(NEURON_VERSION_PREFIX):]) != version_core(compiler_version):
            continue
        modules = sorted(m for m in vdir.glob("MODULE_*") if m.is_dir() and TEMP_MARK not in m.name)
        out += [f"{vdir.name}/{m.name}" for m in modules]
    return out


# ---------------------------------------------------------------------------------------------------- read / write


def manifest_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none. A corrupt one raises ValueError naming the file."""
    path = manifest_path(cache_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("compiles"), list):
        raise ValueError(f"{path}: not a cache manifest (no 'compiles' list)")
    return data


@contextlib.contextmanager
def manifest_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise manifest updates (several nodes may finish compiling into one shared cache)."""
    with locked(cache_dir / ".manifest.lock"):
        yield


def write_json_atomic(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def make_record(fields: Mapping[str, Any], tools: Mapping[str, Any], root: Path, *, created: str,
                compile_seconds: float | None, config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    backend = str(fields.get("backend"))
    entries = neuron_entries(root, str(tools.get("compiler_version"))) if backend == "neuron" else []
    return {
        "key": sha256_json({"graph": fields, "toolchain": {k: tools.get(k) for k in COMPARED_TOOLCHAIN_KEYS}}),
        "backend": backend,
        "created": created,
        "compile_seconds": compile_seconds,
        "config": config_path,
        "overrides": overrides,
        "toolchain": dict(tools),
        "graph": dict(fields),
        "entries": entries,
    }


def update_manifest(root: Path, record: dict[str, Any]) -> Path:
    """Add (or replace, same key) one compile record and re-list the files, atomically and under a lock."""
    root.mkdir(parents=True, exist_ok=True)
    with manifest_lock(root):
        old = read_manifest(root) or {}
        compiles = [c for c in old.get("compiles", []) if c.get("key") != record["key"]] + [record]
        return _rewrite(root, compiles, listing(root, old.get("files")))


def _rewrite(root: Path, compiles: list[dict[str, Any]], files: list[dict[str, Any]]) -> Path:
    """Write the whole manifest (call under manifest_lock): the records and the fresh listing."""
    path = manifest_path(root)
    write_json_atomic(path, {
        "schema_version": SCHEMA_VERSION,
        "layout": layout_of(root),
        "updated": now_iso(),
        "compiles": compiles,
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    })
    return path


def write_manifest(cache_dir: str | Path, plan: PlannedCompile, *, compile_seconds: float | None = None) -> Path:
    """Record that `plan` was compiled into cache_dir (call after `compile` succeeded). Returns the manifest path."""
    if str(cache_dir).startswith("s3://"):
        raise ValueError(f"{cache_dir}: a manifest is written only into a local cache directory")
    root = Path(cache_dir)
    record = make_record(plan.graph, toolchain(plan.backend), root, created=now_iso(),
                         compile_seconds=compile_seconds, config_path=plan.config_path, overrides=list(plan.overrides))
    return update_manifest(root, record)


def merge_manifest(root: Path, other: dict[str, Any]) -> None:
    """Add another manifest's records (the baked one, after seeding) without dropping this cache's own.

    Seeded copies keep size and mtime, so the other manifest's hashes are reused rather than recomputed.
    """
    with manifest_lock(root):
        old = read_manifest(root) or {}
        keys = {c.get("key") for c in old.get("compiles", [])}
        compiles = old.get("compiles", []) + [r for r in other.get("compiles", []) if r.get("key") not in keys]
        _rewrite(root, compiles, listing(root, [*other.get("files", []), *old.get("files", [])]))
