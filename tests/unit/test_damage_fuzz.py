"""Property tests: random damage (truncation, zeroed or random bytes, inserted bytes, missing files) to a config, a
model config.json and a real checkpoint never ends in a traceback, and never yields damaged data.

- config: `load_config` either returns a RunConfig or raises ConfigError (one line naming a key or file).
- checkpoint: `checkpoint list` exits 0 and calls a checkpoint intact only when every file is byte for byte the
  original; `checkpoint export` exits 0 (and then wrote exactly the original weights) or 2 with one line.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llama3_hyperpod.cli import main
from llama3_hyperpod.config import ConfigError, load_config
from tests.conftest import CONFIG_TINY, CONFIGS

# One damage: (kind, position as a fraction of the file, length as a fraction, random bytes to write / insert).
DAMAGE = st.tuples(
    st.sampled_from(["truncate", "zero", "random", "insert", "delete"]),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=0.5),
    st.binary(min_size=1, max_size=64),
)


def damage(path: Path, kind: str, where: float, length: float, noise: bytes) -> None:
    data = path.read_bytes()
    at = int(where * len(data))
    span = max(1, int(length * len(data)))
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(data[:at])
    elif kind == "zero":
        path.write_bytes(data[:at] + b"\0" * len(data[at:at + span]) + data[at + span:])
    elif kind == "random":
        chunk = (noise * (span // len(noise) + 1))[:len(data[at:at + span])]
        path.write_bytes(data[:at] + chunk + data[at + span:])
    else:
        path.write_bytes(data[:at] + noise + data[at:])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(["yaml", "model"]), damages=st.lists(DAMAGE, min_size=1, max_size=3))
def test_damaged_config_files_are_a_config_error_or_a_config(target: str, damages: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        shutil.copy(CONFIGS / "models" / "tiny_llama3.json", root / "models" / "tiny_llama3.json")
        config = root / "tiny.yaml"
        config.write_text(yaml.safe_dump(yaml.safe_load(CONFIG_TINY.read_text())))
        victim = config if target == "yaml" else root / "models" / "tiny_llama3.json"
        for kind, where, length, noise in damages:
            if victim.exists():
                damage(victim, kind, where, length, noise)
        try:
            load_config(config)
            event("config still valid")
        except ConfigError as exc:
            assert exc.key and exc.message and "\n" not in str(exc)
            event("ConfigError")


Original = tuple[Path, dict[str, dict[str, bytes]], dict[str, dict[str, Any]]]  # run, files and weights per step


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def original(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Original:
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("export")
    files, weights = {}, {}
    for step in ("step_0000001", "step_0000002"):
        result = CliRunner().invoke(main, ["checkpoint", "export", str(small_run / "checkpoints" / step),
                                           str(out / step)])
        assert result.exit_code == 0, result.output
        files[step] = _tree(small_run / "checkpoints" / step)
        weights[step] = load_file(str(out / step / "model.safetensors"))
    return small_run, files, weights


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damages=st.lists(st.tuples(st.integers(min_value=0, max_value=100), DAMAGE), min_size=1, max_size=3))
def test_damaged_checkpoints_are_named_never_loaded(original: Original, damages: list[Any]) -> None:
    """The newest of two checkpoints is damaged: list names it, export of it refuses, export of the run dir falls
    back to the older, intact one, and whatever is exported is exactly an original checkpoint's weights."""
    import torch
    from safetensors.torch import load_file

    small_run, files, weights = original
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(small_run / "checkpoints", run / "checkpoints")
        copy = run / "checkpoints" / "step_0000002"
        names = sorted(files["step_0000002"])
        for pick, (kind, where, length, noise) in damages:
            victim = copy / names[pick % len(names)]
            if victim.exists():
                damage(victim, kind, where, length, noise)
        intact = _tree(copy) == files["step_0000002"]
        event(f"checkpoint {'intact' if intact else 'damaged'}")

        listed = CliRunner().invoke(main, ["checkpoint", "list", str(run)])
        assert listed.exception is None or isinstance(listed.exception, SystemExit), listed.output
        assert listed.exit_code == 0 and "Traceback" not in listed.output
        assert (f"{copy}  complete, intact" in listed.output) == intact, listed.output
        assert f"{run / 'checkpoints' / 'step_0000001'}  complete, intact" in listed.output

        for source in (copy, run):  # the step dir itself, and the run dir (its newest intact checkpoint)
            out = Path(tmp) / f"hf-{source.name}"
            exported = CliRunner().invoke(main, ["checkpoint", "export", str(source), str(out)])
            assert exported.exception is None or isinstance(exported.exception, SystemExit), exported.output
            assert "Traceback" not in exported.output
            event(f"export of the {'step dir' if source == copy else 'run dir'}: exit {exported.exit_code}")
            if source == run or intact:
                assert exported.exit_code == 0, exported.output
                expected = weights["step_0000002" if intact else "step_0000001"]
                got = load_file(str(out / "model.safetensors"))
                assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
            else:
                assert exported.exit_code == 2 and not (out / "model.safetensors").exists(), exported.output
                assert len([line for line in exported.output.splitlines() if line.startswith("error:")]) == 1
