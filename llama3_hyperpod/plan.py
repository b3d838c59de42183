"""The plan: a function from (config, environment, accelerator) to plain data; it reads files, writes nothing.

`entrypoint.py plan` prints it; `compile` and `train` execute its commands. Because it is data, the Neuron launch is
tested without Trainium: tests compare the commands and env with shared/reference/neuron-nxdt.md.
Over 400 lines: everything a command derives from the config is derived here, once (the cache's key included).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llama3_hyperpod import schema
from llama3_hyperpod.cache.seed import ENV_RUNTIME_DIR
from llama3_hyperpod.checkpoint_policy import CheckpointPolicy
from llama3_hyperpod.cluster import Accelerator, Cluster, _int_env, cluster_from_env, detect_accelerator
from llama3_hyperpod.config import ConfigError, Layout, RunConfig, check_run_name, load_config, tokenizer_path
from llama3_hyperpod.data.default import default_name
from llama3_hyperpod.graphkey import graph_fields_from_config
from llama3_hyperpod.launchspec import Launch, split_env
from llama3_hyperpod.memory import MemoryEstimate, estimate_memory, flops_per_token, layers_per_stage
from llama3_hyperpod.neuron import devices as neuron_devices
from llama3_hyperpod.neuron import launch as neuron_launch
from llama3_hyperpod.overrides import assignment
from llama3_hyperpod.torch_backend import layout as torch_layout

__all__ = ["Launch", "Plan", "PlanLayout", "build_plan", "checkpoint_policy", "default_data_root", "make_plan",
           "runtime_cache_dir"]

DEFAULT_NXDT_EXAMPLES = neuron_launch.DEFAULT_NXDT_EXAMPLES
TORCH_TRAIN_MODULE = "llama3_hyperpod.torch_backend.train"
NOFILE_LIMIT = 65535  # NxDT's launch scripts run `ulimit -n 65535`
MEMORY_WARN_FRACTION = 0.9


@dataclass(frozen=True)
class PlanLayout(Layout):
    """The config's Layout plus what each device holds (heads, KV heads, layers) and the accumulation steps."""

    heads_per_device: int
    kv_heads_per_device: int
    layers_per_stage: int
    grad_accum_steps: int

    @classmethod
    def of(cls, rc: RunConfig) -> PlanLayout:
        m, lay = rc.model, rc.layout
        return cls(
            **asdict(lay),
            heads_per_device=m.num_attention_heads // lay.tp,
            kv_heads_per_device=max(1, m.num_key_value_heads * lay.kv_replicator // lay.tp),
            layers_per_stage=layers_per_stage(rc),
            grad_accum_steps=rc.grad_accum_steps,
        )


@dataclass(frozen=True)
class Plan:
    config_path: str
    overrides: list[str]
    run_name: str
    run_dir: str
    backend: str
    device: str
    accelerator_detected: bool
    cluster: dict[str, Any]
    model: dict[str, Any]  # _model_summary: the architecture's numbers as shown (JSON key `model`)
    layout: PlanLayout
    memory: MemoryEstimate
    tokens_per_step: int
    flops_per_token: int
    flops_per_step: int
    peak_flops_per_device: float | None
    train_dir: str | None
    tokenizer: str | None
    uses_default_dataset: bool
    compile_cache_dir: str
    commands: dict[str, Launch]
    rlimits: dict[str, int]
    process_group_backend: str | None  # torch.distributed backend of the torch trainer: gloo on CPU, nccl on CUDA
    effective_neuron_cc_flags: str | None
    instance: str | None = None  # the Trainium instance the neuron plan is for (trn1.32xlarge, trn2.48xlarge)
    nxdt_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per mode: what NxDT's orchestrator will set
    checkpoints: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    graph: dict[str, Any] = field(default_factory=dict)  # graphkey.graph_fields_from_config: the compile cache's key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_plan(
    config_path: str | Path,
    overrides: Sequence[str],
    accelerator: Accelerator,
    env: Mapping[str, str] | None = None,
    *,
    run_name: str | None = None,
    output_dir: str | Path = "runs",
    nxdt_examples: str | None = None,
    python: str = sys.executable,
    require_data: bool = False,
) -> Plan:
    """Validate the config for this node and derive everything that will run. Raises ConfigError on bad input.

    Over 60 lines: half of it is the Plan's field list; each derivation is a named helper below.
    """
    env = dict(os.environ if env is None else env)
    cluster = cluster_from_env(env)
    rc = load_config(config_path, overrides, num_nodes=cluster.num_nodes if cluster.source == "slurm" else None)
    instance = _check_backend_rules(rc, accelerator)
    warnings: list[str] = list(rc.warnings)
    cluster = _this_node(cluster, rc, env, warnings)

    if run_name is not None:
        check_run_name(run_name, "--run-name")
    name = run_name or str(rc.cfg.name)
    explicit = rc.cfg.exp_manager.explicit_log_dir
    run_dir = str(Path(explicit) if explicit else (Path(output_dir) / name).resolve())
    train_dir, uses_default = _train_data(rc, accelerator, output_dir, require_data)
    cache_dir = runtime_cache_dir(str(rc.cfg.compiler_cache_url), env)
    mem = estimate_memory(rc, accelerator.backend, accelerator.device, _device_budget(rc, accelerator, instance))
    warnings += _soft_warnings(rc, accelerator, instance, mem, train_dir, uses_default)

    checkpoints = checkpoint_policy(rc, run_dir, accelerator.backend, warnings)
    cc_flags: str | None = None
    nxdt_env: dict[str, dict[str, str]] = {}
    if accelerator.backend == "neuron":
        assert instance is not None
        examples = nxdt_examples or env.get("NXDT_EXAMPLES_DIR") or DEFAULT_NXDT_EXAMPLES
        neuron = neuron_launch.build(rc, cluster, env, run_dir=run_dir, derived_log_dir=not explicit,
                                     cache_dir=cache_dir, examples=examples, warnings=warnings)
        commands, cc_flags, nxdt_env = neuron.commands, neuron.effective_neuron_cc_flags, neuron.nxdt_env
        checkpoints |= {"dir": neuron.checkpoint_dir, "resume": neuron.resume_text(),
                        "resume_from": str(neuron.resume.resume_from.path) if neuron.resume.resume_from else None,
                        "incomplete_newer": [str(c.path) for c in neuron.resume.incomplete_newer],
                        "imported": neuron.imported}
        peak: float | None = instance.bf16_flops_per_device
    else:
        launch_overrides = _torch_overrides(rc, cluster, run_dir if not explicit else None, train_dir, uses_default)
        commands = _torch_commands(rc, cluster, accelerator, env, launch_overrides, run_dir, python, cache_dir)
        peak = rc.cfg.torch_backend.peak_tflops * 1e12 if rc.cfg.torch_backend.peak_tflops else None

    fpt = flops_per_token(rc)
    return Plan(
        config_path=str(rc.path),
        overrides=list(rc.overrides),
        run_name=name,
        run_dir=run_dir,
        backend=accelerator.backend,
        device=accelerator.device,
        accelerator_detected=accelerator.detected,
        cluster=asdict(cluster),
        model=_model_summary(rc),
        layout=PlanLayout.of(rc),
        memory=mem,
        tokens_per_step=rc.tokens_per_step,
        flops_per_token=fpt,
        flops_per_step=fpt * rc.tokens_per_step,
        peak_flops_per_device=peak,
        train_dir=train_dir,
        tokenizer=tokenizer_path(rc.cfg),
        uses_default_dataset=uses_default,
        compile_cache_dir=cache_dir,
        commands=commands,
        rlimits={"nofile": NOFILE_LIMIT} if accelerator.backend == "neuron" else {},
        process_group_backend={"cpu": "gloo", "cuda": "nccl"}.get(accelerator.device),
        effective_neuron_cc_flags=cc_flags,
        instance=instance.name if instance else None,
        nxdt_env=nxdt_env,
        checkpoints=checkpoints,
        warnings=warnings,
        graph=graph_fields_from_config(rc, backend=accelerator.backend, device=accelerator.device,
                                       threads=_launch_threads(commands), cc_flags=cc_flags),
    )


def _this_node(cluster: Cluster, rc: RunConfig, env: Mapping[str, str], warnings: list[str]) -> Cluster:
    """Outside Slurm the config says how many nodes; NODE_RANK/MASTER_ADDR say which one this is."""
    if cluster.source == "slurm":
        return cluster
    node_rank = _int_env(env, "NODE_RANK", 0)
    if not 0 <= node_rank < rc.layout.num_nodes:
        raise ConfigError("NODE_RANK", f"{node_rank} is outside 0..{rc.layout.num_nodes - 1}")
    if rc.layout.num_nodes > 1 and "MASTER_ADDR" not in env:
        warnings.append(f"{rc.layout.num_nodes} nodes outside Slurm: set MASTER_ADDR and NODE_RANK on each node")
    return replace(cluster, num_nodes=rc.layout.num_nodes, node_rank=node_rank)


def _train_data(rc: RunConfig, accelerator: Accelerator, output_dir: str | Path,
                require_data: bool) -> tuple[str | None, bool]:
    """The dataset dir the run reads, and whether it is the embedded default (torch, no data.train_dir)."""
    train_dir = rc.cfg.data.train_dir
    uses_default = train_dir is None and accelerator.backend == "torch"
    if uses_default:
        train_dir = str((default_data_root(output_dir) / default_name(rc.seq_len, rc.model.vocab_size)).resolve())
    if require_data and train_dir is None:
        raise ConfigError("data.train_dir", "is not set: point it at a dataset made by `data prepare`")
    if require_data and not uses_default and train_dir and not train_dir.startswith("s3://") \
            and not Path(train_dir).exists():
        raise ConfigError("data.train_dir", f"{train_dir} does not exist")
    return train_dir, uses_default


def _soft_warnings(rc: RunConfig, accelerator: Accelerator, instance: neuron_devices.Instance | None,
                   mem: MemoryEstimate, train_dir: str | None, uses_default: bool) -> list[str]:
    """What may go wrong but does not stop the plan: tight memory, warmup past the end, devices or data not here."""
    warnings = []
    if mem.device_memory and mem.total > MEMORY_WARN_FRACTION * mem.device_memory:
        warnings.append(
            f"memory estimate {mem.total / 2**30:.1f} GiB is above {MEMORY_WARN_FRACTION:.0%} of the "
            f"{mem.device_memory / 2**30:.1f} GiB per device: little headroom for compiler/runtime buffers"
        )
    if rc.cfg.model.optim.sched.warmup_steps > rc.cfg.trainer.max_steps:
        warnings.append(f"the LR warmup ({rc.cfg.model.optim.sched.warmup_steps} steps) does not end before the "
                        "run does")
    if not accelerator.detected:
        warnings.append(f"planning for {instance.name if instance else accelerator.device} devices that this "
                        "machine does not have")
    if train_dir is None and rc.cfg.data.data_prefix is None:
        warnings.append("data.train_dir is not set: `train` will refuse to start")
    elif train_dir is not None and not uses_default and not train_dir.startswith("s3://") \
            and not Path(train_dir).exists():
        warnings.append(f"data.train_dir {train_dir} does not exist on this machine")
    return warnings


def _model_summary(rc: RunConfig) -> dict[str, Any]:
    """The architecture's numbers the plan shows (Plan.model: a summary, not the YAML section or the nn.Module)."""
    m = rc.model
    return {
        "parameters": m.parameter_count(),
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "seq_len": rc.seq_len,
        "source": str(rc.cfg.model_source),
    }


def make_plan(config: Path, overrides: Sequence[str], backend: str, run_name: str | None, output_dir: str,
              nxdt_examples: str | None, require_data: bool = False) -> Plan:
    """build_plan for a command line: the backend by name (auto: detected), a missing CONFIG one line."""
    if not config.is_file():
        raise ConfigError(str(config), "config file not found")
    return build_plan(config, overrides, detect_accelerator(backend), run_name=run_name, output_dir=output_dir,
                      nxdt_examples=nxdt_examples, require_data=require_data)


def runtime_cache_dir(configured: str, env: Mapping[str, str] | None = None) -> str:
    """The run-time cache dir: L3HP_CACHE_DIR when set (node-local disk), else the config's compiler_cache_url."""
    env = dict(os.environ if env is None else env)
    return env.get(ENV_RUNTIME_DIR) or configured


def _launch_threads(commands: Mapping[str, Launch]) -> int | None:
    """OMP threads per rank the train launch will have (ours or the user's): part of Inductor's CPU cache key."""
    launch = commands.get("train")
    if launch is None:
        return None
    value = launch.env.get("OMP_NUM_THREADS") or launch.env_kept.get("OMP_NUM_THREADS")
    return int(value) if value and value.isdigit() else None


def checkpoint_policy(rc: RunConfig, run_dir: str, backend: str, warnings: list[str]) -> dict[str, Any]:
    """Where checkpoints go and what survives a requeue, the same promise on both backends (the policy itself is
    checkpoint_policy.py's; this adds the dir and what each backend does).

    Both resume from the newest complete checkpoint of the run (the run dir is stable per run name; on Neuron
    `train` pins it, see neuron/checkpoints.py). Only the torch trainer saves on SIGTERM/SIGUSR1; NxDT keeps its
    periodic cadence, so there a time limit loses the steps since the last periodic save.
    """
    decided = CheckpointPolicy.from_config(rc)
    warnings.extend(decided.requeue_warnings())
    policy: dict[str, Any] = {
        "enabled": decided.enabled,
        "dir": str(Path(run_dir) / "checkpoints"),
        "every_n_train_steps": decided.every_n_train_steps,
        "keep": decided.keep,
        "resume_if_exists": decided.resumes,
        "async": decided.async_save,
        "save_on_signal": backend == "torch",
        "max_steps": decided.max_steps,  # with every_n_train_steps and keep: how many are on disk
    }
    if backend == "torch":  # what a checkpoint must share with this run to be resumed (checkpoint_files.py)
        from llama3_hyperpod.torch_backend.checkpoint_files import run_identity

        policy["identity"] = run_identity(rc.model.hf_config)
    return policy


def default_data_root(output_dir: str | Path) -> Path:
    """Where the embedded default dataset is built: beside the runs, on the same (mounted, writable) storage."""
    return Path(output_dir).resolve() / "_data"


def _check_backend_rules(rc: RunConfig, acc: Accelerator) -> neuron_devices.Instance | None:
    """The rules that depend on the backend; for neuron, the Trainium instance the config is for."""
    lay = rc.layout
    if acc.backend == "torch":
        torch_layout.check_layout(lay, rc.model.num_key_value_heads)
        if acc.count is not None and acc.detected and lay.devices_per_node > acc.count and acc.device != "cpu":
            raise ConfigError("trainer.devices",
                              f"is {lay.devices_per_node}, but this node has {acc.count} {acc.device} devices")
        return None
    instance = neuron_devices.instance_for(lay.devices_per_node, rc.cfg.trainer.lnc)
    if acc.detected and acc.count is not None and lay.devices_per_node * instance.lnc > acc.count:
        raise ConfigError("trainer.devices", f"is {lay.devices_per_node} (x lnc {instance.lnc}), but this node has "
                          f"{acc.count} NeuronCores")
    m = rc.model
    if m.head_dim * m.num_attention_heads != m.hidden_size:  # hf/llama_config.py LlamaArgs.head_dim: NxDT's lines
        raise ConfigError("model.model_config", f"head_dim {m.head_dim} is not hidden_size {m.hidden_size} / "
                          f"{m.num_attention_heads} heads: NxDT ignores head_dim and would build another model")
    for key in schema.ORCHESTRATOR_REQUIRED:
        if key not in rc.present:
            raise ConfigError(key, "is missing: NxDT's training_orchestrator.py reads it in process_config "
                              "(lines 35-45) and fails without it; add it to the YAML")
    return instance


def _device_budget(rc: RunConfig, acc: Accelerator, instance: neuron_devices.Instance | None) -> int | None:
    """Memory one rank may use: a NeuronCore's or GPU's own; on CPU the node's RAM shared by its ranks."""
    if instance is not None:
        return instance.memory_per_device
    if acc.memory_per_device is None:
        return None
    if acc.device == "cpu":
        return acc.memory_per_device // rc.layout.devices_per_node
    return acc.memory_per_device


def _torch_overrides(rc: RunConfig, cluster: Cluster, derived_log_dir: str | None, train_dir: str | None,
                     uses_default: bool) -> list[str]:
    """Overrides for our trainer, in Hydra's grammar (it composes the YAML again with them): the user's, with paths
    made absolute, then what the plan derived."""
    out = [*rc.nxdt_overrides, *rc.yaml_path_fixes]
    if uses_default and train_dir is not None:
        out.append(assignment("data.train_dir", train_dir, rc.present))
    out.append(assignment("trainer.devices", rc.layout.devices_per_node, rc.present))
    out.append(assignment("trainer.num_nodes", cluster.num_nodes, rc.present))
    if derived_log_dir:
        out.append(assignment("exp_manager.explicit_log_dir", derived_log_dir, rc.present))
    return out


def _torch_commands(
    rc: RunConfig,
    cluster: Cluster,
    acc: Accelerator,
    env: Mapping[str, str],
    overrides: list[str],
    run_dir: str,
    python: str,
    cache_dir: str,
) -> dict[str, Launch]:
    cpus = os.cpu_count() or 1
    wanted = {"OMP_NUM_THREADS": str(max(1, cpus // rc.layout.devices_per_node))}
    if not cache_dir.startswith("s3://"):
        wanted["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")
    if acc.device == "cpu":
        # Inductor keeps its precompiled header in /tmp/torchinductor_<user>, outside TORCHINDUCTOR_CACHE_DIR, and
        # rebuilds it in every fresh container even when every kernel hits the cache (bench/warm_start.py measured
        # seconds of g++ per start): off, so a baked cache makes a start compile nothing. Part of the cache key:
        # compile and train get the same value.
        wanted["TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"] = "0"
        if not cache_dir.startswith("s3://"):
            # The MFU denominator (this CPU's fp32 GEMM rate), measured once per machine type instead of at every
            # start (torch_backend/metrics.py cached_cpu_gemm_flops).
            wanted["L3HP_GEMM_PEAK_FILE"] = str(Path(cache_dir) / "gemm-peak.json")
    added, kept, _ = split_env(wanted, env)
    rendezvous = [
        "--nproc_per_node", str(rc.layout.devices_per_node), "--nnodes", str(cluster.num_nodes),
        "--node_rank", str(cluster.node_rank), "--master_addr", cluster.master_addr,
        "--master_port", str(cluster.master_port),
    ]

    # One process on one node needs no agent: the trainer runs as the launcher's child (one interpreter and one
    # torch import fewer, ~2 s of every start; bench/warm_start.py). It needs nothing torchrun would give it (no
    # rendezvous; RANK, LOCAL_RANK, GROUP_RANK default to 0), and the launcher forwards signals to it directly.
    # Otherwise, in an image, the SDK environment's torchrun is the agent (the same split as NxDT's launch) and
    # starts the project's interpreter as its workers; elsewhere one interpreter is both.
    direct = rc.layout.devices_per_node == 1 and cluster.num_nodes == 1
    sdk_python = env.get(neuron_launch.SDK_PYTHON_ENV)
    if direct:
        agent = [python]
    elif sdk_python:
        agent = [sdk_python, "-m", "torch.distributed.run", *rendezvous, "--no-python", python]
    else:
        agent = [python, "-m", "torch.distributed.run", *rendezvous]

    def argv(mode: str) -> list[str]:
        return [
            *agent, "-m", TORCH_TRAIN_MODULE,
            "--config", str(rc.path), "--run-dir", run_dir, "--mode", mode, "--device", acc.device,
            *overrides,
        ]

    cwd = str(Path.cwd())
    return {mode: Launch(argv(mode), added, kept, cwd, direct=direct) for mode in ("compile", "train")}
