"""The environment NxDT's orchestrator derives (process_config), replayed rule by rule and held to the reference's
precision table; NEURON_CC_FLAGS set, unset and set-but-empty."""

from __future__ import annotations

from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.neuron.env import orchestrator_env
from llama3_hyperpod.plan import build_plan
from tests.conftest import CONFIG_8B

BASE: dict[str, Any] = {
    "model": {"fusions": {"softmax": True}},
    "neuron_experimental_compress_rg": False,
    "aync_exec_max_inflight_requests": 5,
    "bucket_size_collectives": 1024,
    "compiler_cache_url": "/cache",
    "compiler_flags": "--model-type transformer",
    "neuron_rt_exec_timeout": 100,
    "precision": {"type": "mixed_precision", "xla_use_bf16": "1", "xla_downcast_bf16": "0",
                  "neuron_rt_stochastic_rounding_en": "1"},
}


def cfg(**changes: Any) -> DictConfig:
    conf = OmegaConf.create(BASE)
    for key, value in changes.items():
        OmegaConf.update(conf, key.replace("__", "."), value, force_add=True)
    assert isinstance(conf, DictConfig)
    return conf


def precision_table(reference: str) -> dict[str, tuple[str, str, str, str]]:
    """The reference's `| type | XLA_USE_BF16 | XLA_DOWNCAST_BF16 | NEURON_RT_STOCHASTIC_ROUNDING_EN | flags |` rows."""
    rows = {}
    for line in reference.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("bf16SR", "mixed_precision", "mixed_precision_SR", "fp32", "autocast",
                                            "manual"):
            rows[cells[0]] = (cells[1], cells[2], cells[3], cells[4])
    return rows


def test_the_reference_table_is_complete(neuron_reference: str) -> None:
    assert set(precision_table(neuron_reference)) == {"bf16SR", "mixed_precision", "mixed_precision_SR", "fp32",
                                                      "autocast", "manual"}


@pytest.mark.parametrize("kind", ["bf16SR", "mixed_precision", "mixed_precision_SR", "fp32", "autocast"])
def test_precision_env_follows_the_reference(neuron_reference: str, kind: str) -> None:
    use_bf16, downcast, rounding, flags = precision_table(neuron_reference)[kind]
    out = orchestrator_env(cfg(precision__type=kind), {})
    assert out["XLA_USE_BF16"] == use_bf16 and out["XLA_DOWNCAST_BF16"] == downcast
    if rounding == "(not set)":
        assert "NEURON_RT_STOCHASTIC_ROUNDING_EN" not in out
    else:
        assert out["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == rounding
    expected_flags = flags.replace("`", "")
    assert out["NEURON_CC_FLAGS"] == f"--model-type transformer {expected_flags}"


def test_manual_precision_takes_the_yaml_values_and_adds_no_flag(neuron_reference: str) -> None:
    assert "(nothing)" in precision_table(neuron_reference)["manual"][3]
    out = orchestrator_env(cfg(precision__type="manual"), {})
    assert (out["XLA_USE_BF16"], out["XLA_DOWNCAST_BF16"], out["NEURON_RT_STOCHASTIC_ROUNDING_EN"]) == ("1", "0", "1")
    assert out["NEURON_CC_FLAGS"] == "--model-type transformer"


def test_precision_values_are_set_only_where_unset() -> None:
    out = orchestrator_env(cfg(precision__type="bf16SR"), {"XLA_USE_BF16": "0"})
    assert "XLA_USE_BF16" not in out and out["XLA_DOWNCAST_BF16"] == "0"


@pytest.mark.parametrize(("user", "expected"), [
    (None, "--model-type transformer --enable-mixed-precision-accumulation"),  # unset: set, then appended
    ("--retry_failed_compilation", "--retry_failed_compilation --model-type transformer "
                                   "--enable-mixed-precision-accumulation"),  # set: both appended
    ("", None),  # set but empty: set_env_variable neither appends to nor replaces it
])
def test_neuron_cc_flags_set_unset_and_empty(user: str | None, expected: str | None) -> None:
    env = {} if user is None else {"NEURON_CC_FLAGS": user}
    out = orchestrator_env(cfg(), env)
    assert out.get("NEURON_CC_FLAGS") == expected


def test_softmax_fusion_sets_only_one_and_compress_rg_is_always_set() -> None:
    assert orchestrator_env(cfg(), {})["NEURON_FUSE_SOFTMAX"] == "1"
    off = orchestrator_env(cfg(model__fusions__softmax=False), {})
    assert "NEURON_FUSE_SOFTMAX" not in off  # never set to 0
    assert off["NEURON_EXPERIMENTAL_COMPRESS_RG"] == "0"
    assert orchestrator_env(cfg(neuron_experimental_compress_rg=True), {})["NEURON_EXPERIMENTAL_COMPRESS_RG"] == "1"


def test_the_plan_shows_what_the_orchestrator_sets() -> None:
    env = {"NEURON_CC_FLAGS": "", "L3HP_SDK_PYTHON": "/opt/sdk/bin/python3"}
    plan = build_plan(CONFIG_8B, ["precision.type=fp32"], detect_accelerator("neuron"), env)
    assert plan.effective_neuron_cc_flags == ""
    assert any("NEURON_CC_FLAGS is set but empty" in w for w in plan.warnings)
    assert plan.nxdt_env["train"]["XLA_USE_BF16"] == "0" and "NEURON_RT_STOCHASTIC_ROUNDING_EN" not in \
        plan.nxdt_env["train"]
    plain = build_plan(CONFIG_8B, ["precision.type=autocast"], detect_accelerator("neuron"), {})
    assert plain.effective_neuron_cc_flags == ("--model-type transformer --enable-mixed-precision-accumulation "
                                               "--auto-cast none")
