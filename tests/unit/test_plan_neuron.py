"""The neuron launch as data, held to shared/reference/neuron-nxdt.md ("How NxDT is launched") on 1 and 4 nodes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.errors import ConfigError
from llama3_hyperpod.plan import Plan, build_plan
from tests.conftest import CONFIG_8B, run_cli

FOUR_NODES = {
    "SLURM_JOB_NODELIST": "trn1-st-[007,012-013],trn1-od-001",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "4242",
}
SDK = {"L3HP_SDK_PYTHON": "/opt/sdk/bin/python3"}


def neuron_plan(env: dict[str, str], *overrides: str, run_name: str | None = None) -> Plan:
    return build_plan(CONFIG_8B, overrides, detect_accelerator("neuron"), {**SDK, **env}, output_dir="/fsx/runs",
                      run_name=run_name)


def launch_script_env(reference: str) -> dict[str, str]:
    """`NAME=value` facts of the reference's train_setup.sh paragraph (host-only settings excluded)."""
    paragraph = reference.split("Env set by train_setup.sh under Slurm:", 1)[1].split("root-only", 1)[0]
    return dict(re.findall(r"`([A-Z][A-Z0-9_]*)=([^`\s]+)`", paragraph))


def torchrun_flags(argv: list[str]) -> dict[str, str]:
    """The `--flag value` pairs between torchrun and the script it runs."""
    start = next(i for i, a in enumerate(argv) if a.endswith("/torchrun")) + 1
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    return dict(zip(argv[start:script:2], argv[start + 1:script:2], strict=True))


def test_reference_env_is_parsed(neuron_reference: str) -> None:
    facts = launch_script_env(neuron_reference)
    assert {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "MALLOC_ARENA_MAX", "HYDRA_FULL_ERROR"} <= facts.keys()


@pytest.mark.parametrize("env, nodes, rank, master", [({}, 1, 0, "127.0.0.1"), (FOUR_NODES, 4, 2, "trn1-st-007")])
def test_torchrun_matches_reference(neuron_reference: str, env: dict[str, str], nodes: int, rank: int,
                                    master: str) -> None:
    plan = neuron_plan(env)
    ref = re.search(r"`(--nproc_per_node <trainer.devices> .*?--master_port (\d+))`", neuron_reference, re.DOTALL)
    assert ref is not None
    train = plan.commands["train"].argv
    flags = torchrun_flags(train)
    assert flags["--nproc_per_node"] == "32" and flags["--master_port"] == ref.group(2) == "41000"
    assert (flags["--nnodes"], flags["--node_rank"], flags["--master_addr"]) == (str(nodes), str(rank), master)
    assert train[0] == "/opt/sdk/bin/torchrun"  # the SDK's own torchrun, by absolute path
    assert train[len(flags) * 2 + 1] == "/opt/neuronx-distributed-training/examples/training_orchestrator.py"
    assert f"--config-path={CONFIG_8B.parent}" in train and "--config-name=llama3_8b_trn1" in train
    assert f"trainer.num_nodes={nodes}" in train and "trainer.devices=32" in train
    assert plan.layout.dp == 4 * nodes and plan.layout.world_size == 32 * nodes


def test_compile_engages_nxdt_compile_mode(neuron_reference: str) -> None:
    """Compile mode is COMPILE=1 (the orchestrator caps steps, turns checkpoints off), not neuron_parallel_compile."""
    assert "Compile mode is the env var `COMPILE=1`" in neuron_reference
    plan = neuron_plan(FOUR_NODES)
    compile_, train = plan.commands["compile"], plan.commands["train"]
    assert compile_.env["COMPILE"] == "1" and train.env["COMPILE"] == "0"
    assert compile_.argv[0] == "/opt/sdk/bin/neuron_parallel_compile"
    assert compile_.argv[1] == "--parallel_compile_workdir=/fsx/runs/llama3_8b_trn1/compile/npc-workdir-node2"
    assert compile_.argv[2] == "/opt/sdk/bin/torchrun" and "neuron_parallel_compile" not in " ".join(train.argv)
    assert "--redirect" not in " ".join(compile_.argv)  # incompatible with neuron_parallel_compile
    # compile's logs never land where train looks for checkpoints, and compile does not resume
    assert "exp_manager.explicit_log_dir='/fsx/runs/llama3_8b_trn1/compile'" in compile_.argv
    assert "exp_manager.resume_if_exists=false" in compile_.argv
    assert "exp_manager.explicit_log_dir='/fsx/runs/llama3_8b_trn1'" in train.argv
    assert plan.checkpoints["dir"] == "/fsx/runs/llama3_8b_trn1/checkpoints"


def test_user_compile_in_env_cannot_turn_train_into_compile() -> None:
    plan = neuron_plan({"COMPILE": "1"})
    assert plan.commands["train"].env["COMPILE"] == "0"
    assert plan.commands["train"].env_replaced == {"COMPILE": "1"}


def test_hydra_writes_into_the_run_dir_not_the_image() -> None:
    plan = neuron_plan(FOUR_NODES)
    train, compile_ = plan.commands["train"], plan.commands["compile"]
    assert "hydra.run.dir='/fsx/runs/llama3_8b_trn1/hydra/train-node2'" in train.argv
    assert "hydra.run.dir='/fsx/runs/llama3_8b_trn1/compile/hydra-node2'" in compile_.argv
    assert train.cwd == "/fsx/runs/llama3_8b_trn1" and compile_.cwd == "/fsx/runs/llama3_8b_trn1/compile"


def test_launch_script_env_matches_reference(neuron_reference: str) -> None:
    facts = launch_script_env(neuron_reference)
    slurm = neuron_plan(FOUR_NODES).commands["train"].env
    single = neuron_plan({}).commands["train"].env
    for name, value in facts.items():
        if name in ("MASTER_PORT", "EXPLICIT_LOGDIR"):  # passed as --master_port / exp_manager.explicit_log_dir
            continue
        expected = FOUR_NODES["SLURM_JOB_ID"] if value == "$SLURM_JOB_ID" else value
        assert slurm.get(name) == expected, name
        if name.startswith("FI_") or name == "NEMO_EXPM_VERSION":  # "only under Slurm or MPI"
            assert name not in single
        else:
            assert single.get(name) == value, name


def test_user_set_env_is_left_alone() -> None:
    user = {**FOUR_NODES, "FI_PROVIDER": "sockets", "MALLOC_ARENA_MAX": "64", "NEURON_COMPILE_CACHE_URL": "/x"}
    plan = neuron_plan(user)
    launch = plan.commands["train"]
    assert "FI_PROVIDER" not in launch.env and "MALLOC_ARENA_MAX" not in launch.env
    assert launch.env_kept["FI_PROVIDER"] == "sockets" and launch.env_kept["MALLOC_ARENA_MAX"] == "64"
    assert any("NEURON_COMPILE_CACHE_URL=/x" in w for w in plan.warnings)
    assert "NEURON_COMPILE_CACHE_URL" not in plan.nxdt_env["train"]  # set-if-unset: the orchestrator keeps yours


def test_cache_dir_in_user_cc_flags_warns() -> None:
    plan = neuron_plan({"NEURON_CC_FLAGS": "--cache_dir=/tmp/other"})
    assert any("--cache_dir" in w for w in plan.warnings)


def test_rlimit_as_train_setup() -> None:
    assert neuron_plan({}).rlimits == {"nofile": 65535}


def test_log_dir_is_stable_across_jobs_so_requeues_resume() -> None:
    first = neuron_plan({**FOUR_NODES, "SLURM_JOB_ID": "1"})
    again = neuron_plan({**FOUR_NODES, "SLURM_JOB_ID": "2", "SLURM_RESTART_COUNT": "1"})
    assert first.run_dir == again.run_dir == "/fsx/runs/llama3_8b_trn1"
    assert first.commands["train"].argv == again.commands["train"].argv
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
    assert f"model.model_config='{CONFIG_8B.parent}/models/llama3_8b.json'" in argv  # the YAML's relative path
    assert f"data.train_dir='{Path.cwd()}/data/tok'" in argv  # an override's: against the working directory
    assert "data.train_dir=data/tok" not in argv


def test_a_key_the_yaml_lacks_is_added_with_plus_plus() -> None:
    plan = neuron_plan({}, "+model.fusions.ring_attention=false")
    argv = plan.commands["train"].argv
    assert "+model.fusions.ring_attention=false" in argv  # the user's own form reaches NxDT as written
    lacking = neuron_plan({}, "~trainer.num_nodes")  # Hydra deletes it: a plain trainer.num_nodes= would now fail
    assert "++trainer.num_nodes=1" in lacking.commands["train"].argv


def test_master_port_from_env() -> None:
    assert torchrun_flags(neuron_plan({"MASTER_PORT": "45123"}).commands["train"].argv)["--master_port"] == "45123"


def test_slurm_node_count_wins_over_yaml() -> None:
    plan = neuron_plan(FOUR_NODES, "trainer.num_nodes=2")
    argv = plan.commands["train"].argv
    assert plan.layout.num_nodes == 4
    assert argv.index("trainer.num_nodes=4") > argv.index("trainer.num_nodes=2")  # Hydra applies the last one


def test_cli_json_with_slurm_env() -> None:
    result = run_cli("plan", str(CONFIG_8B), "--backend", "neuron", "--json", "--output-dir", "/fsx/runs",
                     env={**FOUR_NODES, **SDK})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cluster"] | {"hosts": None} == {
        "num_nodes": 4, "node_rank": 2, "master_addr": "trn1-st-007", "master_port": 41000, "source": "slurm",
        "job_id": "4242", "hosts": None}
    assert data["cluster"]["hosts"] == ["trn1-st-007", "trn1-st-012", "trn1-st-013", "trn1-od-001"]
    assert data["layout"]["tp"] == 8 and data["layout"]["dp"] == 16 and data["instance"] == "trn1.32xlarge"
    assert data["commands"]["compile"]["argv"][0] == "/opt/sdk/bin/neuron_parallel_compile"
    assert data["nxdt_env"]["train"]["NEURON_CC_FLAGS"] == \
        "--model-type transformer --enable-mixed-precision-accumulation"


def test_auto_backend_on_a_machine_without_neuroncores_plans_for_trainium() -> None:
    result = run_cli("plan", str(CONFIG_8B), "--json", env={**SDK, "L3HP_BACKEND": "auto"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == "neuron" and data["instance"] == "trn1.32xlarge"
    assert "no NeuronCores here" in data["warnings"][0] and "--backend torch-cpu" in data["warnings"][0]
    forced = run_cli("plan", str(CONFIG_8B), "--backend", "torch-cpu")
    assert forced.returncode == 2 and forced.stderr.startswith("error: memory:")


@pytest.mark.parametrize("env, key", [
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "5"}, "SLURM_NODEID"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NUM_NODES"),
    ({"SLURM_JOB_NODELIST": "n[1-"}, "SLURM_JOB_NODELIST"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT"),
    ({"NODE_RANK": "abc"}, "NODE_RANK"),
])
def test_bad_slurm_env_is_one_line(env: dict[str, str], key: str) -> None:
    result = run_cli("plan", str(CONFIG_8B), "--backend", "neuron", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {key}:") and len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_policy_keeps_the_resume_promise_on_both_backends() -> None:
    plan = neuron_plan(FOUR_NODES)
    ck = plan.checkpoints
    assert (ck["enabled"], ck["dir"], ck["every_n_train_steps"], ck["keep"], ck["resume_if_exists"], ck["async"],
            ck["save_on_signal"]) == (True, "/fsx/runs/llama3_8b_trn1/checkpoints", 200, 1, True, False, False)
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


def test_a_key_the_orchestrator_needs_is_refused_when_missing() -> None:
    result = run_cli("plan", str(CONFIG_8B), "--backend", "neuron", "~neuron_rt_exec_timeout")
    assert result.returncode == 2
    assert result.stderr.startswith("error: neuron_rt_exec_timeout: is missing: NxDT's training_orchestrator.py")


def test_a_head_dim_nxdt_ignores_is_refused(tmp_path: Path) -> None:
    """NxDT builds hidden_size // heads whatever config.json's head_dim says; the torch backend honours it."""
    model = json.loads((CONFIG_8B.parent / "models" / "llama3_8b.json").read_text())
    (tmp_path / "odd.json").write_text(json.dumps({**model, "head_dim": 64}))
    overrides = (f"model.model_config={tmp_path / 'odd.json'}",)
    with pytest.raises(ConfigError) as err:
        build_plan(CONFIG_8B, overrides, detect_accelerator("neuron"), dict(SDK), output_dir=tmp_path)
    assert err.value.key == "model.model_config" and "NxDT ignores head_dim" in err.value.message
    torch_plan = build_plan(CONFIG_8B, overrides, detect_accelerator("torch-cuda"), {}, output_dir=tmp_path)
    assert torch_plan.model["head_dim"] == 64
