"""The safetensors reader/writer and the HF folder checks, on real files (the writer's output read back by the
safetensors library itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.hf import safetensors_io as st
from llama3_hyperpod.hf.folder import architecture, check_architecture, read_folder

CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16, "rope_theta": 500000.0}


def test_writer_output_is_read_by_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.float32).to(torch.bfloat16),
               "c": torch.zeros(0, 4)}
    specs = [st.TensorSpec(n, {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], tuple(t.shape))
             for n, t in tensors.items()]
    writer = st.Writer(tmp_path / "w.safetensors", specs, metadata={"format": "pt"})
    for name, tensor in tensors.items():
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        writer.write(name, data[:5])  # in pieces, as the export streams them
        writer.write(name, data[5:])
    writer.close()
    back = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    entries, metadata = st.read_header(tmp_path / "w.safetensors")
    assert metadata == {"format": "pt"} and [e.name for e in entries.values()] == ["a", "b", "c"]
    assert st.read_bytes(entries["a"]) == tensors["a"].view(torch.uint8).numpy().tobytes()
    with pytest.raises(ValueError, match="unexpected data"):
        st.Writer(tmp_path / "x.safetensors", specs).write("b", b"")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: raw[:5], "too few for a safetensors header"),
    (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "declares a 1000000000-byte header"),
    (lambda raw: raw[:-4], "(truncated)"),
    (lambda raw: raw[:8] + b"x" + raw[9:], "is not JSON"),
    (lambda raw: raw.replace(b'"F32"', b'"F99"'), "unknown dtype 'F99'"),
])
def test_reader_names_what_is_wrong(damage: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(st.SafetensorsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        st.read_header(path)


def _folder(tmp_path: Path, index: dict[str, str] | None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    save_file({"x": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"y": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    if index is not None:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return tmp_path


@pytest.mark.parametrize(("index", "message"), [
    ({"x": "a.safetensors", "y": "a.safetensors", "w": "b.safetensors"},
     "b.safetensors holds tensor 'y', which model.safetensors.index.json puts in a.safetensors"),
    ({"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}, "puts tensor 'z' in b.safetensors, which "
                                                                          "does not hold it"),
    ({"x": "../a.safetensors"}, "names a file outside the folder"),
    (None, "holds neither model.safetensors nor model.safetensors.index.json"),
])
def test_index_and_shards_must_agree(index: dict[str, str] | None, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        read_folder(_folder(tmp_path, index))


def test_architecture_reads_both_rope_spellings_and_names_the_difference(tmp_path: Path) -> None:
    classic = {**CONFIG, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {k: v for k, v in CONFIG.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert architecture(classic, "a") == architecture(v5, "b")
    plain = architecture({**CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "c")
    assert plain == architecture(CONFIG, "d") and plain["rope scaling"] is None

    folder = _folder(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    for change, message in ((dict(tie_word_embeddings=True), "tied embeddings False there, True"),
                            (dict(rope_theta=10000.0), "rope theta 500000.0 there, 10000.0"),
                            (dict(intermediate_size=128), "intermediate 64 there, 128")):
        with pytest.raises(ConfigError, match=message):
            check_architecture(read_folder(folder), {**CONFIG, **change}, "model.model_config")
    check_architecture(read_folder(folder), CONFIG, "model.model_config")


def test_the_sdk_run_steps_import_only_torch_and_the_standard_library() -> None:
    """hf/steps.py runs with the SDK's interpreter (PYTHONPATH at the project), which has torch but none of the
    project venv's packages: its imports must stay torch, model.py and stdlib-only modules."""
    import subprocess
    import sys

    probe = ("import sys, llama3_hyperpod.hf.steps; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'omegaconf', 'hydra', 'click', 'yaml', "
             "'datasets', 'transformers', 'safetensors', 'rich', 'psutil', 'tokenizers'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
