"""What the image tests and bench share: podman set up by scripts/ci/setup_podman.sh, a cached wheelhouse, and
running a command the way pyxis does (non-root uid, read-only rootfs, no ENTRYPOINT, a tmpfs /tmp, empty $HOME)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from llama3_hyperpod.image.lockfilter import filter_lock
from llama3_hyperpod.image.versions import REPO_ROOT

STATE_DIR = Path(os.environ.get("LLAMA3_CI_STATE_DIR", "/var/tmp/llama3-hyperpod-ci"))
SETUP_SCRIPT = REPO_ROOT / "scripts" / "ci" / "setup_podman.sh"
# What the Dockerfile copies: a build context made of only these behaves exactly like the repository.
CONTEXT_PATHS = ("Dockerfile", ".dockerignore", "requirements.lock", "entrypoint.py", "llama3_hyperpod", "configs",
                 "enroot", "neuron_cache", "versions")


def setup_podman() -> dict[str, str]:
    """Run the setup script (idempotent) and apply the environment it prints; returns that environment."""
    result = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{SETUP_SCRIPT} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    env = {}
    for line in result.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = value
    os.environ.update(env)
    return env


def ensure_wheelhouse(lock: Path = REPO_ROOT / "requirements.lock", exclude: Sequence[str] = ()) -> Path:
    """The wheels (and the odd sdist) of the image's part of the lock, downloaded once per lock content."""
    text = filter_lock(lock.read_text(), exclude)
    dest = STATE_DIR / f"wheelhouse-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if (dest / ".complete").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.image.txt"
    req.write_text(text)
    # --prefer-binary, not --only-binary: a few locked packages (python-hostlist) exist only as sdists.
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--require-hashes", "--no-deps", "--prefer-binary", "-r", str(req), "-d", str(dest)], check=True)
    req.unlink()
    (dest / ".complete").touch()
    return dest


def build_cpu_image(context: Path, tag: str, env: Mapping[str, str], lines: list[str], *extra: str) -> int:
    """`build.sh --flavor cpu` the way CI builds it: podman's API, the local Debian base, the cached wheelhouse.
    Returns build.main's exit code; the build log goes to `lines`."""
    from llama3_hyperpod.image import build

    return build.main(["--flavor", "cpu", "--tag", tag, "--base-image", env["LLAMA3_CI_BASE_IMAGE"],
                       "--wheelhouse", str(ensure_wheelhouse()), "--docker-host", env["DOCKER_HOST"],
                       "--context", str(context), *extra], emit=lines.append)


def copy_context(dest: Path) -> Path:
    """A throw-away copy of the build context that a test may modify."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in CONTEXT_PATHS:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def pyxis_argv(image: str, argv: Sequence[str], *, mounts: Mapping[Path, str] = {}, env: Mapping[str, str] = {},
               workdir: str | None = None) -> list[str]:
    """The podman command line that runs argv as pyxis/enroot would: uid 1000, read-only rootfs, ENTRYPOINT skipped,
    a tmpfs /tmp, $HOME not writable."""
    cmd = ["podman", "run", "--rm", "--user", "1000:1000", "--read-only", "--entrypoint", "",
           "--tmpfs", "/tmp:rw,mode=1777", "--network", "host", "-e", "HOME=/nonexistent"]
    for src, dst in mounts.items():
        cmd += ["-v", f"{src}:{dst}"]
    for name, value in env.items():
        cmd += ["-e", f"{name}={value}"]
    if workdir:
        cmd += ["--workdir", workdir]
    return [*cmd, image, *argv]


def pyxis_run(image: str, argv: Sequence[str], *, mounts: Mapping[Path, str] = {}, env: Mapping[str, str] = {},
              workdir: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run argv in the image as pyxis/enroot would (see pyxis_argv) and capture its output."""
    return subprocess.run(pyxis_argv(image, argv, mounts=mounts, env=env, workdir=workdir), capture_output=True,
                          text=True, timeout=timeout, check=False)
