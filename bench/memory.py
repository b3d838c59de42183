"""The plan's memory estimate per rank vs the true peak the trainer measured (ru_maxrss of each rank's process, the
largest rank's), for the tiny config at 1 rank, TP2 and DP2 and for the ~58M bench shape, each run as `train`
runs it (one process started directly; torchrun for two).

    python bench/memory.py [--steps 6] [--json]

Exits 1 when any run's measured peak is more than 20% away from the estimate (the trainer warns then too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import HF as BENCH_SHAPE  # noqa: E402
from tests.token_data import write_byte_text_dataset  # noqa: E402

SUMMARY = re.compile(r"peak mem ([\d.]+) GiB \((\w+)\) vs plan's estimate ([\d.]+) GiB \(([-+]\d+)%\)")
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def run_train(work: Path, name: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """`entrypoint.py train` for real; the trainer's summary line carries both figures."""
    argv = [sys.executable, str(ROOT / "entrypoint.py"), "train", str(TINY), "--backend", "torch-cpu",
            "--output-dir", str(work), "--run-name", name, f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    match = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        sys.exit(f"{name}: train failed ({proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    measured, source, estimate, diff = float(match[1]), match[2], float(match[3]), int(match[4])
    return {"run": name, "measured_gib": measured, "source": source, "estimate_gib": estimate, "diff_pct": diff,
            "warned": "the estimate is off by more than 20%" in proc.stderr}


def runs(work: Path, steps: int) -> list[dict[str, Any]]:
    data256 = work / "data256"
    write_byte_text_dataset(data256, seq_len=256, max_bytes=256 * 16 * (steps + 2))
    bench_model = work / "bench_model.json"
    bench_model.write_text(json.dumps(BENCH_SHAPE))
    data512 = work / "data512"
    write_byte_text_dataset(data512, seq_len=512, max_bytes=512 * 4 * (steps + 2))
    tiny = [f"data.train_dir={data256}"]
    return [
        run_train(work, "tiny-1rank", tiny, steps),
        run_train(work, "tiny-tp2", [*tiny, "trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2"],
                  steps),
        run_train(work, "tiny-dp2", [*tiny, "trainer.devices=2", "data.global_batch_size=16"], steps),
        run_train(work, "58M-1rank", [f"data.train_dir={data512}", f"model.model_config={bench_model}",
                                      "model.encoder_seq_length=512", "data.micro_batch_size=4",
                                      "data.global_batch_size=4"], steps),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        results = runs(Path(tmp), args.steps)
    for r in results:
        print(f"{r['run']:<11} estimate {r['estimate_gib']:.2f} GiB | measured peak {r['measured_gib']:.2f} GiB "
              f"({r['source']}, largest rank) | {r['diff_pct']:+d}%{'  WARNED' if r['warned'] else ''}")
    if args.json:
        print(json.dumps(results))
    return 0 if all(abs(r["diff_pct"]) <= 20 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
