"""The tensors a Llama of a given HF config has, in both namings, and reading them from a folder group by group.

The naming is model.py's alone (`to_hf_state_dict` / `from_hf_state_dict`), applied to meta tensors of the trainer's
own model, so whatever that mapping does (renames today; fused or split tensors tomorrow) the import follows it.
A *group* is the set of HF tensors the mapping turns into ours together: one decoder layer (`model.layers.N.*`), or
one tensor outside the layers. An import holds one group in memory at a time.

Imports only torch and model.py (no config or CLI modules): the neuron plans run it with the SDK's interpreter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.hf.safetensors_io import FLOAT_DTYPES, TensorEntry, read_bytes
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs, from_hf_state_dict, to_hf_state_dict

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SKIPPED = ("rotary_emb.inv_freq",)  # HF's non-parameter buffer, saved by some old checkpoints


def meta_state_dict(hf_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The trainer's model state dict (our names, in its order) as meta tensors: shapes and names, no memory."""
    with torch.device("meta"):
        model = Llama(LlamaArgs.from_hf(dict(hf_config)))
    return dict(model.state_dict())


def expected_hf(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor an HF folder of this model holds (lm_head absent when embeddings are tied)."""
    ours = meta_state_dict(hf_config)
    if hf_config.get("tie_word_embeddings"):
        ours.pop("output.weight", None)
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(ours).items()}


def group_of(hf_name: str) -> str:
    match = _LAYER.match(hf_name)
    return match.group(0) if match else hf_name


@dataclass(frozen=True)
class Groups:
    """Which HF tensors make which of ours: groups (in the trainer's order) of (HF names, our names)."""

    groups: list[tuple[list[str], list[str]]]
    tied: bool

    def group_for(self) -> dict[str, int]:
        """Our name -> index of its group."""
        return {ours: i for i, (_, names) in enumerate(self.groups) for ours in names}


def check_tensors(tensors: Mapping[str, TensorEntry], hf_config: Mapping[str, Any], where: str) -> Groups:
    """ConfigError (key `where`) unless the folder holds exactly this model's tensors, with their shapes, in a float
    dtype; returns how they group."""
    expected = expected_hf(hf_config)
    present = {n: e for n, e in tensors.items() if not n.endswith(SKIPPED)}
    for name, shape in expected.items():
        entry = present.get(name)
        if entry is None:
            raise ConfigError(where, f"has no tensor {name} (the run's model has it)")
        if entry.shape != shape:
            raise ConfigError(where, f"tensor {name} has shape {list(entry.shape)} in {entry.file.name}, the run's "
                                     f"model needs {list(shape)}")
        if entry.dtype not in FLOAT_DTYPES:
            raise ConfigError(where, f"tensor {name} is {entry.dtype}, not a floating-point type")
    for name in present:
        if name not in expected:
            raise ConfigError(where, f"holds tensor {name}, which the run's model does not have")
    ours = meta_state_dict(hf_config)
    tied = bool(hf_config.get("tie_word_embeddings"))
    by_group: dict[str, list[str]] = {}
    for name in expected:
        by_group.setdefault(group_of(name), []).append(name)
    produced: dict[str, str] = {}  # our name -> its group key
    for key, names in by_group.items():
        meta = {n: torch.empty(expected[n], device="meta") for n in names}
        for our_name in from_hf_state_dict(meta):
            produced[our_name] = key
    if tied and "output.weight" in ours:
        produced["output.weight"] = group_of("model.embed_tokens.weight")
    missing = [n for n in ours if n not in produced]
    if missing:
        raise AssertionError(f"model.py's mapping makes no tensor for {missing[:3]}")
    order: list[str] = []
    for our_name in ours:
        if produced[our_name] not in order:
            order.append(produced[our_name])
    groups = [(by_group[k], [n for n in ours if produced[n] == k]) for k in order]
    return Groups(groups, tied)


def read_tensor(entry: TensorEntry, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor from its file (its own buffer), cast to `dtype` when given."""
    raw = read_bytes(entry)
    if entry.nbytes == 0:
        tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
    else:
        tensor = torch.frombuffer(raw, dtype=TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def read_group(tensors: Mapping[str, TensorEntry], plan: Groups, index: int,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our tensors of group `index`, made by model.py's mapping from the group's HF tensors."""
    hf_names, our_names = plan.groups[index]
    ours = from_hf_state_dict({n: read_tensor(tensors[n], dtype) for n in hf_names})
    if plan.tied and "output.weight" in our_names and "output.weight" not in ours:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    return {n: ours[n] for n in our_names}
