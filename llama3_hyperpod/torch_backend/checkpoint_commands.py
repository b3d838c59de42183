"""`checkpoint` commands: list a run's checkpoints and export one in Hugging Face format (`import`, which needs the
plan options, is defined in cli.py and added to this group there; the export of an NxDT checkpoint is
checkpoint_export.py's).

Registered by cli.py. torch, safetensors and the DCP reader are imported inside the commands so the CLI starts fast.
Both check every file's sha256 against the done marker before trusting a checkpoint (`list --quick`: sizes only), so
a damaged checkpoint is named, never exported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llama3_hyperpod.errors import fail as _fail


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir as given, or the newest complete, intact one of a run dir / its checkpoints dir."""
    from llama3_hyperpod.torch_backend.checkpoint_files import CHECKPOINTS, DONE, newest_complete, problem

    if (path / DONE).exists() or (path / DONE).is_symlink() or path.name.startswith("step_"):
        why = problem(path)
        if why is not None:
            _fail(str(path), f"is not a complete, intact checkpoint: {why}")
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = newest_complete(root, lambda msg: click.echo(f"warning: {msg}", err=True))
    if found is None:
        _fail(str(path), f"holds no complete checkpoint (looked in {root})")
    assert found is not None
    return found


def load_model_state(checkpoint: Path) -> dict[str, Any]:
    """The model's full (unsharded) tensors from a DCP checkpoint, read in this one process (no process group)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(checkpoint),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    if not isinstance(state.get("model"), dict) or not state["model"]:
        raise ValueError("no model weights in it")
    return dict(state["model"])


def export_hf(checkpoint: Path, out_dir: Path) -> Path:
    """Write model.safetensors + config.json (+ generation_config.json) that LlamaForCausalLM.from_pretrained loads."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.api import CheckpointException

    from llama3_hyperpod.fsutil import replace_from, tmp_name, write_text
    from llama3_hyperpod.torch_backend.checkpoint_files import MODEL_CONFIG
    from llama3_hyperpod.torch_backend.model import to_hf_state_dict

    config_file = checkpoint / MODEL_CONFIG
    if not config_file.is_file():
        _fail(str(checkpoint), f"has no {MODEL_CONFIG} (saved by an older version?)")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(hf_config, dict):
            raise ValueError("not a JSON object")
        tensors = to_hf_state_dict(load_model_state(checkpoint))
    except (ValueError, KeyError, RuntimeError, CheckpointException) as exc:  # verified, so this is not corruption
        _fail(str(checkpoint), f"cannot be exported: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if hf_config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    hf_config = {**hf_config, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                 "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    tmp = tmp_name(weights)  # written aside, then renamed: a link at the target is replaced, never written through
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        replace_from(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}
    write_text(out_dir / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out_dir


@click.group()
def checkpoint() -> None:
    """Import Hugging Face weights into a run; list the torch backend's checkpoints; export to Hugging Face."""


@checkpoint.command(name="list")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="Check the done marker and file sizes only, not every file's sha256.")
def list_(run_dir: Path, quick: bool) -> None:
    """Every step_N of a run with its state: complete and intact, or why resume would skip it."""
    from llama3_hyperpod.torch_backend.checkpoint_files import (
        CHECKPOINTS,
        SETASIDE_PREFIX,
        WEIGHTS_ONLY,
        list_step_dirs,
        problem,
        read_marker,
    )

    root = run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir
    found = list_step_dirs(root)
    if not found:
        click.echo(f"{root}: no checkpoints")
    good = "complete (sizes only: --quick)" if quick else "complete, intact"
    for step, path in found:
        why = problem(path, verify=not quick)
        marker, _ = read_marker(path)
        imported = " (imported weights: `checkpoint import`)" if marker and marker.get(WEIGHTS_ONLY) else ""
        click.echo(f"{step:>9}  {path}  {good + imported if why is None else 'SKIPPED: ' + why}")
    for path in sorted(root.glob(f"{SETASIDE_PREFIX}*")):
        click.echo(f"{'-':>9}  {path}  set aside (was in the way of a save; kept for you to inspect)")


@checkpoint.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="NxDT checkpoint: the config it was trained with (default: the one `train` recorded in its run "
                   "dir, plan-train-node0.json).")
@click.option("--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="NxDT checkpoint: an override of that config (Hydra's grammar); repeat for more.")
@click.option("--nxdt-examples", default=None, envvar="NXDT_EXAMPLES_DIR",
              help="NxDT checkpoint: NxDT's examples/ folder (holds checkpoint_converter_scripts/).")
@click.option("--dry-run", is_flag=True, help="NxDT checkpoint: print every step, run nothing.")
def export(source: Path, out_dir: Path | None, config: Path | None, overrides: tuple[str, ...],
           nxdt_examples: str | None, dry_run: bool) -> None:
    """Write SOURCE to OUT_DIR in Hugging Face format.

    SOURCE is a torch-backend step_N dir or run dir (its newest complete checkpoint): OUT_DIR gets
    model.safetensors and config.json, which transformers' LlamaForCausalLM.from_pretrained(OUT_DIR) loads with the
    same logits as the trainer's model. Or an NxDT checkpoint <tag>.ckpt: NxDT's converter (--convert_to_full_state,
    for the layout of its shards and its run's config) writes the full state beside it, then it becomes HF
    safetensors + config.json + the run's tokenizer files + manifest.json in OUT_DIR (default: <tag>.hf beside it).
    """
    from llama3_hyperpod.neuron.convert import is_nxdt_tag

    if is_nxdt_tag(source):
        import os

        from llama3_hyperpod.checkpoint_export import export_nxdt, load_run_config
        from llama3_hyperpod.neuron.launch import DEFAULT_NXDT_EXAMPLES

        rc = load_run_config(config, overrides, source.resolve())
        examples = nxdt_examples or DEFAULT_NXDT_EXAMPLES
        sys.exit(export_nxdt(source, out_dir, rc, examples=examples, env=os.environ, dry_run=dry_run,
                             echo=click.echo))
    if out_dir is None:
        _fail("OUT_DIR", "is required for a torch-backend checkpoint")
    assert out_dir is not None
    ckpt = resolve_checkpoint(source)
    export_hf(ckpt, out_dir)
    click.echo(f"exported {ckpt} -> {out_dir} (model.safetensors, config.json)")
