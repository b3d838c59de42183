"""Load an NxDT-format YAML, apply `a.b.c=value` overrides and check every cross-field rule before anything runs.

Every problem with the user's input surfaces as a `ConfigError` naming the key to fix; the CLI turns it into one line
on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llama3_hyperpod import schema

_OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)=(?P<value>.*)$", re.DOTALL)
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RUN_NAME_MAX = 128  # one path component, well below NAME_MAX (255) with room for the project's own suffixes


def check_run_name(name: str, key: str) -> None:
    """A run name names one folder under the output dir: a single path component of sane length."""
    if not isinstance(name, str) or not _RUN_NAME.match(name):
        raise ConfigError(key, f"{name!r} must be letters, digits, '.', '_' or '-', starting with a letter or digit "
                          "(it names one folder under the output dir)")
    if len(name) > RUN_NAME_MAX:
        raise ConfigError(key, f"is {len(name)} characters long; at most {RUN_NAME_MAX} (it names a folder)")


# Numbers that must be finite and in range: (key, lowest, highest, lowest allowed itself). NaN and inf pass every
# `<` test, so each is checked with math.isfinite first. seed: PyTorch Lightning's seed_everything (used by NxDT)
# accepts 0..2**32-1 (lightning/fabric/utilities/seed.py: np.iinfo(np.uint32)); numpy's default_rng rejects < 0.
_NUMBER_RULES: tuple[tuple[str, float, float, bool], ...] = (
    ("model.optim.lr", 0, math.inf, False),
    ("model.optim.weight_decay", 0, math.inf, True),
    ("model.optim.eps", 0, math.inf, False),
    ("model.optim.sched.min_lr", 0, math.inf, True),
    ("trainer.gradient_clip_val", 0, math.inf, True),
    ("trainer.limit_val_batches", 0, math.inf, True),
    ("trainer.limit_test_batches", 0, math.inf, True),
    ("model.rope_theta", 0, math.inf, False),
    ("torch_backend.peak_tflops", 0, math.inf, False),
    ("seed", 0, 2**32 - 1, True),
)
# Keys holding filesystem paths: resolved against the YAML's folder when written in the YAML, against the
# working directory when given as an override.
PATH_KEYS = ("model.model_config", "data.train_dir", "data.val_dir", "data.test_dir", "data.tokenizer",
             "exp_manager.explicit_log_dir")


class ConfigError(Exception):
    """Bad user input: `key` is the dotted config key (or file) to fix, `message` says what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class ModelShape:
    """The numbers of the Llama architecture that planning and the torch backend need."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None
    bos_token_id: int | None
    eos_token_id: int | None
    hf_config: dict[str, Any]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Exact count for the Llama architecture (no biases), embeddings and output layer included."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
        output = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + output


@dataclass(frozen=True)
class Layout:
    """How the world of devices is split: tensor x pipeline x context x data parallel."""

    tp: int
    pp: int
    cp: int
    dp: int
    num_nodes: int
    devices_per_node: int
    world_size: int
    zero1: bool
    sequence_parallel: bool
    kv_replicator: int


@dataclass(frozen=True)
class RunConfig:
    path: Path
    overrides: tuple[str, ...]
    cfg: DictConfig
    model: ModelShape
    layout: Layout
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    num_nodes: int | None = None,
    require_data: bool = False,
) -> RunConfig:
    """Read, merge and validate. `num_nodes` (from Slurm) wins over trainer.num_nodes, as NxDT's train.sh does."""
    config_path = Path(path).resolve()
    user = _read_yaml(config_path)
    _resolve_paths(user, base=config_path.parent)
    parsed = [_parse_override(item) for item in overrides]
    if num_nodes is not None:
        parsed.append(("trainer.num_nodes", num_nodes))

    merged = _merge_into_schema(user, source=str(path))
    for key, value in parsed:
        is_path = key in PATH_KEYS and isinstance(value, str) and value and not value.startswith("s3://")
        _apply_override(merged, key, str(Path(value).resolve()) if is_path else value)
    _resolve_interpolations(merged)
    OmegaConf.set_readonly(merged, True)

    try:  # a mandatory value still missing (model.model_config: ???) surfaces here, as OmegaConf's exception
        model = load_model_shape(merged)
        layout = _layout(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback="config") from None
    rc = RunConfig(
        path=config_path,
        overrides=tuple(overrides),
        cfg=merged,
        model=model,
        layout=layout,
        seq_len=merged.model.encoder_seq_length,
        micro_batch_size=merged.data.micro_batch_size,
        global_batch_size=merged.data.global_batch_size,
        grad_accum_steps=max(1, merged.data.global_batch_size // max(1, merged.data.micro_batch_size * layout.dp)),
    )
    validate(rc, require_data=require_data)
    return rc


# ----------------------------------------------------------------------------------------------- reading and merging


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "could not parse"
        raise ConfigError(str(path), f"malformed YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(str(path), "the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _resolve_paths(user: dict[str, Any], base: Path) -> None:
    for dotted in PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node: Any = user
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            value = node[leaf]
            if value and not value.startswith(("s3://", "???", "${")):
                node[leaf] = str((base / value).resolve())


def _parse_override(item: str) -> tuple[str, Any]:
    match = _OVERRIDE.match(item.strip())
    if not match:
        candidate = item.split("=", 1)[0].strip()
        shown = candidate if re.fullmatch(r"[\w.]+", candidate) else "override"
        raise ConfigError(shown, f"override {item!r} must look like key.path=value")
    key, raw = match.group("key"), match.group("value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge_into_schema(user: dict[str, Any], source: str) -> DictConfig:
    base = OmegaConf.structured(schema.NxdtConfig)
    _check_known_keys(user, schema.NxdtConfig, prefix="")
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(user))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback=source) from None
    assert isinstance(merged, DictConfig)
    return merged


def _check_known_keys(user: Any, section: Any, prefix: str) -> None:
    """Reject unknown keys with the closest valid one, before OmegaConf's less helpful message."""
    if not isinstance(user, dict):
        return
    known = {f.name: f for f in fields(section)}
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in known:
            raise ConfigError(dotted, _unknown_key_message(str(key), prefix, list(known)))
        child_type = _section_type(section, key)
        if child_type is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(dotted, f"must be a mapping of keys, got {value!r}")
            _check_known_keys(value, child_type, prefix=f"{dotted}.")


def _section_type(section: Any, key: str) -> Any:
    hints = {f.name: f for f in fields(section)}
    factory = hints[key].default_factory
    if callable(factory):
        made = factory()
        return type(made) if is_dataclass(made) else None
    return None


def _unknown_key_message(key: str, prefix: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    where = f"in '{prefix.rstrip('.')}'" if prefix else "at the top level"
    return f"unknown key {where}{hint}"


def _schema_section_at(dotted_parent: str) -> Any:
    section: Any = schema.NxdtConfig
    for part in filter(None, dotted_parent.split(".")):
        section = _section_type(section, part) if part in {f.name for f in fields(section)} else None
        if section is None:
            return None
    return section


def _apply_override(merged: DictConfig, key: str, value: Any) -> None:
    parent, _, leaf = key.rpartition(".")
    section = _schema_section_at(parent)
    if section is None:
        raise ConfigError(key, f"unknown key: '{parent}' is not a section")
    names = [f.name for f in fields(section)]
    if leaf not in names:
        raise ConfigError(key, _unknown_key_message(leaf, f"{parent}." if parent else "", names))
    if _section_type(section, leaf) is not None:
        raise ConfigError(key, "is a section; override one of its keys instead")
    try:
        OmegaConf.update(merged, key, value, merge=False)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback=key) from None


def _resolve_interpolations(merged: DictConfig) -> None:
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback="config") from None


def _omegaconf_error(exc: OmegaConfBaseException, fallback: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or fallback
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    value = getattr(exc, "value", None)
    ref_type = getattr(exc, "ref_type", None)
    if "could not be converted" in text or "Value '" in text or "Invalid type" in text or "Invalid value" in text:
        wanted = _type_name(ref_type)
        return ConfigError(key, f"expected {wanted}, got {value!r}" if wanted else text)
    if "Missing mandatory value" in text:
        return ConfigError(key, "is required")
    return ConfigError(key, text)


def _type_name(ref_type: Any) -> str:
    text = str(ref_type or "")
    for name, shown in (("bool", "true or false"), ("int", "an integer"), ("float", "a number"), ("str", "a string")):
        if name in text:
            return shown
    return "a list" if "List" in text or "list" in text else ""


# ---------------------------------------------------------------------------------------------------- model and layout


def load_model_shape(cfg: DictConfig) -> ModelShape:
    """Read the HF config.json named by model.model_config and apply the YAML's model.* overrides as NxDT does."""
    key = "model.model_config"
    path = Path(cfg.model.model_config)
    if not path.is_file():
        raise ConfigError(key, f"model config file {path} does not exist")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"{path} is not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConfigError(key, f"{path} must hold a JSON object")
    for yaml_key, hf_key in (
        ("num_layers", "num_hidden_layers"),
        ("hidden_size", "hidden_size"),
        ("rope_theta", "rope_theta"),
        ("max_position_embeddings", "max_position_embeddings"),
    ):
        value = cfg.model.get(yaml_key)
        if value is not None:
            hf[hf_key] = value

    def need_int(name: str, default: int | None = None) -> int:
        value = hf.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, f"{path}: '{name}' must be a positive integer, got {value!r}")
        return value

    heads = need_int("num_attention_heads")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is not None and (not isinstance(rope_scaling, dict) or "factor" not in rope_scaling):
        raise ConfigError(key, f"{path}: 'rope_scaling' must be an object with a 'factor', got {rope_scaling!r}")
    try:
        rope_theta = float(hf.get("rope_theta", 10000.0))
        eps = float(hf.get("rms_norm_eps", 1e-6))
    except (TypeError, ValueError):
        raise ConfigError(key, f"{path}: 'rope_theta' and 'rms_norm_eps' must be numbers") from None
    return ModelShape(
        hidden_size=need_int("hidden_size"),
        intermediate_size=need_int("intermediate_size"),
        num_layers=need_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=need_int("num_key_value_heads", heads),
        vocab_size=need_int("vocab_size"),
        max_position_embeddings=need_int("max_position_embeddings"),
        rope_theta=rope_theta,
        rms_norm_eps=eps,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos := hf.get("eos_token_id"), list) else eos,
        hf_config=hf,
    )


def _layout(cfg: DictConfig) -> Layout:
    ds = cfg.distributed_strategy
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size", "kv_replicator"):
        if ds[key] < 1:
            raise ConfigError(f"distributed_strategy.{key}", f"must be >= 1, got {ds[key]}")
    for key in ("devices", "num_nodes"):
        if cfg.trainer[key] < 1:
            raise ConfigError(f"trainer.{key}", f"must be >= 1, got {cfg.trainer[key]}")
    tp, pp, cp = ds.tensor_model_parallel_size, ds.pipeline_model_parallel_size, ds.context_parallel_size
    world = cfg.trainer.num_nodes * cfg.trainer.devices
    if world % (tp * pp * cp):
        raise ConfigError(
            "distributed_strategy.tensor_model_parallel_size",
            f"tensor {tp} x pipeline {pp} x context {cp} = {tp * pp * cp} does not divide the world of "
            f"{cfg.trainer.num_nodes} node(s) x {cfg.trainer.devices} devices = {world}",
        )
    return Layout(
        tp=tp,
        pp=pp,
        cp=cp,
        dp=world // (tp * pp * cp),
        num_nodes=cfg.trainer.num_nodes,
        devices_per_node=cfg.trainer.devices,
        world_size=world,
        zero1=bool(ds.zero1),
        sequence_parallel=bool(ds.sequence_parallel),
        kv_replicator=ds.kv_replicator,
    )


# ---------------------------------------------------------------------------------------------------------- the rules


def validate(rc: RunConfig, *, require_data: bool = False) -> None:
    """Every cross-field rule; the first broken one raises. Order: cheap scalar checks, then shapes, then files."""
    cfg, m, lay = rc.cfg, rc.model, rc.layout
    check_run_name(cfg.name, "name")
    _check_numbers(rc)
    _positive(cfg, "data.micro_batch_size", "data.global_batch_size", "model.encoder_seq_length", "trainer.max_steps",
              "trainer.log_every_n_steps", "exp_manager.checkpoint_callback_params.every_n_train_steps")
    _at_least_zero(cfg, "model.optim.sched.warmup_steps", "model.optim.sched.constant_steps")
    betas = list(cfg.model.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("model.optim.betas", f"must be two numbers in [0, 1), got {betas}")
    _one_of("precision.type", cfg.precision.type, schema.PRECISION_TYPES,
            hint={"mixedprecisionSR": "mixed_precision_SR (NxDT raises on the documented 'mixedprecisionSR')"})
    granularity = cfg.model.activations_checkpoint_granularity
    if granularity is not None:
        _one_of("model.activations_checkpoint_granularity", granularity, schema.RECOMPUTE_GRANULARITIES)
    _one_of("model.optim.name", cfg.model.optim.name, schema.OPTIMIZERS)
    _one_of("model.optim.sched.name", cfg.model.optim.sched.name, schema.SCHEDULERS)
    if not cfg.compiler_cache_url.strip():
        raise ConfigError("compiler_cache_url", "must name a directory (or s3:// URL) for the compiled graph cache")

    heads, kv = m.num_attention_heads, m.num_key_value_heads
    if m.hidden_size % heads:
        raise ConfigError("model.hidden_size",
                          f"hidden size {m.hidden_size} is not divisible by {heads} attention heads")
    if heads % kv:
        raise ConfigError("model.model_config", f"{heads} attention heads are not divisible by {kv} KV heads")
    if heads % lay.tp:
        raise ConfigError("distributed_strategy.tensor_model_parallel_size",
                          f"{heads} attention heads are not divisible by tensor parallel {lay.tp}")
    if (kv * lay.kv_replicator) % lay.tp:
        need = lay.tp // kv if kv < lay.tp and lay.tp % kv == 0 else None
        fix = f": set distributed_strategy.kv_replicator={need}" if need else ""
        raise ConfigError("distributed_strategy.kv_replicator",
                          f"{kv} KV heads x kv_replicator {lay.kv_replicator} = {kv * lay.kv_replicator} "
                          f"is not divisible by tensor parallel {lay.tp}{fix}")
    if m.num_layers % lay.pp:
        raise ConfigError("distributed_strategy.pipeline_model_parallel_size",
                          f"{m.num_layers} layers are not divisible by pipeline parallel {lay.pp}")
    if rc.global_batch_size % (rc.micro_batch_size * lay.dp):
        raise ConfigError("data.global_batch_size",
                          f"{rc.global_batch_size} is not divisible by micro batch {rc.micro_batch_size} x "
                          f"data parallel {lay.dp} = {rc.micro_batch_size * lay.dp}")
    if rc.seq_len > m.max_position_embeddings:
        raise ConfigError("model.encoder_seq_length",
                          f"{rc.seq_len} exceeds max_position_embeddings {m.max_position_embeddings}")
    if lay.sequence_parallel and rc.seq_len % (lay.tp * lay.cp):
        raise ConfigError("model.encoder_seq_length",
                          f"{rc.seq_len} is not divisible by tensor x context parallel {lay.tp * lay.cp}, "
                          "which sequence parallel needs")

    if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer).exists():
        raise ConfigError("data.tokenizer", f"{cfg.data.tokenizer} does not exist")
    if require_data:
        train_dir = cfg.data.train_dir
        if train_dir is None:
            raise ConfigError("data.train_dir", "is not set: point it at a dataset made by `data prepare`")
        if not train_dir.startswith("s3://") and not Path(train_dir).is_dir():
            raise ConfigError("data.train_dir", f"{train_dir} is not a directory")


def _check_numbers(rc: RunConfig) -> None:
    """Every number in _NUMBER_RULES (and the model's rope_theta / rms_norm_eps) is finite and in its range."""
    values = [(key, _get(rc.cfg, key), lo, hi, closed) for key, lo, hi, closed in _NUMBER_RULES]
    values += [("model.model_config", rc.model.rope_theta, 0, math.inf, False),
               ("model.model_config", rc.model.rms_norm_eps, 0, math.inf, False)]
    for key, value, lo, hi, closed in values:
        if value is None:
            continue
        finite = isinstance(value, int) or math.isfinite(value)  # (a huge int overflows isfinite)
        bad = not finite or value > hi or value < lo or (value == lo and not closed)
        if bad:
            low = f">= {lo}" if closed else f"> {lo}"
            span = low if hi == math.inf else f"{low} and <= {hi}"
            what = "rope_theta and rms_norm_eps must be" if key == "model.model_config" else "must be"
            raise ConfigError(key, f"{what} a finite number {span}, got {value}")


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")


def _at_least_zero(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")


def _one_of(key: str, value: str, allowed: Sequence[str], hint: dict[str, str] | None = None) -> None:
    if value in allowed:
        return
    suggestion = (hint or {}).get(value) or next(iter(difflib.get_close_matches(value, allowed, n=1)), None)
    extra = f"; did you mean {suggestion}?" if suggestion else ""
    raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}{extra}")
