"""The two conversion steps of the neuron plans that are ours, run with the SDK's interpreter (it has torch; the
neuron image's project venv does not) as `PYTHONPATH=<project> python -m llama3_hyperpod.hf.steps STEP ...`.
Imports only torch, model.py and the standard-library modules of this package.

    consolidate --hf-dir D --config C --out F   HF safetensors -> the ONE torch.save'd state dict NxD's converter
                                               torch.load()s (scripts/checkpoint_converter.py:731-738), HF names and
                                               dtypes kept, written tensor by tensor
    to-hf --full-state F --config C --out D     the converter's full state dict (its save_full writes
                                               <output_dir>/checkpoint.pt, checkpoint_converter.py:799-804) -> HF
                                               safetensors (sharded as transformers shards, with its index)

Both check every tensor name and shape against the config first (hf/tensors.py) and exit 2 with one line naming
the problem; both write to a temp name and rename, so a failure leaves nothing.

consolidate, in bounded memory: `torch.save` under `torch.serialization.skip_data(materialize_fake_tensors=True)`
(a public context manager since pytorch/pytorch#134504, 2024, before the SDK's torch 2.9: "the storage bytes can
then be populated in a separate pass") of FakeTensors writes the archive with every storage's space reserved; each
storage record is then found in the ZIP's directory (stdlib zipfile; the data starts after the local header,
APPNOTE 4.3.7) and filled with pwrite from the safetensors file. Storage records are numbered in the order the
pickler meets them (torch/serialization.py `_save`: `id_map.setdefault(..., str(len(id_map)))`), one per tensor
here; the result is read back with torch.load(mmap=True) and each tensor's first and last bytes compared with the
source, so a different numbering would be an error, not wrong weights. Records carry CRC-32 0, as with torch's own
`torch.utils.serialization.config.save.compute_crc32 = False`; torch.load does not check it.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llama3_hyperpod.errors import ConfigError, run_main
from llama3_hyperpod.hf import safetensors_io as st
from llama3_hyperpod.hf import tensors as hf_tensors
from llama3_hyperpod.hf.folder import read_folder

DEFAULT_MAX_SHARD = 5 * 10**9  # transformers' default max_shard_size ("5GB")
SAMPLE = 64  # bytes compared at each end of every tensor after consolidating


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _record_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """ZIP record name (without the archive folder) -> (offset of its data, size), for stored records."""
    out: dict[str, tuple[int, int]] = {}
    with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
        for info in archive.infolist():
            raw.seek(info.header_offset)
            local = raw.read(30)
            signature, method = struct.unpack("<I", local[:4])[0], struct.unpack("<H", local[8:10])[0]
            if signature != 0x04034B50 or method != zipfile.ZIP_STORED:
                raise RuntimeError(f"{path.name}: record {info.filename} is not a stored ZIP entry")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.filename.split("/", 1)[1]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def consolidate(hf_dir: Path, hf_config: dict[str, Any], out: Path) -> int:
    """Write `out` (a torch.save'd dict of HF-named tensors); returns its size in bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    folder = read_folder(hf_dir)
    plan = hf_tensors.check_tensors(folder.tensors, hf_config, str(hf_dir))
    names = [n for hf_names, _ in plan.groups for n in hf_names]
    entries = [folder.tensors[n] for n in names]
    tmp = _tmp(out)
    try:
        with FakeTensorMode():
            fake = {e.name: torch.empty(e.shape, dtype=hf_tensors.TORCH_DTYPES[e.dtype]) for e in entries}
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(fake, tmp)
        del fake
        records = _record_offsets(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            for i, entry in enumerate(entries):
                offset, size = records[f"data/{i}"]
                if size != entry.nbytes:
                    raise RuntimeError(f"storage record data/{i} has {size} bytes, {entry.name} needs {entry.nbytes}")
                st.copy_bytes(entry, fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        _check_consolidated(tmp, entries)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


def _check_consolidated(path: Path, entries: Sequence[st.TensorEntry]) -> None:
    """Every tensor of `path` has its source's name, dtype, shape and first and last bytes."""
    loaded = torch.load(path, mmap=True, weights_only=True)
    if list(loaded) != [e.name for e in entries]:
        raise RuntimeError(f"{path.name}: the written state dict's names differ from the source's")
    fd_cache: dict[Path, int] = {}
    try:
        for entry in entries:
            tensor = loaded[entry.name]
            if tuple(tensor.shape) != entry.shape or hf_tensors.SAFETENSORS_DTYPES[tensor.dtype] != entry.dtype:
                raise RuntimeError(f"{path.name}: {entry.name} came back as {tensor.dtype} {list(tensor.shape)}")
            if entry.nbytes == 0:
                continue
            data = tensor.reshape(-1).contiguous().view(torch.uint8)
            n = min(SAMPLE, entry.nbytes)
            fd = fd_cache.setdefault(entry.file, os.open(entry.file, os.O_RDONLY))
            head = os.pread(fd, n, entry.offset)
            tail = os.pread(fd, n, entry.offset + entry.nbytes - n)
            if bytes(data[:n].numpy()) != head or bytes(data[-n:].numpy()) != tail:
                raise RuntimeError(f"{path.name}: {entry.name} does not hold its source's bytes")
    finally:
        for fd in fd_cache.values():
            os.close(fd)


def to_hf(full_state: Path, hf_config: dict[str, Any], out: Path, max_shard: int = DEFAULT_MAX_SHARD) -> list[Path]:
    """Write the converter's full state dict as HF safetensors into the new dir `out`; returns the files written."""
    key = str(full_state)
    try:
        state = torch.load(full_state, mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(key, f"cannot be read as a torch state dict ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(key, "is not a flat dict of tensors (the converter's --convert_to_full_state output)")
    expected = hf_tensors.expected_hf(hf_config)
    kept = {n: t for n, t in state.items() if not n.endswith(hf_tensors.SKIPPED)}
    for name, shape in expected.items():
        if name not in kept:
            raise ConfigError(key, f"has no tensor {name} (the run's model has it)")
        if tuple(kept[name].shape) != shape:
            raise ConfigError(key, f"tensor {name} has shape {list(kept[name].shape)}, the run's model needs "
                                   f"{list(shape)} (converted with another layout or config?)")
        if kept[name].dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ConfigError(key, f"tensor {name} is {kept[name].dtype}, not a floating-point type")
    extra = sorted(set(kept) - set(expected))
    if extra:
        raise ConfigError(key, f"holds tensor {extra[0]}, which the run's model does not have")
    specs = [st.TensorSpec(n, hf_tensors.SAFETENSORS_DTYPES[kept[n].dtype], expected[n]) for n in expected]
    shards = st.shard(specs, max_shard)
    names = st.shard_names(len(shards))
    tmp = _tmp(out)
    tmp.mkdir()
    written: list[Path] = []
    try:
        for file_name, group in zip(names, shards, strict=True):
            writer = st.Writer(tmp / file_name, group, metadata={"format": "pt"})
            try:
                for spec in group:
                    data = kept[spec.name].reshape(-1).contiguous().view(torch.uint8)
                    for start in range(0, spec.nbytes, st.CHUNK):
                        writer.write(spec.name, data[start:start + st.CHUNK].numpy())
                writer.close()
            except BaseException:
                writer.abort()
                raise
            written.append(out / file_name)
        if len(shards) > 1:
            index = st.index_json(zip(names, shards, strict=True))
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            written.append(out / "model.safetensors.index.json")
        os.rename(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama3_hyperpod.hf.steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("consolidate", help="HF safetensors -> one torch.save'd state dict")
    c.add_argument("--hf-dir", type=Path, required=True)
    c.add_argument("--config", type=Path, required=True, help="the run's model as an HF config.json")
    c.add_argument("--out", type=Path, required=True)
    h = sub.add_parser("to-hf", help="the converter's full state dict -> HF safetensors")
    h.add_argument("--full-state", type=Path, required=True)
    h.add_argument("--config", type=Path, required=True)
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    def run() -> None:
        hf_config = json.loads(args.config.read_text(encoding="utf-8"))
        if args.step == "consolidate":
            size = consolidate(args.hf_dir, hf_config, args.out)
            print(f"consolidate: {args.out} ({size / 2**30:.2f} GiB)", file=sys.stderr)
        else:
            if args.out.exists():
                raise ConfigError(str(args.out), "already exists")
            files = to_hf(args.full_state, hf_config, args.out, args.max_shard_bytes)
            print(f"to-hf: {args.out} ({len(files)} files)", file=sys.stderr)

    def say(exc: Exception) -> str:
        assert isinstance(exc, OSError)
        return f"{exc.filename or args.step}: {exc.strerror or exc}"

    return run_main(run, OSError, say)


if __name__ == "__main__":
    sys.exit(main())
