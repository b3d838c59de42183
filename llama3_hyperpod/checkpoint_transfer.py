"""`checkpoint import` (a Hugging Face folder -> the weights a run starts from) and `checkpoint export` of an NxDT
checkpoint (-> a Hugging Face folder), for the CLI.

Import, either backend: the folder and its architecture are checked against the run's model first (hf/folder.py;
one line, exit 2, nothing written); the run must have no checkpoints and no import yet. The run dir is locked
(runlock.py) while the import writes, everything goes to temp names that are renamed at the end, and on any failure
the temp files (and a run dir the import created) are removed. The result lands in the run:
- torch: `<run dir>/checkpoints/step_0000000`, a weights-only checkpoint in the trainer's verified format that
  `train` resumes from under any TP/DP layout (torch_backend/hf_import.py);
- neuron: `<run dir>/import/nxdt`, NxD shards for the run's layout made by NxDT's converter from one consolidated
  state dict that our own step writes first (hf/steps.py, run with the SDK's python); the neuron train launch then
  adds `exp_manager.resume_from_checkpoint=<it>` and `model.weight_init_only=true` for as long as the run has no
  checkpoint of its own (neuron/launch.py), so a requeued job resumes from its own checkpoints with their optimizer
  states instead of starting over from the import.
Both keep the tokenizer files and write `<run dir>/import/manifest.json`: the source folder, every file read with
its size and sha256, the layout, the config and what was made.

The steps both run (Step, run_steps, the manifest) are here; the export of an NxDT checkpoint is checkpoint_export.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama3_hyperpod
from llama3_hyperpod.config import RunConfig
from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.fsutil import refuse_links
from llama3_hyperpod.hf import folder as hf_folder
from llama3_hyperpod.launchspec import Launch, split_env
from llama3_hyperpod.neuron import checkpoints as nxd_checkpoints
from llama3_hyperpod.neuron import convert
from llama3_hyperpod.neuron.devices import instance_for
from llama3_hyperpod.neuron.launch import SDK_PYTHON_ENV, checkpoint_dir

MANIFEST_FORMAT = "llama3_hyperpod.hf_transfer/1"
IMPORT_TMP = ".import-tmp"  # <run dir>/.import-tmp while an import is written (the run dir is locked meanwhile)
STEPS_MODULE = "llama3_hyperpod.hf.steps"
Echo = Callable[[str], None]


def project_root() -> Path:
    """The folder holding the `llama3_hyperpod` package (/opt/app in the image): what PYTHONPATH names for our steps
    run by the SDK's interpreter, which does not have the project's venv."""
    return Path(llama3_hyperpod.__file__).resolve().parent.parent


def sdk_python(env: Mapping[str, str]) -> str:
    return env.get(SDK_PYTHON_ENV) or sys.executable


@dataclass(frozen=True)
class Step:
    """One step of a transfer: ours in this process (`launch` None) or a process to start."""

    title: str
    launch: Launch | None = None
    action: Callable[[], None] | None = None
    detail: str = ""

    def describe(self) -> str:
        return self.launch.shell() if self.launch is not None else self.detail


def our_step(env: Mapping[str, str], cwd: Path, *args: str) -> Launch:
    added, kept, replaced = split_env({}, env, forced={"PYTHONPATH": str(project_root())})
    return Launch([sdk_python(env), "-m", STEPS_MODULE, *args], added, kept, str(cwd), replaced)


def run_steps(steps: list[Step], echo: Echo) -> None:
    """Run the steps in order; the first process that exits non-zero raises StepFailedError."""
    for index, step in enumerate(steps, 1):
        echo(f"step {index}/{len(steps)}: {step.title}")
        if step.launch is None:
            assert step.action is not None
            step.action()
            continue
        launch = step.launch
        code = subprocess.run(launch.argv, cwd=launch.cwd, env={**os.environ, **launch.env}, check=False).returncode
        if code != 0:
            raise StepFailedError(index, len(steps), step.title, code)


class StepFailedError(Exception):
    def __init__(self, index: int, total: int, title: str, code: int) -> None:
        super().__init__(f"step {index}/{total} ({title}) exited {code}")
        self.code = code


def print_plan(header: str, steps: list[Step], echo: Echo) -> None:
    echo(header)
    for i, step in enumerate(steps, 1):
        echo(f"step {i}/{len(steps)}: {step.title}")
        echo(f"    {step.describe()}")


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_converter(examples: str, dry_run: bool, echo: Echo) -> None:
    """NxDT's converter must be there before anything is written (a dry run only says so)."""
    script = Path(examples) / convert.CONVERTER
    if script.is_file():
        return
    message = (f"{script} does not exist: point --nxdt-examples (or NXDT_EXAMPLES_DIR) at NxDT's examples/ folder "
               "(the image has it at the default)")
    if dry_run:
        to_stderr(f"warning: {message}")
        return
    raise ConfigError("--nxdt-examples", message)


def manifest_text(**fields: Any) -> str:
    return json.dumps({"format": MANIFEST_FORMAT, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields},
                      indent=2) + "\n"


def config_record(rc: RunConfig) -> dict[str, Any]:
    return {"path": str(rc.path), "overrides": list(rc.overrides), "model": rc.model.hf_config}


# ---- import --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportTarget:
    """Where an import goes: the planned run."""

    run_dir: Path
    backend: str  # "torch" or "neuron"
    instance: str | None
    layout: dict[str, Any]


def import_hf(hf_dir: Path, rc: RunConfig, target: ImportTarget, *, examples: str, env: Mapping[str, str],
              dry_run: bool, echo: Echo) -> int:
    """Check, plan and (unless dry_run) run an import; returns the exit code. ConfigError for bad input."""
    folder = hf_folder.read_folder(hf_dir)
    hf_folder.check_architecture(folder, rc.model.hf_config, "model.model_config")
    run_dir = target.run_dir
    final = run_dir / convert.IMPORT_DIR
    _check_run_starts_from_it(rc, target)
    _check_run_is_empty(rc, target)
    tmp = run_dir / IMPORT_TMP
    params = sum(t.numel for t in folder.tensors.values())
    header = (f"import: {folder.root} ({len(folder.weight_files)} safetensors file(s), {len(folder.tensors)} "
              f"tensors, {params / 1e6:.1f}M parameters, {'/'.join(folder.dtypes())}, "
              f"{_size(folder.nbytes)}) -> run {run_dir} ({target.backend}"
              + (f", {target.instance}" if target.instance else "") + ")")
    if target.backend == "torch":
        steps, made = _torch_import_steps(folder, rc, target, tmp)
    else:
        steps, made = _neuron_import_steps(folder, rc, target, tmp, examples, env)
        check_converter(examples, dry_run, echo)
    if dry_run:
        print_plan(header, steps, echo)
        return 0
    echo(header)
    created = not run_dir.exists()
    from llama3_hyperpod import runlock

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = runlock.acquire(run_dir, purpose="import")
    try:
        _check_run_is_empty(rc, target)  # again, now that the run is ours
        if tmp.is_symlink() or tmp.exists():
            remove_path(tmp)  # an import that crashed: ours, under our lock
        tmp.mkdir()
        try:
            run_steps(steps, echo)
            os.rename(tmp, final)
        except BaseException:
            remove_path(tmp)
            for path in made:
                if path.exists():
                    remove_path(path)
            raise
    except StepFailedError as exc:
        to_stderr(f"error: checkpoint import: {exc}; nothing was kept")
        return exc.code if exc.code > 0 else 1
    finally:
        if lock is not None:
            lock.release()
        if created and not final.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
    echo(f"imported {folder.root} -> {made[0] if made else final} (manifest {final / hf_folder.MANIFEST})")
    return 0


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def _check_run_starts_from_it(rc: RunConfig, target: ImportTarget) -> None:
    """Refuse an import the run would not start from (the trainer resumes only with resume_if_exists, and an explicit
    resume_from_checkpoint wins over the import on both backends)."""
    em = rc.cfg.exp_manager
    if em.resume_from_checkpoint:
        raise ConfigError("exp_manager.resume_from_checkpoint", f"is set ({em.resume_from_checkpoint}): the run would "
                          "start from it, not from the imported weights; drop it")
    if target.backend == "torch" and not em.resume_if_exists:
        raise ConfigError("exp_manager.resume_if_exists", "is false: `train` would not start from the imported "
                          "step-0 checkpoint; set it true")


def _check_run_is_empty(rc: RunConfig, target: ImportTarget) -> None:
    """An import starts a run: refuse a run that has checkpoints or an import already (nothing is replaced)."""
    run_dir = target.run_dir
    final = run_dir / convert.IMPORT_DIR
    if run_dir.exists():
        refuse_links(run_dir.parent, run_dir)
        refuse_links(run_dir, final, run_dir / IMPORT_TMP, run_dir / "checkpoints")
    if final.exists() or final.is_symlink():
        raise ConfigError(str(final), "exists: this run already has imported weights (import into a new --run-name, "
                                      "or remove that folder)")
    if target.backend == "torch":
        from llama3_hyperpod.torch_backend.checkpoint_files import CHECKPOINTS, list_step_dirs

        found = list_step_dirs(run_dir / CHECKPOINTS)
        if found:
            raise ConfigError(str(run_dir), f"already has checkpoints ({found[-1][1].name}): an import starts a run; "
                                            "use a new --run-name")
    else:
        found_nxd = nxd_checkpoints.scan(checkpoint_dir(rc, str(run_dir)))
        if found_nxd:
            raise ConfigError(str(run_dir), f"already has checkpoints ({found_nxd[-1].path.name}): an import starts "
                                            "a run; use a new --run-name")


def _torch_import_steps(folder: hf_folder.HfFolder, rc: RunConfig, target: ImportTarget,
                        tmp: Path) -> tuple[list[Step], list[Path]]:
    from llama3_hyperpod.hf import tensors as hf_tensors
    from llama3_hyperpod.torch_backend import hf_import
    from llama3_hyperpod.torch_backend.checkpoint_files import CHECKPOINTS, TMP_PREFIX, step_dir

    hf_config = dict(rc.model.hf_config)
    plan = hf_tensors.check_tensors(folder.tensors, hf_config, str(folder.root))
    checkpoints = target.run_dir / CHECKPOINTS
    final = step_dir(checkpoints, 0)

    def write() -> None:
        checkpoints.mkdir(exist_ok=True)
        hf_import.write_step0(folder, plan, hf_config, checkpoints, f"{TMP_PREFIX}import-{final.name}")

    def record() -> None:
        copies = hf_folder.copy_companions(folder.companions, tmp)
        (tmp / hf_folder.MANIFEST).write_text(manifest_text(
            backend="torch", source=str(folder.root), files=hf_folder.file_records(folder.files, folder.root),
            tokenizer=[p.name for p in copies],
            layout={"written": hf_import.IMPORT_LAYOUT, "run": target.layout,
                    "note": "full fp32 tensors, resharded by DCP onto the run's layout at load"},
            config=config_record(rc), result={"checkpoint": str(final), "weights_only": True}))

    steps = [
        Step("write the weights-only step-0 checkpoint (ours, one decoder layer in memory at a time)", action=write,
             detail=f"{folder.root} -> {final} (fp32, DCP, digests, identity; train resumes from it under any "
                    "TP x DP)"),
        Step("keep the tokenizer files and write the manifest (ours)", action=record,
             detail=f"{', '.join(p.name for p in folder.companions) or 'no tokenizer files'} + "
                    f"{hf_folder.MANIFEST} (every file read, sha256) -> {target.run_dir / convert.IMPORT_DIR}"),
    ]
    return steps, [final]


def _neuron_import_steps(folder: hf_folder.HfFolder, rc: RunConfig, target: ImportTarget, tmp: Path,
                         examples: str, env: Mapping[str, str]) -> tuple[list[Step], list[Path]]:
    assert target.instance is not None
    lay = convert.layout_for(rc, instance_for(rc.layout.devices_per_node, rc.cfg.trainer.lnc))
    convert.check_layout(lay, rc.model.num_attention_heads, rc.model.num_key_value_heads, to_full_state=False)
    final = target.run_dir / convert.IMPORT_DIR
    config_json = tmp / "config.json"
    consolidated = tmp / convert.CONSOLIDATED
    nxdt_out = tmp / convert.NXDT_SUBDIR
    xser = convert.save_xser(rc)
    converter = convert.converter_argv(sdk_python(env), examples, lay, to_full_state=False,
                                       input_path=str(consolidated), output_dir=str(nxdt_out),
                                       config_json=str(config_json), xser=xser)
    resume = convert.resume_overrides(rc, final / convert.NXDT_SUBDIR)

    def prepare() -> None:
        config_json.write_text(json.dumps(rc.model.hf_config, indent=2) + "\n")

    def record() -> None:
        consolidated.unlink(missing_ok=True)  # as big as the model; the shards are the result
        copies = hf_folder.copy_companions(folder.companions, tmp)
        (tmp / hf_folder.MANIFEST).write_text(manifest_text(
            backend="neuron", source=str(folder.root), files=hf_folder.file_records(folder.files, folder.root),
            tokenizer=[p.name for p in copies], layout=lay.to_dict(), xser=xser, config=config_record(rc),
            converter=[str(a) for a in converter],
            result={"checkpoint": str(final / convert.NXDT_SUBDIR), "train_adds": resume}))

    steps = [
        Step("write the model's config.json for the converter (ours)", action=prepare,
             detail=f"-> {config_json} (the run's model, with the YAML's overrides)"),
        Step("consolidate the safetensors into one state dict file (ours, tensor by tensor, HF names and dtypes)",
             launch=our_step(env, tmp, "consolidate", "--hf-dir", str(folder.root), "--config", str(config_json),
                             "--out", str(consolidated))),
        Step(f"NxDT's converter: full state -> tp {lay.tp} x pp {lay.pp} shards for {lay.hw_backend}",
             launch=Launch(converter, {}, {}, str(tmp))),
        Step("keep the tokenizer files, write the manifest, drop the consolidated file, move into place (ours)",
             action=record,
             detail=f"{tmp} -> {final}; then `train` adds {' '.join(resume)} until the run has a checkpoint of its "
                    "own"),
    ]
    return steps, []
