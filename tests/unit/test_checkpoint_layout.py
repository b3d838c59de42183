"""Which step dirs count as complete and intact checkpoints, what resume skips (and says so), what retention may
delete (only what it could read and is this run's), and that another model's checkpoints are refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from llama3_hyperpod.torch_backend.checkpoint import Checkpointer
from llama3_hyperpod.torch_backend.checkpoint_files import (
    BLOCK,
    DIGEST,
    DONE,
    FORMAT,
    IDENTITY,
    SETASIDE_PREFIX,
    IdentityError,
    check_identity,
    complete_checkpoints,
    list_step_dirs,
    newest_complete,
    problem,
    run_identity,
    step_dir,
)

HF = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300, "bos_token_id": 1}
OURS = run_identity(HF)


def digest(data: bytes) -> str:
    """DIGEST, written out independently of the code under test."""
    blocks = [hashlib.sha256(data[i:i + BLOCK]).digest() for i in range(0, max(len(data), 1), BLOCK)]
    return hashlib.sha256(b"".join(blocks)).hexdigest()


def write_marker(path: Path, files: dict[str, bytes], step: int, **extra: object) -> None:
    listing = {rel: {"bytes": len(data), "digest": digest(data)} for rel, data in files.items()}
    marker = {"format": FORMAT, "digest": DIGEST, "step": step, "files": listing, **extra}
    (path / DONE).write_text(json.dumps(marker))


def fake_checkpoint(root: Path, step: int, *, done: bool = True, size: int = 10,
                    identity: dict[str, object] | None = None) -> Path:
    """A checkpoint dir shaped like the trainer's (files, identity.json, done marker with sizes and digests)."""
    path = step_dir(root, step)
    (path / "rng").mkdir(parents=True)
    files = {".metadata": b"m" * 4, "__0_0.distcp": b"x" * size,
             "rng/rank_00000.pt": b"r", IDENTITY: json.dumps(identity or OURS).encode()}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    if done:
        write_marker(path, files, step)
    return path


def test_the_digest_covers_every_block(tmp_path: Path) -> None:
    from llama3_hyperpod.torch_backend.checkpoint_files import file_digests

    big = tmp_path / "big"
    data = os.urandom(BLOCK * 2 + 12345)
    big.write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    got = file_digests([big, tmp_path / "empty"], threads=3)
    assert got == {big: digest(data), tmp_path / "empty": digest(b"")}
    big.write_bytes(data[:BLOCK * 2 + 100] + b"!" + data[BLOCK * 2 + 101:])  # one byte in the last block
    assert file_digests([big])[big] != digest(data)


def test_complete_needs_done_marker_sizes_and_content(tmp_path: Path) -> None:
    ok = fake_checkpoint(tmp_path, 10)
    assert problem(ok) is None
    assert "no done marker" in str(problem(fake_checkpoint(tmp_path, 20, done=False)))
    truncated = fake_checkpoint(tmp_path, 30)
    (truncated / "__0_0.distcp").write_bytes(b"x" * 3)
    assert "has 3 bytes, the done marker says 10" in str(problem(truncated))
    missing = fake_checkpoint(tmp_path, 40)
    (missing / "rng" / "rank_00000.pt").unlink()
    assert "rng/rank_00000.pt is missing" in str(problem(missing))
    zeroed = fake_checkpoint(tmp_path, 50)
    (zeroed / "__0_0.distcp").write_bytes(b"\0" * 10)  # same size, other bytes: only the hash sees it
    assert problem(zeroed, verify=False) is None
    assert "__0_0.distcp does not have the content the done marker records" in str(problem(zeroed))
    (tmp_path / "step_abc").mkdir()
    (tmp_path / ".tmp-step_0000060").mkdir()
    assert [s for s, _ in list_step_dirs(tmp_path)] == [10, 20, 30, 40, 50]
    assert [s for s, _ in complete_checkpoints(tmp_path, verify=True)] == [10]


@pytest.mark.parametrize(("marker", "expected"), [
    (b"", "unreadable done marker"),
    (b"\xff\xfe garbage", "unreadable done marker"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"format": FORMAT, "digest": DIGEST, "step": 70, "files": None}).encode(), "lists no files"),
    (json.dumps({"format": FORMAT, "digest": DIGEST, "step": 70, "files": {"../x": {"bytes": 1, "digest": "0" * 64}}}
                ).encode(), "bad file name"),
    (json.dumps({"format": FORMAT, "digest": DIGEST, "step": 70, "files": {".metadata": 4}}).encode(), "malformed"),
    (json.dumps({"step": 70, "files": {".metadata": 4}}).encode(), "saved by another version"),
])  # fmt: skip
def test_damaged_done_markers_are_named_not_tracebacks(tmp_path: Path, marker: bytes, expected: str) -> None:
    path = fake_checkpoint(tmp_path, 70)
    (path / DONE).write_bytes(marker)
    assert expected in str(problem(path))


def test_marker_of_another_step_and_links(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path, 5)
    copied = step_dir(tmp_path, 6)
    os.rename(src, copied)  # a checkpoint dir renamed (or copied) to another step: its marker says 5
    assert "the done marker is for step 5, not for step_0000006" in str(problem(copied))
    real = fake_checkpoint(tmp_path / "elsewhere", 7)
    step_dir(tmp_path, 7).symlink_to(real)
    assert "symbolic link" in str(problem(step_dir(tmp_path, 7)))
    linked_file = fake_checkpoint(tmp_path, 8)
    (linked_file / ".metadata").unlink()
    (linked_file / ".metadata").symlink_to(real / ".metadata")
    assert ".metadata is not a regular file" in str(problem(linked_file))


def test_newest_complete_names_what_it_skips(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 15, done=False)
    warnings: list[str] = []
    assert newest_complete(tmp_path, warnings.append) == step_dir(tmp_path, 10)
    assert warnings == [f"skipping checkpoint {step_dir(tmp_path, 15)}: no done marker (the save did not finish)"]
    assert newest_complete(tmp_path / "none", warnings.append) is None


def _checkpointer(run_dir: Path, keep: int) -> tuple[Checkpointer, list[str]]:
    logs: list[str] = []
    return Checkpointer(run_dir, rank=0, world_size=1, keep=keep, async_save=False, hf_config=HF,
                        log=logs.append), logs


def test_prune_deletes_only_what_it_read_and_is_ours(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20, 25):
        fake_checkpoint(root, step)
    (root / "step_0000025" / "__0_0.distcp").write_bytes(b"\0" * 10)  # the newest: corrupt, sizes fine
    fake_checkpoint(root, 12, done=False)  # our own save, interrupted after its rename: ours to remove
    fake_checkpoint(root, 13, done=False, identity={"format": FORMAT, "model": {"hidden_size": 1}})  # another run's
    truncated = fake_checkpoint(root, 3)
    (truncated / "__0_0.distcp").write_bytes(b"x")  # could not be read: stays
    (step_dir(root, 2) / "rng").mkdir(parents=True)
    (step_dir(root, 2) / DONE).write_text('{"files": null}')  # unreadable marker: stays
    foreign = fake_checkpoint(root, 1, identity={"format": FORMAT, "model": {"hidden_size": 1}})
    step_dir(root, 30).symlink_to(fake_checkpoint(tmp_path / "other", 30))  # a link: never followed or deleted
    (root / ".tmp-step_0000035").mkdir()

    ckpt, logs = _checkpointer(tmp_path, keep=2)
    ckpt.prune()
    assert sorted(p.name for p in root.iterdir()) == [
        "step_0000001", "step_0000002", "step_0000003", "step_0000013", "step_0000015", "step_0000020",
        "step_0000025", "step_0000030",
    ]  # fmt: skip
    assert problem(foreign) is None and (tmp_path / "other" / "step_0000030").is_dir()
    assert any("step_0000025 is corrupt" in m and "left in place" in m for m in logs), logs

    ckpt, _ = _checkpointer(tmp_path, keep=-1)
    ckpt.prune()
    assert len(list(root.iterdir())) == 8


def test_another_models_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 5)
    check_identity(root, OURS)  # same model: fine
    wider = run_identity({**HF, "hidden_size": 128})
    with pytest.raises(IdentityError) as err:
        check_identity(root, wider)
    message = str(err.value)
    assert "\n" not in message
    assert "step_0000005: hidden_size 64 there, 128 here" in message and "nothing was deleted" in message
    assert run_identity({**HF, "bos_token_id": 7}) == OURS  # token ids do not change the weights


def test_a_save_does_not_delete_what_is_in_its_way(tmp_path: Path) -> None:
    """The slot of a new save holds a corrupt checkpoint: it is moved aside (kept, named), not deleted."""
    root = tmp_path / "checkpoints"
    corrupt = fake_checkpoint(root, 10)
    (corrupt / "__0_0.distcp").write_bytes(b"\0" * 10)
    ours_interrupted = fake_checkpoint(root, 20, done=False)
    ckpt, logs = _checkpointer(tmp_path, keep=2)
    ckpt._clear_slot(corrupt)
    ckpt._clear_slot(ours_interrupted)
    (aside,) = root.glob(f"{SETASIDE_PREFIX}step_0000010-*")
    assert (aside / "__0_0.distcp").read_bytes() == b"\0" * 10
    assert not corrupt.exists() and not ours_interrupted.exists()
    assert any("moved it to" in m for m in logs)
