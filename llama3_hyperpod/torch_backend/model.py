"""Llama 3 in one readable module (nanoGPT style), built from a Hugging Face config.json dict.

Parameter names are short and our own; `to_hf_state_dict` / `from_hf_state_dict` map them 1:1 to
transformers' LlamaForCausalLM (same rotate-half RoPE convention, so no q/k permutation is needed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the universal PyTorch spelling)
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LlamaArgs:
    """The architecture fields the model needs, read from an HF config dict."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool = False
    head_dim_override: int | None = None

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaArgs:
        """Accept both the classic (rope_theta + rope_scaling) and transformers 5 (rope_parameters) spellings."""
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
        return cls(
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_scaling=dict(scaling) if scaling else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim_override=hf.get("head_dim"),
        )


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse RoPE frequencies; applies Llama 3.1 'llama3' scaling (long wavelengths slowed by `factor`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling is None or rope_type == "default":
        return inv_freq.float()
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r} (only 'llama3' is implemented)")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled).float()


def rope_cos_sin(args: LlamaArgs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq, head_dim) in the rotate-half layout HF uses."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like HF so bf16 runs stay stable.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class CoreAttention(nn.Module):
    """Softmax(QK^T)V with causal mask; a module of its own so 'selective' checkpointing can recompute just it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.hidden_size, args.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, args.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.hidden_size, args.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.num_heads * self.head_dim, args.hidden_size, bias=False)
        self.core = CoreAttention()
        self.recompute_core = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # Head counts come from the (possibly tensor-parallel, i.e. local) projection widths.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.w_gate = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.w_up = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.w_down = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_cos_sin(args, args.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.full_checkpoint = False

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Deterministic init (normal(0, std) like HF's initializer_range), independent of the global RNG state."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def set_activation_checkpointing(self, granularity: str | None) -> None:
        """selective: recompute only the attention core; full: recompute every transformer block."""
        if granularity not in (None, "selective", "full"):
            raise ValueError(f"unknown activations_checkpoint_granularity {granularity!r}")
        self.full_checkpoint = granularity == "full"
        for layer in self.layers:
            layer.attn.recompute_core = granularity == "selective"  # type: ignore[union-attr]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (batch, seq) -> logits (batch, seq, vocab)."""
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.full_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.output(self.norm(h))


def num_params(model: nn.Module, *, exclude_embedding: bool = False) -> int:
    """Parameter count (global shapes, so it is right for sharded DTensor parameters too)."""
    total = 0
    for name, p in model.named_parameters():
        if exclude_embedding and name.endswith("tok_embeddings.weight"):
            continue
        total += p.numel()
    return total


# (ours, HF) key templates; {i} is the layer index.
_KEY_TEMPLATES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp.w_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.w_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.w_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def _rename(key: str, forward: bool) -> str:
    for ours, hf in _KEY_TEMPLATES:
        src, dst = (ours, hf) if forward else (hf, ours)
        match = re.fullmatch(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if match:
            return dst.format(i=match.group(1)) if match.groups() else dst
    raise KeyError(f"no Llama mapping for state dict key {key!r}")


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers LlamaForCausalLM keys (tensors shared, not copied)."""
    return {_rename(k, forward=True): v for k, v in sd.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM keys -> ours; skips HF's non-parameter rotary buffer."""
    return {_rename(k, forward=False): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
