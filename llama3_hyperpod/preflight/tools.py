"""Run an external tool for a check: found on PATH or where the image installs it, with a timeout, and one line
(ToolError) when it is missing, hangs or cannot start. What it printed is the parsers' business."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

# Where the neuron image puts the Neuron tools and libfabric's fi_info (Dockerfile ENV PATH; enroot's login shell
# may reset PATH, see shared/reference/slurm-enroot-pyxis.md), searched after PATH.
EXTRA_TOOL_DIRS = ("/opt/aws/neuron/bin", "/opt/amazon/efa/bin")
DEFAULT_TIMEOUT_S = 20.0


class ToolError(Exception):
    """The tool could not give an answer (not installed, timed out, could not start); the message is one line."""


@dataclass(frozen=True)
class ToolResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def find_tool(name: str, extra_dirs: Sequence[str] = EXTRA_TOOL_DIRS) -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    return shutil.which(name, path=search)


def run_tool(argv: Sequence[str], *, package: str, timeout: float = DEFAULT_TIMEOUT_S,
             extra_dirs: Sequence[str] = EXTRA_TOOL_DIRS) -> ToolResult:
    """Run argv[0] (looked up on PATH, then in extra_dirs); `package` names what provides it, for the message."""
    name = argv[0]
    exe = find_tool(name, extra_dirs)
    if exe is None:
        raise ToolError(f"{name} not found on PATH or in {', '.join(extra_dirs)} (it comes with {package})")
    start = time.perf_counter()
    try:
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace", timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{name} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ToolError(f"{name} could not start: {exc.strerror or exc}") from None
    return ToolResult([exe, *argv[1:]], done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
