"""Layout and memory for the reference 8B config, and the torch-backend launch."""

from __future__ import annotations

import json

import pytest

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.config import ConfigError, load_config
from llama3_hyperpod.data.default import default_name
from llama3_hyperpod.memory import estimate_memory, flops_per_token, params_per_device
from llama3_hyperpod.plan import build_plan
from tests.conftest import CONFIG_8B, CONFIG_TINY, run_cli

GIB = 2**30


def test_8b_layout_and_fit() -> None:
    plan = build_plan(CONFIG_8B, (), detect_accelerator("neuron"), {})
    lay, mem = plan.layout, plan.memory
    assert (lay.tp, lay.pp, lay.dp, lay.world_size, lay.devices_per_node) == (8, 1, 4, 32, 32)
    assert (lay.heads_per_device, lay.kv_heads_per_device) == (4, 1)
    assert mem.device_memory == 16 * GIB and mem.fits
    assert mem.total < 16 * GIB < mem.total_without_zero1  # ZeRO-1 is what makes it fit
    assert plan.model["parameters"] == 8_030_261_248  # Llama 3 8B's published size


def test_8b_memory_parts_follow_the_formula() -> None:
    rc = load_config(CONFIG_8B)
    mem = estimate_memory(rc, "neuron", "neuron", 16 * GIB)
    n = params_per_device(rc)
    norms = (2 * 32 + 1) * 4096  # replicated on every rank; everything else is split 8 ways
    assert n == (rc.model.parameter_count() - norms) // 8 + norms
    assert (mem.weights, mem.gradients, mem.optimizer) == (2 * n, 4 * n, 12 * n // 4)
    # selective recompute, sequence parallel: 32 layers x 8192 tokens x (4h/8 + (2h + 2*128*8)/8 + 3f/8) x 2 bytes
    per_token = 4 * 4096 // 8 + (2 * 4096 + 2 * 128 * 8) // 8 + 3 * 14336 // 8
    assert mem.activations == 32 * 8192 * per_token * 2
    assert mem.logits == 8192 * 128256 // 8 * 4


def test_recompute_and_sequence_parallel_change_activations() -> None:
    selective = estimate_memory(load_config(CONFIG_8B), "neuron", "neuron", None).activations
    full = estimate_memory(load_config(CONFIG_8B, ["model.activations_checkpoint_granularity=full"]),
                           "neuron", "neuron", None).activations
    no_sp = estimate_memory(load_config(CONFIG_8B, ["distributed_strategy.sequence_parallel=false"]),
                            "neuron", "neuron", None).activations
    none = estimate_memory(load_config(CONFIG_8B, ["model.activations_checkpoint_granularity=null",
                                                   "model.fusions.flash_attention=false"]),
                           "neuron", "neuron", None).activations
    assert full < selective < no_sp and selective < none


def test_over_budget_is_an_error() -> None:
    result = run_cli("plan", str(CONFIG_8B), "--backend", "neuron", "distributed_strategy.zero1=false")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: memory:")


def test_flops_per_token() -> None:
    rc = load_config(CONFIG_8B)
    n = rc.model.parameter_count()
    matmul = n - 128256 * 4096 - 65 * 4096
    assert flops_per_token(rc) == 6 * matmul + 12 * 32 * 4096 * 8192


def test_torch_cpu_launch() -> None:
    plan = build_plan(CONFIG_TINY, ["trainer.devices=4", "distributed_strategy.tensor_model_parallel_size=2",
                                    "data.global_batch_size=16"], detect_accelerator("torch-cpu"), {},
                      output_dir="/tmp/out", python="/usr/bin/python3")
    argv = plan.commands["train"].argv
    assert argv[:3] == ["/usr/bin/python3", "-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc_per_node") + 1] == "4"
    i = argv.index("-m", 3)
    assert argv[i + 1] == "llama3_hyperpod.torch_backend.train"
    assert argv[argv.index("--mode") + 1] == "train" and argv[argv.index("--device") + 1] == "cpu"
    assert plan.commands["compile"].argv[plan.commands["compile"].argv.index("--mode") + 1] == "compile"
    assert (plan.layout.tp, plan.layout.dp) == (2, 2)
    assert plan.process_group_backend == "gloo"
    assert plan.uses_default_dataset and plan.train_dir == f"/tmp/out/_data/{default_name(256, 8192)}"
    assert f"data.train_dir='/tmp/out/_data/{default_name(256, 8192)}'" in argv  # quoted: Hydra's grammar
    for mode in ("compile", "train"):  # the same Inductor settings, so what compile caches, train hits
        env = plan.commands[mode].env
        assert env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/llama3-hyperpod-cache/inductor"
        assert env["TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"] == "0"
    assert plan.rlimits == {}


def test_torch_cuda_uses_nccl() -> None:
    plan = build_plan(CONFIG_TINY, (), detect_accelerator("torch-cuda"), {})
    assert plan.device == "cuda" and plan.process_group_backend == "nccl"


def test_pipeline_parallel_is_a_config_error_on_torch() -> None:
    with pytest.raises(ConfigError) as err:
        build_plan(CONFIG_TINY, ["trainer.devices=2", "distributed_strategy.pipeline_model_parallel_size=2"],
                   detect_accelerator("torch-cpu"), {})
    assert err.value.key == "distributed_strategy.pipeline_model_parallel_size"


def test_cli_plan_json_for_tiny() -> None:
    result = run_cli("plan", str(CONFIG_TINY), "--backend", "torch-cpu", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == "torch" and data["memory"]["fits"] is True


def test_train_dry_run_prints_the_launch() -> None:
    result = run_cli("train", str(CONFIG_TINY), "--backend", "torch-cpu", "--dry-run", "trainer.max_steps=3",
                     "trainer.devices=2", "data.global_batch_size=16")
    assert result.returncode == 0, result.stderr
    assert "torch.distributed.run" in result.stdout and "trainer.max_steps=3" in result.stdout


def test_one_process_on_one_node_runs_the_trainer_without_torchrun() -> None:
    """No agent interpreter for a single worker (warm start): the trainer is the launched process itself, and the
    launcher is told so (it then forwards signals to it instead of to its children)."""
    plan = build_plan(CONFIG_TINY, [], detect_accelerator("torch-cpu"), {"L3HP_SDK_PYTHON": "/opt/sdk/bin/python"},
                      output_dir="/tmp/out", python="/opt/venv/bin/python")
    for mode in ("compile", "train"):
        launch = plan.commands[mode]
        assert launch.direct and "torch.distributed.run" not in launch.argv
        assert launch.argv[:3] == ["/opt/venv/bin/python", "-m", "llama3_hyperpod.torch_backend.train"]
        assert launch.argv[launch.argv.index("--mode") + 1] == mode
    two = build_plan(CONFIG_TINY, ["trainer.num_nodes=2", "data.global_batch_size=16"],
                     detect_accelerator("torch-cpu"), {})
    assert not two.commands["train"].direct and "torch.distributed.run" in two.commands["train"].argv


def test_torch_launch_in_an_image_uses_the_sdk_torchrun_and_the_projects_python() -> None:
    """The same split as the neuron launch: the SDK environment's torchrun is the agent, and it starts the
    project's interpreter (--no-python) for the workers."""
    plan = build_plan(CONFIG_TINY, ["trainer.devices=2", "data.global_batch_size=16"], detect_accelerator("torch-cpu"),
                      {"L3HP_SDK_PYTHON": "/opt/sdk/bin/python"}, output_dir="/tmp/out", python="/opt/venv/bin/python")
    argv = plan.commands["train"].argv
    assert argv[:3] == ["/opt/sdk/bin/python", "-m", "torch.distributed.run"]
    i = argv.index("--no-python")
    assert argv[i + 1:i + 4] == ["/opt/venv/bin/python", "-m", "llama3_hyperpod.torch_backend.train"]


def test_async_checkpointing_adds_the_kept_host_copy() -> None:
    """The async save stages into a host copy of the rank's weights and Adam moments and keeps it for the next save:
    counted in the CPU total, shown apart (host memory) on CUDA, absent when checkpoints are off."""
    base = load_config(CONFIG_TINY)
    n = params_per_device(base)
    for device in ("cpu", "cuda"):
        sync = estimate_memory(base, "torch", device, None)
        asyn = estimate_memory(load_config(CONFIG_TINY, ["exp_manager.async_checkpointing=true"]), "torch", device,
                               None)
        assert (sync.staging, asyn.staging) == (0, n * (4 + 8))
        assert asyn.total - sync.total == (n * 12 if device == "cpu" else 0)
    off = load_config(CONFIG_TINY, ["exp_manager.async_checkpointing=true",
                                    "exp_manager.create_checkpoint_callback=false"])
    assert estimate_memory(off, "torch", "cpu", None).staging == 0
