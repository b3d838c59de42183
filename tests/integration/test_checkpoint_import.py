"""`checkpoint import` for real: a tiny Llama made and saved by transformers (random init, safetensors sharded into
several files), imported by the CLI, trained one step with TP2 x DP2 on 4 gloo ranks (the step-1 loss equals
transformers' loss on the same first batch), exported back bit for bit; bad folders refused in one line with nothing
written; the neuron plan's own steps (consolidate, to-hf) run with real files, and its failure leaves nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llama3_hyperpod.torch_backend.checkpoint_files import WEIGHTS_ONLY, problem, read_marker, step_dir
from tests.conftest import CONFIG_TINY, REPO, run_cli
from tests.token_data import write_byte_text_dataset

pytestmark = pytest.mark.integration

SEQ = 64
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "rope_theta": 500000.0,
         "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False}
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
                   "tokenizer_config.json": '{"model_max_length": 128}\n',
                   "special_tokens_map.json": '{"bos_token": "<s>"}\n'}
COMMON = ["model.encoder_seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=8",
          "torch_backend.shuffle=false", "torch_backend.compile=false", "trainer.max_steps=1"]


def save_llama(out: Path, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config: dict[str, Any] = dict(SHAPE)
    model = LlamaForCausalLM(LlamaConfig(**config))
    torch.nn.Module.to(model, dtype)
    model.save_pretrained(out, max_shard_size="100KB")  # ~430 kB of weights: five shards + the index
    for name, text in TOKENIZER_FILES.items():
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = save_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")
    assert len(list(out.glob("model-*.safetensors"))) >= 2 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "bytes64"
    write_byte_text_dataset(out, seq_len=SEQ, max_bytes=SEQ * 32)
    return out


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def import_argv(hf: Path, out: Path, run: str, *extra: str, model: Path | None = None) -> list[str]:
    return ["checkpoint", "import", str(hf), str(CONFIG_TINY), f"model.model_config={model or hf}", *COMMON,
            "--backend", "torch-cpu", "--output-dir", str(out), "--run-name", run, *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_import_trains_tp2_dp2_with_transformers_loss_and_exports_bit_for_bit(hf_dir: Path, dataset: Path,
                                                                              tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    out = tmp_path / "runs"
    done = run_cli(*import_argv(hf_dir, out, "imported"))
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = out / "imported"
    step0 = step_dir(run_dir / "checkpoints", 0)
    assert problem(step0, verify=True) is None  # complete and intact: every file's digest as the trainer checks
    marker, _ = read_marker(step0)
    assert marker is not None and marker[WEIGHTS_ONLY] is True and marker["layout"] == {"tp": 1, "dp": 1}

    # the manifest: the source, every file read with its sha256, the tokenizer files kept byte for byte
    manifest = json.loads((run_dir / "import" / "manifest.json").read_text())
    assert manifest["source"] == str(hf_dir.resolve()) and manifest["backend"] == "torch"
    shards = sorted(p.name for p in hf_dir.glob("model-*.safetensors"))
    assert set(shards) | {"config.json", "model.safetensors.index.json", *TOKENIZER_FILES} <= set(manifest["files"])
    for name, record in manifest["files"].items():
        assert record["sha256"] == hashlib.sha256((hf_dir / name).read_bytes()).hexdigest(), name
    for name, text in TOKENIZER_FILES.items():
        assert (run_dir / "import" / name).read_text() == text
    assert manifest["config"]["model"]["num_hidden_layers"] == 2

    again = run_cli(*import_argv(hf_dir, out, "imported"))
    assert again.returncode == 2 and "already has imported weights" in again.stderr

    # export after 0 steps: the very tensors of the HF folder
    exported = tmp_path / "export0"
    back = run_cli("checkpoint", "export", str(step0), str(exported))
    assert back.returncode == 0, back.stderr
    original, roundtrip = hf_tensors(hf_dir), hf_tensors(exported)
    assert sorted(roundtrip) == sorted(original)
    for name, tensor in original.items():
        assert roundtrip[name].dtype == tensor.dtype and torch.equal(roundtrip[name], tensor), name

    # one step with TP2 x DP2 on 4 gloo ranks, through the CLI, launcher and torchrun
    env = {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    trained = run_cli("train", str(CONFIG_TINY), f"model.model_config={hf_dir}", *COMMON, f"data.train_dir={dataset}",
                      "trainer.devices=4", "distributed_strategy.tensor_model_parallel_size=2",
                      "--backend", "torch-cpu", "--output-dir", str(out), "--run-name", "imported", env=env,
                      timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    log = trained.stdout + trained.stderr
    assert "tp 2 x dp 2" in log
    assert f"started from imported weights {step0}" in log and "resharded from tp 1 x dp 1 to tp 2 x dp 2" in log
    loss = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # transformers' loss on the first batch the trainer draws: stored order (shuffle false), rows 0..7 of step 0
    import datasets

    rows = datasets.load_from_disk(str(dataset)).with_format("numpy")[list(range(8))]
    tokens = torch.from_numpy(np.asarray(rows["input_ids"], dtype=np.int64)[:, :SEQ])
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        expected = model(input_ids=tokens, labels=tokens).loss.item()
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", ["layers", "kv_heads", "vocab", "missing_shard", "truncated"])
def test_bad_folders_exit_2_in_one_line_and_write_nothing(case: str, hf_dir: Path, tmp_path: Path) -> None:
    folder, model = hf_dir, None
    if case in ("layers", "kv_heads", "vocab"):  # the run's model differs from the folder's
        changed = {"layers": {"num_hidden_layers": 3}, "kv_heads": {"num_key_value_heads": 4},
                   "vocab": {"vocab_size": 512}}[case]
        model = tmp_path / "run-model.json"
        model.write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()), **changed}))
    else:
        folder = tmp_path / "hf"
        shutil.copytree(hf_dir, folder)
        shard = sorted(folder.glob("model-*.safetensors"))[1]
        if case == "missing_shard":
            shard.unlink()
        else:
            with shard.open("r+b") as f:
                f.truncate(shard.stat().st_size - 100)
    out = tmp_path / "runs"
    done = run_cli(*import_argv(folder, out, "bad", model=model))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    want = {"layers": "layers 2 there, 3 in the run's model", "kv_heads": "KV heads 2 there, 4 in the run's model",
            "vocab": "vocab 256 there, 512 in the run's model", "missing_shard": "is missing (named in",
            "truncated": "(truncated)"}[case]
    assert want in lines[0]
    assert not out.exists()


def test_an_import_the_run_would_not_start_from_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    for extra, key in ((["exp_manager.resume_if_exists=false"], "exp_manager.resume_if_exists: is false"),
                       ([f"exp_manager.resume_from_checkpoint={tmp_path}"], "exp_manager.resume_from_checkpoint")):
        done = run_cli(*import_argv(hf_dir, out, "r", *extra))
        assert done.returncode == 2 and done.stderr.strip().startswith(f"error: {key}"), done.stderr
        assert not out.exists()


def test_consolidate_step_writes_the_state_dict_the_converter_loads(tmp_path: Path) -> None:
    """The neuron plan's step 2 with real files: one torch.load()able dict of HF names and dtypes, bit for bit."""
    hf = save_llama(tmp_path / "hf", dtype=torch.bfloat16)
    config = tmp_path / "config.json"
    shutil.copyfile(hf / "config.json", config)
    out = tmp_path / "pytorch_model.bin"
    done = subprocess.run([sys.executable, "-m", "llama3_hyperpod.hf.steps", "consolidate", "--hf-dir", str(hf),
                           "--config", str(config), "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    loaded = torch.load(out, map_location="cpu", weights_only=True)  # what load_full_state does (731-738)
    original = hf_tensors(hf)
    assert sorted(loaded) == sorted(original)
    for name, tensor in original.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor), name
    assert list(tmp_path.glob(".pytorch_model.bin.tmp-*")) == []


def test_to_hf_step_turns_a_full_state_dict_into_hf_safetensors(tmp_path: Path) -> None:
    """The export's step 3: a full state dict as the converter's save_full writes it -> HF files transformers loads."""
    from transformers import LlamaForCausalLM

    hf = save_llama(tmp_path / "hf", dtype=torch.bfloat16)
    original = hf_tensors(hf)
    (tmp_path / "full").mkdir()
    torch.save(original, tmp_path / "full" / "checkpoint.pt")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "llama3_hyperpod.hf.steps", "to-hf", "--full-state",
                           str(tmp_path / "full" / "checkpoint.pt"), "--config", str(hf / "config.json"), "--out",
                           str(out), "--max-shard-bytes", "150000"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) >= 2
    # step 4: config.json, tokenizer files, manifest beside them (the source: shards of an NxDT checkpoint's model/)
    from llama3_hyperpod.checkpoint_export import complete_export
    from llama3_hyperpod.config import load_config

    source = tmp_path / "x.ckpt"
    (source / "model").mkdir(parents=True)
    shard = source / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    shard.write_bytes(b"shard")
    rc = load_config(CONFIG_TINY, [f"model.model_config={hf}", "model.encoder_seq_length=64"])
    complete_export(out, rc, source=source, layout={"tp": 1}, converter=["python", "convert"],
                    tokenizer=[hf / n for n in TOKENIZER_FILES], final=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {"model/dp_rank_00_tp_rank_00_pp_rank_00.pt": {
        "bytes": 5, "sha256": hashlib.sha256(b"shard").hexdigest()}}
    for name, record in manifest["result"]["files"].items():
        assert record["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert {"config.json", *TOKENIZER_FILES} <= set(manifest["result"]["files"])
    loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name

    # a full state of another shape (what a mis-split fused QKV gives) is refused in one line, nothing written
    broken = dict(original)
    broken["model.layers.0.self_attn.q_proj.weight"] = broken["model.layers.0.self_attn.q_proj.weight"][:32]
    torch.save(broken, tmp_path / "full" / "checkpoint.pt")
    bad = subprocess.run([sys.executable, "-m", "llama3_hyperpod.hf.steps", "to-hf", "--full-state",
                          str(tmp_path / "full" / "checkpoint.pt"), "--config", str(hf / "config.json"), "--out",
                          str(tmp_path / "out2")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "q_proj.weight has shape [32, 64]" in bad.stderr and not (tmp_path / "out2").exists()


def test_neuron_import_that_fails_half_way_leaves_nothing(hf_dir: Path, tmp_path: Path) -> None:
    """The neuron plan run for real up to a failing step (an SDK interpreter without torch): the run dir is gone."""
    examples = tmp_path / "examples"
    (examples / "checkpoint_converter_scripts").mkdir(parents=True)
    # The plan refuses to start without NxDT's converter (not available here), so a placeholder stands at its path;
    # the run must fail before it: were it started, it would leave a file behind and the test would fail.
    reached = tmp_path / "converter-was-started"
    (examples / "checkpoint_converter_scripts" / "checkpoint_converter.py").write_text(
        f"open({str(reached)!r}, 'w').close()\n")
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    assert system_python is not None
    probe = subprocess.run([system_python, "-c", "import torch"], capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.fail(f"{system_python} imports torch: pick an interpreter without it for this test")
    out = tmp_path / "runs"
    done = run_cli("checkpoint", "import", str(hf_dir), str(REPO / "configs" / "tiny_neuron.yaml"),
                   f"model.model_config={hf_dir}", "model.encoder_seq_length=64", "--backend", "neuron",
                   "--output-dir", str(out), "--run-name", "n", "--nxdt-examples", str(examples),
                   env={"L3HP_SDK_PYTHON": system_python})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "step 2/4 (consolidate" in done.stderr and "nothing was kept" in done.stderr
    assert "ModuleNotFoundError" in done.stderr
    assert not (out / "n").exists() and not reached.exists()
