"""NxDT's learning-rate schedules as pure functions of the step, wrapped in LambdaLR.

- LinearAnnealingWithWarmUp (NxDT, built on transformers' linear schedule): lr rises linearly from 0 over
  warmup_steps, then falls linearly to 0 at max_steps.
- CosineAnnealing (NeMo's Megatron-style `_linear_warmup_with_cosine_annealing`): linear warmup from 0 over
  warmup_steps, cosine from lr to min_lr over max_steps - warmup_steps - constant_steps, then min_lr held.
  (NeMo uses a (step+1)/(warmup+1) warmup when constant_steps == 0; we use the Megatron warmup in both cases
  so the curve does not jump when constant_steps changes.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def linear_annealing_with_warmup(step: int, *, lr: float, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return lr * step / max(1, warmup_steps)
    return lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def cosine_annealing(
    step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0, constant_steps: int = 0
) -> float:
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    decay_steps = max_steps - warmup_steps - constant_steps
    if decay_steps <= 0 or step > warmup_steps + decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


def lr_at(
    name: str, step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0, constant_steps: int = 0
) -> float:
    """The learning rate NxDT would use at optimizer step `step` (0-based)."""
    if name == "LinearAnnealingWithWarmUp":
        return linear_annealing_with_warmup(step, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps)
    if name == "CosineAnnealing":
        return cosine_annealing(
            step, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, min_lr=min_lr, constant_steps=constant_steps
        )
    raise ValueError(f"unknown schedule {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, **kwargs: float) -> LambdaLR:
    """LambdaLR multiplying each group's initial lr by lr_at(step) / lr."""
    base = float(kwargs["lr"])

    def factor(step: int) -> float:
        return lr_at(name, step, **kwargs) / base  # type: ignore[arg-type]

    fn: Callable[[int], float] = factor
    return LambdaLR(optimizer, fn)
