"""The record of Inductor's vector-ISA probes (torch_backend/vec_isa.py): a probe is skipped only for the same library
bytes on the same machine type, inside TORCHINDUCTOR_CACHE_DIR, after it once succeeded.

The probe here is a stand-in that counts its calls (the real one starts an interpreter per library); the
integration test test_torch_smoke.py shows the real probes skipped in a warm start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama3_hyperpod.torch_backend import vec_isa


class Probe:
    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def __call__(self, _isa: object, output_path: str) -> bool:
        self.calls.append(output_path)
        return self.answer


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "inductor"
    (root / "ab").mkdir(parents=True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root))
    return root


def _library(cache: Path, content: bytes = b"\x7fELF probe") -> str:
    lib = cache / "ab" / "cabc.so"
    lib.write_bytes(content)
    return str(lib)


def test_a_successful_probe_is_remembered_for_the_same_library_and_machine(cache: Path) -> None:
    lib = _library(cache)
    probe = Probe()
    first = vec_isa.ProbeRecord("machine A").wrap(probe)
    assert first(object(), lib) is True
    assert len(probe.calls) == 1
    assert json.loads((cache / vec_isa.RECORD_NAME).read_text())["machine A"]

    later = vec_isa.ProbeRecord("machine A")  # another process on the same machine type
    assert later.wrap(probe)(object(), lib) is True
    assert len(probe.calls) == 1
    assert (later.remembered, later.probed) == (1, 0)


def test_a_failed_probe_is_not_remembered(cache: Path) -> None:
    lib = _library(cache)
    failing = Probe(answer=False)
    rec = vec_isa.ProbeRecord("machine A")
    wrapped = rec.wrap(failing)
    assert wrapped(object(), lib) is False
    assert wrapped(object(), lib) is False
    assert len(failing.calls) == 2
    assert not (cache / vec_isa.RECORD_NAME).exists()


def test_another_library_or_machine_type_is_probed_again(cache: Path) -> None:
    lib = _library(cache)
    probe = Probe()
    vec_isa.ProbeRecord("machine A").wrap(probe)(object(), lib)
    vec_isa.ProbeRecord("machine B").wrap(probe)(object(), lib)
    assert len(probe.calls) == 2
    _library(cache, b"\x7fELF rebuilt")  # same path, other bytes
    rec = vec_isa.ProbeRecord("machine A")
    rec.wrap(probe)(object(), lib)
    assert len(probe.calls) == 3
    assert (rec.remembered, rec.probed) == (0, 1)


def test_nothing_is_recorded_outside_the_cache_dir(cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "tmp-default" / "ab"
    elsewhere.mkdir(parents=True)
    lib = elsewhere / "cabc.so"
    lib.write_bytes(b"\x7fELF probe")
    probe = Probe()
    wrapped = vec_isa.ProbeRecord("machine A").wrap(probe)
    wrapped(object(), str(lib))
    wrapped(object(), str(lib))
    assert len(probe.calls) == 2
    assert not list(tmp_path.rglob(vec_isa.RECORD_NAME))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # Inductor's own default dir in /tmp is not ours either
    wrapped(object(), _library(cache))
    assert len(probe.calls) == 3
    assert not list(tmp_path.rglob(vec_isa.RECORD_NAME))


def test_a_damaged_record_only_means_probing(cache: Path) -> None:
    lib = _library(cache)
    (cache / vec_isa.RECORD_NAME).write_text("{not json")
    probe = Probe()
    wrapped = vec_isa.ProbeRecord("machine A").wrap(probe)
    assert wrapped(object(), lib) is True
    assert wrapped(object(), lib) is True
    assert len(probe.calls) == 1  # the damaged record was replaced by a good one
    (cache / vec_isa.RECORD_NAME).write_text(json.dumps({"machine A": "not a list"}))
    assert vec_isa.ProbeRecord("machine A").wrap(probe)(object(), lib) is True
    assert len(probe.calls) == 2


def test_installed_on_the_locked_torch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.13.0 has VecISA._probe_load: the wrapper goes in place once (a torch without it fails here first)."""
    import torch
    from torch._inductor import cpu_vec_isa

    monkeypatch.setattr(cpu_vec_isa.VecISA, "_probe_load", cpu_vec_isa.VecISA._probe_load)  # restored afterwards
    original = cpu_vec_isa.VecISA._probe_load
    rec = vec_isa.remember_probes()
    assert rec is not None and vec_isa.installed() is rec
    assert vec_isa.remember_probes() is rec
    assert cpu_vec_isa.VecISA._probe_load is not original
    assert f"torch {torch.__version__} at " in rec.machine
