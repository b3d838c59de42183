"""safetensors files read and written piece by piece, with the standard library only (no torch, no mmap).

The format (huggingface/safetensors, README "Format"): 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON
mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte after the
header; row-major, little-endian data) plus an optional "__metadata__" object of strings, then the data. The
reference implementation refuses headers over 100 MB (safetensors/src/tensor.rs MAX_HEADER_SIZE) and data ranges that
overlap or leave holes; the writer here produces exactly that layout, its header padded with spaces to a multiple of 8
bytes as the reference writer pads it.

Why not the safetensors library: it maps whole files (pages of every tensor read stay in the process's RSS while
the file is open), and importing an 8B model must hold one tensor at a time, not a 5 GB shard. Here every tensor is
read with pread into its own buffer, and a file shorter than its header says (a truncated download) is named before
a byte of data is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HEADER = 100_000_000
# safetensors dtype name -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
CHUNK = 64 * 2**20  # bytes per read/write call when copying data


class SafetensorsError(ValueError):
    """A file that is not a whole, well-formed safetensors file; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: `offset` is absolute in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Every tensor of `path` (in header order) and its metadata; SafetensorsError when the file is malformed or
    shorter than its header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path.name} has {size} bytes, too few for a safetensors header (truncated?)")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER:
                raise SafetensorsError(f"{path.name} declares a {length}-byte header (not a safetensors file?)")
            if 8 + length > size:
                raise SafetensorsError(f"{path.name} has {size} bytes but its header alone needs {8 + length} "
                                       "(truncated)")
            raw = f.read(length)
    except OSError as exc:
        raise SafetensorsError(f"{path.name} cannot be read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsError(f"{path.name}: the header is not JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path.name}: __metadata__ is not an object")
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, base, size)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _entry(path: Path, name: str, info: Any, base: int, size: int) -> TensorEntry:
    bad = f"{path.name}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{bad} has no dtype/shape/data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise SafetensorsError(f"{bad} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise SafetensorsError(f"{bad} has a malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{bad} has malformed data_offsets {offsets!r}")
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise SafetensorsError(f"{bad}: data_offsets hold {nbytes} bytes, shape {shape} of {dtype} needs "
                               f"{math.prod(shape) * DTYPE_BYTES[dtype]}")
    if base + offsets[1] > size:
        raise SafetensorsError(f"{path.name} has {size} bytes but tensor {name!r} ends at byte {base + offsets[1]} "
                               "(truncated)")
    return TensorEntry(name, path, dtype, tuple(shape), base + offsets[0], nbytes)


def read_bytes(entry: TensorEntry) -> bytearray:
    """The tensor's data as one writable buffer (pread: nothing else of the file is mapped or kept)."""
    out = bytearray(entry.nbytes)
    view = memoryview(out)
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        done = 0
        while done < entry.nbytes:
            got = os.preadv(fd, [view[done:done + CHUNK]], entry.offset + done)
            if got == 0:
                raise SafetensorsError(f"{entry.file.name} ended while reading tensor {entry.name!r} (truncated "
                                       "while being read?)")
            done += got
    finally:
        os.close(fd)
    return out


def copy_bytes(entry: TensorEntry, fd: int, offset: int) -> None:
    """Copy the tensor's data into the open file `fd` at `offset`, in chunks (bounded memory)."""
    src = os.open(entry.file, os.O_RDONLY)
    try:
        done = 0
        while done < entry.nbytes:
            chunk = os.pread(src, min(CHUNK, entry.nbytes - done), entry.offset + done)
            if not chunk:
                raise SafetensorsError(f"{entry.file.name} ended while reading tensor {entry.name!r}")
            written = os.pwrite(fd, chunk, offset + done)
            done += written
    finally:
        os.close(src)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


class Writer:
    """One safetensors file written front to back: the header first (from the specs), then each tensor's bytes in
    the specs' order. `sha256` is the digest of the whole file once closed."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for spec in specs:
            span = [offset, offset + spec.nbytes]
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": span}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self.path = path
        self._specs = list(specs)
        self._i = -1  # the tensor being written
        self._left = 0  # its bytes still to come
        self._hash = hashlib.sha256()
        self._file = path.open("xb")
        self._put(len(raw).to_bytes(8, "little") + raw)
        self.sha256 = ""
        self.bytes = 0

    def _put(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append (part of) the data of tensor `name`: the current tensor, or the next one once it is complete."""
        view = memoryview(data).cast("B")
        if self._left == 0 and (self._i < 0 or self._specs[self._i].name != name):
            self._i += 1
            if self._i >= len(self._specs):
                raise ValueError(f"{self.path.name}: data for {name!r} after the last tensor")
            self._left = self._specs[self._i].nbytes
        if self._specs[self._i].name != name or len(view) > self._left:
            raise ValueError(f"{self.path.name}: unexpected data for {name!r} (expected "
                             f"{self._specs[self._i].name!r}, {self._left} bytes left)")
        self._put(view)
        self._left -= len(view)

    def close(self) -> None:
        """Check every tensor got all its bytes, fsync and close."""
        try:
            if self._left or any(s.nbytes for s in self._specs[self._i + 1:]):
                raise ValueError(f"{self.path.name}: not every tensor was written")
            self._file.flush()
            os.fsync(self._file.fileno())
            self.bytes = self._file.tell()
        finally:
            self._file.close()
        self.sha256 = self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()


def shard(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into files of at most `max_bytes` of data (a bigger tensor gets a file of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' names: model.safetensors alone, else model-0000i-of-0000n.safetensors (+ the index)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_json(shards: Iterable[tuple[str, Sequence[TensorSpec]]]) -> dict[str, Any]:
    """model.safetensors.index.json as transformers writes it: total size and the file of every tensor."""
    weight_map: dict[str, str] = {}
    total = 0
    for name, specs in shards:
        for spec in specs:
            weight_map[spec.name] = name
            total += spec.nbytes
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
