"""The cpu image's size, and how cheap a code-only rebuild is compared with a full build (all from one run).

Builds the cpu flavor through podman's Docker API (scripts/ci/setup_podman.sh) from a snapshot of the build context:
once with no cache (the full build), then after touching entrypoint.py (mtime only), then after changing its content.
Target: the code-change rebuild takes <= 5% of the full build. Exits 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3_hyperpod.image import ci

TARGET = 0.05
TAG = "localhost/llama3-hyperpod:cpu-bench"


def timed_build(context: Path, env: dict[str, str], *extra: str) -> float:
    lines: list[str] = []
    start = time.monotonic()
    rc = ci.build_cpu_image(context, TAG, env, lines, *extra)
    if rc != 0:
        sys.exit("\n".join(lines[-30:]) + f"\nbuild failed ({rc})")
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    env = ci.setup_podman()
    ci.ensure_wheelhouse()
    with tempfile.TemporaryDirectory(prefix="image-bench-", dir=ci.STATE_DIR) as tmp:
        context = ci.copy_context(Path(tmp) / "context")
        full = timed_build(context, env, "--no-cache")
        entry = context / "entrypoint.py"
        os.utime(entry)
        touch = timed_build(context, env)
        entry.write_text(entry.read_text() + f"\n# bench edit {time.time()}\n")
        edit = timed_build(context, env)
    inspect = json.loads(subprocess.run(["podman", "image", "inspect", TAG], capture_output=True, text=True,
                                        check=True).stdout)[0]
    result = {"image": TAG, "size_mb": round(inspect["Size"] / 1e6, 1), "layers": len(inspect["RootFS"]["Layers"]),
              "full_build_s": round(full, 1), "touch_rebuild_s": round(touch, 1), "edit_rebuild_s": round(edit, 1),
              "edit_fraction": round(edit / full, 4), "target_fraction": TARGET}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"cpu image {TAG}: {result['size_mb']} MB in {result['layers']} layers")
        print(f"full build (no cache): {full:.1f} s")
        print(f"rebuild after touching entrypoint.py (mtime only): {touch:.1f} s = {touch / full:.1%} of the full "
              "build")
        print(f"rebuild after changing entrypoint.py: {edit:.1f} s = {edit / full:.1%} of the full build "
              f"({'within' if edit / full <= TARGET else 'OVER'} the {TARGET:.0%} target)")
    return 0 if edit / full <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
