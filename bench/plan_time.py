"""How long `entrypoint.py plan` takes, as a multiple of a bare Python start (both measured here, same run).

Prints the median wall time of `plan` for the 8B neuron config and the tiny CPU config, the ratio to
`python -c pass`, and whether the 2-second budget holds.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 2.0
RUNS = 5


def median_seconds(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    bare = median_seconds([sys.executable, "-c", "pass"])
    worst = 0.0
    for config, backend in (("configs/llama3_8b_trn1.yaml", "neuron"), ("configs/tiny_cpu.yaml", "torch-cpu")):
        seconds = median_seconds([sys.executable, "entrypoint.py", "plan", config, "--backend", backend, "--json"])
        worst = max(worst, seconds)
        print(f"plan {config} ({backend}): {seconds:.3f} s median of {RUNS} = {seconds / bare:.1f}x a bare "
              f"python start ({bare:.3f} s)")
    verdict = "within" if worst < BUDGET_S else "OVER"
    print(f"slowest plan {worst:.3f} s: {verdict} the {BUDGET_S:.0f} s budget ({worst / BUDGET_S:.0%} of it)")
    return 0 if worst < BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
