"""What every bench here shares: interleaved rounds, the machine's load during each, medians and spreads, and the
rules for what may be printed as a figure.

This machine is 2 cores shared with other work. A figure is trusted only when it survives that:
- every variant runs once per round, in a rotated order, so slow drifts of the load hit all of them alike;
- each slice of a round records how much CPU this process (and its children) got and how much everything else on
  the machine used (/proc/stat), so a bench can say how busy the machine was, and when it was too busy;
- figures are medians over rounds with their spread (interquartile range relative to the median) and range; a
  ratio is taken per round (both sides measured minutes apart at most) and printed only when its per-round values
  agree within `max_spread`; an MFU above 100% (a GEMM peak measured while the machine was busy) is never printed.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY_CORES = 0.5  # a slice in which other processes used more than this many cores on average is disturbed


def _machine_busy_s() -> float:
    """CPU seconds all processes have spent (user, nice, system, irq, softirq, steal) since boot."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Load:
    """What the machine did during one measured slice."""

    wall_s: float = 0.0
    own_cpu_s: float = 0.0
    others_cores: float = 0.0  # average cores used by every other process during the slice
    loadavg: float = 0.0  # 1-minute load average at the end

    @property
    def disturbed(self) -> bool:
        return self.others_cores > BUSY_CORES

    def line(self) -> str:
        return f"others {self.others_cores:.2f} cores, load avg {self.loadavg:.1f}"


@contextmanager
def measured() -> Iterator[Load]:
    """with measured() as load: ...  -> load filled in on exit."""
    load = Load()
    wall0, busy0, own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
    try:
        yield load
    finally:
        load.wall_s = time.perf_counter() - wall0
        load.own_cpu_s = _own_cpu_s() - own0
        busy = _machine_busy_s() - busy0
        load.others_cores = max(0.0, busy - load.own_cpu_s) / max(load.wall_s, 1e-9)
        load.loadavg = os.getloadavg()[0]


@dataclass
class Stat:
    """Median and spread of one figure over rounds."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def quartiles(self) -> tuple[float, float]:
        """(25th, 75th percentile); with fewer than 4 values, (min, max)."""
        if len(self.values) < 4:
            return (min(self.values), max(self.values)) if self.values else (float("nan"), float("nan"))
        q = statistics.quantiles(self.values, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """How much the rounds disagree: the interquartile range relative to the median (one round disturbed by
        another process moves the extremes, not the quartiles)."""
        if len(self.values) < 2 or not self.median:
            return 0.0
        lo, hi = self.quartiles
        return (hi - lo) / abs(self.median)

    def text(self, fmt: str = "{:.3f}", unit: str = "") -> str:
        if not self.values:
            return "n/a"
        lo, hi = self.quartiles
        return (f"{fmt.format(self.median)}{unit} [quartiles {fmt.format(lo)}-{fmt.format(hi)}, spread "
                f"{self.spread:.0%}; range {fmt.format(min(self.values))}-{fmt.format(max(self.values))}]")


@dataclass
class Rounds:
    """Values per variant per round, with the load of each slice."""

    variants: Sequence[str]
    values: dict[str, list[float]] = field(default_factory=dict)
    loads: dict[str, list[Load]] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)  # per-round figures that are not a variant's

    def add(self, variant: str, value: float, load: Load) -> None:
        self.values.setdefault(variant, []).append(value)
        self.loads.setdefault(variant, []).append(load)

    def stat(self, variant: str, *, clean_only: bool = False) -> Stat:
        pairs = zip(self.values.get(variant, []), self.loads.get(variant, []), strict=True)
        return Stat([v for v, load in pairs if not (clean_only and load.disturbed)])

    def ratio(self, num: str, den: str) -> Stat:
        """Per-round num/den (e.g. the baseline's seconds / ours: a speed-up)."""
        return Stat([a / b for a, b in zip(self.values.get(num, []), self.values.get(den, []), strict=False) if b])

    def n_rounds(self) -> int:
        return min((len(v) for v in self.values.values()), default=0)

    def disturbed_rounds(self) -> int:
        measured = [v for v in self.variants if v in self.loads]
        return sum(1 for i in range(self.n_rounds()) if any(self.loads[v][i].disturbed for v in measured))

    def load_summary(self) -> str:
        every = [load for loads in self.loads.values() for load in loads]
        if not every:
            return "no slices measured"
        others = Stat([load.others_cores for load in every])
        avg = Stat([load.loadavg for load in every])
        return (f"other processes used {others.text('{:.2f}')} cores (a slice above {BUSY_CORES} counts as "
                f"disturbed: {self.disturbed_rounds()} of {self.n_rounds()} rounds), load average "
                f"{avg.text('{:.1f}')}")


def rotated(variants: Sequence[str], round_index: int) -> list[str]:
    """Round r starts with variant r mod n, so no variant always runs first (or right after the same one)."""
    k = round_index % len(variants)
    return [*variants[k:], *variants[:k]]


def run_rounds(variants: Sequence[str], rounds: int, slice_fn: Callable[[str, int], float],
               between: Callable[[int], None] | None = None) -> Rounds:
    """slice_fn(variant, round) -> the figure of that slice; each call is measured for load."""
    result = Rounds(variants)
    for r in range(rounds):
        if between is not None:
            between(r)
        for variant in rotated(variants, r):
            with measured() as load:
                value = slice_fn(variant, r)
            result.add(variant, value, load)
    return result


def ratio_text(stat: Stat, max_spread: float, target: float | None = None) -> tuple[str, bool]:
    """(what to print for a ratio, whether it may be claimed): refused when its rounds disagree too much."""
    if not stat.values:
        return "n/a (not measured)", False
    if stat.spread > max_spread:
        lo, hi = stat.quartiles
        return (f"not measured: its rounds disagree by {stat.spread:.0%} (> {max_spread:.0%}) "
                f"[median {stat.median:.2f}x, quartiles {lo:.2f}-{hi:.2f}x]"), False
    verdict = ""
    if target is not None:
        lo, _ = stat.quartiles
        verdict = (f" (target >= {target:.2f}x: {'met' if stat.median >= target else 'NOT met'}"
                   f"{', by 3 rounds in 4' if lo >= target else ''})")
    return f"{stat.text('{:.2f}', 'x')}{verdict}", True


def mfu_text(mfus: Sequence[float]) -> str:
    """MFU median with spread; never a value above 100% (it would mean the peak was measured while disturbed)."""
    ok = [m for m in mfus if m <= 1.0]
    refused = len(mfus) - len(ok)
    if not ok:
        return "n/a (every round's GEMM peak was measured below the model's own rate: machine busy)"
    text = Stat([100 * m for m in ok]).text("{:.0f}", "%")
    return text + (f" ({refused} round(s) above 100% refused)" if refused else "")


def steady_heap() -> bool:
    """glibc malloc keeps freed blocks for reuse (mmap and trim thresholds at their maximum); False off glibc.

    Why, for benches that run several models in one process: by default glibc maps every allocation above its
    mmap threshold (128 KiB, raised with use up to 32 MiB) afresh and unmaps it on free, so a model whose step
    allocates large tensors (full logits: 262 MB at 2048 tokens x 32000 words) page-faults them in again every step,
    4 KiB at a time, and how much depends on what ran before in the process. Measured here (train_throughput.py,
    58M shape): torchtitan's model took 3.8, 3.3, then 2.6 s per step over its rounds (spread 25%); with this,
    2.43-2.48 s. Like OMP_WAIT_POLICY it is the same for every variant. The trainer does not set it: it keeps
    freed memory in the resident set (a TP2 run's peak rose 0.69 -> 0.85 GiB) for a 3-5% faster CPU step.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc: other allocators, other knobs
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold, most = -1, -3, 2**31 - 1  # malloc.h; mallopt takes an int
    return bool(libc.mallopt(m_mmap_threshold, most) == 1 and libc.mallopt(m_trim_threshold, most) == 1)


def environment() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
