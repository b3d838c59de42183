"""Shared test helpers: paths of the repo and of the reference facts, and a CLI runner on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CONFIG_8B = CONFIGS / "llama3_8b_trn1.yaml"
CONFIG_TINY = CONFIGS / "tiny_cpu.yaml"
REFERENCE = REPO.parent / "shared" / "reference"
NXDT_CONF = REPO.parent / "shared" / "nxdt" / "conf"  # NxDT's own example configs, unchanged (test data)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python entrypoint.py ARGS` as a user would, in a fresh process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def neuron_reference() -> str:
    """The Neuron/NxDT facts the plan must agree with (shared/reference/neuron-nxdt.md, beside the repo in CI)."""
    path = REFERENCE / "neuron-nxdt.md"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with shared/ beside the repository")
        pytest.skip(f"{path} not present in this checkout")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def nxdt_conf() -> Path:
    """NxDT's own example configs (shared/nxdt/conf, beside the repo in CI)."""
    if not NXDT_CONF.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{NXDT_CONF} is missing: CI must run with shared/ beside the repository")
        pytest.skip(f"{NXDT_CONF} not present in this checkout")
    return NXDT_CONF


SMALL_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64, "rope_theta": 10000.0,
               "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run dir of a 70k-parameter Llama (checkpoints at steps 1 and 2, about 1 MB each) for damage tests."""
    import json

    import torch

    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.torch_backend.train import train
    from tests.token_data import write_byte_text_dataset

    root = tmp_path_factory.mktemp("small")
    (root / "model.json").write_text(json.dumps(SMALL_MODEL))
    write_byte_text_dataset(root / "data", seq_len=32, max_bytes=32 * 4 * 4)
    torch.set_num_threads(1)
    rc = load_config(CONFIG_TINY, [
        f"model.model_config={root / 'model.json'}", "model.encoder_seq_length=32", "data.micro_batch_size=4",
        "data.global_batch_size=4", f"data.train_dir={root / 'data'}", "trainer.max_steps=2",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
        "exp_manager.checkpoint_callback_params.save_top_k=-1", "model.optim.sched.warmup_steps=1",
    ])
    train(rc, root / "run", echo=False)
    return root / "run"
