"""Per-device memory estimate and FLOPs per token, from the model shape and the parallel layout.

The formula (README "Memory estimate" explains it with the 8B numbers):
  params/device  = (2 V h [embedding + untied output, vocab-parallel] + L/pp (2 h^2 + 2 h d kvr + 3 h f)) / tp
                   + norms (replicated)           with d = head_dim, kvr = KV heads x kv_replicator
  weights        = params/device x bytes(weight)
  gradients      = params/device x bytes(grad)
  optimizer      = params/device x bytes(optimizer) / (dp if ZeRO-1 else 1)
  activations    = L/pp layers x stored tensors per layer (see `_layer_activation_elements`) x bytes(activation)
                   + fp32 logits for the loss, T V / tp
Bytes per parameter come from the precision mode: Neuron mixed precision keeps bf16 weights, fp32 gradient
accumulation and fp32 Adam states with fp32 master weights (2 + 4 + 12); fp32 everywhere is 4 + 4 + 8.
The activation count follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"), redone for Llama's blocks (RMSNorm, GQA, SwiGLU, no dropout). It leaves out compiler/runtime scratch
space, so a plan above 90% of device memory gets a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3_hyperpod.config import RunConfig

GIB = 2**30
NEURON_PEAK_BF16_FLOPS = 95e12  # per NeuronCore (shared/reference/neuron-nxdt.md)


@dataclass(frozen=True)
class BytesPerParam:
    weight: int
    grad: int
    optimizer: int  # master weights (if any) + both Adam moments
    activation: int


@dataclass(frozen=True)
class MemoryEstimate:
    params_per_device: int
    weights: int
    gradients: int
    optimizer: int
    optimizer_without_zero1: int
    activations: int
    logits: int
    total: int
    total_without_zero1: int
    device_memory: int | None
    fits: bool | None
    precision: str
    recompute: str


def bytes_per_param(backend: str, device: str, precision: str) -> BytesPerParam:
    if backend == "neuron" and precision != "fp32":
        return BytesPerParam(weight=2, grad=4, optimizer=12, activation=2)
    if device == "cuda":  # fp32 parameters and states, bf16 autocast activations
        return BytesPerParam(weight=4, grad=4, optimizer=8, activation=2)
    return BytesPerParam(weight=4, grad=4, optimizer=8, activation=4)


def layers_per_stage(rc: RunConfig) -> int:
    """Layers on the most loaded pipeline stage: NxD gives a remainder to the last stages (pipeline/partition.py)."""
    return -(-rc.model.num_layers // rc.layout.pp)


def params_per_device(rc: RunConfig) -> int:
    m, lay = rc.model, rc.layout
    h, f, d = m.hidden_size, m.intermediate_size, m.head_dim
    kv_heads_held = max(m.num_key_value_heads * lay.kv_replicator, lay.tp)  # replicated up to at least one per rank
    per_layer = (2 * h * h + 2 * h * d * kv_heads_held + 3 * h * f) // lay.tp + 2 * h
    vocab = m.vocab_size * h * (1 if m.tie_word_embeddings else 2) // lay.tp
    return vocab + layers_per_stage(rc) * per_layer + h


def _layer_activation_elements(rc: RunConfig) -> int:
    """Elements one transformer layer keeps for backward on one device, for one micro batch."""
    m, lay = rc.model, rc.layout
    tokens = rc.seq_len * rc.micro_batch_size // lay.cp
    h, f, d = m.hidden_size, m.intermediate_size, m.head_dim
    sp = lay.tp if lay.sequence_parallel else 1
    granularity = rc.cfg.model.activations_checkpoint_granularity
    if granularity == "full":
        return tokens * h // sp  # only the layer input; one layer is recomputed at a time (added by the caller)
    kv_heads_held = max(m.num_key_value_heads * lay.kv_replicator, lay.tp)
    norms_and_residuals = 4 * h // sp  # input and output of both RMSNorms
    attention = (2 * h + 2 * d * kv_heads_held) // lay.tp  # Q, K, V and the attention output
    mlp = 3 * f // lay.tp  # gate, up, and SiLU(gate) * up
    elements = tokens * (norms_and_residuals + attention + mlp)
    flash = bool(rc.cfg.model.fusions.flash_attention)
    if granularity is None and not flash:  # softmax probabilities are kept: the s^2 term
        elements += rc.micro_batch_size * (m.num_attention_heads // lay.tp) * (rc.seq_len // lay.cp) ** 2
    return elements


def estimate_memory(rc: RunConfig, backend: str, device: str, device_memory: int | None) -> MemoryEstimate:
    precision = str(rc.cfg.precision.type)
    b = bytes_per_param(backend, device, precision)
    n = params_per_device(rc)
    layers = layers_per_stage(rc)
    per_layer = _layer_activation_elements(rc)
    granularity = rc.cfg.model.activations_checkpoint_granularity
    if granularity == "full":  # checkpoints of every layer + one layer's full working set during its recompute
        full_layer = _layer_activation_elements_without_recompute(rc)
        activation_elements = layers * per_layer + full_layer
    else:
        activation_elements = layers * per_layer
    tokens = rc.seq_len * rc.micro_batch_size // rc.layout.cp
    logits = tokens * rc.model.vocab_size // rc.layout.tp * 4
    weights, grads = n * b.weight, n * b.grad
    opt_full = n * b.optimizer
    opt = opt_full // rc.layout.dp if rc.layout.zero1 else opt_full
    activations = activation_elements * b.activation
    total = weights + grads + opt + activations + logits
    total_no_zero = weights + grads + opt_full + activations + logits
    return MemoryEstimate(
        params_per_device=n,
        weights=weights,
        gradients=grads,
        optimizer=opt,
        optimizer_without_zero1=opt_full,
        activations=activations,
        logits=logits,
        total=total,
        total_without_zero1=total_no_zero,
        device_memory=device_memory,
        fits=None if device_memory is None else total <= device_memory,
        precision=precision,
        recompute=str(granularity),
    )


def _layer_activation_elements_without_recompute(rc: RunConfig) -> int:
    from dataclasses import replace

    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(rc.cfg, {"model": {"activations_checkpoint_granularity": "selective"}})
    return _layer_activation_elements(replace(rc, cfg=cfg))  # type: ignore[arg-type]


def flops_per_token(rc: RunConfig) -> int:
    """Training FLOPs per token, PaLM convention: 6 x matmul parameters + 12 x layers x hidden x seq (attention)."""
    m = rc.model
    matmul_params = m.parameter_count() - m.vocab_size * m.hidden_size * (0 if m.tie_word_embeddings else 1)
    matmul_params -= (2 * m.num_layers + 1) * m.hidden_size  # RMSNorm weights do no matmul
    return 6 * matmul_params + 12 * m.num_layers * m.hidden_size * rc.seq_len
