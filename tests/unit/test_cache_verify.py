"""`cache verify` predicts hits and misses from the manifest before anything runs (torch and neuron plans)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_hyperpod.cache.manifest import read_manifest, toolchain, write_manifest
from llama3_hyperpod.cache.verify import EXIT_MISS, EXIT_UNKNOWN, verify, verify_against
from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.plan import Plan, build_plan
from tests.conftest import CONFIG_8B, CONFIG_TINY, REPO

ENV = {"OMP_NUM_THREADS": "2"}  # pinned, so the CPU thread count (part of Inductor's key) is the same everywhere
TWO_NODES = ("trainer.num_nodes=2", "data.global_batch_size=16")
TP2 = ("trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2")


def torch_plan(*overrides: str, env: dict[str, str] | None = None) -> Plan:
    return build_plan(CONFIG_TINY, ("torch_backend.compile=true", *overrides), detect_accelerator("torch-cpu"),
                      env or ENV, output_dir="/tmp/l3hp-test-runs")


def neuron_plan(*overrides: str) -> Plan:
    return build_plan(CONFIG_8B, overrides, detect_accelerator("neuron"), {}, output_dir="/fsx/runs")


def fake_inductor_cache(root: Path) -> Path:
    (root / "inductor" / "fxgraph" / "ab").mkdir(parents=True)
    (root / "inductor" / "fxgraph" / "ab" / "entry").write_bytes(b"compiled graph")
    return root


def fake_neuron_cache(root: Path, version: str) -> Path:
    entry = root / f"neuronxcc-{version}+4a9b2326" / "MODULE_123+abc"
    entry.mkdir(parents=True)
    for name, data in {"model.hlo_module.pb": b"hlo", "model.neff": b"neff", "compile_flags.json": b"[]",
                       "model.done": b""}.items():
        (entry / name).write_bytes(data)
    return root


@pytest.fixture
def torch_cache(tmp_path: Path) -> Path:
    cache = fake_inductor_cache(tmp_path / "cache")
    write_manifest(cache, torch_plan(), compile_seconds=61.0)
    return cache


def test_manifest_records_fields_toolchain_and_hashed_listing(torch_cache: Path) -> None:
    manifest = read_manifest(torch_cache)
    assert manifest is not None
    [record] = manifest["compiles"]
    assert record["backend"] == "torch"
    assert record["graph"]["model.encoder_seq_length"] == 256
    assert record["graph"]["cpu_threads"] == 2
    assert record["toolchain"]["compiler"] == "inductor" and record["toolchain"]["compiler_version"].startswith("2.")
    assert record["compile_seconds"] == 61.0
    [listed] = manifest["files"]
    assert listed["path"] == "inductor/fxgraph/ab/entry" and listed["size"] == len(b"compiled graph")
    assert len(listed["sha256"]) == 64


def test_rewriting_the_same_compile_replaces_its_record(torch_cache: Path) -> None:
    write_manifest(torch_cache, torch_plan("trainer.max_steps=7"))  # same graphs: same key
    write_manifest(torch_cache, torch_plan("model.encoder_seq_length=128"))
    manifest = read_manifest(torch_cache)
    assert manifest is not None
    assert sorted(c["graph"]["model.encoder_seq_length"] for c in manifest["compiles"]) == [128, 256]


@pytest.mark.parametrize("overrides", [
    ("model.optim.lr=1.0e-4",),
    ("trainer.max_steps=5",),
    ("model.optim.sched.warmup_steps=3", "model.optim.sched.min_lr=0.0"),
    ("model.optim.weight_decay=0.1", "model.optim.betas=[0.8,0.9]", "trainer.gradient_clip_val=0.5"),
    ("seed=7", "trainer.log_every_n_steps=5", "exp_manager.checkpoint_callback_params.every_n_train_steps=10"),
])
def test_torch_hit_when_only_non_graph_fields_change(torch_cache: Path, overrides: tuple[str, ...]) -> None:
    verdict = verify(torch_plan(*overrides), torch_cache)
    assert verdict.status == "hit", verdict.message()
    assert verdict.exit_code == 0


@pytest.mark.parametrize(("overrides", "field"), [
    (("model.encoder_seq_length=128",), "model.encoder_seq_length"),
    (("data.micro_batch_size=4", "data.global_batch_size=8"), "data.micro_batch_size"),
    (TP2, "layout.tp"),
    (TWO_NODES, "layout.num_nodes"),
    (("model.activations_checkpoint_granularity=full",), "model.activations_checkpoint_granularity"),
    (("+model.num_layers=2",), "model.config_sha256"),
])
def test_torch_miss_names_the_graph_field(torch_cache: Path, overrides: tuple[str, ...], field: str) -> None:
    verdict = verify(torch_plan(*overrides), torch_cache)
    assert verdict.status == "miss"
    assert verdict.exit_code == EXIT_MISS
    assert field in [d.field for d in verdict.differences]
    assert "61 s" in (verdict.expected_cost or "") or field == "model.config_sha256"


def test_cpu_thread_count_is_part_of_the_key(torch_cache: Path) -> None:
    verdict = verify(torch_plan(env={"OMP_NUM_THREADS": "1"}), torch_cache)
    assert [d.field for d in verdict.differences] == ["cpu_threads"]


def test_other_torch_version_misses(torch_cache: Path) -> None:
    plan = torch_plan()
    tools = toolchain("torch") | {"compiler_version": "2.99.0"}
    verdict = verify_against(plan, torch_cache, plan.graph, tools)
    assert [d.field for d in verdict.differences] == ["toolchain.compiler_version"]


def test_no_compile_means_cache_unused(torch_cache: Path) -> None:
    plan = build_plan(CONFIG_TINY, ["torch_backend.compile=false"], detect_accelerator("torch-cpu"), ENV)
    assert verify(plan, torch_cache).status == "unused"


def test_empty_cache_misses_and_unknown_cache_cannot_tell(tmp_path: Path) -> None:
    assert verify(torch_plan(), tmp_path / "nothing").status == "miss"
    verdict = verify(torch_plan(), fake_inductor_cache(tmp_path / "c"))
    assert verdict.status == "unknown" and verdict.exit_code == EXIT_UNKNOWN


def test_deleted_entries_turn_a_hit_into_a_miss(torch_cache: Path) -> None:
    (torch_cache / "inductor" / "fxgraph" / "ab" / "entry").unlink()
    verdict = verify(torch_plan(), torch_cache)
    assert verdict.status == "miss" and "gone" in verdict.reason


# ---------------------------------------------------------------------------------------------------- neuron


@pytest.fixture
def neuron_cache(tmp_path: Path) -> Path:
    plan = neuron_plan()
    cache = fake_neuron_cache(tmp_path / "ncache", str(toolchain("neuron")["compiler_version"]))
    write_manifest(cache, plan)
    return cache


def test_neuron_record_lists_its_entries(neuron_cache: Path) -> None:
    manifest = read_manifest(neuron_cache)
    assert manifest is not None
    [record] = manifest["compiles"]
    assert record["toolchain"]["compiler"] == "neuronx-cc"
    assert record["entries"] == [next(neuron_cache.glob("neuronxcc-*")).name + "/MODULE_123+abc"]
    assert "--model-type transformer" in record["graph"]["compiler_flags"]


@pytest.mark.parametrize("overrides", [("trainer.max_steps=100",), ("exp_manager.resume_if_exists=false",)])
def test_neuron_hit(neuron_cache: Path, overrides: tuple[str, ...]) -> None:
    assert verify(neuron_plan(*overrides), neuron_cache).status == "hit"


@pytest.mark.parametrize(("overrides", "field"), [
    (("model.encoder_seq_length=4096",), "model.encoder_seq_length"),
    (("distributed_strategy.tensor_model_parallel_size=32", "distributed_strategy.kv_replicator=4"), "layout.tp"),
    (("trainer.num_nodes=4",), "layout.num_nodes"),
    (("model.optim.lr=3.0e-4",), "model.optim.lr"),  # the reference: hyperparameters change Neuron graphs
    (("precision.type=bf16SR",), "precision.type"),
    (("compiler_flags=--model-type transformer -O1",), "compiler_flags"),
])
def test_neuron_miss(neuron_cache: Path, overrides: tuple[str, ...], field: str) -> None:
    verdict = verify(neuron_plan(*overrides), neuron_cache)
    assert verdict.status == "miss"
    assert field in [d.field for d in verdict.differences]
    assert "tens of minutes" in (verdict.expected_cost or "")


def test_neuron_other_compiler_version_misses(neuron_cache: Path) -> None:
    plan = neuron_plan()
    tools = toolchain("neuron") | {"compiler_version": "2.99.1.0"}
    verdict = verify_against(plan, neuron_cache, plan.graph, tools)
    assert "toolchain.compiler_version" in [d.field for d in verdict.differences]


def test_neuron_entry_without_done_marker_misses(neuron_cache: Path) -> None:
    next(neuron_cache.glob("neuronxcc-*/MODULE_*/model.done")).unlink()
    verdict = verify(neuron_plan(), neuron_cache)
    assert verdict.status == "miss" and "MODULE_123+abc" in verdict.reason


# ---------------------------------------------------------------------------------------------------- the command


def cache_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llama3_hyperpod.cache.commands", *args], capture_output=True,
                          text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin", **ENV}, timeout=60, check=False)


def test_verify_command_exit_codes(torch_cache: Path) -> None:
    base = ["verify", str(CONFIG_TINY), "torch_backend.compile=true", "--backend", "torch-cpu",
            "--cache-dir", str(torch_cache)]
    hit = cache_cli(*base, "model.optim.lr=1e-4")
    assert hit.returncode == 0, hit.stderr
    assert "hit" in hit.stdout
    miss = cache_cli(*base, "model.encoder_seq_length=128", "--json")
    assert miss.returncode == EXIT_MISS, miss.stderr
    verdict = json.loads(miss.stdout)
    assert verdict["status"] == "miss"
    assert [d["field"] for d in verdict["differences"]] == ["model.encoder_seq_length"]
    bad = cache_cli(*base, "model.encoder_seq_length=banana")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: model.encoder_seq_length") and "Traceback" not in bad.stderr
