"""How long `entrypoint.py preflight` takes on the torch backend, against a bare `plan` of the same config (both
measured here, same run, alternating).

A job pays the whole preflight process once per node (its srun step starts a fresh interpreter, plans, checks), so
that wall time is what preflight adds to a job; the ratio to `plan` shows what the checks cost beyond planning.
Prints medians, the ratio, the checks' own time (from the report) and whether the 5 s target holds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 5.0
RUNS = 7
CONFIG = "configs/tiny_cpu.yaml"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:4])} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return seconds, done.stdout


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="l3hp-preflight-bench-") as tmp:
        env = {**os.environ, "L3HP_CACHE_DIR": f"{tmp}/cache"}
        common = [CONFIG, "--backend", "torch-cpu", "--output-dir", f"{tmp}/runs"]
        plan_argv = [sys.executable, "entrypoint.py", "plan", *common, "--json"]
        preflight_argv = [sys.executable, "entrypoint.py", "preflight", *common, "--json"]
        plans, preflights, checks = [], [], []
        for _ in range(RUNS):
            plans.append(timed(plan_argv, env)[0])
            seconds, out = timed(preflight_argv, env)
            preflights.append(seconds)
            checks.append(json.loads(out)["seconds"])
    plan_s, pre_s, check_s = map(statistics.median, (plans, preflights, checks))
    verdict = "within" if pre_s < TARGET_S else "OVER"
    print(f"plan {CONFIG} (torch-cpu): {plan_s:.2f} s median of {RUNS}")
    print(f"preflight {CONFIG} (torch-cpu, train): {pre_s:.2f} s median of {RUNS} = {pre_s / plan_s:.2f}x a bare "
          f"plan; the checks themselves {check_s:.2f} s (min {min(checks):.2f}, max {max(checks):.2f})")
    print(f"preflight adds {pre_s:.2f} s to a job step on this node: {verdict} the {TARGET_S:.0f} s target")
    return 0 if pre_s < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
