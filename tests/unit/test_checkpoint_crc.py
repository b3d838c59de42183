"""Checkpoint files carry no torch CRC-32 of tensor data (checkpoint_save.without_torch_crc32): those records' CRC
field is 0 in every file, whichever thread wrote it (DCP's writer threads, the async save's); the checkpoint still
loads, and a changed byte is still caught, by the checkpoint's own digests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.serialization import config as serialization_config

from llama3_hyperpod.torch_backend.checkpoint import Checkpointer
from llama3_hyperpod.torch_backend.checkpoint_files import step_dir
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs
from llama3_hyperpod.torch_backend.schedule import build_scheduler

HF = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}  # fmt: skip


def _setup(seed: int) -> tuple[Llama, torch.optim.Optimizer, object]:
    model = Llama(LlamaArgs.from_hf(HF))
    model.init_weights(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, "CosineAnnealing", lr=1e-2, warmup_steps=1, max_steps=10, min_lr=1e-3)
    return model, optimizer, scheduler


def _records(saved: Path) -> list[zipfile.ZipInfo]:
    """Every torch.save record of a checkpoint: each DCP item is a whole torch.save zip at its offset in a .distcp."""
    infos = list(zipfile.ZipFile(saved / "rng" / "rank_00000.pt").infolist())
    for item in FileSystemReader(saved).read_metadata().storage_data.values():
        data = (saved / item.relative_path).read_bytes()[item.offset:item.offset + item.length]
        infos += zipfile.ZipFile(io.BytesIO(data)).infolist()
    return infos


@pytest.mark.parametrize("async_save", [False, True])
def test_saves_write_no_torch_crc_and_still_load_and_catch_a_changed_byte(tmp_path: Path, async_save: bool) -> None:
    entry = serialization_config._config["save.compute_crc32"]  # type: ignore[attr-defined]  # read by every thread
    was, was_default = torch.serialization.get_crc32_options(), entry.default
    torch.serialization.set_crc32_options(True)
    entry.default = True
    try:
        model, optimizer, scheduler = _setup(0)
        ckpt = Checkpointer(tmp_path, rank=0, world_size=1, keep=-1, async_save=async_save, hf_config=HF,
                            log=lambda _m: None)
        ckpt.save(1, model, optimizer, scheduler, consumed=0)
        ckpt.wait()
        saved = step_dir(ckpt.root, 1)
        assert len(list(saved.glob("*.distcp"))) >= 2  # written by two threads at least
        # The tensors' bytes (torch keeps a CRC on its few small records: the pickle, format version, alignment).
        records = [r for r in _records(saved) if "/data/" in r.filename and r.file_size > 0]
        assert len(records) > 2 * len(model.state_dict())  # the weights, two moments each, the rng state
        assert all(r.CRC == 0 for r in records), [r.filename for r in records if r.CRC != 0][:3]

        assert ckpt.verify(saved) is None
        fresh, fresh_opt, fresh_sched = _setup(5)
        ckpt.load(saved, fresh, fresh_opt, fresh_sched)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())

        shard = max(saved.glob("*.distcp"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        ckpt._intact.clear()  # forget that it was verified: it is read again
        why = ckpt.verify(saved)
        assert why is not None and shard.name in why
    finally:
        torch.serialization.set_crc32_options(was)
        entry.default = was_default
