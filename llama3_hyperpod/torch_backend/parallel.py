"""Tensor parallel (DTensor) + data parallel (FSDP2) over a (dp, tp) DeviceMesh, from the config's layout.

TP follows Megatron: q/k/v and gate/up are split column-wise (by attention head / hidden unit), o and down
row-wise, so each block costs one all-reduce (or reduce-scatter + all-gather with sequence parallel) per
sublayer. The output layer stays vocab-sharded into the loss (loss parallel), so full logits never materialise.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from llama3_hyperpod.config import ConfigError, Layout
from llama3_hyperpod.torch_backend.layout import check_layout
from llama3_hyperpod.torch_backend.model import Llama

__all__ = ["Dist", "check_layout", "clip_grad_norm", "init_distributed", "loss_context", "parallelize", "reduce_mean",
           "set_grad_sync"]

# The grad-norm reduction of 2-D (dp x tp) sharded grads does two small all-reduces; torch warns about that on
# every step, which would drown the console. It is one scalar per parameter, so the cost is negligible.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: global rank, the (dp, tp) mesh (None when single-process) and its coordinates."""

    rank: int
    world_size: int
    dp: int
    tp: int
    dp_rank: int
    tp_rank: int
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(layout: Layout, device: str) -> Dist:
    """Join the process group torchrun set up (if any) and build the (dp, tp) mesh; check it matches the config."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != layout.tp * layout.dp:
        raise ConfigError(
            "trainer.devices",
            f"the config's layout needs {layout.tp * layout.dp} processes (tp {layout.tp} x dp {layout.dp}) "
            f"but {world} were started",
        )
    if world == 1:
        return Dist(rank=0, world_size=1, dp=1, tp=1, dp_rank=0, tp_rank=0, mesh=None)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    mesh = init_device_mesh(device, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))
    return Dist(
        rank=dist.get_rank(),
        world_size=world,
        dp=layout.dp,
        tp=layout.tp,
        dp_rank=mesh["dp"].get_local_rank(),
        tp_rank=mesh["tp"].get_local_rank(),
        mesh=mesh,
    )


def _tensor_parallel(model: Llama, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard attention by head and the MLP by hidden unit; with sequence parallel, norms work on seq shards."""
    act = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
            **({"norm": SequenceParallel()} if sequence_parallel else {}),
            # Vocab-sharded logits go straight into the loss (loss parallel).
            "output": ColwiseParallel(input_layouts=act, output_layouts=Shard(-1), use_local_output=False),
        },
    )
    for block in model.layers:
        # wq/wk/wv: ColwiseParallel places each weight's head shards on its rank; Attention.forward then runs the
        # three as one GEMM on the local shards and does the column-parallel input/gradient handling itself
        # (model._tp_input), so their module hooks are not on the path.
        plan: dict[str, object] = {
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=act),
            "mlp.w_gate": ColwiseParallel(),
            "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=act),
        }
        if sequence_parallel:
            plan |= {
                "attn_norm": SequenceParallel(),
                "attn": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
                ),
                "mlp_norm": SequenceParallel(),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, tp_mesh, plan)  # type: ignore[arg-type]


def parallelize(model: Llama, mesh: DeviceMesh | None, layout: Layout, *, compile: bool) -> None:
    """The one place for the order: TP, then torch.compile per block, then FSDP (all in place).

    Compile sees the TP-sharded block and runs before FSDP wraps it, so one graph serves every layer.
    `mesh` is None for one process (init_distributed has checked that then tp = dp = 1).
    """
    if layout.tp > 1:
        assert mesh is not None
        _tensor_parallel(model, mesh["tp"], sequence_parallel=layout.sequence_parallel)
    if compile:
        for block in model.layers:
            block.compile()
    if layout.dp > 1:
        assert mesh is not None
        _data_parallel(model, mesh["dp"], layout)


def _data_parallel(model: Llama, dp_mesh: DeviceMesh, layout: Layout) -> None:
    """FSDP2 over the dp mesh: per block, then the root (embeddings, final norm, output)."""
    # NxDT's zero1 shards only optimizer state; keeping parameters gathered between forward and backward
    # (no reshard) is the closest FSDP2 setting and saves one all-gather per block.
    reshard = not layout.zero1
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)


def loss_context(d: Dist) -> contextlib.AbstractContextManager[None]:
    """Vocab-parallel cross entropy when the output is TP-sharded; wrap forward loss and backward in it."""
    return loss_parallel() if d.tp > 1 else contextlib.nullcontext()


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP's reduce-scatter on all but the last micro-batch of an accumulation."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def _grads(model: nn.Module) -> Iterator[torch.Tensor]:
    return (p.grad for p in model.parameters() if p.grad is not None)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global L2 norm over all (DTensor or plain) grads; scales them down to max_norm when above (0 = no clip)."""
    total_sq = torch.zeros((), dtype=torch.float64)
    for g in _grads(model):
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.double().cpu() ** 2
    total = float(total_sq.sqrt())
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in _grads(model):
            g.mul_(coef)
    return total


def reduce_mean(value: torch.Tensor, d: Dist) -> float:
    """Average a scalar over all ranks (equal micro-batches, so this is the global-batch mean)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    value = value.detach().float()
    if d.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world_size
    return float(value)
