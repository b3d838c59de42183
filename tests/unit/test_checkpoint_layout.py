"""Which step dirs count as complete checkpoints, what resume skips (and says so), what pruning keeps."""

from __future__ import annotations

import json
from pathlib import Path

from llama3_hyperpod.torch_backend.checkpoint import (
    DONE,
    Checkpointer,
    complete_checkpoints,
    list_step_dirs,
    newest_complete,
    problem,
    step_dir,
)


def fake_checkpoint(root: Path, step: int, *, done: bool = True, size: int = 10) -> Path:
    path = step_dir(root, step)
    (path / "rng").mkdir(parents=True)
    files = {".metadata": b"m" * 4, "__0_0.distcp": b"x" * size, "rng/rank_00000.pt": b"r"}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    if done:
        (path / DONE).write_text(json.dumps({"step": step, "files": {k: len(v) for k, v in files.items()}}))
    return path


def test_complete_needs_done_marker_and_listed_sizes(tmp_path: Path) -> None:
    ok = fake_checkpoint(tmp_path, 10)
    assert problem(ok) is None
    assert "no done marker" in str(problem(fake_checkpoint(tmp_path, 20, done=False)))
    truncated = fake_checkpoint(tmp_path, 30)
    (truncated / "__0_0.distcp").write_bytes(b"x" * 3)
    assert "has 3 bytes, the done marker says 10" in str(problem(truncated))
    missing = fake_checkpoint(tmp_path, 40)
    (missing / "rng" / "rank_00000.pt").unlink()
    assert "rng/rank_00000.pt is missing" in str(problem(missing))
    (tmp_path / "step_abc").mkdir()
    (tmp_path / ".tmp-step_0000050").mkdir()
    assert [s for s, _ in list_step_dirs(tmp_path)] == [10, 20, 30, 40]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10]


def test_newest_complete_names_what_it_skips(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 15, done=False)
    warnings: list[str] = []
    assert newest_complete(tmp_path, warnings.append) == step_dir(tmp_path, 10)
    assert warnings == [f"skipping checkpoint {step_dir(tmp_path, 15)}: no done marker (the save did not finish)"]
    assert newest_complete(tmp_path / "none", warnings.append) is None


def test_prune_keeps_newest_k_complete_and_drops_broken_and_temps(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 12, done=False)
    (root / ".tmp-step_0000025").mkdir()
    Checkpointer(tmp_path, rank=0, world_size=1, keep=2, async_save=False).prune()
    assert sorted(p.name for p in root.iterdir()) == ["step_0000015", "step_0000020"]
    Checkpointer(tmp_path, rank=0, world_size=1, keep=-1, async_save=False).prune()
    assert len(list(root.iterdir())) == 2
