"""The environment NxDT runs in: what its launch scripts export, and what its orchestrator then derives from the config.

Two sources, both at aws-neuron/neuronx-distributed-training 9169aa0:
- examples/train_setup.sh exports, for Slurm jobs (lines 8-13): FI_EFA_USE_DEVICE_RDMA=1, FI_PROVIDER=efa,
  FI_EFA_FORK_SAFE=1; for every run (lines 60-65): XLA_DISABLE_FUNCTIONALIZATION=0, HYDRA_FULL_ERROR=1,
  MASTER_PORT=41000, MALLOC_ARENA_MAX=128. We set these only where the user has not (their tuning wins); the
  EFA trio also for multi-node runs outside Slurm, which train_setup.sh's MPI branch (lines 44-46) covers.
- examples/training_orchestrator.py process_config (lines 25-137) then sets, in every rank's own process:
  set_env_variable (lines 11-18) sets a variable only when it is unset (`os.environ.get(name) is None`), and with
  append=True appends " value" when it is set and non-empty; set to the empty string, it is left empty.
  `orchestrator_env` replays that function by function, so the plan shows the environment NxDT will really have.
COMPILE (lines 53-58): "1" caps max_steps at 10 and turns TensorBoard and checkpoints off; "0" with TRAIN_ITERS
sets max_steps. The plan forces COMPILE=1 for compile and COMPILE=0 for train, whatever the caller exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

EFA_ENV = {"FI_EFA_USE_DEVICE_RDMA": "1", "FI_PROVIDER": "efa", "FI_EFA_FORK_SAFE": "1"}
COMMON_ENV = {"XLA_DISABLE_FUNCTIONALIZATION": "0", "HYDRA_FULL_ERROR": "1", "MALLOC_ARENA_MAX": "128"}
MIXED_FLAG = "--enable-mixed-precision-accumulation"
# precision.type -> (XLA_USE_BF16, XLA_DOWNCAST_BF16, NEURON_RT_STOCHASTIC_ROUNDING_EN or None, NEURON_CC_FLAGS +=)
# (training_orchestrator.py:104-131); `manual` takes the three values from the YAML and adds no flag.
PRECISION_TABLE: dict[str, tuple[str, str, str | None, str | None]] = {
    "bf16SR": ("1", "0", "1", MIXED_FLAG),
    "mixed_precision": ("0", "1", "0", MIXED_FLAG),
    "mixed_precision_SR": ("0", "1", "1", MIXED_FLAG),
    "fp32": ("0", "0", None, "--auto-cast none"),
    "autocast": ("0", "0", "0", f"{MIXED_FLAG} --auto-cast none"),
}


def launch_env(*, under_slurm: bool, num_nodes: int, job_id: str | None) -> dict[str, str]:
    """What train_setup.sh would export for this job (set-if-unset by the caller). Its EXPLICIT_LOGDIR=null is
    train.sh's own variable, passed as exp_manager.explicit_log_dir: we pass the run dir there instead."""
    wanted = dict(COMMON_ENV)
    if under_slurm or num_nodes > 1:
        wanted |= EFA_ENV
    if under_slurm and job_id:
        wanted["NEMO_EXPM_VERSION"] = job_id  # NeMo's log-dir version when no explicit_log_dir is given (line 25)
    return wanted


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def orchestrator_env(cfg: DictConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The variables process_config sets or changes, given the environment the orchestrator starts with.

    `cfg` is the config as NxDT composes it (the raw view, after our overrides); values are str()-ed as NxDT does.
    """
    out: dict[str, str] = dict(env)

    def set_env_variable(name: str, value: Any, append: bool = False) -> None:  # training_orchestrator.py:11-18
        if append and out.get(name):
            out[name] = f"{out[name]} {value}"
            return
        if out.get(name) is None:
            out[name] = value

    if (_select(cfg, "model.fusions") or {}).get("softmax"):
        set_env_variable("NEURON_FUSE_SOFTMAX", "1")
    set_env_variable("NEURON_EXPERIMENTAL_COMPRESS_RG", "1" if cfg.neuron_experimental_compress_rg is True else "0")
    set_env_variable("NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS", str(cfg.aync_exec_max_inflight_requests))
    set_env_variable("BUCKET_CAP_MB", str(cfg.bucket_size_collectives))
    set_env_variable("NEURON_COMPILE_CACHE_URL", cfg.compiler_cache_url)
    set_env_variable("NEURON_CC_FLAGS", cfg.compiler_flags, append=True)
    set_env_variable("NEURON_RT_EXEC_TIMEOUT", str(cfg.neuron_rt_exec_timeout))
    kind = _select(cfg, "precision.type")
    if kind == "manual":
        for name, key in (("XLA_USE_BF16", "xla_use_bf16"), ("XLA_DOWNCAST_BF16", "xla_downcast_bf16"),
                          ("NEURON_RT_STOCHASTIC_ROUNDING_EN", "neuron_rt_stochastic_rounding_en")):
            set_env_variable(name, _select(cfg, f"precision.{key}"))
    elif kind in PRECISION_TABLE:
        use_bf16, downcast, rounding, flags = PRECISION_TABLE[kind]
        set_env_variable("XLA_USE_BF16", use_bf16)
        set_env_variable("XLA_DOWNCAST_BF16", downcast)
        if rounding is not None:
            set_env_variable("NEURON_RT_STOCHASTIC_ROUNDING_EN", rounding)
        if flags is not None:
            set_env_variable("NEURON_CC_FLAGS", flags, append=True)
    return {k: str(v) for k, v in out.items() if env.get(k) != v}
