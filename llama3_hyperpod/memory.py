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

The torch backends (`_torch_estimate`) are this project's own code, so their estimate is what that code keeps alive
at its peak, tensor by tensor, with each tensor's dtype, plus the process itself (imports, allocator): the trainer
measures the true peak (ru_maxrss on CPU, the allocator's peak on CUDA) and warns when they differ by more than 20%.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3_hyperpod.checkpoint_policy import CheckpointPolicy
from llama3_hyperpod.config import RunConfig
from llama3_hyperpod.torch_backend.loss_chunks import ce_chunk_rows

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
    # torch backends: what the process holds besides the tensors (imports, allocator), the working set of the
    # backward pass at its peak, and which moment of the step the total is the peak of. `total` is the peak, not
    # the sum of the parts there (gradients and activations are not all alive at once).
    baseline: int = 0
    transient: int = 0
    allocator: int = 0
    peak_phase: str = ""
    staging: int = 0  # async checkpointing: the host copy of this rank's state it keeps for the next save
    # torch backends: the peak of a fresh run that stops after its first step, lower than `total`: AdamW creates
    # its moments in that step's optimizer step (after the backward) and the heap has no slack from a previous step.
    first_step: int = 0


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
    if backend == "torch":
        return _torch_estimate(rc, device, device_memory)
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


# What a torch-backend trainer process holds before its first tensor: the interpreter, torch, datasets/pyarrow,
# TensorBoard's writer, our modules, the allocator's arenas. Measured as RSS after those imports with torch 2.13 CPU on
# Linux (0.36 GiB) plus the trainer's own start (dataset opened, GEMM peak measured, process group: 0.1 GiB). On
# CUDA the allocator's peak does not see it (nor the CUDA context), so there it is 0 and the check compares tensors.
TORCH_CPU_BASELINE = int(0.46 * GIB)
# glibc's heap keeps what a step freed (its saved activations, the backward's temporaries) for the next, and the
# next step's tensors do not fit back into its holes exactly: the resident peak is above the live peak by about a
# quarter of what a step allocates and frees (measured with the ~58M bench shape: live peak 1.70 + 0.04 GiB,
# ru_maxrss 2.04 GiB with 1 thread, 2.17 GiB with 2; RSS after the optimizer step stayed 0.8 GiB above what was
# alive). The CUDA caching allocator's peak counts live tensors only.
CPU_HEAP_OVERHEAD = 0.25


def _torch_layer_saved(rc: RunConfig, device: str, *, recompute: str | None) -> int:
    """Bytes one transformer block of torch_backend/model.py keeps for backward, per micro batch, with dtypes.

    Per token, with h hidden, f MLP width, q/kv heads of head_dim d held on this rank (split by TP), s = TP when
    sequence parallel else 1: the block's input x (h/s, saved by its RMSNorm) and the residual after attention x2
    (h/s); the normalised inputs of the QKV GEMM and of gate/up (h each: DTensor all-gathers them under sequence
    parallel and the GEMM keeps the gathered copy); RoPE'd q and k and v ((2 q + 2 kv) d, the attention's inputs);
    the attention output (q d, the o projection's input) and its log-sum-exp (q floats); gate, SiLU(gate), up and
    their product (4 f: the autograd of silu and mul keeps three, the down GEMM the fourth). fp32 on CPU. On CUDA
    (bf16 autocast) the residuals and the QKV input stay fp32 (our fused QKV node saves its input as it came), the
    GEMM outputs are bf16, and gate and up each save their own bf16 cast of the normalised input.
    """
    m, lay = rc.model, rc.layout
    tokens = rc.seq_len * rc.micro_batch_size
    h, f, d, tp = m.hidden_size, m.intermediate_size, m.head_dim, lay.tp
    sp = tp if lay.sequence_parallel else 1
    q = m.num_attention_heads // tp
    kv = max(m.num_key_value_heads * lay.kv_replicator, tp) // tp
    if recompute == "full":
        return tokens * h // sp * 4  # only the block's input; one block is recomputed at a time (caller adds it)
    act = 2 if device == "cuda" else 4  # dtype of GEMM outputs
    residuals = 2 * h // sp * 4
    gemm_inputs = h * 4 + (2 * h * act if device == "cuda" else h * 4)
    attention = (2 * q + 2 * kv) * d * act + q * 4
    mlp = 4 * (f // tp) * act
    return tokens * (residuals + gemm_inputs + attention + mlp)


def _torch_estimate(rc: RunConfig, device: str, device_memory: int | None) -> MemoryEstimate:
    """The torch trainer's peak per rank: max over the moments of a step of what is alive then.

    - parameters: fp32 (4 B), split by TP; with data parallel (FSDP2) each rank keeps its shard, plus the gathered
      parameters while the step runs (all of them when zero1 keeps them gathered between forward and backward,
      else about one block and the root's);
    - AdamW: two fp32 moments (8 B) per parameter held, sharded like the parameters;
    - gradients: fp32, like the parameters (the unsharded gradients of one block wait for their reduce-scatter);
    - end of forward = start of backward: parameters + optimizer + every block's saved tensors + the loss node's
      saved gradients (the fused cross-entropy computes the output layer's gradients in its forward: (tokens, h)
      and (vocab, h) in fp32, plus its fp32 buffer of loss_chunks.ce_chunk_rows tokens) + gradients already
      accumulated (grad accumulation);
      under TP the vocab-sharded logits go through loss parallel instead: logits, log-softmax and their gradient,
      (tokens, vocab / TP) fp32 each; plus the working set of the first block's backward;
    - the optimizer step: parameters + optimizer + all gradients;
    - plus the process itself (TORCH_CPU_BASELINE on CPU) and the allocator's slack (CPU_HEAP_OVERHEAD);
    - a fresh run's first step (first_step) peaks lower: no optimizer states before its optimizer step, no slack;
    - with async checkpointing, the host copy of this rank's weights and optimizer states that the save stages into
      and keeps for the next one (checkpoint_save.py): in the total on CPU; on CUDA it is host memory, shown apart.
    """
    n = params_per_device(rc)
    tokens = rc.seq_len * rc.micro_batch_size
    h, f, tp, dp = rc.model.hidden_size, rc.model.intermediate_size, rc.layout.tp, rc.layout.dp
    weights, grads_step = _torch_weights_and_grads(rc, n)
    optimizer = n // dp * 8
    saved = _torch_saved(rc, device, tokens)
    loss, output_grad = _torch_loss(rc, tokens)
    # The first block's backward: gradients of its MLP intermediates (3 x f, GEMM dtype), two hidden-size tensors.
    transient = tokens * (3 * (f // tp) * (2 if device == "cuda" else 4) + 2 * h * 4)
    accumulated = grads_step if rc.grad_accum_steps > 1 else 0
    at_backward = weights + optimizer + saved + loss + output_grad + accumulated + transient
    at_step = weights + optimizer + grads_step
    baseline = TORCH_CPU_BASELINE if device == "cpu" else 0
    allocator = int(CPU_HEAP_OVERHEAD * (saved + loss + transient)) if device == "cpu" else 0
    peak, phase = (at_backward, "start of backward") if at_backward >= at_step else (at_step, "optimizer step")
    staging = _async_staging(rc, n // dp * 4 + optimizer)
    host_staging = staging if device == "cpu" else 0
    total = baseline + allocator + peak + host_staging
    first_step = baseline + max(at_backward - optimizer, at_step) + host_staging
    return MemoryEstimate(
        params_per_device=n,
        weights=weights,
        gradients=n // dp * 4 if dp > 1 else n * 4,
        optimizer=optimizer,
        optimizer_without_zero1=optimizer,
        activations=saved,
        logits=loss + output_grad,
        total=total,
        total_without_zero1=total,
        device_memory=device_memory,
        fits=None if device_memory is None else total <= device_memory,
        precision=str(rc.cfg.precision.type),
        recompute=str(rc.cfg.model.activations_checkpoint_granularity),
        baseline=baseline,
        transient=transient,
        allocator=allocator,
        peak_phase=phase,
        staging=staging,
        first_step=first_step,
    )


def _async_staging(rc: RunConfig, state_bytes: int) -> int:
    """The host copy an async checkpoint stages this rank's weights and optimizer states into (0 without one)."""
    policy = CheckpointPolicy.from_config(rc)
    return state_bytes if policy.enabled and policy.async_save else 0


def _torch_weights_and_grads(rc: RunConfig, n: int) -> tuple[int, int]:
    """fp32 parameters resident during the step (this rank's shard + what FSDP2 has gathered) and the gradients at
    the optimizer step (the shard + one block's unsharded gradients waiting for their reduce-scatter)."""
    m, lay = rc.model, rc.layout
    h, f, tp, dp = m.hidden_size, m.intermediate_size, lay.tp, lay.dp
    block = (2 * h * h + 2 * h * m.head_dim * m.num_key_value_heads + 3 * h * f) // tp + 2 * h
    root = n - m.num_layers * block
    if dp == 1:
        return n * 4, n * 4
    gathered = n if lay.zero1 else 2 * block + root
    return (n // dp + gathered) * 4, (n // dp + block) * 4


def _torch_saved(rc: RunConfig, device: str, tokens: int) -> int:
    """What every block saves for backward (one block whole again under full recompute) + the last block's output."""
    granularity = rc.cfg.model.activations_checkpoint_granularity
    saved = rc.model.num_layers * _torch_layer_saved(rc, device, recompute=granularity)
    if granularity == "full":
        saved += _torch_layer_saved(rc, device, recompute=None)
    sp = rc.layout.tp if rc.layout.sequence_parallel else 1
    return saved + tokens * rc.model.hidden_size // sp * 4  # the last block's output, kept by the final norm


def _torch_loss(rc: RunConfig, tokens: int) -> tuple[int, int]:
    """The loss node's memory at the start of backward, and the output layer's gradient it already holds."""
    h, vocab, tp, dp = rc.model.hidden_size, rc.model.vocab_size, rc.layout.tp, rc.layout.dp
    if tp > 1:
        return 3 * tokens * vocab // tp * 4 + tokens * h * 4, 0  # loss parallel on the logits + output's input
    chunk = ce_chunk_rows(tokens, vocab) * vocab * 4  # the fused cross-entropy's fp32 chunk buffer
    return tokens * h * 4 + chunk, vocab * h * 4 // dp if dp > 1 else vocab * h * 4
