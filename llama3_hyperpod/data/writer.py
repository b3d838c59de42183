"""Writing the dataset: `datasets.save_to_disk`'s layout, streamed into a temp folder that is renamed at the end.

The layout is the one `save_to_disk` produces (`data-XXXXX-of-NNNNN.arrow` written by datasets' own ArrowWriter,
`state.json`, `dataset_info.json`), written batch by batch so no shard is ever held in memory; the finished folder is
checked with `datasets.load_from_disk`, the reader NxDT uses. Nothing in it depends on time or paths, so the same
tokens give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama3_hyperpod.data.errors import DataError
from llama3_hyperpod.fsutil import link_message

COLUMNS = ("input_ids", "labels")
MAX_SHARD_BYTES = 500 * 1000 * 1000  # save_to_disk's default max_shard_size


def features(seq_len: int) -> Any:
    import datasets

    return datasets.Features({c: datasets.List(datasets.Value("int32"), length=seq_len) for c in COLUMNS})


class ShardWriter:
    """Appends (n, seq_len) int32 blocks as rows where input_ids == labels; hashes the content as it goes."""

    def __init__(self, folder: Path, seq_len: int, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder = folder
        self.seq_len = seq_len
        self.rows_per_shard = max(1, max_shard_bytes // (len(COLUMNS) * 4 * seq_len))
        self.features = features(seq_len)
        self.rows = 0
        self.digest = hashlib.sha256()
        self._parts: list[Path] = []
        self._writer: Any = None
        self._rows_in_shard = 0

    def write(self, blocks: np.ndarray) -> None:
        start = 0
        while start < len(blocks):
            if self._writer is None or self._rows_in_shard == self.rows_per_shard:
                self._open_shard()
            take = min(len(blocks) - start, self.rows_per_shard - self._rows_in_shard)
            self._write_rows(blocks[start : start + take])
            start += take

    def _open_shard(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        self._close_shard()
        part = self.folder / f"part-{len(self._parts):05d}.arrow"
        self._parts.append(part)
        self._writer = ArrowWriter(features=self.features, path=str(part))
        self._rows_in_shard = 0

    def _write_rows(self, rows: np.ndarray) -> None:
        import pyarrow as pa

        flat = np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
        self.digest.update(flat.tobytes())
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), self.seq_len)
        self._writer.write_table(pa.table(dict.fromkeys(COLUMNS, column)))
        self._rows_in_shard += len(rows)
        self.rows += len(rows)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def finish(self, fingerprint: str) -> None:
        """Name the shards as save_to_disk does and write its state.json and dataset_info.json."""
        import datasets
        from datasets.utils.py_utils import asdict

        self._close_shard()
        n = len(self._parts)
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for part, name in zip(self._parts, names, strict=True):
            part.rename(self.folder / name)
        state: dict[str, Any] = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = asdict(datasets.DatasetInfo(features=self.features))
        sorted_info = {key: info[key] for key in sorted(info)}
        (self.folder / "dataset_info.json").write_text(json.dumps(sorted_info, indent=2), encoding="utf-8")
        loaded = datasets.load_from_disk(str(self.folder))
        if loaded.num_rows != self.rows or list(loaded.column_names) != list(COLUMNS):
            raise RuntimeError(f"written dataset reads back as {loaded.num_rows} rows of {loaded.column_names}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_destination(output: Path, *, force: bool) -> None:
    if output.is_symlink():
        raise DataError(str(output), link_message())
    if output.exists() and not force:
        raise DataError(str(output), "already exists (use --force to replace it)")
    if not output.parent.is_dir():
        raise DataError(str(output), f"parent folder {output.parent} does not exist")


@contextlib.contextmanager
def atomic_folder(output: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside `output`; on success it replaces `output` by rename, on any failure it vanishes."""
    check_destination(output, force=force)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_destination(output, force=force)
        if output.exists():
            trash = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            output.rename(trash)
            tmp.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
