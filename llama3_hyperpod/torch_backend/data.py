"""Training batches from the Arrow dataset NxDT reads (`datasets.save_to_disk`: input_ids, labels per row).

Each optimizer step consumes the next `global_batch_size` rows of a sequence that visits every row once per pass:
in order, or (the trainer's default) in a random order per pass drawn from the config's seed, so that consecutive
steps do not all come from the same source file of a packed corpus. Within a step, micro-batch m of dp rank r is the
contiguous slice [m*mbs*dp + r*mbs, +mbs) of those rows, as in Megatron/NxDT's pretraining sampler. Any
(dp, accumulation) split of one global batch therefore sees the same rows, and a resume needs only the step.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama3_hyperpod.errors import ConfigError

IGNORE_INDEX = -100


class ArrowRows:
    """The rows of a `save_to_disk` dataset, read with pyarrow alone: its Arrow stream files, memory-mapped.

    `datasets` writes a Dataset as state.json (listing its data files) + `data-NNNNN-of-NNNNN.arrow` (Arrow IPC
    streams), a DatasetDict as dataset_dict.json + a folder per split. Importing `datasets` to read them added 2.6 s to
    `import torch` on a busy 2-core machine (pyarrow alone: nothing); pyarrow is what it reads them with underneath.
    Rows are numpy views of the mapped buffers (`_ListColumn`): pyarrow's compute functions and `to_numpy` import
    pandas on first use, 0.6 s of a warm start's 9-11 s (python -X importtime, this repository's 2-core machine)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.column_names: list[str] = list(table.column_names)
        self._columns: dict[str, _ListColumn] = {}

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def _column(self, name: str) -> _ListColumn:
        if name not in self._columns:
            self._columns[name] = _ListColumn(name, self.table.column(name).chunks)
        return self._columns[name]

    def row_length(self, index: int, column: str = "input_ids") -> int:
        return len(self._column(column).row(index))

    def take(self, rows: list[int], column: str, width: int) -> np.ndarray:
        """The first `width` values of each of these rows of a list column, as an (len(rows), width) array."""
        col = self._column(column)
        return np.stack([col.row(r)[:width] for r in rows])


class _ListColumn:
    """A list-of-integers column as numpy views of its Arrow buffers, chunk by chunk (no copy of the dataset)."""

    def __init__(self, name: str, chunks: list[Any]) -> None:
        self.name = name
        chunks = [c for c in chunks if len(c)]  # an empty chunk may have no data buffer at all
        self.starts = np.cumsum([0] + [len(c) for c in chunks])
        self.parts: list[tuple[np.ndarray, np.ndarray | None]] = [self._part(c) for c in chunks]

    def _part(self, chunk: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, None) for a fixed-size list chunk, as a (rows, size) array; (values, offsets) for a ragged one."""
        import pyarrow as pa

        if chunk.null_count:
            raise ConfigError("data.train_dir", f"column {self.name} has {chunk.null_count} null rows")
        kind = chunk.type
        if pa.types.is_fixed_size_list(kind):
            size = kind.list_size
            values = _int_view(chunk.values, self.name)
            return values[chunk.offset * size : (chunk.offset + len(chunk)) * size].reshape(len(chunk), size), None
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            wide = np.int64 if pa.types.is_large_list(kind) else np.int32
            offsets = np.frombuffer(chunk.buffers()[1], dtype=wide, count=len(chunk) + 1,
                                    offset=chunk.offset * np.dtype(wide).itemsize)
            return _int_view(chunk.values, self.name), offsets
        raise ConfigError("data.train_dir", f"column {self.name} holds {kind}, not lists of token ids")

    def row(self, index: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.starts, index, side="right")) - 1
        values, offsets = self.parts[chunk]
        local = index - int(self.starts[chunk])
        if offsets is None:
            return values[local]
        return values[offsets[local] : offsets[local + 1]]


def _int_view(values: Any, column: str) -> np.ndarray:
    """A zero-copy numpy view of an Arrow integer array without nulls."""
    import pyarrow as pa

    if not pa.types.is_integer(values.type) or values.null_count:
        raise ConfigError("data.train_dir", f"column {column} holds {values.type} values with {values.null_count} "
                          "nulls, not token ids")
    dtype = np.dtype(str(values.type))
    return np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize)


def _saved_split(train_dir: Path) -> Path:
    """The folder of the split to train on: the dataset itself, or a DatasetDict's 'train'."""
    if (train_dir / "state.json").is_file():
        return train_dir
    listing = train_dir / "dataset_dict.json"
    if not listing.is_file():
        raise ConfigError("data.train_dir", f"{train_dir} is not a save_to_disk dataset: it has neither state.json "
                          "nor dataset_dict.json")
    splits = json.loads(listing.read_text(encoding="utf-8")).get("splits", [])
    if "train" not in splits:
        raise ConfigError("data.train_dir", f"{train_dir} holds splits {splits} but no 'train'")
    return _saved_split(train_dir / "train")


def _read_saved(split: Path) -> ArrowRows:
    import pyarrow as pa

    try:
        state = json.loads((split / "state.json").read_text(encoding="utf-8"))
        files = [split / entry["filename"] for entry in state["_data_files"]]
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise ConfigError("data.train_dir", f"{split} is not a readable save_to_disk dataset: {exc}") from None
    if not tables:
        raise ConfigError("data.train_dir", f"{split} lists no data files in its state.json")
    return ArrowRows(pa.concat_tables(tables) if len(tables) > 1 else tables[0])


def load_train_dataset(train_dir: str | None, seq_len: int) -> ArrowRows:
    """The training rows (input_ids, optional labels); ConfigError (data.train_dir) when missing or malformed."""
    if not train_dir:
        raise ConfigError("data.train_dir", "is not set: point it at a dataset made by `data prepare`")
    if not Path(train_dir).is_dir():
        raise ConfigError("data.train_dir", f"{train_dir} is not a directory")
    ds = _read_saved(_saved_split(Path(train_dir)))
    if "input_ids" not in ds.column_names:
        raise ConfigError("data.train_dir", f"{train_dir} has columns {ds.column_names}, needs input_ids (+ labels)")
    if len(ds) == 0:
        raise ConfigError("data.train_dir", f"{train_dir} has no rows")
    row_len = ds.row_length(0)
    if row_len < seq_len:
        raise ConfigError(
            "model.encoder_seq_length", f"is {seq_len} but the rows of {train_dir} hold only {row_len} tokens"
        )
    return ds


@dataclass
class Batches:
    """Deterministic micro-batches for one dp rank; step/micro indexing makes resuming trivial."""

    dataset: ArrowRows
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
        tokens = self.dataset.take(rows, "input_ids", self.seq_len).astype(np.int64)
        labels = self.dataset.take(rows, "labels", self.seq_len) if "labels" in self.dataset.column_names else tokens
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
