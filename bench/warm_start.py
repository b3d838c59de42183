"""Time to the first training step in a fresh cpu-image container with the compile cache baked into the image, as a
fraction of the time without it (both measured in this one run), with Inductor's hit counters as evidence.

1. build the cpu image through podman's Docker API (scripts/ci/setup_podman.sh, as in CI);
2. `compile` the tiny config with torch.compile in a container run like pyxis (uid 1000, read-only rootfs), into a
   mounted dir (L3HP_CACHE_DIR), which then holds Inductor's cache and the manifest;
3. bake that dir into a second image with `build.sh --cache DIR`;
4. start fresh containers of each image, pyxis-style, running `train` for one step on the same data, and time from
   `podman run` to the first step's metrics line, in `--rounds` interleaved rounds (warm and cold, the order rotated
   each round), each with the load the machine saw; the fraction is taken per round, the median reported with its
   spread.
Target: warm <= 15% of cold. Exits 1 when it is over, or when a warm run compiled anything (a cache miss).
Image tags: `$L3HP_CI_IMAGE_TAG-bench-nocache` / `-bench-cache` (default tag localhost/llama3-hyperpod:cpu), so
checkouts sharing podman do not replace each other's images.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import Stat, measured, rotated
from tests import image_ci as ci

TARGET = 0.15
BASE_TAG = os.environ.get("L3HP_CI_IMAGE_TAG", "localhost/llama3-hyperpod:cpu")
COLD_TAG = f"{BASE_TAG}-bench-nocache"
WARM_TAG = f"{BASE_TAG}-bench-cache"
CONFIG = ["configs/tiny_cpu.yaml", "torch_backend.compile=true"]
FIRST_STEP = re.compile(r"^step\s+1/")
COUNTERS = re.compile(r"fx graph hit (\d+) miss (\d+), aot autograd hit (\d+) miss (\d+)")


def image(context: Path, env: dict[str, str], tag: str, *extra: str) -> None:
    lines: list[str] = []
    rc = ci.build_cpu_image(context, tag, env, lines, *extra)
    if rc != 0:
        sys.exit("\n".join(lines[-30:]) + f"\nbuild of {tag} failed ({rc})")
    print(lines[-1], flush=True)


def free_port() -> str:
    """A free TCP port for MASTER_PORT: the containers share the host's network, and on a shared machine another
    run may hold the default 41000 (the trainer refuses a port in use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def first_step(tag: str, out: Path, run_name: str) -> dict[str, Any]:
    """One fresh container training one step: seconds from `podman run` to the step-1 line, and the hit counters."""
    argv = ["/usr/local/bin/llama3-hyperpod", "train", *CONFIG, "trainer.max_steps=1",
            "exp_manager.create_checkpoint_callback=false", "--output-dir", "/out", "--run-name", run_name]
    start = time.monotonic()
    proc = subprocess.Popen(ci.pyxis_argv(tag, argv, mounts={out: "/out"}, env={"MASTER_PORT": free_port()},
                                          workdir="/opt/app"),
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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved (warm, cold) pairs")
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
                                env={"L3HP_CACHE_DIR": "/cache", "MASTER_PORT": free_port()}, workdir="/opt/app",
                                timeout=1200)
        if compiled.returncode != 0:
            sys.exit(compiled.stdout[-2000:] + compiled.stderr[-3000:] + "\ncompile failed")
        print(f"compile in a container: {time.monotonic() - start:.1f} s (dataset built on first use, then 3 steps)",
              flush=True)
        image(context, env, WARM_TAG, "--cache", str(cache))
        runs: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
        for r in range(args.rounds):
            for kind in rotated(["warm", "cold"], r):
                # The containers are not this process's children: the machine's load is sampled in 2 s of idling
                # right before each run (everything that runs then is someone else's).
                with measured() as idle:
                    time.sleep(2)
                res = first_step(WARM_TAG if kind == "warm" else COLD_TAG, out, f"{kind}-{r + 1}")
                res["others_cores_before"] = round(idle.others_cores, 2)
                res["loadavg"] = round(idle.loadavg, 1)
                runs[kind].append(res)
    fractions = Stat([w["seconds"] / c["seconds"] for w, c in zip(runs["warm"], runs["cold"], strict=True)])
    missed = any(w["fxgraph_miss"] != 0 or w["fxgraph_hit"] <= 0 for w in runs["warm"])
    result = {"runs": runs, "warm_fraction": fractions.values, "median_fraction": round(fractions.median, 3),
              "target_fraction": TARGET}
    if args.json:
        print(json.dumps(result))
    else:
        for kind in ("cold", "warm"):
            for i, run in enumerate(runs[kind]):
                print(f"{kind} #{i + 1}: first step after {run['seconds']:6.1f} s | fx graph cache hit "
                      f"{run['fxgraph_hit']} miss {run['fxgraph_miss']} | aot autograd hit {run['aot_hit']} miss "
                      f"{run['aot_miss']} | {run['seeding']} | others used {run['others_cores_before']} cores just "
                      f"before (load avg {run['loadavg']})")
        print(f"time to first step with the baked cache: {fractions.text('{:.1%}')} of the time without it, per "
              f"round ({'within' if fractions.median <= TARGET else 'OVER'} the {TARGET:.0%} target)"
              + ("; a warm run MISSED the cache" if missed else ""))
    return 0 if fractions.median <= TARGET and not missed else 1


if __name__ == "__main__":
    sys.exit(main())
