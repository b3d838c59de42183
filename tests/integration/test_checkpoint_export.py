"""`checkpoint export`: a training checkpoint -> HF safetensors + config.json that
transformers' LlamaForCausalLM loads and that computes the same logits as our model with the checkpoint's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from llama3_hyperpod.config import load_config
from llama3_hyperpod.torch_backend.checkpoint_commands import checkpoint, load_model_state
from llama3_hyperpod.torch_backend.checkpoint_files import CHECKPOINTS
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs
from llama3_hyperpod.torch_backend.train import train
from tests.conftest import CONFIG_TINY, run_cli
from tests.token_data import write_byte_text_dataset

pytestmark = pytest.mark.integration


def test_export_loads_in_transformers_with_the_same_logits(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    data = tmp_path / "data"
    write_byte_text_dataset(data, seq_len=64, max_bytes=64 * 64)
    rc = load_config(CONFIG_TINY, ["trainer.max_steps=3", "model.encoder_seq_length=64", "data.micro_batch_size=4",
                                   "data.global_batch_size=4", f"data.train_dir={data}"])
    train(rc, tmp_path / "run", echo=False)

    out = tmp_path / "hf"
    result = run_cli("checkpoint", "export", str(tmp_path / "run"), str(out))  # the run dir: its newest
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'run' / CHECKPOINTS}/step_0000003" in result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ours = Llama(LlamaArgs.from_hf(json.loads((out / "config.json").read_text())))
    ours.load_state_dict(load_model_state(tmp_path / "run" / CHECKPOINTS / "step_0000003"))
    ours.eval()
    tokens = torch.randint(0, rc.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)

    listed = CliRunner().invoke(checkpoint, ["list", str(tmp_path / "run")])
    assert "3  " in listed.output and "complete" in listed.output
    bad = CliRunner().invoke(checkpoint, ["export", str(tmp_path / "data"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "holds no complete checkpoint" in bad.output
