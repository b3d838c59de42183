"""The neuron launch as data: commands and env agree with shared/reference/neuron-nxdt.md, on 1 and 4 nodes."""

from __future__ import annotations

import json
import re

import pytest

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.plan import Plan, build_plan
from tests.conftest import CONFIG_8B, run_cli

FOUR_NODES = {
    "SLURM_JOB_NODELIST": "trn1-st-[007,012-013],trn1-od-001",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "4242",
}


def neuron_plan(env: dict[str, str], *overrides: str, run_name: str | None = None) -> Plan:
    return build_plan(CONFIG_8B, overrides, detect_accelerator("neuron"), env, output_dir="/fsx/runs",
                      run_name=run_name)


def reference_env(reference: str) -> dict[str, str]:
    """`NAME=value` facts of the launch-script and mixed-precision paragraphs of the reference."""
    launch = reference.split("Env set by the launch scripts:", 1)[1].split("reserved local port", 1)[0]
    precision = reference.split("`precision.type: mixed_precision` sets", 1)[1].split("adds", 1)[0]
    facts = dict(re.findall(r"`([A-Z][A-Z0-9_]*)=([^`\s]+)`", launch + precision))
    return facts


def torchrun_flags(argv: list[str]) -> dict[str, str]:
    """The `--flag value` pairs between `torchrun` and the script it runs."""
    start, script = argv.index("torchrun") + 1, next(i for i, a in enumerate(argv) if a.endswith(".py"))
    return dict(zip(argv[start:script:2], argv[start + 1:script:2], strict=True))


def test_reference_env_is_parsed(neuron_reference: str) -> None:
    facts = reference_env(neuron_reference)
    assert {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "XLA_DOWNCAST_BF16"} <= facts.keys()


@pytest.mark.parametrize("env, nodes, rank, master", [({}, 1, 0, "127.0.0.1"), (FOUR_NODES, 4, 2, "trn1-st-007")])
def test_torchrun_matches_reference(neuron_reference: str, env: dict[str, str], nodes: int, rank: int,
                                    master: str) -> None:
    plan = neuron_plan(env)
    ref = re.search(r"`(--nproc_per_node \d+ .*?--master_port \d+)`", neuron_reference)
    assert ref is not None
    ref_flags = dict(re.findall(r"(--\w+) (\S+)", ref.group(1)))
    train = plan.commands["train"].argv
    flags = torchrun_flags(train)
    assert flags["--nproc_per_node"] == ref_flags["--nproc_per_node"] == "32"
    assert flags["--master_port"] == ref_flags["--master_port"]
    assert (flags["--nnodes"], flags["--node_rank"], flags["--master_addr"]) == (str(nodes), str(rank), master)
    assert train[0] == "torchrun"
    assert train[len(flags) * 2 + 1] == "/opt/neuronx-distributed-training/examples/training_orchestrator.py"
    assert f"--config-path={CONFIG_8B.parent}" in train and "--config-name=llama3_8b_trn1" in train
    assert f"trainer.num_nodes={nodes}" in train and "trainer.devices=32" in train
    assert plan.layout.dp == 4 * nodes and plan.layout.world_size == 32 * nodes


def test_compile_is_train_under_neuron_parallel_compile() -> None:
    plan = neuron_plan(FOUR_NODES)
    compile_argv, train_argv = plan.commands["compile"].argv, plan.commands["train"].argv
    assert compile_argv == ["neuron_parallel_compile", *train_argv]
    assert "neuron_parallel_compile" not in train_argv
    assert "--redirect" not in " ".join(compile_argv)  # incompatible with neuron_parallel_compile
    assert plan.commands["compile"].env == plan.commands["train"].env


def test_env_values_match_reference(neuron_reference: str) -> None:
    facts = reference_env(neuron_reference)
    env = neuron_plan(FOUR_NODES).commands["train"].env
    for name, value in facts.items():
        if name == "CCOM_SOCKET_IFNAME":  # only outside Slurm (EKS/MPI); never for Slurm jobs
            assert name not in env
            continue
        assert env.get(name) == value, name
    assert env["MALLOC_ARENA_MAX"] in ("64", "128")
    assert env["NEURON_COMPILE_CACHE_URL"] == "/var/tmp/neuron-compile-cache"
    assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "5"  # NxDT default
    assert env["BUCKET_CAP_MB"] == "1024" and env["NEURON_RT_EXEC_TIMEOUT"] == "100"
    assert "NEURON_CC_FLAGS" not in env  # the orchestrator appends compiler_flags itself


def test_effective_compiler_flags_and_rlimit() -> None:
    plan = neuron_plan({"NEURON_CC_FLAGS": "--retry_failed_compilation"})
    assert plan.effective_neuron_cc_flags == (
        "--retry_failed_compilation --model-type transformer --enable-mixed-precision-accumulation")
    assert plan.rlimits == {"nofile": 65535}


def test_user_set_env_is_left_alone() -> None:
    user = {**FOUR_NODES, "FI_PROVIDER": "sockets", "MALLOC_ARENA_MAX": "128", "NEURON_COMPILE_CACHE_URL": "/x"}
    plan = neuron_plan(user)
    launch = plan.commands["train"]
    assert "FI_PROVIDER" not in launch.env and "MALLOC_ARENA_MAX" not in launch.env
    assert launch.env_kept["FI_PROVIDER"] == "sockets" and launch.env_kept["MALLOC_ARENA_MAX"] == "128"
    assert any("NEURON_COMPILE_CACHE_URL=/x" in w for w in plan.warnings)


def test_cache_dir_in_user_cc_flags_warns() -> None:
    plan = neuron_plan({"NEURON_CC_FLAGS": "--cache_dir=/tmp/other"})
    assert any("--cache_dir" in w for w in plan.warnings)


@pytest.mark.parametrize("precision, expected", [
    ("mixed_precision", ("0", "1", "0")),
    ("mixed_precision_SR", ("0", "1", "1")),
    ("bf16SR", ("1", "0", "1")),
    ("fp32", ("0", "0", "0")),
])
def test_precision_env(precision: str, expected: tuple[str, str, str]) -> None:
    env = neuron_plan({}, f"precision.type={precision}").commands["train"].env
    assert (env["XLA_USE_BF16"], env["XLA_DOWNCAST_BF16"], env["NEURON_RT_STOCHASTIC_ROUNDING_EN"]) == expected


def test_log_dir_is_stable_across_jobs_so_requeues_resume() -> None:
    first = neuron_plan({**FOUR_NODES, "SLURM_JOB_ID": "1"})
    again = neuron_plan({**FOUR_NODES, "SLURM_JOB_ID": "2", "SLURM_RESTART_COUNT": "1"})
    assert first.run_dir == again.run_dir == "/fsx/runs/llama3_8b_trn1"
    assert "exp_manager.explicit_log_dir=/fsx/runs/llama3_8b_trn1" in first.commands["train"].argv
    named = neuron_plan(FOUR_NODES, run_name="exp7")
    assert named.run_dir == "/fsx/runs/exp7"


def test_user_explicit_log_dir_wins() -> None:
    plan = neuron_plan({}, "exp_manager.explicit_log_dir=/fsx/mine")
    assert plan.run_dir == "/fsx/mine"
    argv = plan.commands["train"].argv
    assert "exp_manager.explicit_log_dir=/fsx/mine" in argv
    assert sum(a.startswith("exp_manager.explicit_log_dir=") for a in argv) == 1


def test_user_overrides_reach_hydra_and_paths_are_absolute() -> None:
    plan = neuron_plan({}, "trainer.max_steps=50", "data.train_dir=data/tok")
    argv = plan.commands["train"].argv
    assert "trainer.max_steps=50" in argv
    assert any(a.startswith("model.model_config=/") and a.endswith("configs/models/llama3_8b.json") for a in argv)
    assert any(a.startswith("data.train_dir=/") and a.endswith("/data/tok") for a in argv)


def test_master_port_from_env() -> None:
    assert torchrun_flags(neuron_plan({"MASTER_PORT": "45123"}).commands["train"].argv)["--master_port"] == "45123"


def test_slurm_node_count_wins_over_yaml() -> None:
    plan = neuron_plan(FOUR_NODES, "trainer.num_nodes=2")
    assert plan.layout.num_nodes == 4 and plan.commands["train"].argv.count("trainer.num_nodes=4") == 1


def test_cli_json_with_slurm_env() -> None:
    result = run_cli("plan", str(CONFIG_8B), "--backend", "neuron", "--json", "--output-dir", "/fsx/runs",
                     env=FOUR_NODES)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cluster"] | {"hosts": None} == {
        "num_nodes": 4, "node_rank": 2, "master_addr": "trn1-st-007", "master_port": 41000, "source": "slurm",
        "job_id": "4242", "hosts": None}
    assert data["cluster"]["hosts"] == ["trn1-st-007", "trn1-st-012", "trn1-st-013", "trn1-od-001"]
    assert data["layout"]["tp"] == 8 and data["layout"]["dp"] == 16
    assert data["commands"]["compile"]["argv"][0] == "neuron_parallel_compile"


@pytest.mark.parametrize("env, key", [
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "5"}, "SLURM_NODEID"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NUM_NODES"),
    ({"SLURM_JOB_NODELIST": "n[1-"}, "SLURM_JOB_NODELIST"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT"),
])
def test_bad_slurm_env_is_one_line(env: dict[str, str], key: str) -> None:
    result = run_cli("plan", str(CONFIG_8B), "--backend", "neuron", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {key}:") and len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_policy_keeps_the_resume_promise_on_both_backends() -> None:
    plan = neuron_plan(FOUR_NODES)
    assert plan.checkpoints == {"enabled": True, "dir": "/fsx/runs/llama3_8b_trn1/checkpoints",
                                "every_n_train_steps": 200, "keep": 1, "resume_if_exists": True, "async": False,
                                "save_on_signal": False}
    assert not [w for w in plan.warnings if "checkpoint" in w or "resum" in w]
    torch_plan = build_plan(CONFIG_8B, ["distributed_strategy.sequence_parallel=false"],
                            detect_accelerator("torch-cpu"), {}, output_dir="/fsx/runs")
    assert torch_plan.checkpoints["save_on_signal"] is True
    assert torch_plan.checkpoints["dir"] == plan.checkpoints["dir"]


@pytest.mark.parametrize(("overrides", "warning"), [
    (("exp_manager.resume_if_exists=false",), "a requeued or resubmitted job starts over instead of resuming"),
    (("exp_manager.create_checkpoint_callback=false",), "checkpoints are off"),
    (("exp_manager.checkpoint_callback_params.save_top_k=0",), "checkpoints are off"),
    (("trainer.max_steps=100", "exp_manager.checkpoint_callback_params.every_n_train_steps=100"),
     "saves nothing before the end"),
])
def test_a_config_that_breaks_resume_is_warned(overrides: tuple[str, ...], warning: str) -> None:
    assert any(warning in w for w in neuron_plan({}, *overrides).warnings)
