"""What the torch backend's layout cannot be, in one place and without importing torch.

The plan checks it before anything starts and the trainer again before it joins the process group (a trainer can be
started by hand, past the plan), with the same function and so the same words. The rules every backend shares are the
config loader's (config.validate).
"""

from __future__ import annotations

from llama3_hyperpod.config import Layout
from llama3_hyperpod.errors import ConfigError


def check_layout(layout: Layout, num_kv_heads: int) -> None:
    """Refuse pipeline and context parallelism and a TP that splits KV heads, as ConfigErrors naming the key."""
    if layout.pp > 1:
        raise ConfigError("distributed_strategy.pipeline_model_parallel_size",
                          f"is {layout.pp}, but the torch backend has no pipeline parallelism: set it to 1 "
                          "(use tensor_model_parallel_size and more data parallel instead)")
    if layout.cp > 1:
        raise ConfigError("distributed_strategy.context_parallel_size",
                          f"is {layout.cp}, but the torch backend has no context parallelism: set it to 1")
    if num_kv_heads % layout.tp:
        raise ConfigError("distributed_strategy.tensor_model_parallel_size",
                          f"{num_kv_heads} KV heads do not split over TP {layout.tp}; the torch backend does not "
                          "replicate KV heads (kv_replicator): use a TP that divides the KV heads")
