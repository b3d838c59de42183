"""What a compile cache holds, entry by entry, and what is wrong with it (`cache inspect`).

Neuron entries (shared/reference/neuron-nxdt.md): `neuronxcc-<version>/MODULE_<graph>+<flags>/` with
model.hlo_module.pb, model.neff, compile_flags.json, model.done (success marker), sometimes model.log; `*.lock`
files are left by running or interrupted compiles. A failed compile is kept as failed and replayed
("Got a cached failed neff"): we count an entry as failed when its neff is empty or a `*.failed` marker is present.
Inductor's cache is summarised per top-level folder (fxgraph, aotautograd, C++/Triton kernels).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama3_hyperpod.cache.manifest import (
    NEURON_VERSION_PREFIX,
    TEMP_MARK,
    layout_of,
    read_manifest,
    version_core,
)

STALE_LOCK_SECONDS = 2 * 3600  # one module of an 8B graph compiles in minutes to tens of minutes


@dataclass(frozen=True)
class Problem:
    kind: str  # stale-lock | lock | failed | incomplete | version-mismatch | manifest | temp
    path: str
    message: str
    severity: str = "error"  # error | warning


@dataclass(frozen=True)
class NeuronEntry:
    compiler_version: str
    name: str
    state: str  # complete | locked | failed | incomplete
    size: int
    files: list[str]
    has_log: bool
    lock_age_s: float | None


@dataclass(frozen=True)
class InductorGroup:
    name: str
    files: int
    size: int


@dataclass
class CacheReport:
    root: str
    layout: str
    expected_compiler_version: str | None
    manifest_compiles: int | None
    neuron: list[NeuronEntry] = field(default_factory=list)
    inductor: list[InductorGroup] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.neuron) + sum(g.size for g in self.inductor)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.neuron:
            out[e.state] = out.get(e.state, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data |= {"total_bytes": self.total_bytes, "counts": self.counts(), "ok": self.ok}
        return data


def _tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def neuron_entry(vdir: Path, mdir: Path, now: float) -> NeuronEntry:
    files = sorted(p.name for p in mdir.iterdir() if p.is_file())
    locks = [mdir / f for f in files if f.endswith(".lock")]
    neff = mdir / "model.neff"
    lock_age = max(now - lk.stat().st_mtime for lk in locks) if locks else None
    if "model.done" in files and neff.is_file() and neff.stat().st_size > 0 and not locks:
        state = "complete"
    elif any(f.endswith(".failed") for f in files) or (neff.is_file() and neff.stat().st_size == 0):
        state = "failed"
    elif locks:
        state = "locked"
    else:
        state = "incomplete"
    return NeuronEntry(
        compiler_version=vdir.name[len(NEURON_VERSION_PREFIX):],
        name=mdir.name,
        state=state,
        size=sum((mdir / f).stat().st_size for f in files),
        files=files,
        has_log="model.log" in files,
        lock_age_s=round(lock_age, 1) if lock_age is not None else None,
    )


def _neuron_problems(root: Path, entry: NeuronEntry, stale_after: float) -> list[Problem]:
    rel = f"{NEURON_VERSION_PREFIX}{entry.compiler_version}/{entry.name}"
    if entry.state == "failed":
        return [Problem("failed", rel, "a failed compile is cached and will be replayed: delete the entry or set "
                        "--retry_failed_compilation in NEURON_CC_FLAGS")]
    if entry.state == "incomplete":
        missing = [f for f in ("model.neff", "model.done") if f not in entry.files]
        return [Problem("incomplete", rel, f"no {' and no '.join(missing)} and no lock: an interrupted compile or "
                        "copy; it will be recompiled")]
    if entry.lock_age_s is not None:
        if entry.lock_age_s > stale_after:
            return [Problem("stale-lock", rel, f"lock {entry.lock_age_s / 3600:.1f} h old: an interrupted compile; "
                            "ranks would wait on it. Remove with `neuron_parallel_compile --command clear-locks`")]
        return [Problem("lock", rel, f"lock {entry.lock_age_s:.0f} s old: a compile may be running", "warning")]
    return []


def inspect_cache(root: str | Path, *, expected_compiler_version: str | None = None,
                  stale_after: float = STALE_LOCK_SECONDS, now: float | None = None) -> CacheReport:
    """Entries, sizes and problems of one cache dir. Version mismatches are checked against the expected compiler
    version (this machine's or the pinned one) and against the manifest's records."""
    root = Path(root)
    now = time.time() if now is None else now
    problems: list[Problem] = []
    try:
        manifest = read_manifest(root)
    except ValueError as exc:
        manifest = None
        problems.append(Problem("manifest", str(root / "manifest.json"), str(exc)))
    report = CacheReport(str(root), layout_of(root), expected_compiler_version,
                         len(manifest["compiles"]) if manifest else None, problems=problems)
    if not root.is_dir():
        return report

    for vdir in sorted(root.glob(f"{NEURON_VERSION_PREFIX}*")):
        if not vdir.is_dir():
            continue
        for mdir in sorted(vdir.iterdir()):
            if not mdir.is_dir():
                continue
            if TEMP_MARK in mdir.name:
                problems.append(Problem("temp", f"{vdir.name}/{mdir.name}", "left over from an interrupted seed copy",
                                        "warning"))
                continue
            entry = neuron_entry(vdir, mdir, now)
            report.neuron.append(entry)
            problems += _neuron_problems(root, entry, stale_after)

    versions = sorted({e.compiler_version for e in report.neuron})
    if expected_compiler_version and report.neuron:
        want = version_core(expected_compiler_version)
        if want not in {version_core(v) for v in versions}:
            problems.append(Problem("version-mismatch", str(root), f"entries are for neuronx-cc {', '.join(versions)};"
                                    f" this compiler is {expected_compiler_version}: none of them will be used"))
    if manifest and report.neuron:
        recorded = {version_core(str(c.get("toolchain", {}).get("compiler_version", "")))
                    for c in manifest["compiles"] if c.get("backend") == "neuron"}
        if recorded and not recorded & {version_core(v) for v in versions}:
            problems.append(Problem("version-mismatch", str(root / "manifest.json"),
                                    f"the manifest records neuronx-cc {', '.join(sorted(recorded))} but the cache "
                                    f"holds {', '.join(versions)}"))

    inductor_root = root / "inductor" if (root / "inductor").is_dir() else root
    if report.layout == "inductor":
        for sub in sorted(p for p in inductor_root.iterdir() if p.is_dir()):
            count, size = _tree_size(sub)
            report.inductor.append(InductorGroup(sub.relative_to(root).as_posix(), count, size))
    if manifest and report.layout == "inductor":
        for c in manifest["compiles"]:
            recorded_version = c.get("toolchain", {}).get("compiler_version")
            if expected_compiler_version and recorded_version and recorded_version != expected_compiler_version:
                problems.append(Problem("version-mismatch", str(root / "manifest.json"),
                                        f"compiled with torch {recorded_version}; this torch is "
                                        f"{expected_compiler_version}: Inductor will recompile"))
                break
    return report


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_report(report: CacheReport, console: Any) -> None:
    """Tables for humans (rich)."""
    from rich.table import Table

    console.print(f"[bold]{report.root}[/bold]  layout {report.layout}  total {human_bytes(report.total_bytes)}"
                  + (f"  manifest: {report.manifest_compiles} compile(s)" if report.manifest_compiles is not None
                     else "  no manifest"))
    if report.neuron:
        table = Table("compiler", "module", "state", "size", "files", "log")
        table.columns[1].overflow = "fold"  # a module name is a hash to grep for: never cut with an ellipsis
        for e in report.neuron:
            color = {"complete": "green", "locked": "yellow"}.get(e.state, "red")
            table.add_row(e.compiler_version, e.name, f"[{color}]{e.state}[/{color}]", human_bytes(e.size),
                          str(len(e.files)), "yes" if e.has_log else "")
        console.print(table)
        console.print(", ".join(f"{n} {state}" for state, n in sorted(report.counts().items())))
    if report.inductor:
        table = Table("inductor folder", "files", "size")
        for g in report.inductor:
            table.add_row(g.name, str(g.files), human_bytes(g.size))
        console.print(table)
    if report.problems:
        table = Table("problem", "where", "what")
        table.columns[1].overflow = "fold"
        for p in report.problems:
            color = "red" if p.severity == "error" else "yellow"
            table.add_row(f"[{color}]{p.kind}[/{color}]", p.path, p.message)
        console.print(table)
    else:
        console.print("[green]no problems[/green]")
