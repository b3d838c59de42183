"""A DCP writer thread that fails must fail the save: DCP itself drops that thread's error (checkpoint_save.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from llama3_hyperpod.torch_backend.checkpoint_base import root_cause
from llama3_hyperpod.torch_backend.checkpoint_save import all_written, write_state, writer_thread_errors


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(256, 256, generator=gen) for i in range(4)}


def test_every_item_is_written_by_a_healthy_save(tmp_path: Path) -> None:
    metadata = write_state(_state(), tmp_path, no_dist=True, threads=2)
    assert sorted(p.name for p in tmp_path.glob("*.distcp")) == ["__0_0.distcp", "__0_1.distcp"]
    assert all_written(metadata, []) is metadata


def test_items_missing_from_the_metadata_fail_even_without_a_kept_error(tmp_path: Path) -> None:
    metadata = write_state(_state(), tmp_path, no_dist=True, threads=2)
    metadata.storage_data = dict(list(metadata.storage_data.items())[:2])
    with pytest.raises(OSError, match=r"2 of 4 items were not written \(first: w\d\): a checkpoint writer thread "
                                      r"failed \(no error kept\)"):
        all_written(metadata, [])


@pytest.mark.parametrize("blocked", ["__0_0.distcp", "__0_1.distcp"])
def test_a_shard_that_cannot_be_written_fails_the_save(tmp_path: Path, blocked: str,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """One of the two shard files is a directory, so whichever thread takes it fails to open it. When that is DCP's
    extra thread (it usually takes the first file), dcp.save alone returns as if all went well, with two of the
    four tensors unwritten; write_state raises either way."""
    (tmp_path / blocked).mkdir()
    with pytest.raises((OSError, CheckpointException)) as failed:  # the thread's own, or DCP's from its main thread
        write_state(_state(), tmp_path, no_dist=True, threads=2)
    reason = root_cause(failed.value)
    assert "Is a directory" in reason and blocked in reason, reason  # the real cause, whichever thread hit it
    assert "Traceback" not in capfd.readouterr().err  # kept for the one-line error, not printed by the thread


def test_the_hook_keeps_only_dcp_writer_threads_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The async save's path takes the same hook (checkpoint_save.py): a thread named as DCP names its writers has
    its error kept, any other thread's goes on to the hook that was there before."""
    passed_on: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: passed_on.append(str(args.exc_value)))

    def fail(message: str) -> None:
        raise OSError(message)

    hook = writer_thread_errors()
    for name in ("Thread-7 (_write_files_from_queue)", "some-other-thread"):
        thread = threading.Thread(target=fail, args=(f"from {name}",), name=name)
        thread.start()
        thread.join()
    assert [str(e) for e in hook.take()] == ["from Thread-7 (_write_files_from_queue)"]
    assert hook.take() == []
    assert passed_on == ["from some-other-thread"]
    assert writer_thread_errors() is hook  # in place already: not wrapped twice
