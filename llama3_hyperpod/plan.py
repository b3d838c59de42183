"""The plan: a pure function from (config, environment, accelerator) to plain data.

`entrypoint.py plan` prints it; `compile` and `train` execute its commands. Because it is data, the Neuron launch is
tested without Trainium: tests compare the commands and env with shared/reference/neuron-nxdt.md.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llama3_hyperpod.cache.seed import runtime_cache_dir
from llama3_hyperpod.cluster import Accelerator, Cluster, _int_env, cluster_from_env
from llama3_hyperpod.config import PATH_KEYS, ConfigError, RunConfig, check_run_name, load_config
from llama3_hyperpod.data.default import default_name
from llama3_hyperpod.memory import NEURON_PEAK_BF16_FLOPS, MemoryEstimate, estimate_memory, flops_per_token

DEFAULT_NXDT_EXAMPLES = "/opt/neuronx-distributed-training/examples"
TORCH_TRAIN_MODULE = "llama3_hyperpod.torch_backend.train"
NOFILE_LIMIT = 65535  # NxDT's launch scripts run `ulimit -n 65535`
MEMORY_WARN_FRACTION = 0.9


@dataclass(frozen=True)
class Launch:
    """One process to start on this node: argv, the env we add (only names the user left unset), and what we kept."""

    argv: list[str]
    env: dict[str, str]
    env_kept: dict[str, str]  # names we would set but the user already had: their values stay
    cwd: str

    def shell(self) -> str:
        """The launch as one shell line (for dry runs and docs)."""
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{assignments} {shlex.join(self.argv)}".strip()


@dataclass(frozen=True)
class LayoutReport:
    tp: int
    pp: int
    cp: int
    dp: int
    zero1: bool
    sequence_parallel: bool
    kv_replicator: int
    world_size: int
    num_nodes: int
    ranks_per_node: int
    heads_per_device: int
    kv_heads_per_device: int
    layers_per_stage: int
    grad_accum_steps: int


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
    model: dict[str, Any]
    layout: LayoutReport
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
    checkpoints: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

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
    """Validate the config for this node and derive everything that will run. Raises ConfigError on bad input."""
    env = dict(os.environ if env is None else env)
    cluster = cluster_from_env(env)
    rc = load_config(config_path, overrides, num_nodes=cluster.num_nodes if cluster.source == "slurm" else None)
    _check_backend_rules(rc, accelerator)
    warnings: list[str] = []
    if cluster.source != "slurm":  # outside Slurm the config says how many nodes; NODE_RANK/MASTER_ADDR say which
        node_rank = _int_env(env, "NODE_RANK", 0)
        if not 0 <= node_rank < rc.layout.num_nodes:
            raise ConfigError("NODE_RANK", f"{node_rank} is outside 0..{rc.layout.num_nodes - 1}")
        cluster = replace(cluster, num_nodes=rc.layout.num_nodes, node_rank=node_rank)
        if rc.layout.num_nodes > 1 and "MASTER_ADDR" not in env:
            warnings.append(f"{rc.layout.num_nodes} nodes outside Slurm: set MASTER_ADDR and NODE_RANK on each node")

    if run_name is not None:
        check_run_name(run_name, "--run-name")
    name = run_name or str(rc.cfg.name)
    explicit = rc.cfg.exp_manager.explicit_log_dir
    run_dir = str(Path(explicit) if explicit else (Path(output_dir) / name).resolve())
    train_dir = rc.cfg.data.train_dir
    uses_default = train_dir is None and accelerator.backend == "torch"
    if uses_default:
        train_dir = str((default_data_root(output_dir) / default_name(rc.seq_len, rc.model.vocab_size)).resolve())
    if require_data and train_dir is None:
        raise ConfigError("data.train_dir", "is not set: point it at a dataset made by `data prepare`")
    if require_data and not uses_default and train_dir and not train_dir.startswith("s3://") \
            and not Path(train_dir).is_dir():
        raise ConfigError("data.train_dir", f"{train_dir} is not a directory")

    cache_dir = runtime_cache_dir(str(rc.cfg.compiler_cache_url), env)
    mem = estimate_memory(rc, accelerator.backend, accelerator.device, _device_budget(rc, accelerator))
    if mem.device_memory and mem.total > MEMORY_WARN_FRACTION * mem.device_memory:
        warnings.append(
            f"memory estimate {mem.total / 2**30:.1f} GiB is above {MEMORY_WARN_FRACTION:.0%} of the "
            f"{mem.device_memory / 2**30:.1f} GiB per device: little headroom for compiler/runtime buffers"
        )
    sched = rc.cfg.model.optim.sched
    if sched.warmup_steps > min(sched.max_steps, rc.cfg.trainer.max_steps):
        warnings.append(f"the LR warmup ({sched.warmup_steps} steps) does not end before the run does")
    if not accelerator.detected:
        warnings.append(f"planning for {accelerator.device} devices that this machine does not have")
    if train_dir is None:
        warnings.append("data.train_dir is not set: `train` will refuse to start")
    elif not uses_default and not train_dir.startswith("s3://") and not Path(train_dir).is_dir():
        warnings.append(f"data.train_dir {train_dir} does not exist on this machine")

    checkpoints = checkpoint_policy(rc, run_dir, accelerator.backend, warnings)
    overrides_out = _launch_overrides(rc, cluster, run_dir if not explicit else None, train_dir)
    if accelerator.backend == "neuron":
        commands, cc_flags = _neuron_commands(rc, cluster, env, overrides_out, nxdt_examples, cache_dir, warnings)
        peak: float | None = NEURON_PEAK_BF16_FLOPS
    else:
        commands = _torch_commands(rc, cluster, accelerator, env, overrides_out, run_dir, python, cache_dir)
        cc_flags = None
        peak = rc.cfg.torch_backend.peak_tflops * 1e12 if rc.cfg.torch_backend.peak_tflops else None

    m, lay = rc.model, rc.layout
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
        model={
            "parameters": m.parameter_count(),
            "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size,
            "num_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads,
            "head_dim": m.head_dim,
            "vocab_size": m.vocab_size,
            "seq_len": rc.seq_len,
        },
        layout=LayoutReport(
            tp=lay.tp,
            pp=lay.pp,
            cp=lay.cp,
            dp=lay.dp,
            zero1=lay.zero1,
            sequence_parallel=lay.sequence_parallel,
            kv_replicator=lay.kv_replicator,
            world_size=lay.world_size,
            num_nodes=lay.num_nodes,
            ranks_per_node=lay.devices_per_node,
            heads_per_device=m.num_attention_heads // lay.tp,
            kv_heads_per_device=max(1, m.num_key_value_heads * lay.kv_replicator // lay.tp),
            layers_per_stage=m.num_layers // lay.pp,
            grad_accum_steps=rc.grad_accum_steps,
        ),
        memory=mem,
        tokens_per_step=rc.tokens_per_step,
        flops_per_token=fpt,
        flops_per_step=fpt * rc.tokens_per_step,
        peak_flops_per_device=peak,
        train_dir=train_dir,
        tokenizer=rc.cfg.data.tokenizer,
        uses_default_dataset=uses_default,
        compile_cache_dir=cache_dir,
        commands=commands,
        rlimits={"nofile": NOFILE_LIMIT} if accelerator.backend == "neuron" else {},
        process_group_backend={"cpu": "gloo", "cuda": "nccl"}.get(accelerator.device),
        effective_neuron_cc_flags=cc_flags,
        checkpoints=checkpoints,
        warnings=warnings,
    )


def checkpoint_policy(rc: RunConfig, run_dir: str, backend: str, warnings: list[str]) -> dict[str, Any]:
    """Where checkpoints go and what survives a requeue, the same promise on both backends.

    Both resume from the newest complete checkpoint under <run dir>/checkpoints (the run dir is stable per run name).
    Only the torch trainer saves on SIGTERM/SIGUSR1; NxDT keeps its periodic cadence, so there a time limit loses
    the steps since the last periodic save.
    """
    em = rc.cfg.exp_manager
    params = em.checkpoint_callback_params
    enabled = bool(em.create_checkpoint_callback) and params.save_top_k != 0
    every = int(params.every_n_train_steps)  # >= 1 (config rule)
    resumes = bool(em.resume_if_exists or em.resume_from_checkpoint)
    if not enabled:
        warnings.append("checkpoints are off (exp_manager.create_checkpoint_callback false or save_top_k 0): "
                        "a requeued or resubmitted job starts over")
    elif not resumes:
        warnings.append("exp_manager.resume_if_exists is false: a requeued or resubmitted job starts over instead of "
                        "resuming from its checkpoints")
    elif every >= rc.cfg.trainer.max_steps:
        warnings.append("exp_manager.checkpoint_callback_params.every_n_train_steps saves nothing before the end: "
                        "a failure loses the whole run")
    policy: dict[str, Any] = {
        "enabled": enabled,
        "dir": str(Path(run_dir) / "checkpoints"),
        "every_n_train_steps": every,
        "keep": int(params.save_top_k),
        "resume_if_exists": resumes,
        "async": bool(em.async_checkpointing),
        "save_on_signal": backend == "torch",
    }
    if backend == "torch":  # what a checkpoint must share with this run to be resumed (checkpoint_files.py)
        from llama3_hyperpod.torch_backend.checkpoint_files import run_identity

        policy["identity"] = run_identity(rc.model.hf_config)
    return policy


def default_data_root(output_dir: str | Path) -> Path:
    """Where the embedded default dataset is built: beside the runs, on the same (mounted, writable) storage."""
    return Path(output_dir).resolve() / "_data"


def _check_backend_rules(rc: RunConfig, acc: Accelerator) -> None:
    lay = rc.layout
    if acc.backend == "torch" and lay.pp > 1:
        raise ConfigError("distributed_strategy.pipeline_model_parallel_size",
                          f"is {lay.pp}, but the torch backend has no pipeline parallelism: use 1")
    if acc.backend == "torch" and lay.cp > 1:
        raise ConfigError("distributed_strategy.context_parallel_size",
                          f"is {lay.cp}, but the torch backend has no context parallelism: use 1")
    if acc.count is not None and acc.detected and lay.devices_per_node > acc.count and acc.device != "cpu":
        raise ConfigError("trainer.devices",
                          f"is {lay.devices_per_node}, but this node has {acc.count} {acc.device} devices")
    if acc.backend == "neuron" and lay.devices_per_node > 32:
        raise ConfigError("trainer.devices", f"is {lay.devices_per_node}; a trn1.32xlarge has 32 NeuronCores")


def _device_budget(rc: RunConfig, acc: Accelerator) -> int | None:
    """Memory one rank may use: a NeuronCore's or GPU's own; on CPU the node's RAM shared by its ranks."""
    if acc.memory_per_device is None:
        return None
    if acc.device == "cpu":
        return acc.memory_per_device // rc.layout.devices_per_node
    return acc.memory_per_device


def _launch_overrides(rc: RunConfig, cluster: Cluster, derived_log_dir: str | None, train_dir: str | None) -> list[str]:
    """Hydra-style overrides passed to the trainer: the user's, then absolute paths and the node count."""
    out = [o for o in rc.overrides if o.split("=", 1)[0] not in PATH_KEYS]
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = rc.cfg[section][leaf]
        if key == "data.train_dir":
            value = train_dir
        if value is not None:
            out.append(f"{key}={value}")
    out.append(f"trainer.devices={rc.layout.devices_per_node}")
    out.append(f"trainer.num_nodes={cluster.num_nodes}")
    if derived_log_dir:
        out.append(f"exp_manager.explicit_log_dir={derived_log_dir}")
    return out


def _torchrun_args(rc: RunConfig, cluster: Cluster) -> list[str]:
    return [
        "--nproc_per_node", str(rc.layout.devices_per_node),
        "--nnodes", str(cluster.num_nodes),
        "--node_rank", str(cluster.node_rank),
        "--master_addr", cluster.master_addr,
        "--master_port", str(cluster.master_port),
    ]


def _set_if_unset(wanted: dict[str, str], env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    added = {k: v for k, v in wanted.items() if k not in env}
    kept = {k: env[k] for k in wanted if k in env}
    return added, kept


def neuron_env(rc: RunConfig, cache_dir: str) -> dict[str, str]:
    """The env NxDT's launch scripts and orchestrator establish (shared/reference/neuron-nxdt.md)."""
    cfg = rc.cfg
    wanted = {
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "FI_EFA_FORK_SAFE": "1",
        "XLA_DISABLE_FUNCTIONALIZATION": "0",
        "HYDRA_FULL_ERROR": "1",
        "MALLOC_ARENA_MAX": "64",
        "NEURON_COMPILE_CACHE_URL": cache_dir,
        "NEURON_FUSE_SOFTMAX": "1" if cfg.model.fusions.softmax else "0",
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": str(cfg.aync_exec_max_inflight_requests),
        "BUCKET_CAP_MB": str(cfg.bucket_size_collectives),
        "NEURON_RT_EXEC_TIMEOUT": str(cfg.neuron_rt_exec_timeout),
    }
    precision = cfg.precision
    by_type = {
        "mixed_precision": ("0", "1", "0"),
        "mixed_precision_SR": ("0", "1", "1"),
        "bf16SR": ("1", "0", "1"),
        "autocast": ("0", "0", "0"),
        "fp32": ("0", "0", "0"),
        "manual": (precision.xla_use_bf16, precision.xla_downcast_bf16, precision.neuron_rt_stochastic_rounding_en),
    }
    use_bf16, downcast, rounding = by_type[str(precision.type)]
    wanted |= {"XLA_USE_BF16": use_bf16, "XLA_DOWNCAST_BF16": downcast, "NEURON_RT_STOCHASTIC_ROUNDING_EN": rounding}
    return wanted


def _neuron_commands(
    rc: RunConfig,
    cluster: Cluster,
    env: Mapping[str, str],
    overrides: list[str],
    nxdt_examples: str | None,
    cache_dir: str,
    warnings: list[str],
) -> tuple[dict[str, Launch], str]:
    examples = nxdt_examples or env.get("NXDT_EXAMPLES_DIR") or DEFAULT_NXDT_EXAMPLES
    train_argv = [
        "torchrun", *_torchrun_args(rc, cluster),
        f"{examples}/training_orchestrator.py",
        f"--config-path={rc.path.parent}",
        f"--config-name={rc.path.stem}",
        *overrides,
    ]
    added, kept = _set_if_unset(neuron_env(rc, cache_dir), env)
    # The orchestrator appends compiler_flags (and the mixed-precision accumulation flag) to NEURON_CC_FLAGS itself;
    # we show the result rather than set it, so the flags are not doubled.
    cc_flags = " ".join(filter(None, [env.get("NEURON_CC_FLAGS", ""), str(rc.cfg.compiler_flags)]))
    if str(rc.cfg.precision.type).startswith("mixed_precision"):
        cc_flags += " --enable-mixed-precision-accumulation"
    if "--cache_dir" in env.get("NEURON_CC_FLAGS", ""):
        warnings.append("NEURON_CC_FLAGS sets --cache_dir, which wins over compiler_cache_url: "
                        "the baked compile cache will not be used unless they agree")
    if "NEURON_COMPILE_CACHE_URL" in kept and kept["NEURON_COMPILE_CACHE_URL"] != cache_dir:
        warnings.append(f"NEURON_COMPILE_CACHE_URL={kept['NEURON_COMPILE_CACHE_URL']} (yours) differs from the "
                        f"planned cache {cache_dir}: graphs will be cached in yours")
    cwd = examples
    return {
        "compile": Launch(["neuron_parallel_compile", *train_argv], added, kept, cwd),
        "train": Launch(train_argv, added, kept, cwd),
    }, cc_flags.strip()


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
    added, kept = _set_if_unset(wanted, env)

    def argv(mode: str) -> list[str]:
        return [
            python, "-m", "torch.distributed.run", *_torchrun_args(rc, cluster),
            "-m", TORCH_TRAIN_MODULE,
            "--config", str(rc.path), "--run-dir", run_dir, "--mode", mode, "--device", acc.device,
            *overrides,
        ]

    cwd = str(Path.cwd())
    return {"compile": Launch(argv("compile"), added, kept, cwd), "train": Launch(argv("train"), added, kept, cwd)}
