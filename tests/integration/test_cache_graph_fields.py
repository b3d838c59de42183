"""Which config fields truly change torch.compile graphs, measured with Inductor's FX graph cache counters, and
`cache verify` predicting exactly that.

The trainer compiles each transformer block (forward + backward) and runs AdamW, the LR schedule, clipping and the
step loop eagerly. The worker below does the same with a block-shaped function (RMSNorm + SwiGLU-style MLP +
residual at the config's hidden/intermediate sizes, inputs of the config's micro batch x sequence length), because a
cold compile of the real attention block costs about a minute on 2 cores. Each variant starts from a reset dynamo
(no in-memory graphs), so a hit can only come from the on-disk cache, as in a new process.
Run alone: python tests/integration/test_cache_graph_fields.py '<json list of variants>'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

STEPS_CAP = 3
BASE = ("torch_backend.compile=true",)
# name -> (overrides, OMP threads); the base first, then variants that must hit, then ones that must miss.
VARIANTS: dict[str, tuple[tuple[str, ...], int]] = {
    "base": ((), 2),
    "lr": (("model.optim.lr=1.0e-4",), 2),
    "max_steps": (("trainer.max_steps=2",), 2),
    "optimizer_and_schedule": (("model.optim.weight_decay=0.1", "model.optim.betas=[0.8,0.9]",
                                "model.optim.sched.warmup_steps=1", "trainer.gradient_clip_val=0.3"), 2),
    "seed": (("seed=99",), 2),
    "seq_len": (("model.encoder_seq_length=128",), 2),
    "micro_batch": (("data.micro_batch_size=4", "data.global_batch_size=8"), 2),
    "cpu_threads": ((), 1),
}


def _worker(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import torch
    from torch._dynamo.utils import counters

    def block(x: torch.Tensor, w_norm: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w_norm
        return x + torch.nn.functional.silu(h @ w_up) @ w_down

    out = []
    for v in variants:
        torch._dynamo.reset()
        counters.clear()
        torch.set_num_threads(v["threads"])
        gen = torch.Generator().manual_seed(v["seed"])
        hidden, inter = v["hidden"], v["intermediate"]
        params = [torch.nn.Parameter(torch.ones(hidden)),
                  torch.nn.Parameter(torch.randn(hidden, inter, generator=gen) * 0.02),
                  torch.nn.Parameter(torch.randn(inter, hidden, generator=gen) * 0.02)]
        opt = torch.optim.AdamW(params, lr=v["lr"], betas=tuple(v["betas"]), weight_decay=v["weight_decay"])
        warmup: int = max(1, v["warmup"])

        def factor(step: int, w: int = warmup) -> float:
            return min(1.0, (step + 1) / w)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        compiled = torch.compile(block)
        for _ in range(min(v["max_steps"], STEPS_CAP)):
            x = torch.randn(v["micro_batch"], v["seq_len"], hidden, generator=gen)
            compiled(x, *params).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(params, v["clip"])
            opt.step()
            opt.zero_grad()
            sched.step()
        keys = ("fxgraph_cache_miss", "fxgraph_cache_hit", "autograd_cache_miss", "autograd_cache_hit")
        merged = {**counters["inductor"], **counters["aot_autograd"]}
        out.append({"name": v["name"], **{k: int(merged.get(k, 0)) for k in keys}})
    return out


def _step_inputs(name: str, overrides: tuple[str, ...], threads: int) -> dict[str, Any]:
    """What reaches the training step, read from the config as the trainer reads it."""
    from llama3_hyperpod.config import load_config
    from tests.conftest import CONFIG_TINY

    rc = load_config(CONFIG_TINY, (*BASE, *overrides))
    optim = rc.cfg.model.optim
    return {"name": name, "threads": threads, "seed": int(rc.cfg.seed), "hidden": rc.model.hidden_size,
            "intermediate": rc.model.intermediate_size, "lr": float(optim.lr), "betas": list(optim.betas),
            "weight_decay": float(optim.weight_decay), "warmup": int(optim.sched.warmup_steps),
            "clip": float(rc.cfg.trainer.gradient_clip_val), "max_steps": int(rc.cfg.trainer.max_steps),
            "micro_batch": rc.micro_batch_size, "seq_len": rc.seq_len}


def test_verify_predicts_what_inductor_recompiles(tmp_path: Path) -> None:
    from llama3_hyperpod.cache.manifest import write_manifest
    from llama3_hyperpod.cache.verify import verify
    from llama3_hyperpod.cluster import detect_accelerator
    from llama3_hyperpod.plan import build_plan
    from tests.conftest import CONFIG_TINY, REPO

    cache = tmp_path / "cache"
    inputs = [_step_inputs(name, ov, threads) for name, (ov, threads) in VARIANTS.items()]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__, json.dumps(inputs)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = {r["name"]: r for r in json.loads(run.stdout.strip().splitlines()[-1])}

    def plan(name: str) -> Any:
        overrides, threads = VARIANTS[name]
        return build_plan(CONFIG_TINY, (*BASE, *overrides), detect_accelerator("torch-cpu"),
                          {"OMP_NUM_THREADS": str(threads)}, output_dir=str(tmp_path / "runs"))

    assert measured["base"]["fxgraph_cache_miss"] > 0  # a cold cache compiles
    write_manifest(cache, plan("base"))
    for name in VARIANTS:
        if name == "base":
            continue
        m = measured[name]
        recompiled = m["fxgraph_cache_miss"] > 0 or m["autograd_cache_miss"] > 0
        verdict = verify(plan(name), cache)
        assert verdict.status == ("miss" if recompiled else "hit"), (name, m, verdict.message())
        if not recompiled:
            assert m["fxgraph_cache_hit"] > 0, (name, m)
    # The measured split this test pins down (see llama3_hyperpod/cache/manifest.py):
    hits = sorted(n for n, m in measured.items() if n != "base" and m["fxgraph_cache_miss"] == 0)
    assert hits == ["lr", "max_steps", "optimizer_and_schedule", "seed"]


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
