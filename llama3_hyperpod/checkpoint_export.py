"""`checkpoint export` of an NxDT checkpoint (`<tag>.ckpt`) to a Hugging Face folder, for the CLI.

Its tp x pp grid comes from the shard names, xser from NxD's own rule (a `*.tensors` folder), the rest of the layout
from the run's config (the plan `train` recorded in the run dir, or --config); NxDT's converter writes the full state
dict beside the checkpoint, and our step turns it into HF safetensors + config.json + the run's tokenizer files + a
manifest, in `<tag>.hf` beside it by default. The steps run as checkpoint_transfer.py runs an import's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama3_hyperpod.checkpoint_transfer import (
    Echo,
    Step,
    StepFailedError,
    check_converter,
    config_record,
    manifest_text,
    our_step,
    print_plan,
    remove_path,
    run_steps,
    sdk_python,
    to_stderr,
)
from llama3_hyperpod.config import RunConfig, load_config
from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.hf import folder as hf_folder
from llama3_hyperpod.launchspec import Launch
from llama3_hyperpod.neuron import convert
from llama3_hyperpod.neuron.devices import instance_for


def recorded_config(tag: Path) -> tuple[Path, list[str]] | None:
    """The config and overrides `train` recorded for the run whose checkpoints dir holds `tag`."""
    for run_dir in (tag.parent.parent, tag.parent):
        plan_file = run_dir / "plan-train-node0.json"
        if plan_file.is_file():
            try:
                data = json.loads(plan_file.read_text(encoding="utf-8"))
                return Path(data["config_path"]), [str(o) for o in data.get("overrides", [])]
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def export_nxdt(tag_path: Path, out_dir: Path | None, rc: RunConfig, *, examples: str, env: Mapping[str, str],
                dry_run: bool, echo: Echo, keep_full_state: bool = False) -> int:
    """Plan and (unless dry_run) run the export of one NxDT checkpoint to HF; returns the exit code."""
    tag = convert.read_tag(tag_path)
    instance = instance_for(rc.layout.devices_per_node, rc.cfg.trainer.lnc)
    lay = convert.layout_for(rc, instance)
    if (tag.tp, tag.pp) != (lay.tp, lay.pp):
        raise ConfigError(str(tag.path), f"has tp {tag.tp} x pp {tag.pp} shards but the config says tp {lay.tp} x "
                                         f"pp {lay.pp}: give the config it was trained with (--config)")
    convert.check_layout(lay, rc.model.num_attention_heads, rc.model.num_key_value_heads, to_full_state=True)
    stem = tag.path.name.removesuffix(".ckpt")
    out = (out_dir or tag.path.with_name(f"{stem}.hf")).absolute()
    if out.exists() or out.is_symlink():
        raise ConfigError(str(out), "exists: choose another output folder or remove it")
    work = tag.path.with_name(f".{stem}.export-tmp")
    steps = _export_steps(tag, lay, rc, work, out, examples, env)
    warn = [] if tag.xser == convert.save_xser(rc) else [
        f"exp_manager.save_xser is {convert.save_xser(rc)} but the shards are {'' if tag.xser else 'not '}xser: "
        f"--load_xser follows the files"]
    header = (f"export: {tag.path} (tp {tag.tp} x pp {tag.pp}, {'xser' if tag.xser else 'torch.save'}, "
              f"{lay.hw_backend}) -> {out}")
    for line in warn:
        to_stderr(f"warning: {line}")
    check_converter(examples, dry_run, echo)
    if dry_run:
        print_plan(header, steps, echo)
        return 0
    echo(header)
    if work.exists() or work.is_symlink():
        remove_path(work)
    try:
        run_steps(steps, echo)
    except StepFailedError as exc:
        to_stderr(f"error: checkpoint export: {exc}; nothing was written")
        return exc.code if exc.code > 0 else 1
    finally:
        if not keep_full_state and work.exists():
            remove_path(work)
    echo(f"exported {tag.path} -> {out}")
    return 0


def _export_steps(tag: convert.NxdtTag, lay: convert.ConverterLayout, rc: RunConfig, work: Path, out: Path,
                  examples: str, env: Mapping[str, str]) -> list[Step]:
    """The export's steps, in `work` (beside the checkpoint) until the last one moves the HF folder to `out`."""
    config_json = work / "config.json"
    converter = convert.converter_argv(sdk_python(env), examples, lay, to_full_state=True,
                                       input_path=str(tag.path / "model"), output_dir=str(work / "full"),
                                       config_json=str(config_json), xser=tag.xser)
    hf_tmp = work / "hf"
    tokenizer = _run_tokenizer_files(rc, tag.path)

    def prepare() -> None:
        work.mkdir()
        config_json.write_text(json.dumps(rc.model.hf_config, indent=2) + "\n")

    def finish() -> None:
        complete_export(hf_tmp, rc, source=tag.path, layout={**lay.to_dict(), "xser": tag.xser},
                        converter=converter, tokenizer=tokenizer, final=out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(hf_tmp, out)

    steps = [
        Step("write the model's config.json for the converter (ours)", action=prepare,
             detail=f"-> {config_json}"),
        Step(f"NxDT's converter: tp {tag.tp} x pp {tag.pp} shards ({'xser' if tag.xser else 'torch.save'}) -> one "
             "full state dict beside the checkpoint", launch=Launch(converter, {}, {}, str(tag.path.parent))),
        Step("the full state dict -> HF safetensors, checked against the config (ours, tensor by tensor)",
             launch=our_step(env, tag.path.parent, "to-hf", "--full-state",
                             str(work / "full" / convert.FULL_STATE_FILE), "--config", str(config_json),
                             "--out", str(hf_tmp))),
        Step("config.json, tokenizer files, manifest; move into place (ours)", action=finish,
             detail=f"{', '.join(p.name for p in tokenizer) or 'no tokenizer files found'} + "
                    f"{hf_folder.MANIFEST} -> {out}; {work} removed"),
    ]
    return steps


def complete_export(hf_dir: Path, rc: RunConfig, *, source: Path, layout: dict[str, Any], converter: list[str],
                    tokenizer: list[Path], final: Path) -> None:
    """Beside the safetensors of `hf_dir` (what the to-hf step wrote): config.json, the tokenizer files and the
    manifest (the source shards' and every written file's sha256)."""
    written = sorted(p for p in hf_dir.iterdir() if p.is_file())
    config = {**rc.model.hf_config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copies = hf_folder.copy_companions(tokenizer, hf_dir)
    sources = sorted(p for p in (source / "model").rglob("*") if p.is_file())
    (hf_dir / hf_folder.MANIFEST).write_text(manifest_text(
        backend="neuron", direction="nxdt-to-hf", source=str(source), files=hf_folder.file_records(sources, source),
        layout=layout, config=config_record(rc), converter=[str(a) for a in converter],
        tokenizer=[p.name for p in copies],
        result={"folder": str(final), "files": hf_folder.file_records([*written, hf_dir / "config.json", *copies],
                                                                      hf_dir)}))


def _run_tokenizer_files(rc: RunConfig, tag: Path) -> list[Path]:
    """The run's tokenizer files: those its import kept, else those of the config's local tokenizer folder."""
    for run_dir in (tag.parent.parent, tag.parent):
        imported = run_dir / convert.IMPORT_DIR
        found = [imported / n for n in hf_folder.COMPANION_FILES if (imported / n).is_file()]
        if found:
            return found
    from llama3_hyperpod.config import tokenizer_path

    return hf_folder.tokenizer_files_in(tokenizer_path(rc.cfg))


def load_run_config(config: Path | None, overrides: tuple[str, ...], tag: Path) -> RunConfig:
    """--config (with overrides), else what `train` recorded for the run (plan-train-node0.json)."""
    if config is not None:
        return load_config(config, overrides)
    recorded = recorded_config(tag)
    if recorded is None:
        raise ConfigError(str(tag), "no plan-train-node0.json of its run found beside its checkpoints dir: give the "
                                    "config it was trained with (--config CONFIG, --override key=value)")
    path, recorded_overrides = recorded
    return load_config(path, [*recorded_overrides, *overrides])
