"""Per-step training metrics: loss, grad norm, lr, tokens/s, MFU against a stated peak, memory.

FLOPs per token follow the PaLM convention: 6 * N (non-embedding parameters, output layer included) for the
matmuls forward + backward, plus 12 * layers * hidden * seq for attention scores and values.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.fsutil import PathError, link_message, open_append, write_text
from llama3_hyperpod.torch_backend.rundir import METRICS, TENSORBOARD

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


PEAK_CACHE_ENV = "L3HP_GEMM_PEAK_FILE"  # set by the plan: <compile cache dir>/gemm-peak.json


def _cpu_key() -> str:
    """What the fp32 GEMM rate depends on: the CPU model, the CPUs this process may use, torch's threads and build."""
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} | {usable} cpus | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cached_cpu_gemm_flops(cache_file: Path | None) -> tuple[float, str]:
    """The measured GEMM rate, from `cache_file` when it holds one for this CPU, else measured (~1 s) and stored.

    Measuring it before every start is a fixed cost of every (warm) start; the compile cache dir is where a run of
    the same machine type finds it again (`compile` measures it, the baked cache carries it)."""
    key = _cpu_key()
    label = f"measured fp32 GEMM (torch.mm 2048^2, {torch.get_num_threads()} threads)"
    if cache_file is not None:
        try:
            known = json.loads(cache_file.read_text())
            value = float(known[key]) if isinstance(known, dict) and key in known else 0.0
        except (OSError, ValueError, TypeError):
            value = 0.0
        if value > 0:
            return value, f"{label}, cached in {cache_file.name}"
    value = measure_cpu_gemm_flops()
    if cache_file is not None:
        try:
            known = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
            known = known if isinstance(known, dict) else {}
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text(cache_file, json.dumps({**known, key: value}, indent=1) + "\n")
        except (OSError, ValueError, PathError):
            pass  # a read-only or odd cache dir: measured every time, as before
    return value, label


def forget_outrun_peak(best_mfu: float, peak_source: str) -> str | None:
    """A step that ran above 100% of a cached GEMM peak proves that peak was measured on a busy machine (a GEMM
    measured under load only errs low): drop this CPU's entry so the next start measures again, and say so.

    Without this, one measurement taken while something else ran would make every later run's MFU too high, since
    the entry is kept (and baked into images) for the machine type. Returns the warning, or None when all is well."""
    cache = os.environ.get(PEAK_CACHE_ENV)
    if best_mfu <= 1.0 or not cache or "cached in" not in peak_source:
        return None
    cache_file, key = Path(cache), _cpu_key()
    try:
        known = json.loads(cache_file.read_text())
        if isinstance(known, dict) and key in known:
            del known[key]
            write_text(cache_file, json.dumps(known, indent=1) + "\n")  # a new file: a hard-linked seed is untouched
        dropped = "dropped, the next start measures it again"
    except (OSError, ValueError, PathError) as e:
        dropped = f"could not be dropped ({e}): delete the file"
    return (f"a step ran at {best_mfu:.0%} of the GEMM peak cached in {cache_file}, so that peak was measured on a "
            f"busy machine and this run's MFU figures are too high; its entry was {dropped} (or set "
            "torch_backend.peak_tflops)")


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
    cache = os.environ.get(PEAK_CACHE_ENV)
    return cached_cpu_gemm_flops(Path(cache) if cache else None)


def memory_bytes(device: str) -> int:
    """The true peak so far: the allocator's peak on CUDA, the process's maximum resident set on CPU (ru_maxrss:
    what the kernel saw at the worst moment, the backward's included, not a sample taken between steps)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


MEMORY_TOLERANCE = 0.2


def memory_verdict(measured: int, estimated: int, source: str, *, first_step: bool = False) -> tuple[str, bool]:
    """('peak 1.02 GiB (ru_maxrss) vs plan's estimate 0.95 GiB (+7%)', within MEMORY_TOLERANCE); `first_step`: the
    estimate is the plan's for a fresh run's first step (memory.MemoryEstimate.first_step), and the text says so."""
    diff = measured / estimated - 1 if estimated else float("inf")
    which = "first-step estimate" if first_step else "estimate"
    text = (f"peak mem {measured / 2**30:.2f} GiB ({source}) vs plan's {which} {estimated / 2**30:.2f} GiB "
            f"({diff:+.0%})")
    return text, abs(diff) <= MEMORY_TOLERANCE


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
        self._jsonl: Any = None
        self._tb: Any = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if (run_dir / TENSORBOARD).is_symlink():
                raise PathError(str(run_dir / TENSORBOARD), link_message())
            if resume_step is not None:
                _truncate_after(run_dir / METRICS, resume_step)
            self._jsonl = open_append(run_dir / METRICS)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step else None
                self._tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD), purge_step=purge)

    def log(self, m: StepMetrics, max_steps: int, *, echo: bool = True) -> None:
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


def _record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a record, or None when it is not one (a line cut short by a crash, garbage)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return None
    return record


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (none when a run starts over from step 0); lines that are not records
    (the last line of a run killed while writing it) are dropped, and said so."""
    if path.is_symlink():
        raise PathError(str(path), link_message())
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = [(line, _record(line)) for line in lines if line.strip()]
    broken = sum(1 for _, r in records if r is None)
    kept = [line for line, r in records if r is not None and r["step"] <= step]
    if broken:
        print(f"metrics: dropped {broken} unreadable line(s) of {path} (a run killed while writing?)",
              file=sys.stderr, flush=True)
    if len(kept) != len(lines):
        write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The step records of metrics.jsonl (lines that are not records are skipped); ConfigError when there is
    no metrics file or no record in it."""
    path = run_dir / METRICS
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise ConfigError(str(run_dir), f"has no {METRICS} (not a torch-backend run folder?)") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror})") from None
    rows = [r for line in text.splitlines() if line.strip() and (r := _record(line)) is not None]
    rows = [r for r in rows if all(isinstance(r.get(k), int | float) for k in ("loss", "lr", "tokens_per_s"))]
    if not rows:
        raise ConfigError(str(path), "holds no step records yet (the run has not logged a step)")
    return rows
