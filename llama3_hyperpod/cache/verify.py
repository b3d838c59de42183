"""Will this plan hit the compile cache? Decided before anything runs, from the manifest `compile` wrote.

`train` runs the same check at start and warns loudly on a predicted miss, with what the miss will cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama3_hyperpod.cache.manifest import (
    COMPARED_TOOLCHAIN_KEYS,
    PlannedCompile,
    iter_cache_files,
    layout_of,
    read_manifest,
    toolchain,
)

EXIT_HIT = 0
EXIT_MISS = 3
EXIT_UNKNOWN = 4
# Measured on a 2-core CPU by bench/warm_start.py (cpu image, fresh container): the first step of the tiny 4-layer
# model with torch.compile comes about 20 s later without a cache than with a baked one (28 s vs 7 s).
TINY_CPU_COLD_COMPILE_S = 20


@dataclass(frozen=True)
class Difference:
    field: str
    cached: Any
    now: Any


@dataclass(frozen=True)
class Verdict:
    status: str  # hit | miss | unknown | unused
    reason: str
    cache_dir: str
    expected_cost: str | None = None
    differences: list[Difference] = field(default_factory=list)
    record: dict[str, Any] | None = None  # the manifest record that matched, or the closest one

    @property
    def exit_code(self) -> int:
        return {"hit": EXIT_HIT, "unused": EXIT_HIT, "miss": EXIT_MISS}.get(self.status, EXIT_UNKNOWN)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.record is not None:  # the listing of entries is long and not what a reader wants here
            data["record"] = {k: v for k, v in self.record.items() if k != "entries"}
        return data

    def message(self) -> str:
        if self.status in ("hit", "unused"):
            return f"compile cache {self.status}: {self.reason}"
        lines = [f"compile cache {self.status.upper()}: {self.reason}"]
        lines += [f"  {d.field}: cached {d.cached!r}, now {d.now!r}" for d in self.differences]
        if self.expected_cost:
            lines.append(f"  expect graphs to be compiled at start: {self.expected_cost}")
        return "\n".join(lines)


def _diff(cached: dict[str, Any], now: dict[str, Any]) -> list[Difference]:
    keys = sorted(set(cached) | set(now))
    return [Difference(k, cached.get(k), now.get(k)) for k in keys if cached.get(k) != now.get(k)]


def _compared(tools: dict[str, Any]) -> dict[str, Any]:
    return {f"toolchain.{k}": tools.get(k) for k in COMPARED_TOOLCHAIN_KEYS if tools.get(k) is not None}


def expected_cost(plan: PlannedCompile, manifest: dict[str, Any] | None) -> str:
    """What a miss costs, in words: measured when this cache recorded a compile of the same model, else known facts."""
    measured = [c.get("compile_seconds") for c in (manifest or {}).get("compiles", [])
                if c.get("backend") == plan.backend and c.get("compile_seconds")
                and c.get("graph", {}).get("model.num_layers") == plan.model.get("num_layers")
                and c.get("graph", {}).get("model.hidden_size") == plan.model.get("hidden_size")]
    if measured:
        return f"about {max(measured):.0f} s (measured when this model was compiled into the cache)"
    params = int(plan.model.get("parameters") or 0)
    if plan.backend == "neuron":
        if params >= 1_000_000_000:
            return (f"tens of minutes for a {params / 1e9:.0f}B graph on Neuron (about 25 min is quoted for 70B); "
                    "run `compile` for this config and node count first")
        return "minutes on Neuron: run `compile` for this config and node count first"
    if plan.device == "cpu" and params < 50_000_000:
        return f"about {TINY_CPU_COLD_COMPILE_S} s of Inductor C++ compilation for a tiny model on a 2-core CPU"
    return "minutes of Inductor compilation (one graph per transformer block, reused by every layer)"


def _entries_missing(cache: Path, record: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Entries (Neuron) or files (Inductor) the record relies on that are gone or incomplete now."""
    if record.get("backend") == "neuron":
        out = []
        for rel in record.get("entries", []):
            d = cache / rel
            neff = d / "model.neff"
            if not ((d / "model.done").is_file() and neff.is_file() and neff.stat().st_size > 0):
                out.append(rel)
        return out
    return [f["path"] for f in manifest.get("files", []) if not (cache / f["path"]).is_file()]


def verify_against(plan: PlannedCompile, cache_dir: str | Path, fields: dict[str, Any],
                   tools: dict[str, Any]) -> Verdict:
    """verify() with the plan's fields and toolchain given (tests and callers that already have them)."""
    cache = str(cache_dir)
    if plan.backend == "torch" and fields.get("torch_backend.compile") is False:
        return Verdict("unused", "torch_backend.compile is false: nothing is compiled", cache)
    if cache.startswith("s3://"):
        return Verdict("unknown", "the cache is on S3: only local caches are checked", cache)
    root = Path(cache)
    try:
        manifest = read_manifest(root)
    except ValueError as exc:
        return Verdict("unknown", str(exc), cache, expected_cost(plan, None))
    if manifest is None:
        if next(iter_cache_files(root), None) is None:
            return Verdict("miss", f"the cache {cache} is empty", cache, expected_cost(plan, None))
        return Verdict("unknown", f"{cache} holds a {layout_of(root)} cache but no manifest.json saying what it "
                       "was compiled for", cache, expected_cost(plan, None))

    now = fields | _compared(tools)
    candidates = [c for c in manifest["compiles"] if c.get("backend") == plan.backend]
    if not candidates:
        return Verdict("miss", f"the cache holds no {plan.backend} compiles", cache, expected_cost(plan, manifest),
                       _diff({"backend": manifest["compiles"][0].get("backend") if manifest["compiles"] else None},
                             {"backend": plan.backend}))
    scored = sorted(
        ((_diff(c.get("graph", {}) | _compared(c.get("toolchain", {})), now), c) for c in candidates),
        key=lambda item: (len(item[0]), str(item[1].get("created"))),
    )
    diffs, best = scored[0]
    if diffs:
        what = ", ".join(d.field for d in diffs)
        return Verdict("miss", f"no compile in the cache matches this plan; closest differs in {what}", cache,
                       expected_cost(plan, manifest), diffs, best)
    missing = _entries_missing(root, best, manifest)
    if missing:
        return Verdict("miss", f"the matching compile's entries are gone or incomplete: {', '.join(missing[:5])}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""), cache,
                       expected_cost(plan, manifest), [], best)
    return Verdict("hit", f"matches the compile of {best.get('created')} ({best.get('config')})", cache, None, [], best)


def verify(plan: PlannedCompile, cache_dir: str | Path | None = None) -> Verdict:
    """Compare the plan with the manifest of its cache (or cache_dir). Reads files; runs nothing."""
    return verify_against(plan, cache_dir or plan.compile_cache_dir, plan.graph, toolchain(plan.backend))
