"""Where documents come from: local txt/jsonl/parquet files (or folders of them) and Hugging Face hub datasets.

Everything streams: a source yields `Piece`s (a document or a bounded part of a long one) together with the input
bytes consumed, so a corpus larger than RAM is read in bounded memory and progress can be measured in bytes.

Bounded for any input shape: files are read in segments of at most CHUNK_BYTES (a 50 MB line is not one string), and
a document longer than CHUNK_CHARS is handed to the tokenizer in pieces of at most that size (the tokenizer's memory
grows with the length of what it encodes at once: a 50 MB single-line document took 9 GB). Pieces are cut where
Llama 3's pre-tokenizer splits anyway (`cut_point`), so the tokens are the whole document's; a document of ordinary
size is never cut at all.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from llama3_hyperpod import fsutil
from llama3_hyperpod.data.errors import DataError

SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
TXT_SPLITS = ("file", "paragraph", "line")
# Files are read in segments of at most this many bytes, and no piece handed to the tokenizer is longer than
# CHUNK_CHARS characters.
CHUNK_BYTES = 1 << 20
CHUNK_CHARS = 1 << 20
MAX_JSONL_LINE = 256 << 20  # a JSON record must be parsed whole: bounded, and a longer line is refused
# Where a long text may be cut without changing its tokens (Llama 3's split pattern, tokenizer.LLAMA3_SPLIT): before a
# space or tab followed by a non-space (" word", " '", " 1": a pre-token starts there with that space, and none of the
# pattern's alternatives can carry the previous one across it: a whitespace run followed by a non-space gives its last
# space to the next token, and `(?!\S)` sees the same non-space-or-end either way), or after a line break that is not
# followed by more whitespace (the newline run ends there).
_WORD_START = re.compile(r"[ \t](?=\S)")
_LINE_END = re.compile(r"\n(?=\S)")
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
    try:
        return fsutil.sha256_file(path)
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None


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


def cut_point(text: str, limit: int) -> int:
    """Where to cut `text` (longer than `limit`) so the first part is at most `limit` characters: the last space
    before a non-space in its second half, else the last line end there, else at `limit` (a text without either
    there, such as a base64 blob: only then may the tokens at the cut differ)."""
    for pattern in (_WORD_START, _LINE_END):
        last = None
        for last in pattern.finditer(text, limit // 2, limit):  # noqa: B007  (the last match is the one wanted)
            pass
        if last is not None:
            return last.start() if pattern is _WORD_START else last.end()
    return limit


class _Document:
    """Collects one document's text as it is read and yields it in pieces of at most CHUNK_CHARS characters."""

    def __init__(self) -> None:
        self.text = ""
        self.first = True
        self.nbytes = 0

    def feed(self, text: str, nbytes: int) -> Iterator[Piece]:
        self.text += text
        self.nbytes += nbytes
        while len(self.text) > CHUNK_CHARS:
            cut = cut_point(self.text, CHUNK_CHARS)
            yield Piece(self.text[:cut], self.first, False, self.nbytes)
            self.text, self.first, self.nbytes = self.text[cut:], False, 0

    def end(self) -> Piece:
        return Piece(self.text, self.first, True, self.nbytes)


def _whole(text: str, nbytes: int) -> Iterator[Piece]:
    """A document read whole (a JSON record, a Parquet cell) as bounded pieces."""
    doc = _Document()
    yield from doc.feed(text, nbytes)
    yield doc.end()


def _segments(path: Path, size: int = CHUNK_BYTES) -> Iterator[tuple[bytes, int]]:
    """The file's lines as (bytes, offset), each at most `size` bytes: a longer line comes in several segments,
    of which only the last ends with a newline. OSError becomes a one-line DataError."""
    offset = 0
    try:
        with path.open("rb") as f:
            while segment := f.readline(size):
                yield segment, offset
                offset += len(segment)
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None


class _Decoder:
    """UTF-8 across segments (a character may be split between two); errors name the byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def __call__(self, data: bytes, offset: int, final: bool = False) -> str:
        """Decode `data`, which starts at byte `offset` of the file."""
        held = len(self._decoder.getstate()[0])  # bytes of a character begun in the previous segment
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError as e:
            raise DataError(str(self.path), f"not valid UTF-8 (byte {offset - held + e.start})") from None


def _txt_pieces(path: Path, split: str) -> Iterator[Piece]:
    """A .txt file as documents: the whole file, each paragraph (ended by a blank line) or each line."""
    decode = _Decoder(path)
    doc = _Document()
    line_start = True
    for segment, offset in _segments(path):
        text = decode(segment, offset)
        ends_line = segment.endswith(b"\n")
        if split == "line":
            yield from doc.feed(text, len(segment))
            if ends_line:
                doc.text = doc.text.rstrip("\r\n")
                yield doc.end()
                doc = _Document()
        elif split == "paragraph" and line_start and ends_line and not segment.strip():  # a blank line
            if doc.text or not doc.first:  # it ends the paragraph; its bytes go with it
                doc.nbytes += len(segment)
                yield doc.end()
                doc = _Document()
            else:
                yield Piece("", False, False, len(segment))  # bytes only: no document
        else:
            yield from doc.feed(text, len(segment))
        line_start = ends_line
    decode(b"", path.stat().st_size, final=True)  # a character cut short at the end of the file is an error
    if split == "file" or doc.text or not doc.first or doc.nbytes:
        if split == "line":
            doc.text = doc.text.rstrip("\r\n")
        yield doc.end()


def _jsonl_pieces(path: Path, field: str) -> Iterator[Piece]:
    lineno = 0
    for line, _ in _segments(path, MAX_JSONL_LINE + 1):
        lineno += 1
        if len(line) > MAX_JSONL_LINE:
            raise DataError(f"{path}:{lineno}", f"a JSON line longer than {MAX_JSONL_LINE >> 20} MiB: split the record")
        if not line.strip():
            yield Piece("", False, False, len(line))
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(where, f"not a JSON object ({e})") from None
        yield from _whole(_field(row, field, where), len(line))


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
                yield from _whole(text or "", upto - done_bytes if i == len(texts) - 1 else 0)
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
            yield from _whole(text, len(text.encode("utf-8")))
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
