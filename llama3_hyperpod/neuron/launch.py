"""The NxDT launch lines for compile and train, as NxDT's own examples/train.sh would run them, made safe to run from
a read-only image and to requeue.

train.sh (aws-neuron/neuronx-distributed-training 9169aa0, lines 16-31) runs, per node,
`[neuron_parallel_compile] torchrun --nproc_per_node D --nnodes N --node_rank R --master_addr M --master_port 41000
training_orchestrator.py --config-path=conf --config-name=C trainer.devices=D trainer.num_nodes=N
exp_manager.explicit_log_dir=...`. Here:
- torchrun and neuron_parallel_compile are the SDK environment's own, by absolute path (`L3HP_SDK_PYTHON` names the
  SDK's interpreter; both scripts live beside it);
- the orchestrator is `@hydra.main(..., version_base="1.2")` (training_orchestrator.py:140): without
  `hydra.run.dir` it writes `outputs/<date>/<time>/` under the working directory, which fails in a read-only image,
  so the run dir is given and the working directory is the run's own writable folder;
- every override is in Hydra's grammar with struct rules (`++` for keys the YAML lacks, values quoted);
- compile sets COMPILE=1, which is what makes the orchestrator cap max_steps at 10 and turn checkpoints and
  TensorBoard off (training_orchestrator.py:53-56); train sets COMPILE=0. Compile logs go to `<run dir>/compile`,
  never where train looks for checkpoints, and compile does not resume;
- neuron_parallel_compile's work dir (default /tmp/$USER/parallel_compile_workdir, removed at start) is per node in
  the run dir; it exits with the number of graphs that failed to compile.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llama3_hyperpod.cluster import Cluster
from llama3_hyperpod.config import RunConfig
from llama3_hyperpod.launchspec import Launch, split_env
from llama3_hyperpod.neuron import checkpoints, convert
from llama3_hyperpod.neuron.devices import instance_for
from llama3_hyperpod.neuron.env import launch_env, orchestrator_env
from llama3_hyperpod.overrides import assignment, hydra_value

DEFAULT_NXDT_EXAMPLES = "/opt/neuronx-distributed-training/examples"
SDK_PYTHON_ENV = "L3HP_SDK_PYTHON"  # set by every image flavor: the SDK environment's interpreter
COMPILE_DIR = "compile"


@dataclass(frozen=True)
class NeuronLaunch:
    commands: dict[str, Launch]
    nxdt_env: dict[str, dict[str, str]]  # per mode: what the orchestrator will set or change in its own environment
    effective_neuron_cc_flags: str | None
    checkpoint_dir: str
    resume: checkpoints.ResumeChoice
    resume_pin: str | None  # what train passes as exp_manager.resume_from_checkpoint (None: NxDT's own choice)
    imported: str | None = None  # the run's imported weights train starts from (no checkpoint of its own yet)

    def resume_text(self) -> str:
        if self.imported:
            return f"from the imported weights {self.imported} (model.weight_init_only: optimizer states start fresh)"
        if self.resume_pin:
            return f"from {self.resume_pin} (pinned: the newest with NxD's 'done' marker)"
        if self.resume.resume_from is not None:
            return f"not from {self.resume.resume_from.path}: resume is off"
        return "nothing to resume from: starts from the beginning"


def sdk_bin(env: Mapping[str, str]) -> Path:
    """Where the SDK's torchrun and neuron_parallel_compile are: beside its interpreter (ours outside an image)."""
    return Path(env.get(SDK_PYTHON_ENV) or sys.executable).parent


def checkpoint_dir(rc: RunConfig, log_dir: str) -> Path:
    """Where NxDT saves and resumes: checkpoint_callback_params.dirpath, else <log dir>/checkpoints
    (utils/exp_manager.py:206-216, 357-358)."""
    dirpath = rc.cfg.exp_manager.checkpoint_callback_params.dirpath
    return Path(dirpath) if dirpath else Path(log_dir) / "checkpoints"


def build(
    rc: RunConfig,
    cluster: Cluster,
    env: Mapping[str, str],
    *,
    run_dir: str,
    derived_log_dir: bool,
    cache_dir: str,
    examples: str,
    warnings: list[str],
) -> NeuronLaunch:
    """NxDT's compile and train launches for this node, their env and what the orchestrator adds, the resume."""
    lay, present = rc.layout, rc.present
    bin_dir = sdk_bin(env)
    head, common = _orchestrator_args(rc, cluster, bin_dir, cache_dir, examples)
    ckpt_dir = checkpoint_dir(rc, run_dir)
    resume = checkpoints.choose(ckpt_dir)
    train_extra = [assignment("exp_manager.explicit_log_dir", run_dir, present)] if derived_log_dir else []
    pin = _resume_pin(rc, resume, warnings)
    if pin is not None:
        train_extra.append(assignment("exp_manager.resume_from_checkpoint", pin, present))
    imported = convert.read_import(run_dir) if resume.resume_from is None else None
    import_args = (convert.import_overrides(rc, imported, instance_for(lay.devices_per_node, rc.cfg.trainer.lnc),
                                            warnings) if imported is not None else [])
    train_extra += import_args
    rank = cluster.node_rank
    train_argv = [*head, *common, *train_extra, f"hydra.run.dir={hydra_value(f'{run_dir}/hydra/train-node{rank}')}"]

    compile_dir = f"{run_dir}/{COMPILE_DIR}"
    compile_argv = [
        str(bin_dir / "neuron_parallel_compile"), f"--parallel_compile_workdir={compile_dir}/npc-workdir-node{rank}",
        *head, *common,
        assignment("exp_manager.explicit_log_dir", compile_dir, present),
        assignment("exp_manager.resume_if_exists", False, present),
        f"hydra.run.dir={hydra_value(f'{compile_dir}/hydra-node{rank}')}",
    ]

    commands, nxdt_env = _launches(rc, cluster, env, cache_dir, {"compile": (compile_argv, compile_dir, "1"),
                                                               "train": (train_argv, run_dir, "0")})
    _env_warnings(env, cache_dir, warnings)
    flags = nxdt_env["train"].get("NEURON_CC_FLAGS", env.get("NEURON_CC_FLAGS"))
    return NeuronLaunch(commands, nxdt_env, flags, str(ckpt_dir), resume, pin,
                        str(imported.checkpoint) if imported is not None and import_args else None)


def _orchestrator_args(rc: RunConfig, cluster: Cluster, bin_dir: Path, cache_dir: str,
                       examples: str) -> tuple[list[str], list[str]]:
    """torchrun + training_orchestrator.py with this node's rendezvous, and the overrides both modes share."""
    lay, present = rc.layout, rc.present
    rendezvous = [
        "--nproc_per_node", str(lay.devices_per_node), "--nnodes", str(cluster.num_nodes),
        "--node_rank", str(cluster.node_rank), "--master_addr", cluster.master_addr,
        "--master_port", str(cluster.master_port),
    ]
    head = [str(bin_dir / "torchrun"), *rendezvous, f"{examples}/training_orchestrator.py",
            f"--config-path={rc.path.parent}", f"--config-name={rc.path.stem}"]
    common = [*rc.nxdt_overrides, *rc.yaml_path_fixes,
              assignment("trainer.devices", lay.devices_per_node, present),
              assignment("trainer.num_nodes", cluster.num_nodes, present)]
    if cache_dir != rc.raw.compiler_cache_url:
        common.append(assignment("compiler_cache_url", cache_dir, present))
    return head, common


def _launches(rc: RunConfig, cluster: Cluster, env: Mapping[str, str], cache_dir: str,
              modes: Mapping[str, tuple[list[str], str, str]]) -> tuple[dict[str, Launch], dict[str, dict[str, str]]]:
    """Per mode (argv, cwd, COMPILE flag): the Launch with our env, and the env NxDT's orchestrator then sets."""
    wanted = launch_env(under_slurm=cluster.source == "slurm", num_nodes=cluster.num_nodes, job_id=cluster.job_id)
    commands, nxdt_env = {}, {}
    nxdt_cfg = OmegaConf.merge(rc.raw, {"compiler_cache_url": cache_dir})
    assert isinstance(nxdt_cfg, DictConfig)
    for mode, (argv, cwd, compile_flag) in modes.items():
        added, kept, replaced = split_env(wanted, env, forced={"COMPILE": compile_flag})
        commands[mode] = Launch(argv, added, kept, cwd, replaced)
        nxdt_env[mode] = orchestrator_env(nxdt_cfg, {**env, **added})
    return commands, nxdt_env


def _resume_pin(rc: RunConfig, resume: checkpoints.ResumeChoice, warnings: list[str]) -> str | None:
    """The checkpoint train must name in exp_manager.resume_from_checkpoint, or None to leave NxDT's own choice."""
    em = rc.cfg.exp_manager
    if resume.resume_from is None:
        return None
    if not (em.resume_if_exists or em.resume_from_checkpoint):
        warnings.append(f"exp_manager.resume_if_exists is false: {resume.resume_from.path} is not resumed from")
        return None
    newest = str(resume.resume_from.path)
    if em.resume_from_checkpoint and em.resume_from_checkpoint != newest:
        warnings.append(f"exp_manager.resume_from_checkpoint {em.resume_from_checkpoint} is replaced by this run's "
                        f"own newer checkpoint {newest}" + (" (weight_init_only: optimizer states start fresh)"
                                                             if rc.cfg.model.weight_init_only else ""))
    return newest


def _env_warnings(env: Mapping[str, str], cache_dir: str, warnings: list[str]) -> None:
    flags = env.get("NEURON_CC_FLAGS")
    if flags is not None and "--cache_dir" in flags:
        warnings.append("NEURON_CC_FLAGS sets --cache_dir, which wins over compiler_cache_url: "
                        "the baked compile cache will not be used unless they agree")
    if flags == "":
        warnings.append("NEURON_CC_FLAGS is set but empty: NxDT's orchestrator then appends neither compiler_flags nor "
                        "the precision flags (set_env_variable skips an empty value); unset it")
    user_cache = env.get("NEURON_COMPILE_CACHE_URL")
    if user_cache is not None and user_cache != cache_dir:
        warnings.append(f"NEURON_COMPILE_CACHE_URL={user_cache} (yours) differs from the planned cache {cache_dir}: "
                        "graphs will be cached in yours")
    if env.get("TRAIN_ITERS") is not None:
        warnings.append(f"TRAIN_ITERS={env['TRAIN_ITERS']}: with COMPILE=0 NxDT's orchestrator sets trainer.max_steps "
                        "to it (training_orchestrator.py:57-58)")
