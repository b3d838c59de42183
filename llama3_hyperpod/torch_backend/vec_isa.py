"""Inductor's CPU vector-ISA probes, remembered in the compile cache: a warm start no longer pays for them.

Before it can load a cached CPU kernel, Inductor must know the kernel's compile flags, so it picks the vector ISA
(torch 2.13.0, torch/_inductor/cpu_vec_isa.py: `valid_vec_isa_list`, line 599, via `pick_vec_isa`, line 649, from
`CppPythonBindingsCodeCache.load_async`, codecache.py:3691). For every ISA the CPU's flags name it builds a small test
library into TORCHINDUCTOR_CACHE_DIR (once: `check_build`, line 164, skips the build when the .so is there) and then
dlopens it in a fresh interpreter (`VecISA._probe_load`, line 133), in every process, cache hit or not: 10
interpreter starts on an AMX Xeon, 4 of them loading libtorch_cpu, about 1.6 s of CPU and 3-4 s on a busy 2-core
machine (bench/warm_start.py), a quarter of a warm start.

Whether a given library loads is a property of that library and the machine: the same file (sha256) on the same
machine type (CPU model and flags, kernel, torch build and where its libraries are) loads again. So each probe that
succeeded is recorded in TORCHINDUCTOR_CACHE_DIR next to the libraries it checked (`compile` writes it, a baked cache
carries it), and a later process with the same file on the same machine type takes the record instead of starting
an interpreter. A failed probe is never recorded (it runs again next time: a timeout under load is not a verdict), a
rebuilt library has another digest, another machine type another key. Without a cache dir nothing changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

from llama3_hyperpod.fsutil import PathError, sha256_file, write_text

RECORD_NAME = "vec-isa-probes.json"


def machine_key() -> str:
    """What decides whether a probe library loads, besides its own bytes: CPU, kernel, the torch it links against."""
    import torch

    model, flags = "unknown cpu", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and model == "unknown cpu":
                    model = value.strip()
                elif name.strip() == "flags" and not flags:
                    flags = " ".join(sorted(value.split()))
                if flags and model != "unknown cpu":
                    break
    except OSError:
        pass
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return f"{model} | {flags} | {platform.machine()} {platform.release()} | torch {torch.__version__} at {torch_lib}"


def _read(record: Path, machine: str) -> set[str]:
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        return set()
    entries = known.get(machine) if isinstance(known, dict) else None
    return {d for d in entries if isinstance(d, str)} if isinstance(entries, list) else set()


def _add(record: Path, machine: str, digest: str) -> None:
    """Add one digest (read, merge, atomic replace); a read-only or odd cache dir just means no record."""
    try:
        known = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entries = known.get(machine)
    merged = sorted({*(entries if isinstance(entries, list) else []), digest})
    with contextlib.suppress(OSError, PathError):
        write_text(record, json.dumps({**known, machine: merged}, indent=1) + "\n")


class ProbeRecord:
    """The installed wrapper's counts, for the evidence: probes answered by the record, probes run."""

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.remembered = 0
        self.probed = 0

    def wrap(self, probe: Callable[[object, str], bool]) -> Callable[[object, str], bool]:
        def remembered_probe(isa: object, output_path: str) -> bool:
            record = record_for(Path(output_path))
            try:
                digest = sha256_file(Path(output_path)) if record is not None else None
            except OSError:
                digest = None
            if record is None or digest is None:
                return probe(isa, output_path)
            if digest in _read(record, self.machine):
                self.remembered += 1
                return True
            self.probed += 1
            ok = probe(isa, output_path)
            if ok:
                _add(record, self.machine, digest)
            return ok

        remembered_probe.l3hp_probe_record = self  # type: ignore[attr-defined]
        return remembered_probe


def record_for(library: Path) -> Path | None:
    """The record beside a probe library in TORCHINDUCTOR_CACHE_DIR (Inductor's default dir in /tmp is not ours)."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        return None
    root = Path(cache).absolute()
    return root / RECORD_NAME if root in library.absolute().parents else None


def remember_probes() -> ProbeRecord | None:
    """Route Inductor's probes through the record (idempotent); the counts of this process.

    None when this torch has no `VecISA._probe_load` (another version: left as it is).
    """
    from torch._inductor import cpu_vec_isa

    probe = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    if not callable(probe):
        return None
    if (rec := installed()) is not None:
        return rec
    rec = ProbeRecord(machine_key())
    cpu_vec_isa.VecISA._probe_load = rec.wrap(probe)  # type: ignore[method-assign,assignment]
    return rec


def installed() -> ProbeRecord | None:
    """The wrapper `remember_probes` put in place in this process, if any (torch is not imported for this)."""
    import sys

    module = sys.modules.get("torch._inductor.cpu_vec_isa")
    probe = getattr(getattr(module, "VecISA", None), "_probe_load", None)
    rec = getattr(probe, "l3hp_probe_record", None)
    return rec if isinstance(rec, ProbeRecord) else None
