"""NxDT's checkpoint converter, planned: HF -> NxDT shards for a run's layout (import) and back (export).

NxDT's examples/checkpoint_converter_scripts/checkpoint_converter.py is a 5-line wrapper of NxD's
CheckpointConverterBase (aws-neuron/neuronx-distributed fbac349, src/neuronx_distributed/scripts/
checkpoint_converter.py; line numbers below are that file's). What the plan relies on:
- its flags (get_arg_parser, 881-921): `--hw_backend` is required (884; trn1 or trn2); `--qkv_linear`,
  `--fuse_qkv`, `--coalesce_qkv`, `--load_xser`, `--save_xser`, `--pad_attn_heads` are `type=bool`, so any value,
  "False" included, means true: they are passed as `True` or left out;
- run() (926-932) asserts exactly one `--convert_*` flag;
- from a full state (832-870): `--input_dir` is ONE torch.load()ed state dict file (load_full_state, 731-738), HF
  names; the shards go to `<output_dir>/model/dp_rank_00_tp_rank_XX_pp_rank_XX.pt` (get_output_filename, 767-775),
  fused per rank when `--fuse_qkv` (717);
- to a full state (872-875): `--input_dir` is the tag's `model/` folder, `dp_rank_00_tp_rank_XX_pp_rank_XX.pt`
  (get_input_filename, 740-765); the result is `<output_dir>/checkpoint.pt` (save_full, 799-804), HF names.
Where the converter would produce wrong weights or fail for a layout, the plan refuses it (check_layout).

What the model NxDT builds (neuronx-distributed-training 9169aa0) decides the flags:
- lightning_modules/model/hf_models/llama_model.py:31-33: `qkv_linear` (default False), `fuse_qkv` (default True)
  from `model.*`, and the KV replication `kv_shared_group_size` = `distributed_strategy.kv_replicator`, which is the
  converter's `--kv_size_multiplier`;
- models/hf_models/modeling_llama.py:297: with fuse_qkv, equal heads and KV heads and no qkv_linear, q/k/v are one
  ColumnParallelLinear of stride 3, which the converter builds with `--coalesce_qkv` (coalesce_qkv, 145-158);
- lightning_modules/nlp_overrides.py:1141-1142: saves use xser when `exp_manager.save_xser` (default False there);
  a load detects xser itself: NxD's checkpoint_storage.py:150-158 (is_checkpoint_xser: a `*.tensors` folder);
- nlp_overrides.py:547-555: `resume_from_checkpoint=P` loads tag basename(P) from dirname(P), optimizer states
  skipped when `model.weight_init_only` (examples/training.py:48; the documented way to start from converted
  weights, docs/tutorials/hf_llama3_70B_pretraining.rst:378-389).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama3_hyperpod.config import RunConfig
from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.neuron.devices import Instance
from llama3_hyperpod.overrides import assignment

CONVERTER = "checkpoint_converter_scripts/checkpoint_converter.py"  # under NxDT's examples/
BOOL_FLAGS = ("--qkv_linear", "--fuse_qkv", "--coalesce_qkv", "--load_xser", "--save_xser", "--pad_attn_heads")
CONVERT_FLAGS = ("--convert_from_full_state", "--convert_to_full_state", "--convert_from_xser", "--convert_to_xser")
FULL_STATE_FILE = "checkpoint.pt"  # what --convert_to_full_state writes into --output_dir
CONSOLIDATED = "pytorch_model.bin"  # what the import's consolidate step writes for --convert_from_full_state
IMPORT_DIR = "import"  # <run dir>/import: the imported weights and their manifest, both backends
NXDT_SUBDIR = "nxdt"  # <run dir>/import/nxdt: the converter's output, what resume_from_checkpoint names
_SHARD = re.compile(r"^dp_rank_(\d{2})_tp_rank_(\d{2})_pp_rank_(\d{2})\.pt$")


@dataclass(frozen=True)
class ConverterLayout:
    """Everything about a run's model and layout that the converter's shards depend on."""

    tp: int
    pp: int
    virtual_pp: int
    kv_size_multiplier: int
    qkv_linear: bool
    fuse_qkv: bool  # fused q/k/v in NxD's GQA QKV layer (only with qkv_linear)
    coalesce_qkv: bool  # q/k/v as one stride-3 ColumnParallelLinear (fuse_qkv, MHA, no qkv_linear)
    hw_backend: str
    n_layers: int
    model_style: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layout_for(rc: RunConfig, instance: Instance) -> ConverterLayout:
    """The converter layout of a run: what NxDT builds for this config on this instance."""
    model = rc.raw.get("model") or {}
    strategy = rc.raw.get("distributed_strategy") or {}
    qkv_linear = bool(model.get("qkv_linear", False))
    fuse = bool(model.get("fuse_qkv", True))
    mha = rc.model.num_attention_heads == rc.model.num_key_value_heads
    return ConverterLayout(
        tp=rc.layout.tp,
        pp=rc.layout.pp,
        virtual_pp=int(strategy.get("virtual_pipeline_model_parallel_size") or 1),
        kv_size_multiplier=rc.layout.kv_replicator,
        qkv_linear=qkv_linear,
        fuse_qkv=fuse and qkv_linear,
        coalesce_qkv=fuse and mha and not qkv_linear,
        hw_backend="trn2" if instance.name.startswith("trn2") else "trn1",
        n_layers=rc.model.num_layers,
        model_style="megatron" if rc.cfg.model_source == "megatron" else "hf",
    )


def check_layout(lay: ConverterLayout, heads: int, kv_heads: int, *, to_full_state: bool) -> None:
    """Refuse layouts the converter cannot handle (it would fail half way, or write wrong weights)."""
    key = "distributed_strategy.kv_replicator"
    if lay.qkv_linear and lay.hw_backend == "trn1" and kv_heads * lay.kv_size_multiplier != lay.tp:
        # trn1 orders Q heads by KV head with one KV head (replica) per rank: from a full state 626-637, to it 399-409
        fix = (f"set kv_replicator to {lay.tp // kv_heads}" if lay.tp % kv_heads == 0
               else "use a tensor parallel degree that is a multiple of the KV heads")
        raise ConfigError(key, f"{kv_heads} KV heads x kv_replicator {lay.kv_size_multiplier} is not tensor parallel "
                          f"{lay.tp}: NxD's checkpoint converter lays out qkv_linear heads on trn1 only with one KV "
                          f"head per rank (scripts/checkpoint_converter.py:626-637, 399-409): {fix}")
    if to_full_state and lay.fuse_qkv and heads != kv_heads * lay.kv_size_multiplier:
        per_rank = (heads // lay.tp, kv_heads * lay.kv_size_multiplier // lay.tp)
        raise ConfigError("model.fuse_qkv", f"NxD's checkpoint converter splits a fused QKV weight into three equal "
                          f"parts (scripts/checkpoint_converter.py:268-290), but here a rank holds {per_rank[0]} "
                          f"query and {per_rank[1]} KV head(s) per projection: it would write wrong weights. This "
                          "export needs a run trained with model.fuse_qkv=false, or with heads = KV heads x "
                          "kv_replicator (e.g. tensor parallel 32, kv_replicator 4 for Llama 3 8B)")


def converter_argv(python: str, examples: str, lay: ConverterLayout, *, to_full_state: bool, input_path: str,
                   output_dir: str, config_json: str, xser: bool) -> list[str]:
    """The converter's command line for one direction (bool flags only as `True`, exactly one --convert_*)."""
    argv = [python, f"{examples}/{CONVERTER}", "--model_style", lay.model_style, "--input_dir", input_path,
            "--output_dir", output_dir, "--config", config_json, "--hw_backend", lay.hw_backend,
            "--tp_size", str(lay.tp), "--pp_size", str(lay.pp), "--n_layers", str(lay.n_layers),
            "--kv_size_multiplier", str(lay.kv_size_multiplier)]
    if not to_full_state:
        argv += ["--virtual_pp_size", str(lay.virtual_pp)]
    if lay.qkv_linear:
        argv += ["--qkv_linear", "True"]
    if lay.fuse_qkv:
        argv += ["--fuse_qkv", "True"]
    if lay.coalesce_qkv and not to_full_state:
        argv += ["--coalesce_qkv", "True"]
    if xser:
        argv += ["--load_xser" if to_full_state else "--save_xser", "True"]
    argv.append("--convert_to_full_state" if to_full_state else "--convert_from_full_state")
    return argv


def save_xser(rc: RunConfig) -> bool:
    """Whether NxDT saves this run's checkpoints with xser (nlp_overrides.py:1141-1142: default False)."""
    return bool((rc.raw.get("exp_manager") or {}).get("save_xser", False))


# ---- an NxDT checkpoint on disk --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NxdtTag:
    """A `<tag>.ckpt` dir of NxD model shards: its tp x pp grid and whether it is xser."""

    path: Path
    tp: int
    pp: int
    xser: bool
    shards: list[Path]


def is_nxdt_tag(path: Path) -> bool:
    model = path / "model"
    return model.is_dir() and any(_SHARD.match(p.name) for p in model.iterdir())


def read_tag(path: Path) -> NxdtTag:
    """The layout of a checkpoint from its model shard names; ConfigError when it is incomplete or not NxD's."""
    key = str(path)
    model = path / "model"
    if not model.is_dir():
        raise ConfigError(key, "has no model/ folder (not an NxDT checkpoint <tag>.ckpt)")
    if not (path / "done").is_file():
        raise ConfigError(key, "has no 'done' marker: NxD did not finish saving it (a newer save was interrupted?)")
    grid: set[tuple[int, int]] = set()
    shards = []
    for p in sorted(model.iterdir()):
        match = _SHARD.match(p.name)
        if match is None:
            if p.name.endswith((".tensors", ".info.pt")) or p.is_dir():
                continue
            if re.match(r"^dp_rank_\d{2}_ep_rank_", p.name):
                raise ConfigError(key, f"{p.name}: expert-parallel shards are not a Llama checkpoint")
            continue
        dp, tp, pp = (int(g) for g in match.groups())
        if dp != 0:
            continue  # model shards are saved by dp rank 0 (NxD trainer/checkpoint.py:_get_path, dp=False)
        grid.add((tp, pp))
        shards.append(p)
    if not grid:
        raise ConfigError(key, "model/ holds no dp_rank_00_tp_rank_XX_pp_rank_XX.pt shards")
    tp = 1 + max(t for t, _ in grid)
    pp = 1 + max(s for _, s in grid)
    missing = [(t, s) for t in range(tp) for s in range(pp) if (t, s) not in grid]
    if missing:
        t, s = missing[0]
        raise ConfigError(key, f"model/dp_rank_00_tp_rank_{t:02d}_pp_rank_{s:02d}.pt is missing ({len(grid)} of "
                               f"{tp * pp} shards of a tp {tp} x pp {pp} checkpoint)")
    xser = any(entry.is_dir() and entry.name.endswith(".tensors") for entry in model.iterdir())
    return NxdtTag(path.resolve(), tp, pp, xser, shards)


# ---- the record an import leaves for `train` -------------------------------------------------------------------


@dataclass(frozen=True)
class ImportRecord:
    """A neuron import of a run: where its NxDT weights are and the layout they were converted for."""

    manifest: Path
    checkpoint: Path
    layout: dict[str, Any]


def read_import(run_dir: str | Path) -> ImportRecord | None:
    """The run's neuron import (`<run dir>/import/manifest.json`), or None when it has none."""
    manifest = Path(run_dir) / IMPORT_DIR / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(manifest), f"cannot be read ({exc})") from None
    if not isinstance(data, dict) or data.get("backend") != "neuron":
        return None
    return ImportRecord(manifest, Path(run_dir) / IMPORT_DIR / NXDT_SUBDIR, dict(data.get("layout") or {}))


def layout_difference(recorded: dict[str, Any], now: ConverterLayout) -> str | None:
    for name, value in now.to_dict().items():
        if name in recorded and recorded[name] != value:
            return f"{name} {recorded[name]!r} there, {value!r} now"
    return None


def resume_overrides(rc: RunConfig, nxdt_dir: Path) -> list[str]:
    """What the neuron train launch adds to start from imported weights (Hydra's grammar)."""
    return [assignment("exp_manager.resume_from_checkpoint", str(nxdt_dir), rc.present),
            assignment("model.weight_init_only", True, rc.present)]


def import_overrides(rc: RunConfig, record: ImportRecord, instance: Instance, warnings: list[str]) -> list[str]:
    """The overrides that start a run without checkpoints of its own from its import; [] when the config names its
    own starting point. ConfigError when the import was converted for another layout than the config's now."""
    if rc.cfg.exp_manager.resume_from_checkpoint:
        warnings.append(f"exp_manager.resume_from_checkpoint {rc.cfg.exp_manager.resume_from_checkpoint} is used, "
                        f"not the run's imported weights {record.checkpoint}")
        return []
    why = layout_difference(record.layout, layout_for(rc, instance))
    if why is not None:
        raise ConfigError("distributed_strategy", f"the run's imported weights ({record.manifest}) were converted for "
                          f"another layout ({why}): NxD shards load only into their own layout; import again into a "
                          "new --run-name")
    if not record.checkpoint.is_dir():
        raise ConfigError(str(record.checkpoint), f"is missing but {record.manifest} records it")
    return resume_overrides(rc, record.checkpoint)
