"""Load an NxDT-format YAML the way NxDT does (Hydra compose + overrides), then check every rule before anything runs.

Composition is Hydra's own (llama3_hyperpod/overrides.py), so an override is accepted here exactly when NxDT's
orchestrator would accept it. On top of that: every key is checked against what NxDT really reads
(llama3_hyperpod/nxdt_keys.py), the keys we interpret are typed (llama3_hyperpod/schema.py), relative paths are made
absolute (a YAML's against its folder, an override's against the working directory) and every cross-field rule is
checked. Every problem is a `ConfigError` naming the key; the CLI turns it into one line and exit code 2.

Over 400 lines: loading and every rule of the config in one place, so no rule is checked twice elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llama3_hyperpod import nxdt_keys, overrides, schema
from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.hf.llama_config import LlamaArgs

__all__ = ["PATH_KEYS", "ConfigError", "Layout", "LlamaArgs", "RunConfig", "load_config", "tokenizer_path"]

# NeMo registers `multiply` on import (nemo/core/classes/modelPT.py: `OmegaConf.register_new_resolver("multiply",
# lambda x, y: x * y, replace=True)`); NxDT's example configs use it for checkpoint_callback_params.model_parallel_size.
if not OmegaConf.has_resolver("multiply"):
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y)

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
# Keys holding filesystem paths: a relative one is resolved against the YAML's folder when the YAML sets it, against
# the working directory when an override does. `data.tokenizer.type` may also be a hub name: resolved only if it exists.
PATH_KEYS = ("model.model_config", "data.train_dir", "data.val_dir", "data.test_dir", "data.tokenizer",
             "data.tokenizer.type", "exp_manager.explicit_log_dir", "exp_manager.resume_from_checkpoint",
             "exp_manager.checkpoint_callback_params.dirpath")
_MAYBE_NAME_KEYS = ("data.tokenizer.type",)
_ABSENT = object()


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
    overrides: tuple[str, ...]  # as the user wrote them
    nxdt_overrides: tuple[str, ...]  # the same, with relative paths made absolute: what NxDT must receive
    cfg: DictConfig  # the typed view of the keys we interpret (defaults filled in)
    raw: DictConfig  # everything NxDT will see, interpolations resolved
    model: LlamaArgs  # the architecture (hf/llama_config.py), not the YAML's model section (cfg.model)
    layout: Layout
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum_steps: int
    yaml_path_fixes: tuple[str, ...] = ()  # overrides that carry the YAML's relative paths to NxDT as absolute ones
    present: frozenset[str] = frozenset()  # keys of YAML + user overrides: a derived override of any other needs ++
    warnings: tuple[str, ...] = ()

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def load_config(
    path: str | Path,
    overrides_: Sequence[str] = (),
    *,
    num_nodes: int | None = None,
) -> RunConfig:
    """Compose, check and derive. `num_nodes` (from Slurm) wins over trainer.num_nodes, as NxDT's train.sh does."""
    config_path = Path(path).resolve()
    _check_yaml_file(config_path, shown=str(path))
    items = list(overrides_)
    try:
        composed = overrides.compose(config_path, items)
    except ConfigError as exc:
        raise ConfigError(str(path), exc.message) if exc.key == "CONFIG" else exc from None
    present = overrides.present_keys(composed)
    if num_nodes is not None:
        OmegaConf.update(composed, "trainer.num_nodes", num_nodes, force_add=True)
    nxdt_items, yaml_fixes = _absolute_paths(composed, items, base=config_path.parent)
    raw = _resolved(composed)
    warnings = _check_keys(raw)
    typed = _typed(raw)
    OmegaConf.set_readonly(typed, True)
    OmegaConf.set_readonly(raw, True)

    try:  # a mandatory value still missing (model.model_config: ???) surfaces here, as OmegaConf's exception
        arch = load_llama_args(typed)
        layout = _layout(typed)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback="config") from None
    seq_len = typed.data.seq_length or typed.model.encoder_seq_length
    rc = RunConfig(
        path=config_path,
        overrides=tuple(items),
        nxdt_overrides=tuple(nxdt_items),
        cfg=typed,
        raw=raw,
        model=arch,
        layout=layout,
        seq_len=seq_len,
        micro_batch_size=typed.data.micro_batch_size,
        global_batch_size=typed.data.global_batch_size,
        grad_accum_steps=max(1, typed.data.global_batch_size // max(1, typed.data.micro_batch_size * layout.dp)),
        yaml_path_fixes=tuple(yaml_fixes),
        present=present,
        warnings=tuple(warnings),
    )
    validate(rc)
    return rc


def tokenizer_path(cfg: DictConfig) -> str | None:
    """The tokenizer a config names: `data.tokenizer` as a path (ours) or NxDT's mapping form `data.tokenizer.type`."""
    tok = cfg.data.tokenizer
    if isinstance(tok, DictConfig | dict):
        value = tok.get("type")
        return str(value) if value else None
    return str(tok) if tok else None


# ----------------------------------------------------------------------------------------------- reading and merging


def _check_yaml_file(path: Path, shown: str) -> None:
    """The file problems NxDT's Hydra would report less clearly: missing, not .yaml, not UTF-8, malformed, empty."""
    if not path.is_file():
        raise ConfigError(shown, "config file not found")
    if path.suffix != ".yaml":
        raise ConfigError(shown, "NxDT's Hydra loads only files named *.yaml (--config-name drops the suffix): "
                                 "rename it")
    from omegaconf._utils import get_yaml_loader

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=get_yaml_loader())
    except UnicodeDecodeError:
        raise ConfigError(shown, "not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "could not parse"
        raise ConfigError(shown, f"malformed YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(shown, "the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(shown, f"the top level must be a mapping of keys, not {type(data).__name__}")


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return _ABSENT


def _needs_resolving(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not value.startswith(("s3://", "/", "${"))
            and value != "???")


def _absolute_paths(composed: DictConfig, items: list[str], base: Path) -> tuple[list[str], list[str]]:
    """Make relative paths absolute in `composed`; return the user's overrides rewritten with them, and the overrides
    that carry the YAML's own relative paths to NxDT (which would read them against its working directory)."""
    parsed = {i: o for i, o in enumerate(overrides.parse(items))}
    by_key = {o.key_or_group: i for i, o in parsed.items() if not o.is_delete()}
    rewritten = list(items)
    yaml_fixes: list[str] = []
    for key in PATH_KEYS:
        value = _select(composed, key)
        if not _needs_resolving(value):
            continue
        from_override = key in by_key
        root = Path.cwd() if from_override else base
        candidate = (root / value).resolve()
        if key in _MAYBE_NAME_KEYS and not candidate.exists():
            continue  # a hub name such as meta-llama/Meta-Llama-3-8B
        OmegaConf.update(composed, key, str(candidate), force_add=True)
        if from_override:
            i = by_key[key]
            prefix = "++" if parsed[i].is_force_add() else "+" if parsed[i].is_add() else ""
            rewritten[i] = f"{prefix}{key}={overrides.hydra_value(str(candidate))}"
        else:
            yaml_fixes.append(f"{key}={overrides.hydra_value(str(candidate))}")
    return rewritten, yaml_fixes


def _resolved(composed: DictConfig) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(composed, resolve=False))
    assert isinstance(cfg, DictConfig)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback=_unresolvable_key(cfg) or "config") from None
    return cfg


def _unresolvable_key(node: Any, prefix: str = "") -> str | None:
    """The first key whose interpolation fails (OmegaConf.resolve's error does not always name it)."""
    if not isinstance(node, DictConfig | ListConfig):
        return None
    container: Any = node
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        dotted = f"{prefix}{key!s}"
        try:
            child = container[key]
        except OmegaConfBaseException:
            return dotted
        found = _unresolvable_key(child, f"{dotted}.")
        if found:
            return found
    return None


def _check_keys(node: Any, prefix: str = "") -> list[str]:
    """Refuse keys NxDT would reject and misspellings of known keys; warn about unknown keys NxDT ignores."""
    warnings: list[str] = []
    if not isinstance(node, DictConfig):
        return warnings
    for key, value in node.items_ex(resolve=False):
        dotted = f"{prefix}{key!s}"
        try:
            warning = nxdt_keys.check_key(dotted)
        except nxdt_keys.UnknownKeyError as exc:
            parent = dotted.rpartition(".")[0]
            where = f"in '{parent}'" if parent else "at the top level"
            hint = f" (did you mean '{exc.suggestion}'?)" if exc.suggestion else ""
            raise ConfigError(dotted, f"unknown key {where}{hint}") from None
        if warning:
            warnings.append(warning)  # unknown to NxDT as a whole: nothing below it is checked either
        elif not any(dotted == p or dotted.startswith(p + ".") for p in nxdt_keys.OPEN):
            warnings += _check_keys(value, f"{dotted}.")
    return warnings


def _schema_subset(node: Any, section: Any, prefix: str) -> dict[str, Any]:
    """The part of `node` that `section` (a schema dataclass) types; a section given as a scalar is an error."""
    out: dict[str, Any] = {}
    for f in fields(section):
        value = node.get(f.name, _ABSENT) if isinstance(node, DictConfig) else _ABSENT
        if value is _ABSENT:
            continue
        child = f.default_factory() if callable(f.default_factory) else None
        if is_dataclass(child):
            if value is None:
                continue
            if not isinstance(value, DictConfig):
                raise ConfigError(f"{prefix}{f.name}", f"must be a mapping of keys, got {value!r}")
            out[f.name] = _schema_subset(value, type(child), f"{prefix}{f.name}.")
        else:
            out[f.name] = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    return out


def _typed(raw: DictConfig) -> DictConfig:
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema.NxdtConfig), _schema_subset(raw, schema.NxdtConfig, ""))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, fallback="config") from None
    assert isinstance(typed, DictConfig)
    return typed


def _omegaconf_error(exc: OmegaConfBaseException, fallback: str) -> ConfigError:
    key = re.sub(r"(\[\d+\])+$", "", getattr(exc, "full_key", None) or fallback)  # betas[0] -> betas: the key to fix
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


def load_llama_args(cfg: DictConfig) -> LlamaArgs:
    """The architecture: an HF config.json with the YAML's overrides (NxDT's hf source, llama_model.py:22-40), or the
    inline keys plus the tokenizer's vocabulary (its megatron source)."""
    if cfg.model_source == "megatron":
        return _megatron_args(cfg)
    key = "model.model_config"
    if not cfg.model.model_config:
        raise ConfigError(key, "is required: the Hugging Face config.json of the model (model_source: hf)")
    path = Path(cfg.model.model_config)
    if path.is_dir():
        path = path / "config.json"  # LlamaConfig.from_pretrained accepts the folder too
    if not path.is_file():
        raise ConfigError(key, f"model config file {path} does not exist")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"{path} is not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConfigError(key, f"{path} must hold a JSON object")
    for yaml_key, hf_key in (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                             ("rope_theta", "rope_theta")):
        value = cfg.model.get(yaml_key)
        if value is not None and value != -1:
            hf[hf_key] = value
    # The YAML's max_position_embeddings only ever raises config.json's: NxDT takes the max of the two
    # (lightning_modules/model/hf_models/llama_model.py:30; every NxDT example config sets it, ours may leave it out).
    positions = cfg.model.get("max_position_embeddings")
    if positions is not None:
        own = hf.get("max_position_embeddings")
        hf["max_position_embeddings"] = max(own, positions) if isinstance(own, int) else positions
    if hf.get("max_position_embeddings") is None:  # the sequence length is checked against it (validate)
        raise ConfigError(key, f"{path}: 'max_position_embeddings' must be a positive integer, got None")
    return LlamaArgs.from_hf(hf, key, str(path))


def _megatron_args(cfg: DictConfig) -> LlamaArgs:
    """NxDT's megatron source: the architecture inline, the vocabulary from the tokenizer, padded as Megatron pads
    it (a multiple of make_vocab_size_divisible_by x tensor parallel)."""
    m = cfg.model
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if m.get(name) is None:
            raise ConfigError(f"model.{name}", "is required for model_source megatron (the architecture is inline)")
    vocab = _tokenizer_vocab_size(cfg)
    unit = m.make_vocab_size_divisible_by * cfg.distributed_strategy.tensor_model_parallel_size
    padded = max(1, math.ceil(vocab / max(1, unit))) * max(1, unit)
    hf = {
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_kv_heads or m.num_attention_heads,
        "vocab_size": padded,
        "max_position_embeddings": m.max_position_embeddings or m.encoder_seq_length,
        "rope_theta": m.position_freq_base or 10000.0,
        "rms_norm_eps": m.layernorm_epsilon or 1e-5,
        "tie_word_embeddings": bool(m.share_embeddings_and_output_weights),
    }
    return LlamaArgs.from_hf(hf, "model", "the megatron model section")


def _tokenizer_vocab_size(cfg: DictConfig) -> int:
    key = "data.tokenizer.type"
    where = tokenizer_path(cfg)
    if not where:
        raise ConfigError(key, "is required for model_source megatron: the vocabulary size comes from the tokenizer")
    folder = Path(where)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return int(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True))
        except Exception as exc:  # the tokenizers library raises its own exception type for a broken file
            raise ConfigError(key, f"{folder}/tokenizer.json cannot be read: {exc}") from None
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            try:
                size = json.loads(file.read_text(encoding="utf-8")).get("vocab_size")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                size = None
            if isinstance(size, int) and size > 0:
                return size
    raise ConfigError(key, f"{where}: no tokenizer.json (or config.json with vocab_size) to read the vocabulary "
                           "size from; point it at the tokenizer folder")


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


def validate(rc: RunConfig) -> None:
    """Every cross-field rule; the first broken one raises. Order: cheap scalar checks, then shapes, then files.

    Over 60 lines: a flat list of independent rules, each a few lines, read top to bottom.
    """
    cfg, m, lay = rc.cfg, rc.model, rc.layout
    check_run_name(cfg.name, "name")
    _check_numbers(rc)
    _one_of("model_source", cfg.model_source, schema.MODEL_SOURCES)
    _positive(cfg, "data.micro_batch_size", "data.global_batch_size", "model.encoder_seq_length", "trainer.max_steps",
              "trainer.log_every_n_steps")
    every = cfg.exp_manager.checkpoint_callback_params.every_n_train_steps
    if every is not None and every < 1:
        raise ConfigError("exp_manager.checkpoint_callback_params.every_n_train_steps", f"must be >= 1, got {every}")
    _at_least_zero(cfg, "model.optim.sched.warmup_steps", "model.optim.sched.constant_steps")
    betas = list(cfg.model.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("model.optim.betas", f"must be two numbers in [0, 1), got {betas}")
    _one_of("precision.type", cfg.precision.type, schema.PRECISION_TYPES,
            hint={"mixedprecisionSR": "mixed_precision_SR (NxDT raises on the documented 'mixedprecisionSR')"})
    if cfg.precision.type == "manual":  # training_orchestrator.py:123-126 puts them into os.environ as they are
        for name in ("xla_use_bf16", "xla_downcast_bf16", "neuron_rt_stochastic_rounding_en"):
            if not isinstance(cfg.precision[name], str):
                raise ConfigError(f"precision.{name}", f"must be a quoted string such as '1' with precision.type "
                                  f"manual (NxDT writes it into the environment; {cfg.precision[name]!r} fails there)")
    granularity = cfg.model.activations_checkpoint_granularity
    if granularity is not None:
        _one_of("model.activations_checkpoint_granularity", granularity, schema.RECOMPUTE_GRANULARITIES)
    _one_of("model.optim.name", cfg.model.optim.name, schema.OPTIMIZERS)
    _one_of("model.optim.sched.name", cfg.model.optim.sched.name, schema.SCHEDULERS)
    if not cfg.compiler_cache_url.strip():
        raise ConfigError("compiler_cache_url", "must name a directory (or s3:// URL) for the compiled graph cache")
    if cfg.trainer.lnc not in (None, 1, 2):
        raise ConfigError("trainer.lnc", f"must be 1 or 2 (logical NeuronCore size), got {cfg.trainer.lnc}")
    accumulate = _select(rc.raw, "trainer.accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate > 1:  # nlp_overrides.py:949
        raise ConfigError("trainer.accumulate_grad_batches", "NxDT refuses it: accumulation follows from "
                          "data.global_batch_size / (data.micro_batch_size x data parallel)")
    if _select(rc.raw, "trainer.enable_model_summary") is True:  # nlp_overrides.py:954
        raise ConfigError("trainer.enable_model_summary", "NxDT refuses it: set it to false")

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
    if m.num_layers < lay.pp:  # NxD spreads a remainder over the last stages (pipeline/partition.py:280-295)
        raise ConfigError("distributed_strategy.pipeline_model_parallel_size",
                          f"{m.num_layers} layers cannot fill {lay.pp} pipeline stages")
    if rc.global_batch_size % (rc.micro_batch_size * lay.dp):
        raise ConfigError("data.global_batch_size",
                          f"{rc.global_batch_size} is not divisible by micro batch {rc.micro_batch_size} x "
                          f"data parallel {lay.dp} = {rc.micro_batch_size * lay.dp}")
    seq_key = "data.seq_length" if cfg.data.seq_length else "model.encoder_seq_length"
    if rc.seq_len > m.max_position_embeddings:
        raise ConfigError(seq_key, f"{rc.seq_len} exceeds max_position_embeddings {m.max_position_embeddings}")
    if lay.sequence_parallel and rc.seq_len % (lay.tp * lay.cp):
        raise ConfigError(seq_key, f"{rc.seq_len} is not divisible by tensor x context parallel {lay.tp * lay.cp}, "
                                   "which sequence parallel needs")

    tok = tokenizer_path(cfg)
    if tok is not None and tok.startswith("/") and not Path(tok).exists():
        key = "data.tokenizer.type" if isinstance(cfg.data.tokenizer, DictConfig) else "data.tokenizer"
        raise ConfigError(key, f"{tok} does not exist")


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
        if value is not None and value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")


def _one_of(key: str, value: str | None, allowed: Sequence[str], hint: dict[str, str] | None = None) -> None:
    if value in allowed:
        return
    import difflib

    suggestion = (hint or {}).get(str(value)) or next(iter(difflib.get_close_matches(str(value), allowed, n=1)), None)
    extra = f"; did you mean {suggestion}?" if suggestion else ""
    raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}{extra}")
