"""The async save keeps its staging copy for the next save: each checkpoint must still hold its own step's state."""

from __future__ import annotations

from pathlib import Path

import torch

from llama3_hyperpod.torch_backend.checkpoint import Checkpointer
from llama3_hyperpod.torch_backend.checkpoint_files import step_dir
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs
from llama3_hyperpod.torch_backend.schedule import build_scheduler

HF = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}  # fmt: skip


def _setup(seed: int) -> tuple[Llama, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = Llama(LlamaArgs.from_hf(HF))
    model.init_weights(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, "CosineAnnealing", lr=1e-2, warmup_steps=1, max_steps=10, min_lr=1e-3)
    return model, optimizer, scheduler


def _step(model: Llama, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    tokens = torch.randint(0, HF["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)


def test_each_async_checkpoint_holds_its_own_step_through_the_kept_staging_copy(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup(0)
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1, keep=-1, async_save=True, hf_config=HF, log=lambda _m: None)
    snapshots = {}
    for step in (1, 2, 3):
        _step(model, optimizer, scheduler)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save(step, model, optimizer, scheduler, consumed=0)
        stager = ckpt._stager
        _step(model, optimizer, scheduler)  # changes the weights while (or after) the save writes
        ckpt.wait()
        assert ckpt._stager is stager is not None  # one staging copy, reused by every save
    for step, expected in snapshots.items():
        fresh, fresh_opt, fresh_sched = _setup(5)
        saved = step_dir(ckpt.root, step)
        assert ckpt.verify(saved) is None
        ckpt.load(saved, fresh, fresh_opt, fresh_sched)
        loaded = fresh.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), f"step {step} holds another state"
    assert not torch.equal(snapshots[1]["output.weight"], snapshots[3]["output.weight"])  # the steps differ
