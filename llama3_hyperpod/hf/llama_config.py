"""The Llama architecture read from a Hugging Face config.json: the one parser of it.

The config loader (the plan's numbers), the torch model and the HF folder check all read config.json through
`LlamaArgs.from_hf`, so a default or a spelling means the same everywhere. Imports neither torch nor yaml/omegaconf:
the conversion steps run it in the Neuron SDK's interpreter (hf/steps.py), the planner without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llama3_hyperpod.errors import ConfigError

DEFAULT_MAX_POSITIONS = 8192  # only for a config.json without it; the config loader requires it (config.py)


@dataclass(frozen=True)
class LlamaArgs:
    """The numbers of the Llama architecture, and the effective config.json they were read from."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # config.json's head_dim, as transformers and our torch model use it. NxDT ignores it and uses
    # hidden_size // num_attention_heads (aws-neuron/neuronx-distributed-training: models/hf_models/modeling_llama.py
    # LlamaAttention.__init__, lightning_modules/model/hf_models/llama_model.py get_sin_cos_matrix); every Llama 3
    # config.json has the two equal.
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    rope_scaling: dict[str, Any] | None  # rope_type spelled `rope_type`; None for plain RoPE
    tie_word_embeddings: bool
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], key: str = "config.json", source: str = "") -> LlamaArgs:
        """Defaults as transformers' LlamaConfig has them (rms_norm_eps 1e-6, head_dim hidden / heads); both RoPE
        spellings (rope_theta + rope_scaling, transformers 5's rope_parameters). A bad field is a ConfigError on
        `key`, its message starting with `source`."""
        where = f"{source}: " if source else ""

        def need_int(name: str, default: Any = None) -> int:
            value = hf.get(name)
            value = default if value is None else value  # null means the default, as in LlamaConfig
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(key, f"{where}'{name}' must be a positive integer, got {value!r}")
            return value

        heads, hidden = need_int("num_attention_heads"), need_int("hidden_size")
        rope = dict(hf.get("rope_parameters") or {})
        try:
            theta = next((v for v in (hf.get("rope_theta"), rope.get("rope_theta")) if v is not None), 10000.0)
            rope_theta, eps = float(theta), float(hf.get("rms_norm_eps", 1e-6))
        except (TypeError, ValueError):
            raise ConfigError(key, f"{where}'rope_theta' and 'rms_norm_eps' must be numbers") from None
        return cls(
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=need_int("num_key_value_heads", heads),
            head_dim=need_int("head_dim", max(1, hidden // heads)),  # validate() names an uneven split
            vocab_size=need_int("vocab_size"),
            max_position_embeddings=need_int("max_position_embeddings", DEFAULT_MAX_POSITIONS),
            rope_theta=rope_theta,
            rms_norm_eps=eps,
            rope_scaling=_rope_scaling(hf.get("rope_scaling"), rope, key, where),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hf_config=dict(hf),
        )

    def parameter_count(self) -> int:
        """Exact count for the Llama architecture (no biases), embeddings and output layer included."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = h * q * 2 + h * kv * 2 + 3 * h * f + 2 * h
        output = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + output


def _rope_scaling(classic: Any, rope: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """rope_scaling, or transformers 5's rope_parameters without its theta; `type` spelled `rope_type`."""
    scaling = classic
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(key, f"{where}'rope_scaling' must be an object with a 'factor', got {scaling!r}")
    scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    if scaling.get("rope_type", "default") == "default":
        return None
    if "factor" not in scaling:
        raise ConfigError(key, f"{where}'rope_scaling' must be an object with a 'factor', got {classic or scaling!r}")
    return scaling
