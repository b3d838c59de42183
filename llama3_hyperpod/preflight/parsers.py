"""Tool output -> data, pure. Each parser accepts what the tool's documentation shows and refuses anything else with
one line (ParseError) saying what was wrong, never a traceback. Formats and their sources: docs/preflight-facts.md;
the documented outputs are test data in tests/data/preflight/.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

FI_ENODATA = 61  # libfabric's "no data available": fi_getinfo found no interface matching the filter


class ParseError(ValueError):
    """The tool printed something this parser cannot read; the message is one line."""


def _excerpt(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


# ---------------------------------------------------------------------------------------------------- neuron-ls


@dataclass(frozen=True)
class NeuronProcess:
    pid: int
    command: str
    runtime_version: str | None


@dataclass(frozen=True)
class NeuronDevice:
    """One `/dev/neuronN` as `neuron-ls --json-output` describes it (Neuron SDK 2.28, tools/neuron-sys-tools/
    neuron-ls.rst): `nc_count` NeuronCores (logical ones on trn2 with LNC 2) with ids `core_ids`, and the processes
    using the device."""

    index: int
    nc_count: int
    core_ids: tuple[int, ...]
    memory_bytes: int | None
    processes: tuple[NeuronProcess, ...]


def _int_field(entry: dict[str, object], key: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(f"{where}: {key!r} is {value!r}, not an integer")
    return value


def parse_neuron_ls(text: str) -> list[NeuronDevice]:
    """`neuron-ls --json-output` (a JSON list, one object per device) -> devices, sorted by index."""
    if not text.strip():
        raise ParseError("neuron-ls printed nothing (expected a JSON list of devices)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"neuron-ls output is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                         f"{_excerpt(text)}") from None
    if not isinstance(data, list):
        raise ParseError(f"neuron-ls JSON is a {type(data).__name__}, expected a list of devices")
    devices = []
    for i, entry in enumerate(data):
        where = f"neuron-ls device #{i}"
        if not isinstance(entry, dict):
            raise ParseError(f"{where} is a {type(entry).__name__}, expected an object")
        index = _int_field(entry, "neuron_device", where)
        nc_count = _int_field(entry, "nc_count", f"{where} (neuron_device {index})")
        raw_ids = entry.get("neuroncore_ids")
        if raw_ids is None:  # older tools print no ids: cores are numbered device by device
            core_ids = tuple(range(index * nc_count, (index + 1) * nc_count))
        elif isinstance(raw_ids, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in raw_ids):
            core_ids = tuple(raw_ids)
        else:
            raise ParseError(f"{where}: 'neuroncore_ids' is {raw_ids!r}, not a list of integers")
        memory = entry.get("memory_size")
        raw_procs = entry.get("neuron_processes") or []
        if not isinstance(raw_procs, list):
            raise ParseError(f"{where}: 'neuron_processes' is {raw_procs!r}, not a list")
        procs = []
        for proc in raw_procs:
            if not isinstance(proc, dict):
                raise ParseError(f"{where}: a neuron_processes entry is {proc!r}, not an object")
            version = proc.get("neuron_runtime_version")
            procs.append(NeuronProcess(_int_field(proc, "pid", f"{where} process"), str(proc.get("command", "")),
                                       None if version is None else str(version)))
        devices.append(NeuronDevice(index, nc_count, core_ids,
                                    memory if isinstance(memory, int) and not isinstance(memory, bool) else None,
                                    tuple(procs)))
    return sorted(devices, key=lambda d: d.index)


def parse_core_list(text: str) -> set[int]:
    """`NEURON_RT_VISIBLE_CORES` syntax: `3`, `0-7`, `0,2,4-5`."""
    cores: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ParseError(f"NEURON_RT_VISIBLE_CORES={text!r}: {part!r} is not a core id or a range a-b")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise ParseError(f"NEURON_RT_VISIBLE_CORES={text!r}: range {part} runs backwards")
        cores.update(range(lo, hi + 1))
    return cores


# ------------------------------------------------------------------------------------------------------ fi_info


@dataclass(frozen=True)
class FabricInterface:
    """One block of `fi_info`'s default summary output (libfabric man/fi_info.1.md, util/info.c print_short_info)."""

    provider: str
    fabric: str
    domain: str
    version: str
    ep_type: str
    protocol: str


_FI_KEYS = {"provider", "fabric", "domain", "version", "type", "protocol"}


def parse_fi_info(text: str) -> list[FabricInterface]:
    """`fi_info [-p P] [-t T]` summary: blocks of `provider: X` then indented `fabric/domain/version/type/protocol`."""
    if not text.strip():
        raise ParseError("fi_info printed nothing (expected 'provider: ...' blocks)")
    blocks: list[dict[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key not in _FI_KEYS:
            raise ParseError(f"fi_info line {number} is not a 'key: value' line of its summary output: {_excerpt(raw)}")
        if key == "provider":
            blocks.append({})
        elif not blocks:
            raise ParseError(f"fi_info line {number} ({key}) comes before any 'provider:' line")
        blocks[-1][key] = value.strip()
    out = []
    for block in blocks:
        missing = sorted(_FI_KEYS - set(block))
        if missing:
            raise ParseError(f"fi_info block for provider {block.get('provider', '?')!r} lacks {', '.join(missing)}")
        out.append(FabricInterface(block["provider"], block["fabric"], block["domain"], block["version"],
                                   block["type"], block["protocol"]))
    return out


def fi_info_error(returncode: int, stderr: str) -> str:
    """What a failed `fi_info` said, in words: it prints `fi_getinfo: <-errno>` and exits with errno."""
    match = re.search(r"fi_getinfo:\s*(-?\d+)", stderr)
    code = abs(int(match.group(1))) if match else returncode
    if code == FI_ENODATA:
        return f"fi_getinfo returned -{FI_ENODATA} (FI_ENODATA): no interface of that provider on this node"
    detail = _excerpt(stderr) if stderr.strip() else "no message"
    return f"fi_info exited {returncode}: {detail}"


# ------------------------------------------------------------------------------------------- versions, packages


def parse_version(text: str) -> tuple[int, ...]:
    """'2.26.5.0' (or '2.30.51.0-faa1b8a6e', a Debian revision after '-') -> (2, 26, 5, 0)."""
    core = text.strip().split("-", 1)[0].split("+", 1)[0]
    if not re.fullmatch(r"\d+(\.\d+)*", core):
        raise ParseError(f"{text.strip()!r} is not a dotted version number")
    return tuple(int(p) for p in core.split("."))


def parse_dpkg_versions(text: str) -> dict[str, str]:
    """`dpkg-query -W -f '${Package} ${Version}\\n' P...` -> {package: version}."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        parts = raw.split()
        if len(parts) != 2:
            raise ParseError(f"dpkg-query line {number} is not 'package version': {_excerpt(raw)}")
        out[parts[0]] = parts[1]
    return out
