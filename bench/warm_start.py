"""Time to the first training step in a fresh cpu-image container with the compile cache baked into the image, as a
fraction of the time without it (both measured in this one run), with Inductor's hit counters as evidence.

1. build the cpu image through podman's Docker API (scripts/ci/setup_podman.sh, as in CI);
2. `compile` the tiny config with torch.compile in a container run like pyxis (uid 1000, read-only rootfs), into a
   mounted dir (L3HP_CACHE_DIR), which then holds Inductor's cache and the manifest;
3. bake that dir into a second image with `build.sh --cache DIR`;
4. start fresh containers of each image, pyxis-style, running `train` for one step on the same data, and time from
   `podman run` to the first step's metrics line (order: warm, cold, warm; the slower warm run counts).
Target: warm <= 15% of cold. Exits 1 when it is over, or when the warm run compiled anything (a cache miss).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import image_ci as ci

TARGET = 0.15
COLD_TAG = "localhost/llama3-hyperpod:cpu-bench-nocache"
WARM_TAG = "localhost/llama3-hyperpod:cpu-bench-cache"
CONFIG = ["configs/tiny_cpu.yaml", "torch_backend.compile=true"]
FIRST_STEP = re.compile(r"^step\s+1/")
COUNTERS = re.compile(r"fx graph hit (\d+) miss (\d+), aot autograd hit (\d+) miss (\d+)")


def image(context: Path, env: dict[str, str], tag: str, *extra: str) -> None:
    lines: list[str] = []
    rc = ci.build_cpu_image(context, tag, env, lines, *extra)
    if rc != 0:
        sys.exit("\n".join(lines[-30:]) + f"\nbuild of {tag} failed ({rc})")
    print(lines[-1], flush=True)


def first_step(tag: str, out: Path, run_name: str) -> dict[str, Any]:
    """One fresh container training one step: seconds from `podman run` to the step-1 line, and the hit counters."""
    argv = ["/usr/local/bin/llama3-hyperpod", "train", *CONFIG, "trainer.max_steps=1",
            "exp_manager.create_checkpoint_callback=false", "--output-dir", "/out", "--run-name", run_name]
    start = time.monotonic()
    proc = subprocess.Popen(ci.pyxis_argv(tag, argv, mounts={out: "/out"}, workdir="/opt/app"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seconds, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if seconds is None and FIRST_STEP.match(line):
            seconds = time.monotonic() - start
    if proc.wait() != 0 or seconds is None:
        sys.exit("\n".join(lines[-30:]) + f"\ntrain in {tag} failed ({proc.returncode})")
    counters = next((COUNTERS.search(line) for line in lines if COUNTERS.search(line)), None)
    hits = [int(n) for n in counters.groups()] if counters else [-1] * 4
    seeded = next((line for line in lines if line.startswith("cache: seeded")), "cache: nothing seeded")
    return {"seconds": round(seconds, 1), "fxgraph_hit": hits[0], "fxgraph_miss": hits[1], "aot_hit": hits[2],
            "aot_miss": hits[3], "seeding": seeded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    env = ci.setup_podman()
    with tempfile.TemporaryDirectory(prefix="warm-start-", dir=ci.STATE_DIR) as tmp:
        work = Path(tmp)
        context = ci.copy_context(work / "context")
        image(context, env, COLD_TAG)
        out, cache = work / "out", work / "cache"
        for path in (out, cache):
            path.mkdir()
            path.chmod(0o777)  # written by uid 1000 inside the containers
        start = time.monotonic()
        compile_argv = ["/usr/local/bin/llama3-hyperpod", "compile", *CONFIG, "--output-dir", "/out",
                        "--run-name", "compile"]
        compiled = ci.pyxis_run(COLD_TAG, compile_argv, mounts={out: "/out", cache: "/cache"},
                                env={"L3HP_CACHE_DIR": "/cache"}, workdir="/opt/app", timeout=1200)
        if compiled.returncode != 0:
            sys.exit(compiled.stdout[-2000:] + compiled.stderr[-3000:] + "\ncompile failed")
        print(f"compile in a container: {time.monotonic() - start:.1f} s (dataset built on first use, then 3 steps)",
              flush=True)
        image(context, env, WARM_TAG, "--cache", str(cache))
        warm = [first_step(WARM_TAG, out, "warm-1")]
        cold = first_step(COLD_TAG, out, "cold")
        warm.append(first_step(WARM_TAG, out, "warm-2"))
    slow_warm = max(warm, key=lambda r: r["seconds"])
    fraction = slow_warm["seconds"] / cold["seconds"]
    missed = any(r["fxgraph_miss"] != 0 or r["fxgraph_hit"] <= 0 for r in warm)
    result = {"cold": cold, "warm": warm, "warm_fraction": round(fraction, 3), "target_fraction": TARGET}
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in [("without cache", cold), *[(f"baked cache #{i + 1}", r) for i, r in enumerate(warm)]]:
            print(f"{name:>15}: first step after {r['seconds']:6.1f} s | fx graph cache hit {r['fxgraph_hit']} "
                  f"miss {r['fxgraph_miss']} | aot autograd hit {r['aot_hit']} miss {r['aot_miss']} | {r['seeding']}")
        print(f"time to first step with the baked cache: {fraction:.1%} of the time without it "
              f"({'within' if fraction <= TARGET else 'OVER'} the {TARGET:.0%} target)"
              + ("; the warm run MISSED the cache" if missed else ""))
    return 0 if fraction <= TARGET and not missed else 1


if __name__ == "__main__":
    sys.exit(main())
