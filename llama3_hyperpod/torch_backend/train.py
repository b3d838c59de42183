"""The torch backend's training loop, top to bottom in one function (`train`), plus its command line.

    python -m llama3_hyperpod.torch_backend.train --config X.yaml --run-dir D --mode train|compile \
        --device cpu|cuda [key.path=value ...]

Run under torchrun for TP/DP; one process needs no process group. `--mode compile` runs a few steps so
torch.compile fills TORCHINDUCTOR_CACHE_DIR, then exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812  (the universal PyTorch spelling)
from torch.distributed.tensor import DTensor

from llama3_hyperpod.config import ConfigError, RunConfig, load_config
from llama3_hyperpod.torch_backend import parallel
from llama3_hyperpod.torch_backend.data import IGNORE_INDEX, Batches, load_train_dataset
from llama3_hyperpod.torch_backend.metrics import (
    MetricsWriter,
    StepMetrics,
    flops_per_token,
    memory_bytes,
    peak_flops,
)
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs, num_params
from llama3_hyperpod.torch_backend.schedule import build_scheduler

COMPILE_MODE_STEPS = 3


@dataclass
class TrainResult:
    """What a run did, for smoke/bench/tests calling the loop in-process."""

    losses: list[float] = field(default_factory=list)
    history: list[StepMetrics] = field(default_factory=list)
    peak_flops: float = 0.0
    peak_source: str = ""
    flops_per_token: float = 0.0
    num_params: int = 0
    wall_s: float = 0.0

    def steady(self, key: str) -> float:
        """Median of a metric over steps after the first (which pays for warm-up / compilation)."""
        values = [getattr(m, key) for m in self.history[1:]] or [getattr(m, key) for m in self.history]
        return statistics.median(values) if values else float("nan")


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); plain fp32 on CPU or precision.type fp32."""
    if device == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: torch.nn.Module, rc: RunConfig) -> torch.optim.AdamW:
    """AdamW with fp32 state (parameters are fp32); norms skip weight decay unless do_layer_norm_weight_decay.

    DTensor and plain parameters (TP without sequence parallel keeps norms plain) go in separate groups,
    because the foreach kernels cannot mix them.
    """
    optim = rc.cfg.model.optim
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decay = not name.endswith("norm.weight") or rc.cfg.model.do_layer_norm_weight_decay
        groups.setdefault((decay, isinstance(p, DTensor)), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": optim.weight_decay if decay else 0.0}
        for (decay, _), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=True)


def _inductor_cache_files() -> int:
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache or not Path(cache).is_dir():
        return 0
    return sum(1 for p in Path(cache).rglob("*") if p.is_file())


def train(rc: RunConfig, run_dir: Path, *, mode: str = "train", device: str = "cpu", echo: bool = True) -> TrainResult:
    """Build model, data and optimizer from the config and run the loop; returns the metrics of every step."""
    cfg, layout = rc.cfg, rc.layout
    started = time.perf_counter()
    parallel.check_layout(layout, rc.model.num_key_value_heads)
    dataset = load_train_dataset(cfg.data.train_dir, rc.seq_len)
    d = parallel.init_distributed(layout, device)
    torch.manual_seed(cfg.seed)

    # Model: identical init on every rank (own generator), then sharded by TP/FSDP.
    model = Llama(LlamaArgs.from_hf(rc.model.hf_config))
    model.init_weights(seed=cfg.seed)
    model.set_activation_checkpointing(cfg.model.activations_checkpoint_granularity)
    model.to(device)
    n_params = num_params(model)
    fpt = flops_per_token(
        non_embedding_params=num_params(model, exclude_embedding=True),
        num_layers=rc.model.num_layers,
        hidden_size=rc.model.hidden_size,
        seq_len=rc.seq_len,
    )
    if d.tp > 1:
        parallel.apply_tensor_parallel(model, d.mesh["tp"], sequence_parallel=layout.sequence_parallel)  # type: ignore[index]
    if cfg.torch_backend.compile:
        # Compile per block (one graph reused by every layer), before FSDP wraps them.
        for block in model.layers:
            block.compile()
    if d.dp > 1:
        parallel.apply_data_parallel(model, d, layout)

    optimizer = _optimizer(model, rc)
    sched = cfg.model.optim.sched
    scheduler = build_scheduler(
        optimizer,
        sched.name,
        lr=cfg.model.optim.lr,
        warmup_steps=sched.warmup_steps,
        max_steps=sched.max_steps,
        min_lr=sched.min_lr,
        constant_steps=sched.constant_steps,
    )
    batches = Batches(dataset, rc.seq_len, rc.micro_batch_size, d.dp, d.dp_rank, rc.grad_accum_steps, device)

    peak_per_device, peak_source = peak_flops(device, cfg.torch_backend.peak_tflops)
    if device == "cpu" and d.world_size > 1:
        # Processes share this machine's cores: the peak is what they reach together (measured concurrently).
        peak_total = parallel.reduce_mean(torch.tensor(peak_per_device), d) * d.world_size
    else:
        peak_total = peak_per_device * d.world_size
    max_steps = min(cfg.trainer.max_steps, COMPILE_MODE_STEPS) if mode == "compile" else cfg.trainer.max_steps
    writer = MetricsWriter(run_dir, enabled=d.is_main and mode == "train")
    cache_before = _inductor_cache_files()
    if d.is_main and echo:
        print(
            f"torch backend: {n_params / 1e6:.1f}M params | tp {d.tp} x dp {d.dp} on {device} | "
            f"global batch {rc.global_batch_size} x seq {rc.seq_len} (micro {rc.micro_batch_size}, "
            f"accum {rc.grad_accum_steps}) | {fpt / 1e6:.1f} MFLOP/token | peak {peak_total / 1e12:.2f} "
            f"TFLOP/s ({peak_source}) | compile {cfg.torch_backend.compile}",
            flush=True,
        )

    result = TrainResult(peak_flops=peak_total, peak_source=peak_source, flops_per_token=fpt, num_params=n_params)
    tokens_per_step = rc.global_batch_size * rc.seq_len
    model.train()
    for step in range(max_steps):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(rc.grad_accum_steps):
            tokens, targets = batches.get(step, micro)
            parallel.set_grad_sync(model, micro == rc.grad_accum_steps - 1)
            with parallel.loss_context(d):
                with _autocast(device, cfg.precision.type):
                    logits = model(tokens)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX)
                (loss / rc.grad_accum_steps).backward()
            loss_sum += loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach()  # type: ignore[attr-defined]
        grad_norm = parallel.clip_grad_norm(model, cfg.trainer.gradient_clip_val)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_loss = parallel.reduce_mean(loss_sum / rc.grad_accum_steps, d)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        m = StepMetrics(
            step=step + 1,
            loss=step_loss,
            grad_norm=grad_norm,
            lr=lr,
            tokens_per_s=tps,
            mfu=tps * fpt / peak_total,
            memory_gib=memory_bytes(device) / 2**30,
            step_time_s=dt,
        )
        result.losses.append(step_loss)
        result.history.append(m)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}")
        if (step + 1) % cfg.trainer.log_every_n_steps == 0 or step + 1 == max_steps:
            writer.log(m, max_steps, echo=echo)
    writer.close()
    result.wall_s = time.perf_counter() - started

    if d.is_main and echo:
        cache_after = _inductor_cache_files()
        print(
            f"summary: {max_steps} steps in {result.wall_s:.1f} s | loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f} | {result.steady('tokens_per_s'):,.0f} tok/s | "
            f"MFU {100 * result.steady('mfu'):.1f}% of {peak_total / 1e12:.2f} TFLOP/s | "
            f"peak mem {max(m.memory_gib for m in result.history):.2f} GiB | "
            f"inductor cache files {cache_before} -> {cache_after}",
            flush=True,
        )
    return result


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama3_hyperpod.torch_backend.train", description=__doc__)
    p.add_argument("--config", required=True, help="NxDT-format YAML")
    p.add_argument("--run-dir", required=True, type=Path, help="metrics.jsonl and TensorBoard events go here")
    p.add_argument("--mode", choices=("train", "compile"), default="train")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="key.path=value (hydra style)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        rc = load_config(args.config, args.overrides)
        train(rc, args.run_dir, mode=args.mode, device=args.device)
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
