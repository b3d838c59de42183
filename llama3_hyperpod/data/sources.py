"""Where documents come from: local txt/jsonl/parquet files (or folders of them) and Hugging Face hub datasets.

Everything streams: a source yields `Piece`s (a document or a bounded part of a long one) together with the input
bytes consumed, so a corpus larger than RAM is read in bounded memory and progress can be measured in bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from llama3_hyperpod.data.errors import DataError

SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
TXT_SPLITS = ("file", "paragraph", "line")
# A long txt document is cut into pieces of about this many bytes (at line ends) so no file is held whole.
CHUNK_BYTES = 1 << 20
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class Piece(NamedTuple):
    """A document or part of one: `bos` marks its first part, `eos` its last; `nbytes` is input consumed."""

    text: str
    bos: bool
    eos: bool
    nbytes: int


@dataclass(frozen=True)
class LocalFile:
    """One input file; `name` is what the metadata records (the input's name plus the path inside a folder)."""

    path: Path
    name: str
    kind: str  # txt | jsonl | parquet

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face hub, read with `datasets.load_dataset(..., streaming=True)`."""

    name: str
    config: str | None
    split: str


Source = LocalFile | HubDataset


def resolve_inputs(inputs: Sequence[str], *, hub_config: str | None = None, hub_split: str = "train") -> list[Source]:
    """Expand the user's inputs into sources in a fixed order (folders recursively, sorted by path)."""
    if not inputs:
        raise DataError("inputs", "give at least one input file, folder or Hugging Face dataset name")
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            if not found:
                raise DataError(raw, f"folder holds no input files ({', '.join(sorted(SUFFIXES))})")
            sources += [
                LocalFile(p, f"{path.resolve().name}/{p.relative_to(path).as_posix()}", _kind(p)) for p in found
            ]
        elif path.exists() or path.is_symlink():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(raw, f"unsupported file type {path.suffix!r} (use {', '.join(sorted(SUFFIXES))})")
            sources.append(LocalFile(path, path.name, _kind(path)))
        elif path.suffix.lower() not in SUFFIXES and _HUB_NAME.match(raw) and not raw.startswith("."):
            sources.append(HubDataset(raw, hub_config, hub_split))
        else:
            raise DataError(raw, "no such file or folder")
    return sources


def _kind(path: Path) -> str:
    return SUFFIXES[path.suffix.lower()]


def sha256_file(path: Path) -> str:
    """Hash a file in bounded memory; also proves it is readable before any output is started."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None
    return digest.hexdigest()


def iter_pieces(source: Source, *, text_field: str, txt_split: str) -> Iterator[Piece]:
    """Yield the source's documents in order, in bounded memory."""
    if isinstance(source, HubDataset):
        yield from _hub_pieces(source, text_field)
    elif source.kind == "txt":
        yield from _txt_pieces(source.path, txt_split)
    elif source.kind == "jsonl":
        yield from _jsonl_pieces(source.path, text_field)
    else:
        yield from _parquet_pieces(source.path, text_field)


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"not valid UTF-8 (byte {offset + e.start})") from None


def _lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """Binary lines with their byte offsets; OSError becomes a one-line DataError."""
    offset = 0
    try:
        with path.open("rb") as f:
            for line in f:
                yield line, offset
                offset += len(line)
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None


def _txt_pieces(path: Path, split: str) -> Iterator[Piece]:
    if split == "line":
        for line, offset in _lines(path):
            yield Piece(_decode(line, path, offset).rstrip("\r\n"), True, True, len(line))
    elif split == "paragraph":
        buf: list[bytes] = []
        start = 0
        for line, offset in _lines(path):
            if line.strip():
                if not buf:
                    start = offset
                buf.append(line)
            elif buf:
                data = b"".join(buf)
                yield Piece(_decode(data, path, start), True, True, len(data) + len(line))
                buf = []
            else:
                yield Piece("", False, False, len(line))  # bytes only: no document
        if buf:
            data = b"".join(buf)
            yield Piece(_decode(data, path, start), True, True, len(data))
    else:
        yield from _txt_file_pieces(path)


def _txt_file_pieces(path: Path) -> Iterator[Piece]:
    """The whole file is one document, cut at line ends into ~CHUNK_BYTES pieces (the last held back one step)."""
    pending: Piece | None = None
    first = True
    buf: list[bytes] = []
    size = start = 0
    for line, offset in _lines(path):
        if not buf:
            start = offset
        buf.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            if pending is not None:
                yield pending
            pending = Piece(_decode(b"".join(buf), path, start), first, False, size)
            first = False
            buf, size = [], 0
    if buf or pending is None:
        if pending is not None:
            yield pending
        yield Piece(_decode(b"".join(buf), path, start), first, True, size)
    else:
        yield pending._replace(eos=True)


def _jsonl_pieces(path: Path, field: str) -> Iterator[Piece]:
    for lineno, (line, _) in enumerate(_lines(path), start=1):
        if not line.strip():
            yield Piece("", False, False, len(line))
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(where, f"not a JSON object ({e})") from None
        yield Piece(_field(row, field, where), True, True, len(line))


def _field(row: Any, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        raise DataError(where, f"no field {field!r} (choose another with --text-field)")
    text = row[field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(where, f"field {field!r} is {type(text).__name__}, not text")
    return text


def _parquet_pieces(path: Path, field: str) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DataError(str(path), f"no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        if not pa.types.is_string(pf.schema_arrow.field(field).type) and not pa.types.is_large_string(
            pf.schema_arrow.field(field).type
        ):
            raise DataError(str(path), f"column {field!r} is {pf.schema_arrow.field(field).type}, not text")
        total_rows = max(pf.metadata.num_rows, 1)
        size = path.stat().st_size
        done_rows = done_bytes = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            texts = batch.column(0).to_pylist()
            done_rows += len(texts)
            upto = size * done_rows // total_rows
            for i, text in enumerate(texts):
                yield Piece(text or "", True, True, upto - done_bytes if i == len(texts) - 1 else 0)
            done_bytes = upto
    except (OSError, pa.ArrowException) as e:
        raise DataError(
            str(path), f"cannot read as Parquet: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _hub_pieces(source: HubDataset, field: str) -> Iterator[Piece]:
    import datasets

    label = f"{source.name} (Hugging Face hub)"
    _probe_hub(label)
    try:
        stream = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
        for i, row in enumerate(stream):
            text = _field(row, field, f"{source.name}[{i}]")
            yield Piece(text, True, True, len(text.encode("utf-8")))
    except DataError:
        raise
    except Exception as e:  # network, auth, missing dataset: all surface as one line naming the dataset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(label, f"cannot stream it, and it is not a local path either ({first[:200]})") from None


def _probe_hub(label: str) -> None:
    """Fail in one line at once when the hub cannot be reached, instead of after minutes of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.utils

    huggingface_hub.utils.logging.set_verbosity_error()  # no retry chatter: the error below says it once
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes"):
        return  # offline mode: datasets answers from its cache or fails fast by itself
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise DataError(
            label, f"not a local path, and {host} cannot be reached ({e.strerror or e}): offline?"
        ) from None
