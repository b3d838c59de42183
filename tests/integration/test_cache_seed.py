"""Seeding the run-time cache from the baked one with real concurrent processes, as 32 ranks on a node would.

8 processes seed at once: one complete copy results, no reader ever sees a partial MODULE_* entry, no temp names
are left, the manifest's records arrive, and a second seed copies nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama3_hyperpod.cache.manifest import TEMP_MARK, iter_cache_files, read_manifest, update_manifest
from llama3_hyperpod.cache.seed import SeedError, seed_cache
from tests.conftest import REPO

pytestmark = pytest.mark.integration

VDIR = "neuronxcc-2.23.6484.0+4a9b2326"
ENTRY_FILES = ("model.hlo_module.pb", "model.neff", "compile_flags.json", "model.done")
N_ENTRIES = 24
N_PROCS = 8

SEEDER = """
import json, sys
from pathlib import Path
from llama3_hyperpod.cache.seed import SeedError, seed_cache
sys.stdin.readline()  # start together
print(json.dumps(seed_cache(Path(sys.argv[1]), Path(sys.argv[2]), link=sys.argv[3] == "link").to_dict()))
"""


def make_baked(root: Path) -> Path:
    """A baked cache as `build.sh --cache` ships it: Neuron entries, an Inductor dir and a manifest, read-only."""
    for i in range(N_ENTRIES):
        d = root / VDIR / f"MODULE_{i:04d}+5d2d81ce"
        d.mkdir(parents=True)
        for name in ENTRY_FILES:
            (d / name).write_bytes(b"" if name == "model.done" else os.urandom(64 * 1024 + i))
    fx = root / "inductor" / "fxgraph" / "ab"
    fx.mkdir(parents=True)
    (fx / "graph").write_bytes(os.urandom(5000))
    update_manifest(root, {"key": "baked", "backend": "neuron", "toolchain": {"compiler_version": "2.23.6484.0"},
                           "graph": {"layout.num_nodes": 1}, "entries": []})
    for p in [root, *root.rglob("*")]:  # the image's copy is read-only
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.as_posix(): (root / p).read_bytes() for p in iter_cache_files(root)}


def partial_entries(runtime: Path) -> list[str]:
    """MODULE_* dirs visible under their real name but missing files: what the rename-into-place prevents."""
    out = []
    for d in runtime.glob(f"{VDIR}/MODULE_*"):
        with_files = {p.name for p in d.iterdir()} if d.is_dir() else set()
        if TEMP_MARK not in d.name and not set(ENTRY_FILES) <= with_files:
            out.append(d.name)
    return out


@pytest.fixture
def baked(tmp_path: Path) -> Iterator[Path]:
    path = make_baked(tmp_path / "baked")
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_concurrent_seeders_make_one_complete_copy(baked: Path, tmp_path: Path, mode: str) -> None:
    runtime = tmp_path / "node-local" / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", SEEDER, str(baked), str(runtime), mode], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(N_PROCS)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    seen_partial: list[str] = []
    while any(p.poll() is None for p in procs):  # read the run-time dir while they work, as Neuron would
        seen_partial += partial_entries(runtime) if runtime.is_dir() else []
        time.sleep(0.005)
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reports.append(json.loads(out))

    assert seen_partial == []
    assert tree(runtime) == tree(baked)
    assert not [p for p in runtime.rglob("*") if TEMP_MARK in p.name]
    assert sum(r["entries_copied"] for r in reports) == N_ENTRIES  # each entry placed once, by one process
    placed = sum(r["files_copied"] + r["files_linked"] for r in reports)
    assert placed == len(tree(baked))
    assert sorted(r["files_copied"] + r["files_linked"] == 0 for r in reports) == [False] + [True] * (N_PROCS - 1)
    if mode == "link":  # same filesystem: hard links, no bytes copied
        assert sum(r["files_linked"] for r in reports) == placed
    manifest = read_manifest(runtime)
    assert manifest is not None and [c["key"] for c in manifest["compiles"]] == ["baked"]
    assert {f["path"] for f in manifest["files"]} == set(tree(baked))

    again = seed_cache(baked, runtime)
    assert again.changed == 0 and again.entries_copied == 0 and not again.manifest_merged
    assert again.files_skipped == len(tree(baked))


def test_seed_keeps_what_the_run_time_cache_already_has(baked: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    own = runtime / VDIR / "MODULE_mine+00000000"
    own.mkdir(parents=True)
    (own / "model.neff").write_bytes(b"compiled here")
    update_manifest(runtime, {"key": "mine", "backend": "neuron", "toolchain": {}, "graph": {}, "entries": []})
    # An entry interrupted while being compiled at run time: its missing files come from the baked one.
    half = runtime / VDIR / "MODULE_0003+5d2d81ce"
    half.mkdir()
    (half / "model.hlo_module.pb").write_bytes((baked / VDIR / half.name / "model.hlo_module.pb").read_bytes())

    report = seed_cache(baked, runtime, link=False)
    assert report.entries_copied == N_ENTRIES - 1
    assert (own / "model.neff").read_bytes() == b"compiled here"
    assert tree(half) == tree(baked / VDIR / half.name)
    manifest = read_manifest(runtime)
    assert manifest is not None and [c["key"] for c in manifest["compiles"]] == ["mine", "baked"]


def test_no_baked_cache_is_not_an_error(tmp_path: Path) -> None:
    report = seed_cache(tmp_path / "absent", tmp_path / "rt")
    assert report.changed == 0 and not (tmp_path / "rt").exists()


def test_seed_command(baked: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    run = subprocess.run([sys.executable, "-m", "llama3_hyperpod.cache.commands", "seed", "--json", "--copy"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "L3HP_BAKED_CACHE": str(baked), "L3HP_CACHE_DIR": str(runtime)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["entries_copied"] == N_ENTRIES


def test_links_in_the_baked_cache_are_never_followed(tmp_path: Path) -> None:
    """A link to /etc/passwd, a linked MODULE_* entry pointing at a dir elsewhere, a link inside an entry: none of
    them reaches the run-time cache, as a copy or as a hard link (before: copied, or their targets hard-linked)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not part of any cache")
    baked = tmp_path / "baked"
    entry = baked / VDIR / "MODULE_real+5d2d81ce"
    entry.mkdir(parents=True)
    for name in ENTRY_FILES:
        (entry / name).write_bytes(name.encode())
    (entry / "model.log").symlink_to("/etc/passwd")
    (baked / VDIR / "MODULE_linked+5d2d81ce").symlink_to(outside, target_is_directory=True)
    (baked / "passwd").symlink_to("/etc/passwd")
    (baked / "inductor").symlink_to(outside, target_is_directory=True)
    runtime = tmp_path / "rt"
    for link in (True, False):
        report = seed_cache(baked, runtime, link=link)
        seeded = sorted(str(p.relative_to(runtime)) for p in runtime.rglob("*") if p.is_file())
        assert seeded == sorted([*(f"{VDIR}/MODULE_real+5d2d81ce/{n}" for n in ENTRY_FILES), ".seed.lock"])
        assert not any(p.is_symlink() for p in runtime.rglob("*"))
        if link:
            assert report.links_skipped == 4 and report.entries_copied == 1
        shutil.rmtree(runtime)


def test_links_on_the_run_time_side_are_refused(tmp_path: Path, baked: Path) -> None:
    """A run-time cache whose version dir is a link elsewhere: nothing is written through it, one clear error."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runtime = tmp_path / "rt"
    runtime.mkdir()
    (runtime / VDIR).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SeedError) as err:
        seed_cache(baked, runtime)
    assert err.value.key == str(runtime / VDIR) and "symbolic link" in err.value.message
    assert list(elsewhere.iterdir()) == []


def test_seed_errors_are_one_line_through_the_cli(tmp_path: Path, baked: Path) -> None:
    """A malformed baked manifest, and a run-time dir that cannot be written (before: tracebacks)."""
    runtime = tmp_path / "rt"
    env = {**os.environ, "L3HP_BAKED_CACHE": str(baked), "L3HP_CACHE_DIR": str(runtime)}
    manifest = baked / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text('{"compiles": [1, 2]}')
    bad = subprocess.run([sys.executable, "-m", "llama3_hyperpod.cache.commands", "seed"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith(f"error: {manifest}: malformed cache manifest"), bad.stderr
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run-time dir should be")
    env["L3HP_CACHE_DIR"] = str(blocked / "cache")
    unwritable = subprocess.run([sys.executable, "-m", "llama3_hyperpod.cache.commands", "seed"], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=60, check=False)
    assert unwritable.returncode == 2 and len(unwritable.stderr.strip().splitlines()) == 1, unwritable.stderr
    assert "cannot create the run-time cache dir" in unwritable.stderr
