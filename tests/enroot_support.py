"""What the enroot-side tests share: squashfs-tools, podman, the cpu image as an enroot .sqsh (made by the shipped
enroot/import.sh), and the pyxis+enroot-like runner (llama3_hyperpod/image/pyxis_podman.py) around podman."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.conftest import REPO

ENROOT = REPO / "enroot"
RUNNER = REPO / "llama3_hyperpod" / "image" / "pyxis_podman.py"
# L3HP_CI_IMAGE_TAG: several checkouts on one machine (worktrees) build side by side without clobbering a tag.
TAG = os.environ.get("L3HP_CI_IMAGE_TAG", "localhost/llama3-hyperpod:cpu-ci")
# HyperPod's squash options (enroot/enroot.conf): uncompressed, so CI's pack and unpack are quick.
SQUASH = "-comp lzo -noI -noD -noF -noX -no-duplicates"
DOCKER_DOWN = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str) -> None:
    """A prerequisite this machine lacks: a failure in CI (which installs everything), a skip elsewhere."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def ensure_squashfs_tools() -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "ci" / "setup_squashfs.sh")], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        unavailable(result.stderr.strip())


def podman_env() -> dict[str, str]:
    from tests import image_ci as ci

    if os.geteuid() != 0:
        unavailable("the pyxis-like runner needs root podman (podman run --rootfs)")
    try:
        return ci.setup_podman()
    except (OSError, RuntimeError) as exc:
        unavailable(f"podman setup failed: {exc}")
        raise


def build_cpu_image(tmp: Path) -> str:
    """The cpu image from a snapshot of this checkout (a layer-cache hit when another test built it already)."""
    from tests import image_ci as ci

    env = podman_env()
    lines: list[str] = []
    rc = ci.build_cpu_image(ci.copy_context(tmp / "context"), TAG, env, lines)
    assert rc == 0, "\n".join(lines[-40:])
    return TAG


def daemonless_docker(bin_dir: Path) -> dict[str, str]:
    """Env in which `docker` is a CLI without a daemon: the real CLI pointed at no socket, or where this machine has
    no docker CLI, a stand-in that fails the way it does."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    real = shutil.which("docker")
    if real is None:
        stub = bin_dir / "docker"
        stub.write_text(f"#!/bin/sh\necho '{DOCKER_DOWN}' >&2\nexit 1\n")
        stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_HOST": f"unix://{bin_dir}/no-daemon.sock"}


def podman_containers() -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(out.split())


def import_sh(*args: str, env: Mapping[str, str] = {}, cwd: Path | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "ENROOT_SQUASH_OPTIONS": SQUASH, **env}
    return subprocess.run(["bash", str(ENROOT / "import.sh"), *args], env=full, capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, check=False)


def pyxis_run(options: Sequence[str], command: Sequence[str], *, data: Path, env: Mapping[str, str] = {},
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run COMMAND through the runner (what `CONTAINER=podman` in enroot/job.sh does per node) with the given
    pyxis options and extra job environment."""
    full = {**os.environ, "L3HP_PODMAN_DATA_PATH": str(data), **env}
    return subprocess.run([sys.executable, str(RUNNER), *options, "--", *command], env=full, capture_output=True,
                          text=True, timeout=timeout, check=False)
