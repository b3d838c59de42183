"""Hugging Face weights -> a step-0 checkpoint of a torch-backend run, written tensor by tensor.

The result is a checkpoint in the trainer's own format (checkpoint_files.py: DCP files, model_config.json,
identity.json, a done marker with every file's digest) marked weights-only: it holds the model as full, unsharded
fp32 tensors (written by one process: layout tp 1 x dp 1) and the trainer position, step 0. DCP reshards full
tensors onto any (dp, tp) split at load, so `train` with any layout starts from it, and its optimizer and LR schedule
come from the run's own config (Checkpointer.load).

Memory: DCP's FileSystemWriter keeps every tensor of one output file referenced until that file is closed
(torch 2.13 distributed/checkpoint/filesystem.py:436-451 fills `tensor_dict` for its safetensors mode), so the
writer makes one file per tensor (`single_file_per_rank=False`, filesystem.py:700-704) and the planner produces each
tensor only when DCP asks for it (`lookup_object`, the extension point of DefaultSavePlanner): one decoder layer of
the HF folder is read at a time (hf/tensors.py), never the whole model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from llama3_hyperpod.fsutil import create_durably, fsync_path
from llama3_hyperpod.hf import tensors as hf_tensors
from llama3_hyperpod.hf.folder import HfFolder
from llama3_hyperpod.torch_backend.checkpoint_base import STATE_DICT_OPTIONS
from llama3_hyperpod.torch_backend.checkpoint_files import (
    IDENTITY,
    MODEL_CONFIG,
    WEIGHTS_ONLY,
    file_digests,
    make_marker,
    run_identity,
    step_dir,
)
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs

IMPORT_LAYOUT = {"tp": 1, "dp": 1}  # full tensors, as one process of the trainer would write them


class _Streaming(DefaultSavePlanner):
    """Resolves each model tensor from the HF folder when DCP writes it; the current group stays cached."""

    def __init__(self, folder: HfFolder, plan: hf_tensors.Groups) -> None:
        super().__init__()
        self._folder = folder
        self._plan = plan
        self._group_of = plan.group_for()
        self._index: int | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self.groups_read = 0

    def lookup_object(self, index: MetadataIndex) -> Any:
        prefix = "model."
        if not index.fqn.startswith(prefix):
            return super().lookup_object(index)
        name = index.fqn[len(prefix):]
        group = self._group_of[name]
        if group != self._index:
            self._cache = {}  # the previous group's tensors go before the next group is read
            self._cache = hf_tensors.read_group(self._folder.tensors, self._plan, group, torch.float32)
            self._index = group
            self.groups_read += 1
        return self._cache[name].contiguous()


def write_step0(folder: HfFolder, plan: hf_tensors.Groups, hf_config: dict[str, Any], checkpoints: Path,
                tmp_name: str) -> Path:
    """Write the weights-only step-0 checkpoint into `checkpoints/<tmp_name>`, then rename it to step_0000000.

    On any error the temp dir is removed and nothing else was written.
    """
    final = step_dir(checkpoints, 0)
    tmp = checkpoints / tmp_name
    with torch.device("meta"):
        model = Llama(LlamaArgs.from_hf(hf_config))
    meta_sd = get_model_state_dict(model, options=STATE_DICT_OPTIONS)  # exactly the keys the trainer loads
    if set(meta_sd) != {n for _, names in plan.groups for n in names}:
        raise AssertionError("the trainer's state dict and model.py's mapping disagree on the tensor names")
    tmp.mkdir()
    try:
        state = {"model": meta_sd, "trainer": {"step": 0, "consumed_samples": 0}}
        planner = _Streaming(folder, plan)
        writer = FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1, sync_files=True)
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
        create_durably(tmp / MODEL_CONFIG, json.dumps(hf_config, indent=1).encode())
        create_durably(tmp / IDENTITY, json.dumps(run_identity(hf_config), indent=1).encode())
        on_disk = sorted(p for p in tmp.rglob("*") if p.is_file())
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "digest": d}
                 for p, d in file_digests(on_disk).items()}
        marker = make_marker(0, files, world_size=1, layout=IMPORT_LAYOUT,
                             **{WEIGHTS_ONLY: True, "source": str(folder.root)})
        create_durably(tmp / "done", json.dumps(marker, indent=1).encode())
        fsync_path(tmp, directory=True)
        os.rename(tmp, final)
        fsync_path(checkpoints, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
