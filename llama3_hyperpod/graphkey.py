"""What selects a compiled graph: the fields of a config that shape the graphs, and so the compile cache's key.

The plan derives them once (`Plan.graph`); the cache manifest records them and `cache verify` compares them.

Which fields shape graphs (and so the cache key) differs by backend:
- torch (Inductor, per-block torch.compile, eager AdamW): shapes and layout reach the compiled blocks; the optimizer,
  LR schedule, step counts, seeds and cadences do not (tests/integration/test_cache_graph_fields.py measures this
  with Inductor's FX graph cache hit/miss counters). The CPU thread count is part of Inductor's key on CPU.
- neuron (XLA graphs of the whole step, optimizer included): shared/reference/neuron-nxdt.md lists model size,
  batch, sequence length, optimizer and its hyperparameters, precision, DP degree / node count and compiler flags.
  That cannot be measured off Trainium, so the neuron field set follows the reference (false misses over false hits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llama3_hyperpod.fsutil import sha256_json

if TYPE_CHECKING:
    from llama3_hyperpod.config import RunConfig

# HF config keys that never reach a graph (token ids, init, provenance): left out of the model hash.
NON_GRAPH_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "use_cache", "torch_dtype", "dtype",
})


def model_config_hash(hf_config: Mapping[str, Any]) -> str:
    """Hash of the effective HF config without the keys that cannot change a graph."""
    return sha256_json({k: v for k, v in hf_config.items() if k not in NON_GRAPH_HF_KEYS})


def graph_fields_from_config(rc: RunConfig, *, backend: str, device: str, threads: int | None,
                             cc_flags: str | None) -> dict[str, Any]:
    """The fields that select compiled graphs for this config: flat, dotted keys, JSON values. Reads nothing."""
    m, lay, cfg = rc.model, rc.layout, rc.cfg
    fields: dict[str, Any] = {
        "backend": backend,
        "device": device,
        "model.config_sha256": model_config_hash(m.hf_config),
        "model.hidden_size": m.hidden_size,
        "model.intermediate_size": m.intermediate_size,
        "model.num_layers": m.num_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_key_value_heads": m.num_key_value_heads,
        "model.vocab_size": m.vocab_size,
        "model.encoder_seq_length": rc.seq_len,
        "data.micro_batch_size": rc.micro_batch_size,
        "layout.tp": lay.tp,
        "layout.pp": lay.pp,
        "layout.cp": lay.cp,
        # Conservative on torch too: DP degree and node count decide the sharding the blocks see.
        "layout.dp": lay.dp,
        "layout.num_nodes": lay.num_nodes,
        "layout.devices_per_node": lay.devices_per_node,
        "layout.zero1": lay.zero1,
        "layout.sequence_parallel": lay.sequence_parallel,
        "layout.kv_replicator": lay.kv_replicator,
        "precision.type": str(cfg.precision.type),
        "model.activations_checkpoint_granularity": cfg.model.activations_checkpoint_granularity,
    }
    if backend == "neuron":
        optim = cfg.model.optim
        fields |= {
            "compiler_flags": cc_flags or "",
            "model.activations_checkpoint_recompute": list(cfg.model.activations_checkpoint_recompute or []),
            "model.fusions.softmax": bool(cfg.model.fusions.softmax),
            "model.fusions.flash_attention": bool(cfg.model.fusions.flash_attention),
            "model.fuse_qkv": bool(cfg.model.fuse_qkv),
            "model.qkv_linear": bool(cfg.model.qkv_linear),
            "precision.master_weights": bool(cfg.precision.master_weights),
            "precision.fp32_grad_acc": bool(cfg.precision.fp32_grad_acc),
            "model.optim.name": str(optim.name),
            "model.optim.lr": float(optim.lr),
            "model.optim.betas": [float(b) for b in optim.betas],
            "model.optim.eps": float(optim.eps),
            "model.optim.weight_decay": float(optim.weight_decay),
            "trainer.gradient_clip_val": float(cfg.trainer.gradient_clip_val),
            "grad_accum_steps": rc.grad_accum_steps,
        }
    else:
        fields |= {"torch_backend.compile": bool(cfg.torch_backend.compile)}
        if device == "cpu":
            fields["cpu_threads"] = threads
    return fields
