"""The torch backend's training loop (`train`: build, then train_step after train_step), plus its command line.

    python -m llama3_hyperpod.torch_backend.train --config X.yaml --run-dir D --mode train|compile \
        --device cpu|cuda [key.path=value ...]

Run under torchrun for TP/DP; one process needs no process group. `--mode compile` runs a few steps so
torch.compile fills TORCHINDUCTOR_CACHE_DIR, then exits 0.

Checkpoints (checkpoint.py) go to <run-dir>/checkpoints every exp_manager.checkpoint_callback_params
.every_n_train_steps steps and at the end; a run resumes by itself from the newest complete one. SIGTERM or
SIGUSR1 make every rank checkpoint at the next step boundary; each node then writes <run-dir>/.requeue-node<N> and all
exit 85 (llama3_hyperpod.errors), which the launcher and enroot/job.sh turn into a requeue. SIGINT / SIGHUP
checkpoint the same way and exit 130 / 129. Rank 0 owns the run dir (runlock.py) for the whole run.

Over 400 lines: build, step and finish of one run read best together; the save/stop decision is in
step_boundary.py.
"""

from __future__ import annotations

import os
import signal

from llama3_hyperpod.torch_backend import signals, startup

if __name__ == "__main__":
    startup.hold_gc()  # until the first step (startup.py)
    # Before torch's import (seconds): stop signals are recorded from here on, and under torchrun this worker dies
    # with torchrun (procs.py) instead of training on alone.
    EARLY_STOP: signals.StopRequest | None = signals.install_early()
    if "LOCAL_RANK" in os.environ:
        from llama3_hyperpod.procs import die_with_parent

        die_with_parent(signal.SIGKILL)
else:
    EARLY_STOP = None

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from llama3_hyperpod import runlock
from llama3_hyperpod.checkpoint_policy import CheckpointPolicy
from llama3_hyperpod.config import ConfigError, RunConfig, load_config
from llama3_hyperpod.errors import requeue_marker
from llama3_hyperpod.fsutil import write_text
from llama3_hyperpod.memory import estimate_memory
from llama3_hyperpod.torch_backend import parallel, vec_isa
from llama3_hyperpod.torch_backend.checkpoint import Checkpointer, CheckpointError, stderr_log
from llama3_hyperpod.torch_backend.data import Batches, load_train_dataset
from llama3_hyperpod.torch_backend.metrics import (
    MetricsWriter,
    StepMetrics,
    flops_per_token,
    forget_outrun_peak,
    memory_bytes,
    memory_verdict,
    peak_flops,
)
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs, num_params
from llama3_hyperpod.torch_backend.rundir import refuse_links_in
from llama3_hyperpod.torch_backend.schedule import build_scheduler
from llama3_hyperpod.torch_backend.signals import StopRequest, exit_code
from llama3_hyperpod.torch_backend.step_boundary import StepBoundary

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
    start_step: int = 0  # > 0 when the run resumed from a checkpoint
    stop_signal: int = 0  # stopped on this signal after checkpointing (0: ran to the end)
    checkpoint_stall_s: list[float] = field(default_factory=list)  # time each save blocked the loop
    peak_memory: int = 0  # bytes, the largest rank's true peak (ru_maxrss on CPU, the allocator's peak on CUDA)
    memory_estimate: int = 0  # bytes per rank, the plan's estimate (llama3_hyperpod.memory)

    @property
    def requeue(self) -> bool:
        """Stopped on SIGTERM / SIGUSR1 after checkpointing: exit 85 so the job is requeued."""
        return self.stop_signal in signals.REQUEUE_SIGNALS

    @property
    def exit_code(self) -> int:
        return exit_code(self.stop_signal) if self.stop_signal else 0

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

    The fused kernel (one pass over each tensor): about 7x faster than foreach for a 58M model on CPU (20 vs
    136 ms per step, bench/train_throughput.py's shape). DTensor and plain parameters (TP without sequence parallel
    keeps norms plain) go in separate groups, because the multi-tensor kernels cannot mix them.
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
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)


def _inductor_cache_files() -> int:
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache or not Path(cache).is_dir():
        return 0
    return sum(1 for p in Path(cache).rglob("*") if p.is_file())


def _compile_cache_counters() -> str:
    """Inductor's own hit/miss counts for this process: the evidence that a (baked) cache was used."""
    from torch._dynamo.utils import counters

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    probes = vec_isa.installed()
    return (f"compile cache: fx graph hit {inductor['fxgraph_cache_hit']} miss {inductor['fxgraph_cache_miss']}, "
            f"aot autograd hit {aot['autograd_cache_hit']} miss {aot['autograd_cache_miss']}"
            + (f", vec-isa probes run {probes.probed} remembered {probes.remembered}" if probes else ""))


def _checkpointer(rc: RunConfig, policy: CheckpointPolicy, run_dir: Path, d: parallel.Dist,
                  echo: bool) -> Checkpointer | None:
    """None when the config turns checkpoints off (create_checkpoint_callback false or save_top_k 0)."""
    if not policy.enabled:
        return None
    return Checkpointer(
        run_dir,
        rank=d.rank,
        world_size=d.world_size,
        keep=policy.keep,
        async_save=policy.async_save,
        hf_config=dict(rc.model.hf_config),
        layout={"tp": d.tp, "dp": d.dp},
        log=stderr_log if echo else (lambda _m: None),
    )


def train(rc: RunConfig, run_dir: Path, *, mode: str = "train", device: str = "cpu", echo: bool = True,
          stop: StopRequest | None = None) -> TrainResult:
    """Build model, data and optimizer from the config, resume, and run the loop; returns every step's metrics.

    `stop`: handlers installed earlier by the caller (main's, before torch was imported); else installed here.
    """
    if stop is not None:
        return _owned(rc, run_dir, stop, mode=mode, device=device, echo=echo)
    with StopRequest(announce=echo) as own:
        return _owned(rc, run_dir, own, mode=mode, device=device, echo=echo)


def _owned(rc: RunConfig, run_dir: Path, stop: StopRequest, *, mode: str, device: str, echo: bool) -> TrainResult:
    """Rank 0 of a training run owns the run dir for the run's life (held by its launcher, or taken here)."""
    lock = None
    try:
        if mode == "train" and int(os.environ.get("RANK", "0")) == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = runlock.hold_or_inherit(run_dir, purpose="train")
            refuse_links_in(run_dir)
        return _train(rc, run_dir, stop, mode=mode, device=device, echo=echo)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Built:
    """What build makes: where this rank sits, the sharded model, its optimizer and schedule, this rank's batches."""

    d: parallel.Dist
    model: Llama
    optimizer: torch.optim.AdamW
    scheduler: LambdaLR
    batches: Batches
    n_params: int
    fpt: float  # training FLOPs per token


def _build(rc: RunConfig, device: str) -> _Built:
    """Check the layout, join the process group, and build model (identical init on every rank), optimizer, data."""
    cfg, layout = rc.cfg, rc.layout
    parallel.check_layout(layout, rc.model.num_key_value_heads)
    dataset = load_train_dataset(cfg.data.train_dir, rc.seq_len)
    d = parallel.init_distributed(layout, device)
    torch.manual_seed(cfg.seed)

    model = Llama(LlamaArgs.from_hf(rc.model.hf_config))
    model.init_weights(seed=cfg.seed)  # its own generator: the same weights on every rank, then sharded
    model.set_activation_checkpointing(cfg.model.activations_checkpoint_granularity)
    model.to(device)
    n_params = num_params(model)
    fpt = flops_per_token(
        non_embedding_params=num_params(model, exclude_embedding=True),
        num_layers=rc.model.num_layers,
        hidden_size=rc.model.hidden_size,
        seq_len=rc.seq_len,
    )
    if cfg.torch_backend.compile:
        startup.defer_kernel_templates()  # before torch.compile imports Inductor's templates
    if cfg.torch_backend.compile and device == "cpu":
        vec_isa.remember_probes()  # before a compiled kernel loads: a warm start skips Inductor's ISA probes
    parallel.parallelize(model, d.mesh, layout, compile=cfg.torch_backend.compile)

    optimizer = _optimizer(model, rc)
    sched = cfg.model.optim.sched
    scheduler = build_scheduler(
        optimizer,
        sched.name,
        lr=cfg.model.optim.lr,
        warmup_steps=sched.warmup_steps,
        max_steps=cfg.trainer.max_steps,  # NxDT replaces sched.max_steps with it (model/base.py:311)
        min_lr=sched.min_lr,
        constant_steps=sched.constant_steps,
    )
    batches = Batches(dataset, rc.seq_len, rc.micro_batch_size, d.dp, d.dp_rank, rc.grad_accum_steps, device,
                      shuffle_seed=cfg.seed if cfg.torch_backend.shuffle else None)
    return _Built(d, model, optimizer, scheduler, batches, n_params, fpt)


def _resume(rc: RunConfig, policy: CheckpointPolicy, b: _Built, ckpt: Checkpointer | None) -> int:
    """Load the newest complete checkpoint when the config asks for it; returns the step the run starts after."""
    em = rc.cfg.exp_manager
    if ckpt is None or not policy.resumes:
        return 0
    restored = ckpt.resume(b.model, b.optimizer, b.scheduler, explicit=em.resume_from_checkpoint)
    if restored is not None:
        b.batches.row_offset = restored.consumed_samples - restored.step * rc.global_batch_size
        return restored.step
    if not em.resume_ignore_no_checkpoint:
        raise ConfigError("exp_manager.resume_ignore_no_checkpoint",
                          f"is false and {ckpt.root} holds no complete checkpoint to resume from")
    return 0


def _peak_total(device: str, d: parallel.Dist, peak_tflops: float | None) -> tuple[float, str]:
    """All ranks' peak FLOP/s together, and where the per-device figure came from."""
    peak_per_device, peak_source = peak_flops(device, peak_tflops)
    if device == "cpu" and d.world_size > 1:
        # Processes share this machine's cores: the peak is what they reach together (measured concurrently).
        return parallel.reduce_mean(torch.tensor(peak_per_device), d) * d.world_size, peak_source
    return peak_per_device * d.world_size, peak_source


def forward_backward_step(b: _Built, rc: RunConfig, step: int, micro: int, device: str) -> torch.Tensor:
    """One micro-batch: forward, loss, backward (grads summed over micro-batches); returns the detached loss."""
    tokens, targets = b.batches.get(step, micro)
    parallel.set_grad_sync(b.model, micro == rc.grad_accum_steps - 1)
    with parallel.loss_context(b.d):
        with _autocast(device, rc.cfg.precision.type):
            loss = b.model(tokens, targets)  # mean cross-entropy over the non-ignored targets, fp32
        (loss / rc.grad_accum_steps).backward()
    return loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach()  # type: ignore[attr-defined]


def train_step(b: _Built, rc: RunConfig, step: int, device: str, peak_total: float) -> StepMetrics:
    """One optimizer step over grad_accum_steps micro-batches: loss, backward, clip, step; its metrics."""
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for micro in range(rc.grad_accum_steps):
        loss_sum += forward_backward_step(b, rc, step, micro, device)
    grad_norm = parallel.clip_grad_norm(b.model, rc.cfg.trainer.gradient_clip_val)
    lr = b.optimizer.param_groups[0]["lr"]
    b.optimizer.step()
    b.scheduler.step()
    b.optimizer.zero_grad(set_to_none=True)

    step_loss = parallel.reduce_mean(loss_sum / rc.grad_accum_steps, b.d)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = rc.global_batch_size * rc.seq_len / dt
    return StepMetrics(
        step=step + 1,
        loss=step_loss,
        grad_norm=grad_norm,
        lr=lr,
        tokens_per_s=tps,
        mfu=tps * b.fpt / peak_total,
        memory_gib=memory_bytes(device) / 2**30,
        step_time_s=dt,
    )


def _train(rc: RunConfig, run_dir: Path, stop: StopRequest, *, mode: str, device: str, echo: bool) -> TrainResult:
    """Build, resume, then train_step after train_step; after each, the step boundary decides on save and stop."""
    cfg = rc.cfg
    started = time.perf_counter()
    b = _build(rc, device)
    d = b.d
    policy = CheckpointPolicy.from_config(rc)
    ckpt = _checkpointer(rc, policy, run_dir, d, echo) if mode == "train" else None
    start_step = _resume(rc, policy, b, ckpt)
    peak_total, peak_source = _peak_total(device, d, cfg.torch_backend.peak_tflops)
    max_steps = min(cfg.trainer.max_steps, COMPILE_MODE_STEPS) if mode == "compile" else cfg.trainer.max_steps
    writer = MetricsWriter(run_dir, enabled=d.is_main and mode == "train", resume_step=start_step)
    cache_before = _inductor_cache_files()
    if d.is_main and echo:
        print(
            f"torch backend: {b.n_params / 1e6:.1f}M params | tp {d.tp} x dp {d.dp} on {device} | "
            f"global batch {rc.global_batch_size} x seq {rc.seq_len} (micro {rc.micro_batch_size}, "
            f"accum {rc.grad_accum_steps}) | {b.fpt / 1e6:.1f} MFLOP/token | peak {peak_total / 1e12:.2f} "
            f"TFLOP/s ({peak_source}) | compile {cfg.torch_backend.compile}",
            flush=True,
        )

    def save_state(c: Checkpointer, done: int) -> None:
        c.save(done, b.model, b.optimizer, b.scheduler, b.batches.row_offset + done * rc.global_batch_size)

    boundary = StepBoundary(ckpt, save_state, policy.save_every, max_steps, stop, d, device)
    result = TrainResult(peak_flops=peak_total, peak_source=peak_source, flops_per_token=b.fpt,
                         num_params=b.n_params, start_step=start_step, checkpoint_stall_s=boundary.stall_s)
    try:
        b.model.train()
        startup.release_gc()
        for step in range(start_step, max_steps):
            m = train_step(b, rc, step, device, peak_total)
            result.losses.append(m.loss)
            result.history.append(m)
            if not math.isfinite(m.loss):
                raise FloatingPointError(f"loss is {m.loss} at step {step + 1}")
            if (step + 1) % cfg.trainer.log_every_n_steps == 0 or step + 1 == max_steps:
                writer.log(m, max_steps, echo=echo)
            result.stop_signal = boundary.after_step(step + 1)
            if result.stop_signal:
                break
        if not result.stop_signal:
            boundary.at_end(start_step)
    finally:
        writer.close()  # also on a failed save: frees the files (a full disk can then be unmounted)
    result.wall_s = time.perf_counter() - started
    _finish(rc, result, run_dir, d, device, echo=echo, max_steps=max_steps, cache_before=cache_before)
    return result


def _finish(rc: RunConfig, result: TrainResult, run_dir: Path, d: parallel.Dist, device: str, *, echo: bool,
            max_steps: int, cache_before: int) -> None:
    """After the loop: peak memory against the estimate, then the requeue marker and stop line, or the summary."""
    result.peak_memory = _max_over_ranks(memory_bytes(device), d, device)
    estimate = estimate_memory(rc, "torch", device, None)
    # A fresh run that stopped after one step never reached the steady peak (memory.MemoryEstimate.first_step).
    first_step = result.start_step == 0 and len(result.losses) == 1
    result.memory_estimate = estimate.first_step if first_step else estimate.total
    memory_line, memory_ok = memory_verdict(result.peak_memory, result.memory_estimate,
                                            "allocator" if device == "cuda" else "ru_maxrss", first_step=first_step)
    if d.is_main and echo and not memory_ok:
        stderr_log(f"train: warning: {memory_line}: the estimate is off by more than 20% (llama3_hyperpod/memory.py)")
    best_mfu = max((m.mfu for m in result.history), default=0.0)
    # Once per node (each node has its own cache dir); the main rank says so.
    stale_peak = forget_outrun_peak(best_mfu, result.peak_source) if os.environ.get("LOCAL_RANK", "0") == "0" else None
    if d.is_main and stale_peak:
        stderr_log(f"train: warning: {stale_peak}")
    start_step = result.start_step
    if result.stop_signal:
        if result.requeue and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            # After the checkpoint is complete, once per node: its launcher turns the marker into exit 85 (torchrun
            # reports 1 for any failed worker). torchrun's GROUP_RANK is the node rank.
            marker = requeue_marker(run_dir, int(os.environ.get("GROUP_RANK", "0")))
            write_text(marker, f"{start_step + len(result.losses)}\n")
        if d.is_main:
            why = "for a requeue" if result.requeue else f"on {signal.Signals(result.stop_signal).name}"
            stderr_log(f"train: stopped after step {start_step + len(result.losses)} {why} (exit {result.exit_code})")
        return

    if d.is_main and echo and not result.losses:
        print(f"summary: nothing to do, the run resumed at step {start_step} of {max_steps}", flush=True)
    elif d.is_main and echo:
        cache_after = _inductor_cache_files()
        print(
            f"summary: steps {start_step + 1}-{max_steps} in {result.wall_s:.1f} s | loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f} | {result.steady('tokens_per_s'):,.0f} tok/s | "
            f"MFU {100 * result.steady('mfu'):.1f}% of {result.peak_flops / 1e12:.2f} TFLOP/s | "
            f"{memory_line} | "
            f"inductor cache files {cache_before} -> {cache_after}"
            + (f" | {_compile_cache_counters()}" if rc.cfg.torch_backend.compile else ""),
            flush=True,
        )


def _max_over_ranks(value: int, d: parallel.Dist, device: str) -> int:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama3_hyperpod.torch_backend.train", description=__doc__)
    p.add_argument("--config", required=True, help="NxDT-format YAML")
    p.add_argument("--run-dir", required=True, type=Path, help="metrics.jsonl and TensorBoard events go here")
    p.add_argument("--mode", choices=("train", "compile"), default="train")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="key.path=value (hydra style)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, stop: StopRequest | None = None) -> int:
    args = _parse(argv)
    first = int(os.environ.get("RANK", "0")) == 0
    try:
        rc = load_config(args.config, args.overrides)
        result = train(rc, args.run_dir, mode=args.mode, device=args.device, stop=stop)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank is done with every collective before any tears down
    except ConfigError as exc:  # bad input, a run dir in use, another model's checkpoints, a link in the way
        if first:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        if first:
            print(f"error: checkpoint: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the environment: a full or read-only disk, a vanished mount
        if first:
            print(f"error: {exc.filename or 'train'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            gc.collect()  # the model, optimizer and the collective work they hold go while the process group lives
            torch.distributed.destroy_process_group()
    return result.exit_code


if __name__ == "__main__":
    code = main(stop=EARLY_STOP)
    # Leave without interpreter finalization: gloo's worker threads may still hold tensors then, and freeing them
    # while the interpreter is torn down aborts the process ("terminate called without an active exception"; seen
    # here once after a complete 2-rank run, which torchrun then reported as failed). All output is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
