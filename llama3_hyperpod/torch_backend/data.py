"""Training batches from the Arrow dataset NxDT reads (`datasets.save_to_disk`: input_ids, labels per row).

Each optimizer step consumes the next `global_batch_size` rows of a sequence that visits every row once per pass:
in order, or (the trainer's default) in a random order per pass drawn from the config's seed, so that consecutive
steps do not all come from the same source file of a packed corpus. Within a step, micro-batch m of dp rank r is the
contiguous slice [m*mbs*dp + r*mbs, +mbs) of those rows, as in Megatron/NxDT's pretraining sampler. Any
(dp, accumulation) split of one global batch therefore sees the same rows, and a resume needs only the step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama3_hyperpod.errors import ConfigError

IGNORE_INDEX = -100


def load_train_dataset(train_dir: str | None, seq_len: int) -> Any:
    """datasets.Dataset with numpy format; ConfigError (data.train_dir) when it is missing or malformed."""
    if not train_dir:
        raise ConfigError("data.train_dir", "is not set: point it at a dataset made by `data prepare`")
    if not Path(train_dir).is_dir():
        raise ConfigError("data.train_dir", f"{train_dir} is not a directory")
    import datasets

    try:
        ds = datasets.load_from_disk(train_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("data.train_dir", f"{train_dir} is not a save_to_disk dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError("data.train_dir", f"{train_dir} holds splits {list(ds)} but no 'train'")
        ds = ds["train"]
    if "input_ids" not in ds.column_names:
        raise ConfigError("data.train_dir", f"{train_dir} has columns {ds.column_names}, needs input_ids (+ labels)")
    if len(ds) == 0:
        raise ConfigError("data.train_dir", f"{train_dir} has no rows")
    row_len = len(ds[0]["input_ids"])
    if row_len < seq_len:
        raise ConfigError(
            "model.encoder_seq_length", f"is {seq_len} but the rows of {train_dir} hold only {row_len} tokens"
        )
    return ds.with_format("numpy")


@dataclass
class Batches:
    """Deterministic micro-batches for one dp rank; step/micro indexing makes resuming trivial."""

    dataset: Any
    seq_len: int
    micro_batch_size: int
    dp: int
    dp_rank: int
    grad_accum_steps: int
    device: str = "cpu"
    row_offset: int = 0  # rows consumed before step 0 of this numbering (a resume after a global batch change)
    shuffle_seed: int | None = None  # None: rows in stored order; else a permutation per pass from (seed, pass)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp * self.grad_accum_steps

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) of shape (mbs, seq); targets are labels shifted left, the last position ignored."""
        start = self.row_offset + step * self.global_batch_size
        start += (micro * self.dp + self.dp_rank) * self.micro_batch_size
        rows = [self.row(start + i) for i in range(self.micro_batch_size)]
        batch = self.dataset[rows]
        tokens = np.asarray(batch["input_ids"], dtype=np.int64)[:, : self.seq_len]
        labels = np.asarray(batch["labels"] if "labels" in batch else batch["input_ids"], dtype=np.int64)
        targets = np.full_like(tokens, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1 : self.seq_len]
        return torch.from_numpy(tokens).to(self.device), torch.from_numpy(targets).to(self.device)

    def row(self, position: int) -> int:
        """The dataset row at this position of the (endless) sequence of passes over the dataset."""
        epoch, index = divmod(position, len(self.dataset))
        if self.shuffle_seed is None:
            return index
        return int(_pass_order(self.shuffle_seed, epoch, len(self.dataset))[index])


@functools.lru_cache(maxsize=2)  # the current pass, and the next one when a step straddles the boundary
def _pass_order(seed: int, epoch: int, rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(rows)


def write_token_dataset(out_dir: Path, tokens: np.ndarray, seq_len: int) -> int:
    """Chunk a token stream into rows of seq_len (labels = input_ids) and save_to_disk; returns the row count."""
    import datasets

    rows = len(tokens) // seq_len
    chunks = tokens[: rows * seq_len].reshape(rows, seq_len).astype(np.int32)
    ds = datasets.Dataset.from_dict({"input_ids": chunks.tolist(), "labels": chunks.tolist()})
    ds.save_to_disk(str(out_dir))
    return rows
