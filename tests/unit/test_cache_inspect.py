"""`cache inspect` and `cache prune` on Neuron-layout trees built from the documented layout
(shared/reference/neuron-nxdt.md: neuronxcc-<version>/MODULE_<graph>+<flags>/ with model.hlo_module.pb,
model.neff, compile_flags.json, model.done; *.lock from interrupted compiles; failed compiles kept as failed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llama3_hyperpod.cache.inspect import inspect_cache
from llama3_hyperpod.cache.manifest import read_manifest, update_manifest
from llama3_hyperpod.cache.prune import prune_cache, version_key
from tests.conftest import REPO

VERSION = "2.23.6484.0"
VDIR = f"neuronxcc-{VERSION}+4a9b2326"


def entry(root: Path, name: str, *, version_dir: str = VDIR, neff: bytes | None = b"NEFF" * 100,
          done: bool = True, lock_age: float | None = None, log: bool = False) -> Path:
    d = root / version_dir / name
    d.mkdir(parents=True)
    (d / "model.hlo_module.pb").write_bytes(b"HLO" * 10)
    (d / "compile_flags.json").write_text('["--model-type", "transformer"]')
    if neff is not None:
        (d / "model.neff").write_bytes(neff)
    if done:
        (d / "model.done").write_bytes(b"")
    if log:
        (d / "model.log").write_text("compiler output\n")
    if lock_age is not None:
        lock = d / "model.hlo_module.pb.lock"
        lock.write_bytes(b"")
        old = time.time() - lock_age
        os.utime(lock, (old, old))
    return d


def test_complete_cache_has_no_problems(tmp_path: Path) -> None:
    entry(tmp_path, "MODULE_1+aa")
    entry(tmp_path, "MODULE_2+aa", log=True)
    report = inspect_cache(tmp_path, expected_compiler_version=VERSION)
    assert report.layout == "neuron"
    assert [e.state for e in report.neuron] == ["complete", "complete"]
    assert report.neuron[1].has_log
    assert report.problems == [] and report.ok
    assert report.total_bytes == sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())


def test_locked_failed_and_incomplete_entries(tmp_path: Path) -> None:
    entry(tmp_path, "MODULE_ok+aa")
    entry(tmp_path, "MODULE_running+aa", neff=None, done=False, lock_age=30)
    entry(tmp_path, "MODULE_stale+aa", neff=None, done=False, lock_age=5 * 3600)
    entry(tmp_path, "MODULE_failed+aa", neff=b"")
    entry(tmp_path, "MODULE_partial+aa", done=False)
    report = inspect_cache(tmp_path, expected_compiler_version=VERSION)
    assert {e.name: e.state for e in report.neuron} == {
        "MODULE_ok+aa": "complete", "MODULE_running+aa": "locked", "MODULE_stale+aa": "locked",
        "MODULE_failed+aa": "failed", "MODULE_partial+aa": "incomplete",
    }
    kinds = {(p.kind, p.path.split("/")[-1], p.severity) for p in report.problems}
    assert kinds == {
        ("lock", "MODULE_running+aa", "warning"),
        ("stale-lock", "MODULE_stale+aa", "error"),
        ("failed", "MODULE_failed+aa", "error"),
        ("incomplete", "MODULE_partial+aa", "error"),
    }
    assert not report.ok
    assert report.counts() == {"complete": 1, "locked": 2, "failed": 1, "incomplete": 1}


def test_wrong_compiler_version(tmp_path: Path) -> None:
    entry(tmp_path, "MODULE_1+aa", version_dir="neuronxcc-2.16.372.0+4a9b2326")
    report = inspect_cache(tmp_path, expected_compiler_version=VERSION)
    [problem] = report.problems
    assert problem.kind == "version-mismatch"
    assert "2.16.372.0" in problem.message and VERSION in problem.message
    # The pip version has no build hash; the cache dir's does: they still match.
    assert inspect_cache(tmp_path, expected_compiler_version="2.16.372.0").ok


def test_manifest_version_disagreeing_with_the_tree(tmp_path: Path) -> None:
    entry(tmp_path, "MODULE_1+aa")
    update_manifest(tmp_path, {"key": "k", "backend": "neuron", "toolchain": {"compiler_version": "2.16.372.0"},
                               "graph": {}, "entries": []})
    kinds = [p.kind for p in inspect_cache(tmp_path).problems]
    assert kinds == ["version-mismatch"]


def test_inductor_cache_summary(tmp_path: Path) -> None:
    for sub, n in (("fxgraph", 3), ("aotautograd", 2)):
        for i in range(n):
            path = tmp_path / "inductor" / sub / f"h{i}" / "entry"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"x" * 10)
    report = inspect_cache(tmp_path)
    assert report.layout == "inductor"
    assert {(g.name, g.files, g.size) for g in report.inductor} == {("inductor/fxgraph", 3, 30),
                                                                   ("inductor/aotautograd", 2, 20)}


def cache_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llama3_hyperpod.cache.commands", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)


def test_inspect_command(tmp_path: Path) -> None:
    entry(tmp_path, "MODULE_1+aa")
    ok = cache_cli("inspect", str(tmp_path), "--expected-version", VERSION)
    assert ok.returncode == 0, ok.stderr
    assert "MODULE_1+aa" in ok.stdout and "complete" in ok.stdout
    entry(tmp_path, "MODULE_2+aa", neff=b"")
    bad = cache_cli("inspect", str(tmp_path), "--expected-version", VERSION, "--json")
    assert bad.returncode == 1
    data = json.loads(bad.stdout)
    assert data["counts"] == {"complete": 1, "failed": 1} and not data["ok"]
    missing = cache_cli("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


# ---------------------------------------------------------------------------------------------------- prune


def test_versions_sort_numerically() -> None:
    names = ["neuronxcc-2.9.0.1+a", "neuronxcc-2.16.372.0+b", "neuronxcc-2.14.213.0+c"]
    assert sorted(names, key=version_key)[-1] == "neuronxcc-2.16.372.0+b"


def test_prune_keeps_the_newest_versions(tmp_path: Path) -> None:
    for v in ("2.9.0.1+a", "2.16.372.0+b", "2.14.213.0+c"):
        entry(tmp_path, "MODULE_1+aa", version_dir=f"neuronxcc-{v}")
    update_manifest(tmp_path, {"key": "old", "backend": "neuron", "toolchain": {"compiler_version": "2.9.0.1"},
                               "graph": {}, "entries": []})
    update_manifest(tmp_path, {"key": "new", "backend": "neuron", "toolchain": {"compiler_version": "2.16.372.0"},
                               "graph": {}, "entries": []})
    dry = prune_cache(tmp_path, 2, dry_run=True)
    assert dry.removed == ["neuronxcc-2.9.0.1+a"] and (tmp_path / "neuronxcc-2.9.0.1+a").is_dir()
    report = prune_cache(tmp_path, 2)
    assert report.kept == ["neuronxcc-2.16.372.0+b", "neuronxcc-2.14.213.0+c"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == report.kept[::-1]
    manifest = read_manifest(tmp_path)
    assert manifest is not None
    assert [c["key"] for c in manifest["compiles"]] == ["new"]
    assert not any(f["path"].startswith("neuronxcc-2.9.") for f in manifest["files"])
    out = cache_cli("prune", str(tmp_path), "--keep", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["removed"] == ["neuronxcc-2.14.213.0+c"]
