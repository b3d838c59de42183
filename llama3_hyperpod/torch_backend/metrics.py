"""Per-step training metrics: loss, grad norm, lr, tokens/s, MFU against a stated peak, memory.

FLOPs per token follow the PaLM convention: 6 * N (non-embedding parameters, output layer included) for the
matmuls forward + backward, plus 12 * layers * hidden * seq for attention scores and values.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (no sparsity), by substring of torch.cuda.get_device_name().
_CUDA_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,
}


def flops_per_token(*, non_embedding_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * num_layers * hidden_size * seq_len


def measure_cpu_gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    """This process's fp32 GEMM FLOP/s with its torch thread count: best of a few large square torch.mm."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up (thread pool, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(device: str, configured_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s of one device, where the number comes from) for the MFU denominator."""
    if configured_tflops:
        return configured_tflops * 1e12, "torch_backend.peak_tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in _CUDA_BF16_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} dense bf16 peak"
        return float("nan"), f"{name}: unknown peak, set torch_backend.peak_tflops"
    return measure_cpu_gemm_flops(), f"measured fp32 GEMM (torch.mm 2048^2, {torch.get_num_threads()} threads)"


def memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    mfu: float
    memory_gib: float
    step_time_s: float

    def line(self, max_steps: int) -> str:
        return (
            f"step {self.step:>5}/{max_steps} | loss {self.loss:.4f} | gnorm {self.grad_norm:.3f} | lr {self.lr:.2e} "
            f"| {self.tokens_per_s:,.0f} tok/s | MFU {100 * self.mfu:.1f}% | mem {self.memory_gib:.2f} GiB "
            f"| {self.step_time_s:.3f} s"
        )


class MetricsWriter:
    """metrics.jsonl + TensorBoard events in the run dir, one console line per logged step (main rank only)."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        """resume_step: the run continues after this step, so later records (steps redone after the checkpoint)
        are dropped and metrics.jsonl / TensorBoard hold every step exactly once."""
        self.enabled = enabled
        self.history: list[StepMetrics] = []
        self._jsonl: Any = None
        self._tb: Any = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                _truncate_after(run_dir / "metrics.jsonl", resume_step)
            self._jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step else None
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, m: StepMetrics, max_steps: int, *, echo: bool = True) -> None:
        self.history.append(m)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(asdict(m)) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in asdict(m).items():
                if key != "step":
                    self._tb.add_scalar(f"train/{key}", value, m.step)
        if echo:
            print(m.line(max_steps), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (none when a run starts over from step 0)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
