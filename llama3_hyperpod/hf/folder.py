"""A local Hugging Face model folder, checked before anything is written (standard library only: the neuron image's
project venv has no torch).

What is read: config.json, the weights as safetensors (one model.safetensors, or model.safetensors.index.json and
the shards its weight_map names; transformers' layout), and the tokenizer files beside them. pytorch_model.bin
(a pickle) is not read. Every file is checked here: a shard the index names but the folder lacks, a file shorter
than its header says, a tensor the index puts in a shard that does not hold it: each is one ConfigError naming the
file. The architecture is compared with the run's model (`architecture_difference`), field by field, in one line.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.fsutil import sha256_file
from llama3_hyperpod.hf.llama_config import LlamaArgs
from llama3_hyperpod.hf.safetensors_io import SafetensorsError, TensorEntry, read_header

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Kept beside an imported or exported model: the tokenizer (transformers' AutoTokenizer reads these) and the
# generation defaults.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class HfFolder:
    """A checked HF folder: its config, every tensor (name -> where its bytes are) and the files read."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    weight_files: list[Path]
    companions: list[Path] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every file the import reads, for the manifest."""
        index = [self.root / INDEX] if (self.root / INDEX).is_file() else []
        return [self.root / CONFIG, *index, *self.weight_files, *self.companions]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtypes(self) -> list[str]:
        return sorted({t.dtype for t in self.tensors.values()})


def read_folder(root: Path) -> HfFolder:
    """Check `root` and everything in it that an import reads; ConfigError (key: the folder) on the first problem."""
    key = str(root)
    if not root.is_dir():
        raise ConfigError(key, "is not a directory (give the Hugging Face model folder: config.json + safetensors)")
    config = _read_json(root / CONFIG, key)
    if not isinstance(config, dict):
        raise ConfigError(key, f"{CONFIG} does not hold a JSON object")
    if (root / INDEX).is_file():
        index = _read_json(root / INDEX, key)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ConfigError(key, f"{INDEX} has no weight_map of tensor names to file names")
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or name.startswith("."):
                raise ConfigError(key, f"{INDEX} names a file outside the folder: {name!r}")
    elif (root / SINGLE).is_file():
        weight_map, names = None, [SINGLE]
    else:
        bins = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (it has {', '.join(bins[:3])}: pickles are not read; save with safe_serialization)" if bins else ""
        raise ConfigError(key, f"holds neither {SINGLE} nor {INDEX}{hint}")
    files = [root / n for n in names]
    for path in files:
        if not path.is_file():
            where = f" (named in {INDEX})" if weight_map is not None else ""
            raise ConfigError(key, f"shard {path.name} is missing{where}")
    tensors: dict[str, TensorEntry] = {}
    for path in files:
        try:
            entries, _ = read_header(path)
        except SafetensorsError as exc:
            raise ConfigError(key, str(exc)) from None
        for name, entry in entries.items():
            if name in tensors:
                raise ConfigError(key, f"tensor {name!r} is in both {tensors[name].file.name} and {path.name}")
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ConfigError(key, f"{path.name} holds tensor {name!r}, which {INDEX} puts "
                                       f"{'in ' + weight_map[name] if name in weight_map else 'nowhere'}")
            tensors[name] = entry
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors:
                raise ConfigError(key, f"{INDEX} puts tensor {name!r} in {file}, which does not hold it")
    companions = [root / n for n in COMPANION_FILES if (root / n).is_file()]
    return HfFolder(root.resolve(), config, tensors, [p.resolve() for p in files], companions)


def _read_json(path: Path, key: str) -> Any:
    if not path.is_file():
        raise ConfigError(key, f"has no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(key, f"{path.name} is not valid JSON ({str(exc).splitlines()[0]})") from None


# ---- architecture ------------------------------------------------------------------------------------------------


def architecture(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields that decide the weights and what they mean, named for people, from an HF config (read by the one
    parser, hf/llama_config.py: both RoPE spellings). ConfigError on `where` when one is missing."""
    args = LlamaArgs.from_hf(hf, where)
    return {
        "model type": hf.get("model_type", "llama"),
        "layers": args.num_layers,
        "heads": args.num_attention_heads,
        "KV heads": args.num_key_value_heads,
        "hidden": args.hidden_size,
        "head dim": args.head_dim,
        "intermediate": args.intermediate_size,
        "vocab": args.vocab_size,
        "rope theta": args.rope_theta,
        "rope scaling": args.rope_scaling,
        "tied embeddings": args.tie_word_embeddings,
    }


def architecture_difference(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str | None:
    """The first field that differs, as 'KV heads 2 there, 4 here', or None."""
    for name, value in ours.items():
        other = theirs.get(name)
        same = (math.isclose(other, value, rel_tol=1e-9) if isinstance(value, float) and isinstance(other, float)
                else other == value)
        if not same:
            return f"{name} {other!r} there, {value!r} in the run's model"
    return None


def check_architecture(folder: HfFolder, run_hf_config: Mapping[str, Any], run_model_key: str) -> None:
    """ConfigError naming the first field where the folder's model is not the run's."""
    theirs = architecture(folder.config, f"{folder.root}/{CONFIG}")
    ours = architecture(run_hf_config, run_model_key)
    if theirs["model type"] != "llama":
        raise ConfigError(str(folder.root), f"model_type {theirs['model type']!r} is not a Llama")
    why = architecture_difference(theirs, ours)
    if why is not None:
        raise ConfigError(str(folder.root), f"is not the run's model ({run_model_key}): {why}")


# ---- files kept beside the result, and the manifest ----------------------------------------------------------------


def sha256_files(paths: Iterable[Path]) -> dict[Path, str]:
    """Plain sha256 of each file (what `sha256sum` prints), files hashed in parallel threads."""
    todo = list(paths)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(todo, pool.map(sha256_file, todo), strict=True))


def file_records(paths: Iterable[Path], base: Path) -> dict[str, dict[str, Any]]:
    """{name relative to base: {bytes, sha256}} for the manifest."""
    todo = list(paths)
    digests = sha256_files(todo)
    return {str(p.relative_to(base)) if p.is_relative_to(base) else str(p): {"bytes": p.stat().st_size,
                                                                             "sha256": digests[p]}
            for p in todo}


def copy_companions(files: Iterable[Path], dest: Path) -> list[Path]:
    """Copy the tokenizer (and generation config) files into `dest`; returns the copies."""
    out = []
    for path in files:
        target = dest / path.name
        shutil.copyfile(path, target)
        out.append(target)
    return out


def tokenizer_files_in(path: str | None) -> list[Path]:
    """The companion files of a tokenizer folder (or of the folder holding a tokenizer.json), if it is local."""
    if not path:
        return []
    where = Path(path)
    folder = where if where.is_dir() else where.parent if where.is_file() else None
    if folder is None:
        return []
    return [folder / n for n in COMPANION_FILES if (folder / n).is_file() and n != "generation_config.json"]
