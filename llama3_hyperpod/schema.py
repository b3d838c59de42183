"""The NxDT YAML schema as OmegaConf structured configs.

Merging a user's YAML into these dataclasses rejects unknown keys and wrong types for us. Field names and defaults
follow NxDT's `examples/conf/hf_llama3_8B_config.yaml` (see shared/reference/neuron-nxdt.md), including its
misspelled `aync_exec_max_inflight_requests`. One section is ours: `torch_backend`, which NxDT ignores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerSection:
    devices: int = 32
    num_nodes: int = 1
    max_epochs: int = -1
    max_steps: int = 10000
    log_every_n_steps: int = 10
    val_check_interval: Any = 10000
    check_val_every_n_epoch: int | None = None
    num_sanity_val_steps: int = 0
    limit_val_batches: float = 0.0
    limit_test_batches: float = 0.0
    gradient_clip_val: float = 1.0


@dataclass
class CheckpointCallbackSection:
    monitor: str = "step"
    save_top_k: int = 1
    mode: str = "max"
    save_last: bool = False
    filename: str = "hf_llama3_8B--{step}-{consumed_samples}"
    every_n_train_steps: int = 10
    use_master_weights_in_ckpt: bool = False


@dataclass
class ExpManagerSection:
    log_local_rank_0_only: bool = True
    create_tensorboard_logger: bool = True
    explicit_log_dir: str | None = None
    exp_dir: str | None = None
    name: str = "hf_llama"
    resume_if_exists: bool = True
    resume_ignore_no_checkpoint: bool = True
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackSection = field(default_factory=CheckpointCallbackSection)
    log_parameter_norm: bool = True
    log_gradient_norm: bool = True
    enable_recovery_time_instrumentation: bool = False
    save_xser: bool = True
    load_xser: bool = True
    save_bf16: bool = False
    async_checkpointing: bool = False
    resume_from_checkpoint: str | None = None


@dataclass
class DistributedStrategySection:
    tensor_model_parallel_size: int = 8
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    zero1: bool = True
    sequence_parallel: bool = True
    kv_replicator: int = 1


@dataclass
class DataSection:
    micro_batch_size: int = 1
    global_batch_size: int = 1024
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    tokenizer: str | None = None


@dataclass
class FusionsSection:
    softmax: bool = True
    flash_attention: bool = True


@dataclass
class SchedSection:
    name: str = "LinearAnnealingWithWarmUp"
    warmup_steps: int = 100
    max_steps: int = 10000
    min_lr: float = 0.0
    constant_steps: int = 0


@dataclass
class OptimSection:
    name: str = "adamw_fp32OptState"
    lr: float = 1.5e-4
    weight_decay: float = 0.01
    capturable: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    sched: SchedSection = field(default_factory=SchedSection)


@dataclass
class ModelSection:
    model_config: str = "???"
    encoder_seq_length: int = 8192
    max_position_embeddings: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    rope_theta: float | None = None
    qkv_linear: bool = True
    fuse_qkv: bool = True
    persistent_workers: bool = True
    transformer_engine: bool = False
    use_cpu_initialization: bool = True
    activations_checkpoint_granularity: str | None = "selective"
    activations_checkpoint_recompute: list[str] = field(default_factory=lambda: ["CoreAttention"])
    fusions: FusionsSection = field(default_factory=FusionsSection)
    do_layer_norm_weight_decay: bool = True
    optim: OptimSection = field(default_factory=OptimSection)


@dataclass
class PrecisionSection:
    type: str = "mixed_precision"
    master_weights: bool = False
    fp32_grad_acc: bool = False
    xla_use_bf16: str = "0"
    xla_downcast_bf16: str = "0"
    neuron_rt_stochastic_rounding_en: str = "0"


@dataclass
class TorchBackendSection:
    """Settings of the PyTorch-native backend only; NxDT never reads this section."""

    compile: bool = True
    peak_tflops: float | None = None
    shuffle: bool = True  # each pass over the dataset in a random order drawn from `seed`; false: stored order


@dataclass
class NxdtConfig:
    name: str = "hf_llama"
    model_source: str = "hf"
    seed: int = 1234
    trainer: TrainerSection = field(default_factory=TrainerSection)
    exp_manager: ExpManagerSection = field(default_factory=ExpManagerSection)
    distributed_strategy: DistributedStrategySection = field(default_factory=DistributedStrategySection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    compiler_flags: str = "--model-type transformer"
    compiler_cache_url: str = "/var/tmp/neuron-compile-cache"
    aync_exec_max_inflight_requests: int = 5
    bucket_size_collectives: int = 1024
    neuron_rt_exec_timeout: int = 100
    neuron_experimental_compress_rg: bool = False
    torch_backend: TorchBackendSection = field(default_factory=TorchBackendSection)


PRECISION_TYPES = ("mixed_precision", "mixed_precision_SR", "bf16SR", "fp32", "autocast", "manual")
RECOMPUTE_GRANULARITIES = ("selective", "full")
OPTIMIZERS = ("adamw", "adamw_fp32OptState")
SCHEDULERS = ("LinearAnnealingWithWarmUp", "CosineAnnealing")
