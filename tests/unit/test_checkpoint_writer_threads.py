"""A DCP writer thread that fails must fail the save: DCP itself drops that thread's error (checkpoint_save.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from llama3_hyperpod.torch_backend.checkpoint_base import root_cause
from llama3_hyperpod.torch_backend.checkpoint_save import all_written, write_state


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(256, 256, generator=gen) for i in range(4)}


def test_every_item_is_written_by_a_healthy_save(tmp_path: Path) -> None:
    metadata = write_state(_state(), tmp_path, no_dist=True, threads=2)
    assert sorted(p.name for p in tmp_path.glob("*.distcp")) == ["__0_0.distcp", "__0_1.distcp"]
    assert all_written(metadata) is metadata


@pytest.mark.parametrize("blocked", ["__0_0.distcp", "__0_1.distcp"])
def test_a_shard_that_cannot_be_written_fails_the_save(tmp_path: Path, blocked: str) -> None:
    """One of the two shard files is a directory, so whichever thread takes it fails to open it. When that is DCP's
    extra thread (it usually takes the first file), dcp.save alone returns as if all went well, with two of the
    four tensors unwritten; write_state raises either way."""
    (tmp_path / blocked).mkdir()
    with pytest.raises((OSError, CheckpointException)) as failed:  # ours, or DCP's when its main thread hit it
        write_state(_state(), tmp_path, no_dist=True, threads=2)
    reason = root_cause(failed.value)
    assert "items were not written" in reason or "Is a directory" in reason, reason
