"""Keep the newest N compiler versions of a Neuron cache (`neuronxcc-*` dirs by version order), drop the rest.

A Neuron SDK upgrade leaves the old compiler's whole tree behind, unusable by the new one. Dirs are renamed away
before they are deleted, so a concurrent reader sees a version dir either whole or gone.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama3_hyperpod.cache.manifest import (
    NEURON_VERSION_PREFIX,
    TEMP_MARK,
    manifest_lock,
    read_manifest,
    version_core,
    write_json_atomic,
)


@dataclass
class PruneReport:
    root: str
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_key(dirname: str) -> tuple[tuple[int, ...], str]:
    """'neuronxcc-2.16.372.0+4a9b2326' -> ((2, 16, 372, 0), '4a9b2326'): numeric order, not string order."""
    core = version_core(dirname.removeprefix(NEURON_VERSION_PREFIX))
    numbers = tuple(int(x) for x in re.findall(r"\d+", core))
    return numbers, dirname


def prune_cache(root: str | Path, keep: int, *, dry_run: bool = False) -> PruneReport:
    """Remove all but the `keep` newest compiler-version dirs; drop their records from the manifest."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    root = Path(root)
    report = PruneReport(str(root), dry_run=dry_run)
    versions = sorted((p for p in root.glob(f"{NEURON_VERSION_PREFIX}*") if p.is_dir() and TEMP_MARK not in p.name),
                      key=lambda p: version_key(p.name), reverse=True)
    report.kept = [p.name for p in versions[:keep]]
    for old in versions[keep:]:
        report.removed.append(old.name)
        report.freed_bytes += sum(f.stat().st_size for f in old.rglob("*") if f.is_file())
        if not dry_run:
            trash = old.with_name(f".{old.name}{TEMP_MARK}prune-{os.getpid()}")
            os.rename(old, trash)
            shutil.rmtree(trash)
    if report.removed and not dry_run:
        _drop_records(root, {version_core(n.removeprefix(NEURON_VERSION_PREFIX)) for n in report.removed})
    return report


def _drop_records(root: Path, versions: set[str]) -> None:
    with manifest_lock(root):
        manifest = read_manifest(root)
        if manifest is None:
            return
        manifest["compiles"] = [
            c for c in manifest["compiles"]
            if not (c.get("backend") == "neuron"
                    and version_core(str(c.get("toolchain", {}).get("compiler_version", ""))) in versions)
        ]
        dirs = {f"{NEURON_VERSION_PREFIX}{v}" for v in versions}
        manifest["files"] = [f for f in manifest.get("files", [])
                             if version_core(f["path"].split("/", 1)[0]) not in dirs]
        manifest["total_bytes"] = sum(f["size"] for f in manifest["files"])
        write_json_atomic(root / "manifest.json", manifest)
