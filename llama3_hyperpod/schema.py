"""The typed view of the NxDT keys this project interprets, as OmegaConf structured configs.

Only keys the plan or the torch backend read are here; NxDT's other keys (llama3_hyperpod/nxdt_keys.py) are checked
by name and passed to NxDT unchanged. A missing key takes the default NxDT itself would use where that matters to
what we derive: exp_manager and its checkpoint_callback_params follow NeMo 2.1.0's ExpManagerConfig / CallbackParams
with NxDT's overrides (neuronx-distributed-training utils/exp_manager.py:40-61), so a config without
`resume_if_exists` does not resume, here as there. Names follow NxDT, misspelled `aync_exec_max_inflight_requests`
included. The section `torch_backend` is ours; NxDT never reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerSection:
    devices: int = 32
    num_nodes: int = 1
    max_epochs: Any = -1
    max_steps: int = 10000
    log_every_n_steps: int = 10
    val_check_interval: Any = 10000
    check_val_every_n_epoch: int | None = None
    num_sanity_val_steps: int = 0
    limit_val_batches: float = 0.0
    limit_test_batches: float = 0.0
    gradient_clip_val: float | None = 1.0
    lnc: int | None = None  # logical NeuronCore size: 2 (the trn2 default) makes a trn2.48xlarge 64 devices
    sequential_move_factor: int | None = None


@dataclass
class CheckpointCallbackSection:
    monitor: str | None = "val_loss"
    save_top_k: int = 3
    mode: str | None = "min"
    save_last: bool = True
    filename: str | None = None
    dirpath: str | None = None  # NxDT saves (and resumes from) here instead of <log dir>/checkpoints when set
    every_n_train_steps: int | None = None  # None: no step-based saves
    model_parallel_size: Any = None  # ${multiply:tp, pp} in NxDT's configs
    use_master_weights_in_ckpt: bool = False


@dataclass
class ExpManagerSection:
    log_local_rank_0_only: bool = False
    create_tensorboard_logger: bool = True
    explicit_log_dir: str | None = None
    exp_dir: str | None = None
    name: str | None = None
    resume_if_exists: bool = False
    resume_ignore_no_checkpoint: bool = False
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
    ckpt_ptl_version: str | None = None


@dataclass
class DistributedStrategySection:
    tensor_model_parallel_size: int = 8
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = 1
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
    tokenizer: Any = None  # a path (ours, HF pretraining) or NxDT's mapping with `type: <path or name>` (SFT, megatron)
    seq_length: int | None = None
    data_prefix: Any = None  # megatron source: [weight, path, ...] or a mapping


@dataclass
class FusionsSection:
    softmax: bool | None = True
    flash_attention: bool = True
    ring_attention: bool = False


@dataclass
class SchedSection:
    name: str = "LinearAnnealingWithWarmUp"
    warmup_steps: int = 100
    max_steps: int | None = None  # NxDT replaces it with trainer.max_steps (lightning_modules/model/base.py:311)
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
    model_config: str | None = None  # an HF config.json: required when model_source is hf
    encoder_seq_length: int = 8192
    max_position_embeddings: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    rope_theta: float | None = None
    qkv_linear: bool = False  # NxDT's default (lightning_modules/model/hf_models/llama_model.py:31)
    fuse_qkv: bool = True
    use_cpu_initialization: bool = True
    activations_checkpoint_granularity: str | None = "selective"
    activations_checkpoint_recompute: list[str] | None = field(default_factory=lambda: ["CoreAttention"])
    fusions: FusionsSection = field(default_factory=FusionsSection)
    do_layer_norm_weight_decay: bool = True
    weight_init_only: bool = False
    optim: OptimSection = field(default_factory=OptimSection)
    # The architecture inline, for model_source megatron (no config.json)
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    layernorm_epsilon: float | None = None
    share_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128  # Megatron's default padding unit (times TP)
    position_freq_base: float | None = None


@dataclass
class PrecisionSection:
    type: str | None = "mixed_precision"
    master_weights: bool = False
    fp32_grad_acc: bool = False
    xla_use_bf16: Any = "0"  # `manual` writes these three into os.environ as they are: they must be strings
    xla_downcast_bf16: Any = "0"
    neuron_rt_stochastic_rounding_en: Any = "0"
    parallel_layers_reduce_dtype: str | None = None


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
    model_alignment_strategy: Any = None  # sft / dpo / orpo / peft settings, passed to NxDT as they are
    torch_backend: TorchBackendSection = field(default_factory=TorchBackendSection)


MODEL_SOURCES = ("hf", "megatron")
PRECISION_TYPES = ("mixed_precision", "mixed_precision_SR", "bf16SR", "fp32", "autocast", "manual")
RECOMPUTE_GRANULARITIES = ("selective", "full")
OPTIMIZERS = ("adamw", "adamw_fp32OptState")
SCHEDULERS = ("LinearAnnealingWithWarmUp", "CosineAnnealing")
# Keys NxDT's orchestrator reads as attributes in process_config (examples/training_orchestrator.py:35-45), so a
# config without them fails there before training starts.
ORCHESTRATOR_REQUIRED = ("neuron_experimental_compress_rg", "aync_exec_max_inflight_requests",
                         "bucket_size_collectives", "compiler_cache_url", "compiler_flags", "neuron_rt_exec_timeout",
                         "precision.type", "model.fusions")
