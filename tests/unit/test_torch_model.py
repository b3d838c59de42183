"""The torch backend's Llama matches transformers' LlamaForCausalLM given the same weights."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama3_hyperpod.torch_backend import model as model_module
from llama3_hyperpod.torch_backend.data import IGNORE_INDEX
from llama3_hyperpod.torch_backend.loss_chunks import ce_chunk_rows
from llama3_hyperpod.torch_backend.model import (
    Llama,
    LlamaArgs,
    _LinearCrossEntropy,
    from_hf_state_dict,
    num_params,
    rope_inv_freq,
    to_hf_state_dict,
)

HF_SMALL: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 128,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
LLAMA31_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("scaling", [None, LLAMA31_SCALING], ids=["plain", "llama3.1-scaling"])
def test_logits_match_transformers(scaling: dict | None) -> None:
    hf_cfg: dict[str, Any] = dict(HF_SMALL, rope_scaling=scaling)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    ours = Llama(LlamaArgs.from_hf(hf_cfg)).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()))
    tokens = torch.randint(0, hf_cfg["vocab_size"], (2, 100))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_to_hf_keys() -> None:
    ours = Llama(LlamaArgs.from_hf(HF_SMALL))
    ours.init_weights(seed=3)
    hf = LlamaForCausalLM(LlamaConfig(**HF_SMALL))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    back = from_hf_state_dict(hf.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key
    assert num_params(ours) == sum(p.numel() for p in hf.parameters())


def test_rope_scaling_matches_transformers_and_keeps_high_frequencies() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(**dict(HF_SMALL, rope_scaling=LLAMA31_SCALING))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(8, 500000.0, LLAMA31_SCALING)
    torch.testing.assert_close(got, expected.float())
    plain = rope_inv_freq(8, 500000.0, None)
    assert got[0] == plain[0]  # shortest wavelength is untouched
    assert math.isclose(float(got[-1]), float(plain[-1]) / 8.0, rel_tol=1e-6)  # longest slowed by factor


def test_rope_parameters_spelling_of_transformers_5_is_accepted() -> None:
    args = LlamaArgs.from_hf(
        {k: v for k, v in HF_SMALL.items() if k != "rope_theta"}
        | {"rope_parameters": dict(LLAMA31_SCALING, rope_theta=123.0)}
    )
    assert args.rope_theta == 123.0 and args.rope_scaling and args.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-blocks"])
def test_loss_and_gradients_match_transformers(compiled: bool) -> None:
    """The fused paths (QKV + RoPE node, RMSNorm node, output layer + cross-entropy node) and, under torch.compile,
    the plain formulas that replace the first two give transformers' loss and every parameter's gradient."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**HF_SMALL))
    ours = Llama(LlamaArgs.from_hf(HF_SMALL))
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()))
    if compiled:
        for block in ours.layers:
            block.compile()
    tokens = torch.randint(0, HF_SMALL["vocab_size"], (2, 48))
    targets = torch.randint(0, HF_SMALL["vocab_size"], (2, 48))
    targets[0, :5] = -100  # IGNORE_INDEX: not counted by either
    logits = hf(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
    expected.backward()
    got = ours(tokens, targets)
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert len(ours_grads) == len(hf_grads)  # every parameter got a gradient
    for key, grad in to_hf_state_dict(ours_grads).items():
        torch.testing.assert_close(grad, hf_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def test_hf_config_defaults_follow_transformers() -> None:
    """A config.json that leaves rms_norm_eps or head_dim out means transformers' defaults (the one parser)."""
    from transformers import LlamaConfig

    from llama3_hyperpod.torch_backend.model import LlamaArgs

    hf: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                          "max_position_embeddings": 128}
    reference = LlamaConfig(**hf)
    args, shape = LlamaArgs.from_hf(hf), LlamaArgs.from_hf(hf, "model.model_config", "config.json")
    assert args.rms_norm_eps == shape.rms_norm_eps == reference.rms_norm_eps
    assert args.head_dim == shape.head_dim == reference.head_dim


@pytest.mark.parametrize("rows", [7, 1024])
def test_the_fused_cross_entropy_matches_the_logits_path_chunk_by_chunk(rows: int, monkeypatch: Any) -> None:
    """Chunks of 7 tokens (the last one short, ignored targets across a chunk boundary) and one whole chunk give the
    loss and both gradients of logits -> F.cross_entropy: every chunk after the first adds to the weight gradient."""
    monkeypatch.setattr(model_module, "ce_chunk_rows", lambda tokens, vocab: min(tokens, rows))
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = (torch.randn(96, 16) * 0.1).requires_grad_()
    targets = torch.randint(0, 96, (40,))
    targets[5:9] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(h @ w.t(), targets)
    expected_h, expected_w = torch.autograd.grad(expected * 3.0, (h, w))
    got = _LinearCrossEntropy.apply(h, w, targets)
    got_h, got_w = torch.autograd.grad(got * 3.0, (h, w))  # a scaled loss, as under gradient accumulation
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_h, expected_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_w, expected_w, atol=1e-6, rtol=1e-5)


def test_a_cross_entropy_chunk_has_at_least_1024_tokens_for_a_large_vocabulary() -> None:
    """The weight-gradient GEMM's inner dimension is the chunk's rows: Llama 3's vocabulary gets 1024 (not the 65 that
    2^23 logits allow); a small vocabulary gets up to 2^23 logits; never more rows than tokens."""
    assert ce_chunk_rows(8192, 128256) == 1024
    assert ce_chunk_rows(8192, 256) == 8192 and ce_chunk_rows(100_000, 256) == 2**23 // 256
    assert ce_chunk_rows(300, 128256) == 300
