"""NxDT's LR schedules at known steps."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from llama3_hyperpod.torch_backend.schedule import build_scheduler, lr_at


def test_linear_annealing_with_warmup_values() -> None:
    kw: dict[str, Any] = {"lr": 1.0, "warmup_steps": 10, "max_steps": 110}
    assert [lr_at("LinearAnnealingWithWarmUp", s, **kw) for s in (0, 5, 10, 60, 110, 200)] == [
        0.0,
        0.5,
        1.0,
        0.5,
        0.0,
        0.0,
    ]


def test_cosine_annealing_values() -> None:
    kw: dict[str, Any] = {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr": 0.1}
    assert lr_at("CosineAnnealing", 0, **kw) == 0.0
    assert lr_at("CosineAnnealing", 5, **kw) == 0.5
    assert lr_at("CosineAnnealing", 10, **kw) == 1.0
    assert math.isclose(lr_at("CosineAnnealing", 60, **kw), 0.55)  # half way: (1 + 0.1) / 2
    assert math.isclose(lr_at("CosineAnnealing", 110, **kw), 0.1)
    assert lr_at("CosineAnnealing", 500, **kw) == 0.1


def test_cosine_annealing_holds_min_lr_for_constant_steps() -> None:
    kw: dict[str, Any] = {"lr": 1.0, "warmup_steps": 0, "max_steps": 100, "min_lr": 0.0, "constant_steps": 50}
    assert lr_at("CosineAnnealing", 0, **kw) == 1.0
    assert math.isclose(lr_at("CosineAnnealing", 25, **kw), 0.5)
    assert lr_at("CosineAnnealing", 51, **kw) == 0.0
    assert lr_at("CosineAnnealing", 99, **kw) == 0.0


def test_scheduler_drives_the_optimizer_lr() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, "LinearAnnealingWithWarmUp", lr=2.0, warmup_steps=4, max_steps=8)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 1.5])
