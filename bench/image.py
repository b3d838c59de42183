"""The cpu image's size, and how cheap a code-only rebuild is compared with a full build, on podman and on Docker
Engine side by side (all from one run).

Builds the cpu flavor with build.sh's code (the Docker SDK) through podman's Docker API (scripts/ci/setup_podman.sh)
and through a real Docker Engine (scripts/ci/setup_docker.sh; stopped again at the end when this run started it),
each from its own snapshot of the build context: once with no cache (the full build), then after touching
entrypoint.py (mtime only), then after changing its content.
Target: the code-change rebuild takes <= 5% of the full build on each engine. Exits 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import image_ci as ci

TARGET = 0.05
TAG = "localhost/llama3-hyperpod:cpu-bench"


def timed_build(context: Path, env: dict[str, str], *extra: str) -> float:
    lines: list[str] = []
    start = time.monotonic()
    rc = ci.build_cpu_image(context, TAG, env, lines, *extra)
    if rc != 0:
        sys.exit("\n".join(lines[-30:]) + f"\nbuild failed ({rc})")
    return time.monotonic() - start


def bench(engine: str, env: dict[str, str], cli: Sequence[str], workdir: Path) -> dict[str, Any]:
    context = ci.copy_context(workdir / f"context-{engine}")
    full = timed_build(context, env, "--no-cache")
    entry = context / "entrypoint.py"
    os.utime(entry)
    touch = timed_build(context, env)
    entry.write_text(entry.read_text() + f"\n# bench edit {time.time()}\n")
    edit = timed_build(context, env)
    process_env = ci.docker_env(env) if engine == "docker" else None
    inspect = json.loads(subprocess.run([*cli, "image", "inspect", TAG], capture_output=True, text=True, check=True,
                                        env=process_env).stdout)[0]
    return {"engine": engine, "image": TAG, "size_mb": round(inspect["Size"] / 1e6, 1),
            "layers": len(inspect["RootFS"]["Layers"]), "full_build_s": round(full, 1),
            "touch_rebuild_s": round(touch, 1), "edit_rebuild_s": round(edit, 1),
            "touch_fraction": round(touch / full, 4), "edit_fraction": round(edit / full, 4), "target_fraction": TARGET}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--engine", choices=("podman", "docker"), action="append",
                        help="only this engine (repeatable; default: both)")
    args = parser.parse_args()
    engines = args.engine or ["podman", "docker"]
    ci.ensure_wheelhouse()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="image-bench-", dir=ci.STATE_DIR) as tmp:
        if "podman" in engines:
            results.append(bench("podman", ci.setup_podman(), ["podman"], Path(tmp)))
        if "docker" in engines:
            env = ci.setup_docker()
            try:
                results.append(bench("docker", env, ci.docker_cli(env), Path(tmp)))
            finally:
                if env.get("L3HP_DOCKERD_STARTED"):
                    ci.stop_docker()
    ok = all(r["edit_fraction"] <= TARGET for r in results)
    if args.json:
        print(json.dumps({"results": results, "within_target": ok}))
        return 0 if ok else 1
    width = 16
    print(f"{TAG} (build.sh)".ljust(44) + "".join(r["engine"].rjust(width) for r in results))
    rows = [("size", lambda r: f"{r['size_mb'] / 1000:.2f} GB"), ("layers", lambda r: str(r["layers"])),
            ("full build (no cache)", lambda r: f"{r['full_build_s']:.1f} s"),
            ("rebuild, entrypoint.py touched", lambda r: f"{r['touch_rebuild_s']:.1f} s {r['touch_fraction']:.1%}"),
            ("rebuild, entrypoint.py changed", lambda r: f"{r['edit_rebuild_s']:.1f} s {r['edit_fraction']:.1%}")]
    for label, cell in rows:
        print(label.ljust(44) + "".join(cell(r).rjust(width) for r in results))
    print(f"code-change rebuild vs full build: {'within' if ok else 'OVER'} the {TARGET:.0%} target on "
          + " and ".join(r["engine"] for r in results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
