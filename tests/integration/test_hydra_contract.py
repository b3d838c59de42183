"""The contract with NxDT's Hydra, run for real: the arguments the plan puts after training_orchestrator.py, given to a
Hydra program declared exactly like NxDT's orchestrator, in a separate venv with NxDT's pins (hydra-core 1.3.2,
omegaconf 2.2.3), as a non-root user, from a read-only directory, with a run dir holding `,` and `(`.

The program is ours (NxDT's code is not copied): `@hydra.main(config_path="conf", config_name="megatron_gpt_config",
version_base="1.2")` as at neuronx-distributed-training examples/training_orchestrator.py:140; it registers
`multiply` as NeMo does on import and dumps the config it received.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.overrides import hydra_value
from llama3_hyperpod.plan import build_plan
from tests.conftest import CONFIGS, NXDT_CONF

pytestmark = pytest.mark.integration

PINS = ("hydra-core==1.3.2", "omegaconf==2.2.3")  # NxDT's: nxdt_requirements.txt (shared/reference/neuron-nxdt.md)
STATE = Path(os.environ.get("LLAMA3_CI_STATE_DIR", "/var/tmp/llama3-hyperpod-ci"))
ORCHESTRATOR = '''
import json, os
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

@hydra.main(config_path="conf", config_name="megatron_gpt_config", version_base="1.2")
def main(cfg) -> None:
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)  # as NeMo's modelPT.py does
    with open(os.environ["CONTRACT_OUT"], "w") as out:
        json.dump({"cfg": OmegaConf.to_container(cfg, resolve=True), "cwd": os.getcwd(),
                   "output_dir": HydraConfig.get().runtime.output_dir}, out)

if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="session")
def nxdt_hydra_python() -> Path:
    """A venv with exactly NxDT's hydra-core and omegaconf (made once per pin set, like the CI wheelhouse)."""
    venv = STATE / ("hydra-venv-" + "-".join(p.replace("==", "") for p in PINS))
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PINS],
                       check=True)
        (venv / ".complete").touch()
    versions = subprocess.run([str(python), "-c", "import hydra, omegaconf; print(hydra.__version__, "
                               "omegaconf.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    assert versions == ["1.3.2", "2.2.3"]
    return python


@pytest.fixture()
def sandbox() -> Iterator[dict[str, Path]]:
    """A world-readable scratch tree: a read-only 'image' (program + configs) and a writable output dir whose name
    holds `,` `(` `)` and a space, as a user's /fsx path might."""
    root = Path(tempfile.mkdtemp(prefix="l3hp-contract-"))
    image = root / "image"
    (image / "examples" / "conf").mkdir(parents=True)
    (image / "examples" / "training_orchestrator.py").write_text(ORCHESTRATOR)
    shutil.copytree(CONFIGS, image / "configs")
    if NXDT_CONF.is_dir():
        shutil.copytree(NXDT_CONF, image / "nxdt-conf")
    output = root / "runs, try (2)"
    output.mkdir()
    data = root / "data (v1)"
    data.mkdir()
    for path in [image, *image.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    for path in (root, output, data):
        path.chmod(0o777)
    try:
        yield {"root": root, "image": image, "output": output, "data": data}
    finally:
        for path in [image, *image.rglob("*")]:
            path.chmod(stat.S_IRWXU)
        shutil.rmtree(root, ignore_errors=True)


def as_non_root(argv: list[str]) -> list[str]:
    """Run as nobody when we are root (CI); a non-root user already is one."""
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv] if os.getuid() == 0 else argv


def run_orchestrator(python: Path, sandbox: dict[str, Path], tail: list[str], cwd: Path) -> dict[str, Any]:
    out = sandbox["output"] / "contract.json"
    env = {"PATH": os.environ["PATH"], "CONTRACT_OUT": str(out), "HYDRA_FULL_ERROR": "1", "HOME": "/nonexistent"}
    result = subprocess.run(as_non_root([str(python), str(sandbox["image"] / "examples" / "training_orchestrator.py"),
                                         *tail]), cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def tail_after_orchestrator(argv: list[str]) -> list[str]:
    return argv[next(i for i, a in enumerate(argv) if a.endswith("training_orchestrator.py")) + 1:]


def test_without_a_run_dir_hydra_fails_in_a_read_only_image(nxdt_hydra_python: Path,
                                                            sandbox: dict[str, Path]) -> None:
    """The failure the plan's hydra.run.dir prevents (what NxDT's own train.sh would hit in our image)."""
    image = sandbox["image"]
    argv = as_non_root([str(nxdt_hydra_python), str(image / "examples" / "training_orchestrator.py"),
                        f"--config-path={image / 'configs'}", "--config-name=tiny_cpu"])
    result = subprocess.run(argv, cwd=image / "examples", capture_output=True, text=True, timeout=120, check=False,
                            env={"PATH": os.environ["PATH"], "CONTRACT_OUT": "/dev/null", "HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "PermissionError" in result.stderr and "outputs" in result.stderr


@pytest.mark.parametrize("config", ["ours", "nxdt"])
@pytest.mark.parametrize("mode", ["compile", "train"])
def test_the_plans_arguments_compose_in_nxdts_hydra(nxdt_hydra_python: Path, sandbox: dict[str, Path],
                                                     config: str, mode: str) -> None:
    image = sandbox["image"]
    if config == "ours":
        path = image / "configs" / "llama3_8b_trn1.yaml"
        extra: list[str] = []
    else:
        if not (image / "nxdt-conf").is_dir():
            pytest.fail(f"{NXDT_CONF} is missing: shared/ must be beside the repository")
        path = image / "nxdt-conf" / "hf_llama3_8B_config.yaml"
        extra = [f"model.model_config={image / 'configs' / 'models' / 'llama3_8b.json'}"]
    # A user quotes a value with `(` as Hydra's grammar asks (plan refuses it unquoted, as NxDT's Hydra would)
    user = [*extra, f"data.train_dir={hydra_value(str(sandbox['data']))}", "trainer.max_steps=7", "+model.my_tag='a,b'"]
    env = {"SLURM_JOB_NODELIST": "trn1-[1-4]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "1",
           "SLURM_JOB_ID": "77", "L3HP_CACHE_DIR": str(sandbox["output"] / "cache (node)")}
    plan = build_plan(path, user, detect_accelerator("neuron"), env, output_dir=sandbox["output"])
    launch = plan.commands[mode]
    got = run_orchestrator(nxdt_hydra_python, sandbox, tail_after_orchestrator(launch.argv), cwd=image / "examples")

    cfg = got["cfg"]
    run_dir = plan.run_dir
    assert "," in run_dir and "(" in run_dir
    assert (cfg["trainer"]["devices"], cfg["trainer"]["num_nodes"], cfg["trainer"]["max_steps"]) == (32, 4, 7)
    assert cfg["data"]["train_dir"] == str(sandbox["data"]) and cfg["model"]["my_tag"] == "a,b"
    assert cfg["compiler_cache_url"] == plan.compile_cache_dir == env["L3HP_CACHE_DIR"]
    assert cfg["model"]["model_config"] == str(image / "configs" / "models" / "llama3_8b.json")
    assert cfg["exp_manager"]["checkpoint_callback_params"]["model_parallel_size"] == plan.layout.tp * plan.layout.pp
    expected_log = f"{run_dir}/compile" if mode == "compile" else run_dir
    assert cfg["exp_manager"]["explicit_log_dir"] == expected_log
    if mode == "compile":
        assert cfg["exp_manager"]["resume_if_exists"] is False
    hydra_dir = f"{run_dir}/compile/hydra-node1" if mode == "compile" else f"{run_dir}/hydra/train-node1"
    assert got["output_dir"] == hydra_dir and (Path(hydra_dir) / ".hydra" / "config.yaml").is_file()
    assert got["cwd"] == str(image / "examples")  # version_base 1.2: no chdir; nothing written into the image
    assert not (image / "examples" / "outputs").exists()


def test_a_pinned_resume_path_with_odd_characters_reaches_hydra(nxdt_hydra_python: Path,
                                                                sandbox: dict[str, Path]) -> None:
    image = sandbox["image"]
    run_dir = sandbox["output"] / "run"
    tag = run_dir / "checkpoints" / "llama3_8B--step=5-consumed_samples=5120.0.ckpt"
    tag.mkdir(parents=True)
    (tag / "done").write_text("1")
    for path in (run_dir, run_dir / "checkpoints", tag):
        path.chmod(0o777)
    plan = build_plan(image / "configs" / "llama3_8b_trn1.yaml",
                      [f"exp_manager.explicit_log_dir={hydra_value(str(run_dir))}"],
                      detect_accelerator("neuron"), {})
    got = run_orchestrator(nxdt_hydra_python, sandbox, tail_after_orchestrator(plan.commands["train"].argv),
                           cwd=run_dir)
    assert got["cfg"]["exp_manager"]["resume_from_checkpoint"] == str(tag)


def test_an_imported_run_starts_from_its_weights_in_nxdts_hydra(nxdt_hydra_python: Path,
                                                                 sandbox: dict[str, Path]) -> None:
    """What `checkpoint import` leaves for the neuron train launch, composed by NxDT's Hydra: the converted shards as
    resume_from_checkpoint and weight_init_only true (a key the YAML lacks: added with ++)."""
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.neuron import convert
    from llama3_hyperpod.neuron.devices import instance_for

    image = sandbox["image"]
    config = image / "configs" / "llama3_8b_trn1.yaml"
    run_dir = sandbox["output"] / "run"
    nxdt = run_dir / "import" / "nxdt"
    (nxdt / "model").mkdir(parents=True)
    layout = convert.layout_for(load_config(config, []), instance_for(32, None)).to_dict()
    (run_dir / "import" / "manifest.json").write_text(json.dumps({"backend": "neuron", "layout": layout}))
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o777)
    plan = build_plan(config, [f"exp_manager.explicit_log_dir={hydra_value(str(run_dir))}"],
                      detect_accelerator("neuron"), {})
    got = run_orchestrator(nxdt_hydra_python, sandbox, tail_after_orchestrator(plan.commands["train"].argv),
                           cwd=run_dir)
    assert got["cfg"]["exp_manager"]["resume_from_checkpoint"] == str(nxdt)
    assert got["cfg"]["model"]["weight_init_only"] is True
