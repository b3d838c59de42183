"""Bad configs and overrides: each exits 2 with one line naming the key; random overrides never crash."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_hyperpod import schema
from llama3_hyperpod.config import ConfigError, load_config
from tests.conftest import CONFIG_TINY, CONFIGS, run_cli

BASE: dict[str, Any] = yaml.safe_load(CONFIG_TINY.read_text())
MODEL_JSON: dict[str, Any] = json.loads((CONFIGS / "models" / "tiny_llama3.json").read_text())


def edit(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """Set dotted keys in the YAML mapping."""

    def apply(cfg: dict[str, Any]) -> None:
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = cfg
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value

    return apply


def model_json(**changes: Any) -> dict[str, Any]:
    return {**MODEL_JSON, **changes}


# (case id, YAML edit or raw text, overrides, model config.json content or raw text, expected key)
CASES: list[tuple[str, Any, list[str], Any, str]] = [
    ("tp-does-not-divide-world", edit(trainer__devices=4, distributed_strategy__tensor_model_parallel_size=3), [],
     None, "distributed_strategy.tensor_model_parallel_size"),
    ("heads-not-divisible-by-tp", None, ["trainer.devices=16", "distributed_strategy.tensor_model_parallel_size=16"],
     None, "distributed_strategy.tensor_model_parallel_size"),
    ("kv-heads-not-covered", None, ["trainer.devices=8", "distributed_strategy.tensor_model_parallel_size=8"],
     None, "distributed_strategy.kv_replicator"),
    ("hidden-not-divisible-by-heads", None, [], model_json(hidden_size=250), "model.hidden_size"),
    ("heads-not-divisible-by-kv", None, [], model_json(num_key_value_heads=3), "model.model_config"),
    ("layers-not-divisible-by-pp", None, ["trainer.devices=3", "distributed_strategy.pipeline_model_parallel_size=3"],
     None, "distributed_strategy.pipeline_model_parallel_size"),
    ("global-batch-not-divisible", None, ["trainer.devices=2", "data.global_batch_size=12"], None,
     "data.global_batch_size"),
    ("seq-longer-than-positions", None, ["model.encoder_seq_length=2048"], None, "model.encoder_seq_length"),
    ("seq-not-divisible-for-sp", None, ["trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2",
                                        "distributed_strategy.sequence_parallel=true", "model.encoder_seq_length=255"],
     None, "model.encoder_seq_length"),
    ("model-config-missing", edit(model__model_config="models/nope.json"), [], None, "model.model_config"),
    ("model-config-bad-json", None, [], "{not json", "model.model_config"),
    ("model-config-missing-field", None, [], {k: v for k, v in MODEL_JSON.items() if k != "vocab_size"},
     "model.model_config"),
    ("model-config-not-object", None, [], [1, 2], "model.model_config"),
    ("tokenizer-missing", None, ["data.tokenizer=/nonexistent/tokenizer.json"], None, "data.tokenizer"),
    ("malformed-yaml", "name: [unclosed\n", [], None, "CONFIG"),
    ("yaml-not-a-mapping", "- just\n- a list\n", [], None, "CONFIG"),
    ("empty-yaml", "", [], None, "CONFIG"),
    ("unknown-top-level-key", edit(trainr={"devices": 1}), [], None, "trainr"),
    ("unknown-nested-key", edit(trainer__max_step=5), [], None, "trainer.max_step"),
    ("unknown-override-key", None, ["model.optim.lr_rate=0.1"], None, "model.optim.lr_rate"),
    ("override-without-equals", None, ["trainer.max_steps"], None, "trainer.max_steps"),
    ("override-of-a-section", None, ["model.optim=3"], None, "model.optim"),
    ("wrong-type-int", edit(trainer__max_steps="many"), [], None, "trainer.max_steps"),
    ("wrong-type-override-bool", None, ["distributed_strategy.zero1=maybe"], None, "distributed_strategy.zero1"),
    ("section-is-scalar", edit(data=5), [], None, "data"),
    ("zero-micro-batch", None, ["data.micro_batch_size=0"], None, "data.micro_batch_size"),
    ("negative-tp", None, ["distributed_strategy.tensor_model_parallel_size=-2"], None,
     "distributed_strategy.tensor_model_parallel_size"),
    ("zero-devices", None, ["trainer.devices=0"], None, "trainer.devices"),
    ("negative-lr", None, ["model.optim.lr=-0.1"], None, "model.optim.lr"),
    ("bad-betas", None, ["model.optim.betas=[0.9]"], None, "model.optim.betas"),
    ("precision-doc-spelling", None, ["precision.type=mixedprecisionSR"], None, "precision.type"),
    ("unknown-recompute", None, ["model.activations_checkpoint_granularity=partial"], None,
     "model.activations_checkpoint_granularity"),
    ("unknown-optimizer", None, ["model.optim.name=sgd"], None, "model.optim.name"),
    ("unknown-scheduler", None, ["model.optim.sched.name=Linear"], None, "model.optim.sched.name"),
    ("negative-clip", None, ["trainer.gradient_clip_val=-1"], None, "trainer.gradient_clip_val"),
    ("bad-run-name", None, ["name=../escape"], None, "name"),
    ("empty-cache-url", None, ["compiler_cache_url=' '"], None, "compiler_cache_url"),
    ("bad-interpolation", edit(model__optim__sched__max_steps="${trainer.nope}"), [], None,
     "model.optim.sched.max_steps"),
    ("pp-on-torch-backend", None, ["trainer.devices=2", "distributed_strategy.pipeline_model_parallel_size=2"],
     None, "distributed_strategy.pipeline_model_parallel_size"),
    ("train-data-missing", None, ["data.train_dir=/nonexistent/data"], None, "data.train_dir"),
    # Numbers that are not finite or out of range (before: accepted by plan, a 60-line traceback in the worker).
    ("nan-lr", None, ["model.optim.lr=nan"], None, "model.optim.lr"),
    ("inf-lr", None, ["model.optim.lr=.inf"], None, "model.optim.lr"),
    ("negative-weight-decay", None, ["model.optim.weight_decay=-0.1"], None, "model.optim.weight_decay"),
    ("nan-weight-decay", None, ["model.optim.weight_decay=.nan"], None, "model.optim.weight_decay"),
    ("zero-eps", None, ["model.optim.eps=0"], None, "model.optim.eps"),
    ("negative-eps", None, ["model.optim.eps=-1e-8"], None, "model.optim.eps"),
    ("nan-clip", None, ["trainer.gradient_clip_val=nan"], None, "trainer.gradient_clip_val"),
    ("inf-clip", None, ["trainer.gradient_clip_val=inf"], None, "trainer.gradient_clip_val"),
    ("negative-seed", None, ["seed=-1"], None, "seed"),
    ("seed-above-uint32", None, ["seed=4294967296"], None, "seed"),
    ("nan-min-lr", None, ["model.optim.sched.min_lr=nan"], None, "model.optim.sched.min_lr"),
    ("nan-beta", None, ["model.optim.betas=[.nan, 0.9]"], None, "model.optim.betas"),
    ("zero-peak-tflops", None, ["torch_backend.peak_tflops=0"], None, "torch_backend.peak_tflops"),
    ("nan-rope-theta-override", None, ["+model.rope_theta=nan"], None, "model.rope_theta"),
    ("nan-rms-eps-in-model-json", None, [], model_json(rms_norm_eps=float("nan")), "model.model_config"),
    ("long-name", None, ["name=" + "n" * 300], None, "name"),
    ("absolute-name", None, ["name=/abs"], None, "name"),
]


def materialize(tmp_path: Path, yaml_change: Any, model: Any) -> Path:
    """Write the case's YAML and model config into tmp_path; return the YAML's path."""
    (tmp_path / "models").mkdir()
    model_path = tmp_path / "models" / "tiny_llama3.json"
    if model is None:
        shutil.copy(CONFIGS / "models" / "tiny_llama3.json", model_path)
    else:
        model_path.write_text(model if isinstance(model, str) else json.dumps(model))
    config = tmp_path / "case.yaml"
    if isinstance(yaml_change, str):
        config.write_text(yaml_change)
    else:
        cfg = copy.deepcopy(BASE)
        if yaml_change is not None:
            yaml_change(cfg)
        config.write_text(yaml.safe_dump(cfg))
    return config


def test_there_are_at_least_25_distinct_cases() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: tuple[str, Any, list[str], Any, str]) -> None:
    _, yaml_change, overrides, model, key = case
    config = materialize(tmp_path, yaml_change, model)
    command = "train" if key == "data.train_dir" else "plan"
    result = run_cli(command, str(config), "--backend", "torch-cpu", *overrides, "--output-dir", str(tmp_path / "o"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    expected_key = str(config) if key == "CONFIG" else key
    assert lines[0].startswith(f"error: {expected_key}: "), lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()  # nothing was started or written


# Bad input that is not in the config file: options and the environment (before: tracebacks or a silent escape).
CLI_CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("run-name-parent", ["--run-name", "../x"], {}, "--run-name"),
    ("run-name-absolute", ["--run-name", "/abs"], {}, "--run-name"),
    ("run-name-nested", ["--run-name", "a/b"], {}, "--run-name"),
    ("run-name-empty", ["--run-name", ""], {}, "--run-name"),
    ("run-name-300-chars", ["--run-name", "r" * 300], {}, "--run-name"),
    ("node-rank-not-a-number", [], {"NODE_RANK": "abc"}, "NODE_RANK"),
    ("node-rank-out-of-range", [], {"NODE_RANK": "3"}, "NODE_RANK"),
    ("master-port-not-a-number", [], {"MASTER_PORT": "http"}, "MASTER_PORT"),
    ("slurm-nodeid-not-a-number", [], {"SLURM_JOB_NODELIST": "n1", "SLURM_NODEID": "x"}, "SLURM_NODEID"),
    ("lock-wait-not-a-number", ["--dry-run-off"], {"L3HP_RUN_LOCK_WAIT": "soon"}, "L3HP_RUN_LOCK_WAIT"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_options_and_environment_are_one_line(tmp_path: Path, case: tuple[str, list[str], dict[str, str], str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, args, env, key = case
    command = "plan"
    if "--dry-run-off" in args:  # only a real `train` takes the run dir's lock
        args, command = [a for a in args if a != "--dry-run-off"], "train"
    out = tmp_path / "o"
    result = run_cli(command, str(CONFIG_TINY), "--backend", "torch-cpu", "--output-dir", str(out), *args,
                     "trainer.max_steps=1", "data.train_dir=/nonexistent" if command == "plan" else "trainer.devices=1",
                     env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), result.stderr
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()


def test_unknown_key_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_TINY, ["distributed_strategy.tensor_parallel_size=2"])
    assert "did you mean 'distributed_strategy.tensor_model_parallel_size'" in err.value.message


def test_missing_config_file() -> None:
    result = run_cli("plan", "/nonexistent.yaml")
    assert result.returncode == 2 and result.stderr.startswith("error: /nonexistent.yaml: config file not found")


# ----------------------------------------------------------------------------------------------- property: no crash


def leaf_keys(section: Any = schema.NxdtConfig, prefix: str = "") -> list[str]:
    out = []
    for f in fields(section):
        default = f.default_factory() if callable(f.default_factory) else None
        if is_dataclass(default):
            out += leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


KEYS = leaf_keys()
VALUES = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "null", "[]", "[1, 2]", "{a: 1}", "''", "${trainer.max_steps}", "${nope}",
                     "/tmp", "s3://bucket/x", "selective", "full", "mixed_precision", "CosineAnnealing"]),
    st.text(max_size=12),
)
OVERRIDE = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(KEYS), st.text(max_size=6)).map(lambda kv: f"{kv[0]}{kv[1]}"),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OVERRIDE, max_size=4))
def test_random_overrides_never_end_in_a_traceback(overrides: list[str]) -> None:
    try:
        load_config(CONFIG_TINY, overrides)
    except ConfigError as exc:
        assert exc.key and exc.message and "\n" not in str(exc)


def passable_as_argv(text: str) -> bool:
    """What a process argument can hold at all: no NUL byte (execve) and encodable to the file system encoding."""
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeEncodeError:
        return False


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}").filter(passable_as_argv),
                min_size=1, max_size=3))
def test_random_overrides_through_the_cli(overrides: list[str]) -> None:
    result = run_cli("plan", str(CONFIG_TINY), "--backend", "torch-cpu", "--json", *overrides)
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 2)
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1
