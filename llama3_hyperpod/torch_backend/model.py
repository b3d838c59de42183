"""Llama 3 in one readable module (nanoGPT style), built from a Hugging Face config.json (hf/llama_config.py).

Parameter names are short and our own; `to_hf_state_dict` / `from_hf_state_dict` map them 1:1 to
transformers' LlamaForCausalLM (same rotate-half RoPE convention, so no q/k permutation is needed).
Over 400 lines: the whole model (its fused autograd nodes included) reads in one sitting, as nanoGPT's does.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the universal PyTorch spelling)
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.utils.checkpoint import checkpoint

from llama3_hyperpod.hf.llama_config import LlamaArgs
from llama3_hyperpod.torch_backend.data import IGNORE_INDEX
from llama3_hyperpod.torch_backend.loss_chunks import ce_chunk_rows

__all__ = ["Llama", "LlamaArgs", "apply_rope", "from_hf_state_dict", "num_params", "rope_cos_sin", "rope_inv_freq",
           "to_hf_state_dict"]


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
    """cos/sin tables of shape (seq, head_dim / 2): HF's rotate-half tables are these twice, side by side."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); HF's rotate-half formula, kept as the reference the fused kernel is tested
    against."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """out = rotate-half RoPE of x by +angle (sign 1) or -angle (sign -1, the backward); four passes over halves."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)


class _QKVRope(torch.autograd.Function):
    """x @ [wq; wk; wv]^T as one GEMM, RoPE on its q and k parts, as one autograd node: returns (qk, v), each
    (batch, seq, heads, head_dim) and contiguous, q heads first in qk.

    Saved for backward: x and references to the three weights (not their concatenation, which is made again:
    keeping it would hold a copy of every layer's q/k/v weights until backward). The backward writes the rotated-back
    q/k gradient and the v gradient into one (tokens, q+k+v) buffer and runs the two GEMMs on it, so nothing is
    concatenated or zero-filled. Eager autograd of the rotate-half formula (reference: apply_rope) costs ~5 passes
    forward and ~8 backward per tensor and keeps q, k and their rotations alive.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seq = x.shape[0], x.shape[1]
        n_qk = wq.shape[0] + wk.shape[0]
        out = torch.matmul(x, torch.cat([wq, wk, wv]).t())
        qk = torch.empty((bsz, seq, n_qk // head_dim, head_dim), dtype=out.dtype, device=out.device)
        _rotate_into(qk, out[..., :n_qk].view(bsz, seq, -1, head_dim), cos, sin, 1.0)
        v = out[..., n_qk:].reshape(bsz, seq, -1, head_dim).clone()  # frees `out`; v is a quarter of it or less
        ctx.save_for_backward(x, wq, wk, wv, cos, sin)
        ctx.head_dim = head_dim
        return qk, v

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, g_qk: torch.Tensor, g_v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, wq, wk, wv, cos, sin = ctx.saved_tensors
        bsz, seq, hidden = x.shape
        n_qk, n_v = wq.shape[0] + wk.shape[0], wv.shape[0]
        g_out = torch.empty((bsz, seq, n_qk + n_v), dtype=g_qk.dtype, device=g_qk.device)
        _rotate_into(g_out[..., :n_qk].view(bsz, seq, -1, ctx.head_dim), g_qk, cos, sin, -1.0)
        g_out[..., n_qk:].copy_(g_v.reshape(bsz, seq, n_v))
        w = torch.cat([wq, wk, wv]).to(g_out.dtype)
        grad_x = torch.matmul(g_out, w).to(x.dtype)
        grad_w = torch.mm(g_out.view(-1, n_qk + n_v).t(), x.reshape(-1, hidden).to(g_out.dtype))
        gq, gk, gv = grad_w.to(wq.dtype).split([wq.shape[0], wk.shape[0], n_v])
        return grad_x, gq, gk, gv, None, None, None


def _tp_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The local tensor of an activation replicated over the TP ranks, for a column-parallel matmul by hand: its
    gradient is a partial sum on each rank, all-reduced on the way back (what ColwiseParallel's input hook does)."""
    if not isinstance(weight, DTensor):
        return x.to_local() if isinstance(x, DTensor) else x
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, weight.device_mesh, [Replicate()], run_check=False)
    return x.to_local(grad_placements=[Partial()])


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm as one autograd node, in fp32 like HF (y = weight * (x * rstd).to(x.dtype)), saving only x and the
    per-token rstd: 3 passes forward (the mean square as one norm reduction), 7 backward. Eager autograd of the
    formula runs ~6 kernels forward and ~12 backward and keeps three (tokens, hidden) tensors per norm."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        rstd = ms.add_(eps).rsqrt_()
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return normed.mul_(weight) if normed.dtype == weight.dtype else normed * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        xf, gf = x.float(), grad.float()
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw = gf * weight.float()
            # d/dx of x * rstd: rstd * (g - x * rstd^2 * mean(g * x)).
            coef = torch.linalg.vecdot(gw, xf, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
            grad_x = gw.mul_(rstd).addcmul_(xf, coef).to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (xf * rstd).mul_(gf).sum(dim=tuple(range(gf.dim() - 1))).to(weight.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like HF so bf16 runs stay stable.
        if torch.compiler.is_compiling():
            # Under torch.compile the plain formula: Inductor fuses it and its autograd into a kernel or two, which
            # beats the hand-written node (measured: compiled blocks 10% slower with the custom nodes).
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(x.dtype)
        if not isinstance(x, DTensor):
            return _RMSNormFn.apply(x, _local(self.weight), self.eps)
        # Sequence parallel: each rank normalises its own tokens; the replicated weight's gradient is a partial
        # sum over them, reduced on the way back (as DTensor's rules would do for the plain formula).
        w = self.weight
        w_local = w.to_local(grad_placements=[Partial()]) if isinstance(w, DTensor) else w
        y = _RMSNormFn.apply(x.to_local(), w_local, self.eps)
        return DTensor.from_local(y, x.device_mesh, x.placements, run_check=False)


class CoreAttention(nn.Module):
    """Softmax(QK^T)V with causal mask; a module of its own so 'selective' checkpointing can recompute just it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Attention(nn.Module):
    """Grouped-query attention with Q, K and V computed by one GEMM.

    The parameters stay three (wq, wk, wv: the names and shapes of HF's q/k/v_proj, so checkpoints and the HF
    mapping are unchanged and any TP split can load them); forward concatenates them (each rank its own shards of
    them under TP: the local weight is [q heads of this rank | their KV heads' k | v], a rank-interleaved layout of
    the global fused weight) and runs one matmul instead of three; RoPE rotates q and k in the same autograd node
    (_QKVRope).
    """

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.hidden_size, args.num_attention_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, args.num_key_value_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.hidden_size, args.num_key_value_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.num_attention_heads * self.head_dim, args.hidden_size, bias=False)
        self.core = CoreAttention()
        self.recompute_core = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        d = self.head_dim
        wq, wk, wv = self.wq.weight, self.wk.weight, self.wv.weight
        # TP: this rank's shards (ColwiseParallel placed them; their module forwards are not called, so this does
        # the column-parallel matmul's input all-gather / gradient all-reduce once for the three).
        x_local = _tp_input(x, wq)
        cos_h, sin_h = cos[:, None, :].to(x_local.dtype), sin[:, None, :].to(x_local.dtype)
        if torch.compiler.is_compiling():  # the same math as plain ops, for Inductor to fuse (see RMSNorm)
            n_qk = _local(wq).shape[0] + _local(wk).shape[0]
            qkv = F.linear(x_local, torch.cat([_local(wq), _local(wk), _local(wv)]))
            qk_in, v = qkv.split([n_qk, qkv.shape[-1] - n_qk], dim=-1)
            x1, x2 = qk_in.view(bsz, seq, -1, d).chunk(2, dim=-1)
            qk = torch.cat((x1 * cos_h - x2 * sin_h, x2 * cos_h + x1 * sin_h), dim=-1)
            v = v.view(bsz, seq, -1, d)
        else:
            qk, v = _QKVRope.apply(x_local, _local(wq), _local(wk), _local(wv), cos_h, sin_h, d)
        # Head counts come from the (possibly tensor-parallel, i.e. local) projection widths.
        q, k = qk.split([_local(wq).shape[0] // d, _local(wk).shape[0] // d], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). gate and up stay two GEMMs: one fused GEMM measured no faster on CPU
    (hidden 512 -> 2 x 1536, 2048 tokens, forward + backward: 135 vs 122 ms median of 8 interleaved rounds)."""

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

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (batch, seq) -> logits (batch, seq, vocab); with targets (batch, seq): the mean cross-entropy over
        the targets that are not IGNORE_INDEX (fp32), without materialising the logits when the output layer is not
        vocab-sharded (see _LinearCrossEntropy). Under TP the caller wraps forward and backward in loss_parallel."""
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.full_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        h = self.norm(h)
        if targets is None:
            return self.output(h)
        weight = self.output.weight
        if isinstance(weight, DTensor) or isinstance(h, DTensor):  # TP: vocab-sharded logits into loss parallel
            logits = self.output(h)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX)
        return _LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(0, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ W^T, targets)) with the gradients computed in the same pass, chunk by chunk of tokens.

    The usual path writes the (tokens, vocab) logits, their log-softmax, a zero-filled gradient of the same size
    and the log-softmax gradient: four fresh tensors of 262 MB each for 2048 tokens x 32000 words in fp32, and six
    passes over them. Here one chunk buffer (loss_chunks.py: how many tokens at a time) is reused: its logits give
    the loss, are turned in place into (softmax - one_hot) / n, and go straight into the two gradient GEMMs. The
    FLOPs are those of the output layer's forward and backward; backward only scales the saved gradients by the
    incoming one.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tokens, vocab = h.shape[0], weight.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        hc_all, w = h.to(dtype), weight.to(dtype)
        valid = targets != IGNORE_INDEX
        count = int(valid.sum())
        inv_n = 1.0 / max(count, 1)
        chunk = ce_chunk_rows(tokens, vocab)
        buf = torch.empty(chunk, vocab, dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for start in range(0, tokens, chunk):
            end = min(tokens, start + chunk)
            hc, tc, vc = hc_all[start:end], targets[start:end], valid[start:end]
            logits = buf[: end - start]
            if dtype == torch.float32:
                torch.mm(hc, w.t(), out=logits)
            else:
                logits.copy_(hc @ w.t())
            safe = tc.clamp(min=0)[:, None]
            picked = logits.gather(1, safe).squeeze(1)
            # log-sum-exp in place: max, shift, exp, sum (4 passes, no temporary of the chunk's size).
            top = logits.amax(dim=-1)
            logits.sub_(top[:, None]).exp_()
            sums = logits.sum(dim=-1)
            lse = top + sums.log()
            total += ((lse - picked) * vc).sum(dtype=torch.float64)
            if grad_h is None or grad_w is None:
                continue
            # (softmax - one_hot) / n on valid rows, 0 on ignored ones: exp / sum / n, then the target's -1 / n.
            logits.mul_((vc * inv_n / sums)[:, None])
            logits.scatter_add_(1, safe, (vc * -inv_n)[:, None].to(logits.dtype))
            g = logits.to(dtype)
            torch.mm(g, w, out=grad_h[start:end]) if grad_h.dtype == dtype else grad_h[start:end].copy_(g @ w)
            if start == 0:  # the first chunk writes the gradient (no zero-fill pass), the others add to it
                torch.mm(g.t().float(), hc.float(), out=grad_w)
            else:
                grad_w.addmm_(g.t().float(), hc.float())
        if need_grad:
            assert grad_w is not None
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return (total * inv_n).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_h, grad_w = ctx.saved_tensors
        if float(grad) != 1.0:  # the trainer's loss / accumulation steps, or any caller's scale: in place (once)
            grad_h.mul_(grad)
            grad_w.mul_(grad)
        return grad_h, grad_w, None


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
