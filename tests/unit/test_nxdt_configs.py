"""Every NxDT example config in shared/nxdt/conf plans on the neuron backend with only path overrides, with the layout
the config says; and a typo in one still gets one line naming the nearest real key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.config import ConfigError, load_config
from llama3_hyperpod.plan import Plan, build_plan
from tests.conftest import CONFIGS, NXDT_CONF, run_cli

MODELS = CONFIGS / "models"


def model_json(name: str) -> Path:
    """The Hugging Face config.json each NxDT example is written for (their /home/ubuntu/config.json)."""
    for marker, file in (("405B", "llama3.1_405b.json"), ("3.1_70B", "llama3.1_70b.json"), ("70B", "llama3_70b.json"),
                         ("3.1_8B", "llama3.1_8b.json"), ("llama_7B", "llama2_7b.json")):
        if marker in name:
            return MODELS / file
    return MODELS / "llama3_8b.json"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder with Llama 2's vocabulary size (32000), for the configs that name one."""
    from tokenizers import Tokenizer, models

    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(32000)}, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return folder


def path_overrides(config: Path, raw: dict, tokenizer: Path, data: Path) -> list[str]:
    """Point the authors' /home/ubuntu paths at files that exist here; nothing else is changed."""
    out = []
    if raw.get("model_source", "hf") == "hf":
        out.append(f"model.model_config={model_json(config.name)}")
    if isinstance(raw.get("data", {}).get("tokenizer"), dict):
        out.append(f"data.tokenizer.type={tokenizer}")
    if "train_dir" in raw.get("data", {}):
        out.append(f"data.train_dir={data}")
    return out


def node_counts(raw: dict) -> list[int]:
    """1 and 4 nodes where the layout allows; otherwise the smallest node count it fits."""
    ds, devices = raw["distributed_strategy"], raw["trainer"]["devices"]
    model_parallel = ds["tensor_model_parallel_size"] * ds["pipeline_model_parallel_size"] * \
        ds.get("context_parallel_size", 1)
    counts = [n for n in (1, 4) if (n * devices) % model_parallel == 0]
    return counts or [next(n for n in range(1, 257) if (n * devices) % model_parallel == 0)]


CASES = [(p, n) for p in sorted(NXDT_CONF.glob("*.yaml")) for n in node_counts(yaml.safe_load(p.read_text()))]


def slurm(nodes: int) -> dict[str, str]:
    return {"SLURM_JOB_NODELIST": f"trn-[1-{nodes}]" if nodes > 1 else "trn-1", "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NODEID": "0", "SLURM_JOB_ID": "11"}


def test_the_shared_configs_are_there(nxdt_conf: Path) -> None:
    assert len(list(nxdt_conf.glob("*.yaml"))) >= 9 and len(CASES) >= 9


@pytest.mark.parametrize(("config", "nodes"), CASES, ids=[f"{c.stem}-{n}n" for c, n in CASES])
def test_every_nxdt_config_plans_with_its_own_layout(nxdt_conf: Path, tokenizer_dir: Path, tmp_path: Path,
                                                      config: Path, nodes: int) -> None:
    raw = yaml.safe_load(config.read_text())
    plan: Plan = build_plan(config, path_overrides(config, raw, tokenizer_dir, tmp_path),
                            detect_accelerator("neuron"), slurm(nodes), output_dir=tmp_path / "runs")
    ds, lay = raw["distributed_strategy"], plan.layout
    assert (lay.tp, lay.pp, lay.cp) == (ds["tensor_model_parallel_size"], ds["pipeline_model_parallel_size"],
                                        ds.get("context_parallel_size", 1))
    assert lay.devices_per_node == raw["trainer"]["devices"] and lay.num_nodes == nodes
    assert lay.dp == nodes * raw["trainer"]["devices"] // (lay.tp * lay.pp * lay.cp)
    expected_instance = "trn2.48xlarge" if raw["trainer"].get("lnc") == 2 else "trn1.32xlarge"
    assert plan.instance == expected_instance
    assert plan.memory.device_memory == (24 if expected_instance.startswith("trn2") else 16) * 2**30
    assert plan.memory.fits, f"{plan.memory.total / 2**30:.1f} GiB"
    assert plan.model["num_layers"] == raw["model"]["num_layers"]
    assert plan.model["hidden_size"] == raw["model"]["hidden_size"]
    argv = plan.commands["train"].argv
    assert argv[argv.index(next(a for a in argv if a.startswith("--config-name="))) - 1].startswith("--config-path=")
    assert f"--config-name={config.stem}" in argv and "hydra.run.dir=" in " ".join(argv)


def test_multiply_is_resolved_with_nemo_meaning(nxdt_conf: Path) -> None:
    config = nxdt_conf / "hf_llama3_8B_config.yaml"
    rc = load_config(config, [f"model.model_config={MODELS / 'llama3_8b.json'}",
                              "distributed_strategy.pipeline_model_parallel_size=2", "trainer.num_nodes=8"])
    assert rc.raw.exp_manager.checkpoint_callback_params.model_parallel_size == 32 * 2


def test_the_yaml_max_position_embeddings_only_raises_the_model_configs(nxdt_conf: Path) -> None:
    """NxDT takes max(config.json, YAML) (llama_model.py:30): a smaller YAML value does not shrink the model's RoPE
    table, a larger one grows it; the llama3.1 8B config.json says 131072, NxDT's 8B example YAML 8192."""
    config = nxdt_conf / "hf_llama3_8B_config.yaml"
    model = f"model.model_config={MODELS / 'llama3.1_8b.json'}"
    assert load_config(config, [model]).model.max_position_embeddings == 131072
    assert load_config(config, [model, "model.max_position_embeddings=262144"]).model.max_position_embeddings == 262144
    base = f"model.model_config={MODELS / 'llama3_8b.json'}"  # 8192
    assert load_config(config, [base, "model.max_position_embeddings=4096"]).model.max_position_embeddings == 8192


@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("+trainer.max_step=5", "trainer.max_step", "trainer.max_steps"),  # strict: PTL would raise
    ("+exp_manager.resume_if_exist=true", "exp_manager.resume_if_exist", "exp_manager.resume_if_exists"),
    ("+exp_manager.checkpoint_callback_params.every_n_train_step=5",
     "exp_manager.checkpoint_callback_params.every_n_train_step",
     "exp_manager.checkpoint_callback_params.every_n_train_steps"),
    ("+distributed_strategy.kv_replicater=4", "distributed_strategy.kv_replicater",
     "distributed_strategy.kv_replicator"),
    ("+model.fusions.flash_atention=true", "model.fusions.flash_atention", "model.fusions.flash_attention"),
    ("trainer.max_stepz=5", "trainer.max_stepz", "trainer.max_steps"),  # without +: Hydra's struct rule
])
def test_a_typo_in_an_nxdt_config_is_one_line_naming_the_nearest_key(nxdt_conf: Path, tmp_path: Path,
                                                                      override: str, key: str,
                                                                      suggestion: str) -> None:
    config = nxdt_conf / "hf_llama3_8B_config.yaml"
    result = run_cli("plan", str(config), "--backend", "neuron", f"model.model_config={MODELS / 'llama3_8b.json'}",
                     override, "--output-dir", str(tmp_path))
    assert result.returncode == 2, result.stdout[-500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: ") and f"'{suggestion}'" in lines[0], lines


def test_an_unknown_key_nxdt_ignores_is_a_warning_not_an_error(nxdt_conf: Path) -> None:
    rc = load_config(nxdt_conf / "hf_llama3_8B_config.yaml",
                     [f"model.model_config={MODELS / 'llama3_8b.json'}", "+model.my_experiment_tag=42"])
    assert any(w.startswith("model.my_experiment_tag: not a key NxDT reads") for w in rc.warnings)
    assert rc.raw.model.my_experiment_tag == 42  # kept for NxDT, not dropped


def test_a_trn2_config_beyond_its_logical_cores_is_refused(nxdt_conf: Path) -> None:
    config = nxdt_conf / "hf_llama3_8B_trn2_config.yaml"
    with pytest.raises(ConfigError) as err:
        build_plan(config, [f"model.model_config={MODELS / 'llama3_8b.json'}", "trainer.devices=128"],
                   detect_accelerator("neuron"), {})
    assert err.value.key == "trainer.devices" and "trn2.48xlarge has 64" in err.value.message
