"""What the image tests and bench share: podman (scripts/ci/setup_podman.sh) and a real Docker Engine
(scripts/ci/setup_docker.sh), a cached wheelhouse, and running a command the way pyxis does (non-root uid, read-only
rootfs, no ENTRYPOINT, a tmpfs /tmp, empty $HOME) on either engine."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from llama3_hyperpod.image.lockfilter import filter_lock
from llama3_hyperpod.image.versions import REPO_ROOT

STATE_DIR = Path(os.environ.get("LLAMA3_CI_STATE_DIR", "/var/tmp/llama3-hyperpod-ci"))
SETUP_SCRIPT = REPO_ROOT / "scripts" / "ci" / "setup_podman.sh"
DOCKER_SETUP_SCRIPT = REPO_ROOT / "scripts" / "ci" / "setup_docker.sh"
# What the Dockerfile copies: a build context made of only these behaves exactly like the repository.
CONTEXT_PATHS = ("Dockerfile", ".dockerignore", "requirements.lock", "entrypoint.py", "llama3_hyperpod", "configs",
                 "enroot", "neuron_cache", "versions", "wheelhouse")


def _run_setup(script: Path, *args: str) -> dict[str, str]:
    """Run a setup script (idempotent) and return the environment it prints as `export` lines."""
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    env = {}
    for line in result.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = value
    return env


def setup_podman() -> dict[str, str]:
    """podman + its API socket + the local base; applies the environment to this process (podman's CLI needs it)."""
    env = _run_setup(SETUP_SCRIPT)
    os.environ.update(env)
    return env


def setup_docker() -> dict[str, str]:
    """Docker Engine on its private socket + the local base. The environment is returned, not applied: this
    process's DOCKER_HOST stays podman's; pass it to docker_cli / build.sh explicitly."""
    return _run_setup(DOCKER_SETUP_SCRIPT)


def stop_docker() -> None:
    """Stop the daemon setup_docker started (by the pid in its pidfile)."""
    _run_setup(DOCKER_SETUP_SCRIPT, "--stop")


def docker_cli(env: Mapping[str, str]) -> list[str]:
    """Debian's /usr/bin/docker against the CI daemon (a newer CLI elsewhere on PATH may insist on buildx)."""
    return [env["L3HP_DOCKER_CLI"], "--host", env["DOCKER_HOST"]]


def docker_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for the docker CLI: the CI daemon, its private config dir, BuildKit on."""
    return {**os.environ, "DOCKER_HOST": env["DOCKER_HOST"], "DOCKER_CONFIG": env["DOCKER_CONFIG"],
            "DOCKER_BUILDKIT": "1"}


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
    """`build.sh --flavor cpu` the way CI builds it: the engine's Docker API (podman's, or Docker Engine's with
    --network host: its daemon has no bridge), the local Debian base, the cached wheelhouse.
    Returns build.main's exit code; the build log goes to `lines`."""
    from llama3_hyperpod.image import build

    network = ["--network", "host"] if "L3HP_DOCKER_CLI" in env else []
    return build.main(["--flavor", "cpu", "--tag", tag, "--base-image", env["LLAMA3_CI_BASE_IMAGE"],
                       "--wheelhouse", str(ensure_wheelhouse()), "--docker-host", env["DOCKER_HOST"],
                       "--context", str(context), *network, *extra], emit=lines.append)


def build_stage(context: Path, stage: str, tag: str, env: Mapping[str, str], lines: list[str]) -> str:
    """One stage of the cpu flavor (e.g. `sdk-cpu`) built alone, exactly as build.sh builds the deps image (same
    Dockerfile form, build args and wheelhouse, so the engine's layer cache gives the same layers); its image id."""
    from llama3_hyperpod.image import build

    network = ["--network", "host"] if "L3HP_DOCKER_CLI" in env else []
    req = build.make_request(build.parser().parse_args([
        "--flavor", "cpu", "--tag", tag, "--base-image", env["LLAMA3_CI_BASE_IMAGE"], "--wheelhouse",
        str(ensure_wheelhouse()), "--docker-host", env["DOCKER_HOST"], "--context", str(context), *network]))
    client, engine = build.connect(req.docker_host)
    text = build.flavor_dockerfile((context / "Dockerfile").read_text(), "cpu", classic=engine == "docker")
    dockerfile = context / "build" / f"Dockerfile.cpu-{stage}"
    dockerfile.parent.mkdir(parents=True, exist_ok=True)
    dockerfile.write_text(build.split_app_stage(text)[0])
    with build.staged_wheelhouse(req.wheelhouse, context):
        return build.run_build(client, lines.append, time.monotonic(), path=str(context), tag=tag, target=stage,
                               dockerfile=dockerfile.relative_to(context).as_posix(), buildargs=req.build_args,
                               network_mode=req.network)


def plain_build_argv(context: Path, tag: str, env: Mapping[str, str], *, target: str | None = None) -> list[str]:
    """`docker build` as a user types it (BuildKit, the Dockerfile as written, only --build-arg) for the cpu flavor
    with the local base and the wheelhouse staged into the context."""
    from llama3_hyperpod.image import build

    staged = context / build.WHEELHOUSE
    if not build.wheels(staged):  # a throw-away context (copy_context): its wheelhouse/ keeps the links
        for src in build.wheels(ensure_wheelhouse()):
            os.link(src, staged / src.name)
    argv = [*docker_cli(env), "build", "--network", "host", "--tag", tag, "--build-arg", "FLAVOR=cpu",
            "--build-arg", f"CPU_BASE_IMAGE={env['LLAMA3_CI_BASE_IMAGE']}"]
    return [*argv, *(["--target", target] if target else []), str(context)]


def copy_context(dest: Path) -> Path:
    """A throw-away copy of the build context that a test may modify."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in CONTEXT_PATHS:
        src = REPO_ROOT / name
        if src.is_dir():
            skip = ("__pycache__", "*.pyc", *(("*.whl", "*.tar.gz", "*.zip") if name == "wheelhouse" else ()))
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(*skip))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def pyxis_argv(image: str, argv: Sequence[str], *, mounts: Mapping[Path, str] = {}, env: Mapping[str, str] = {},
               workdir: str | None = None, engine: Sequence[str] = ("podman",)) -> list[str]:
    """The command line that runs argv as pyxis/enroot would: uid 1000, read-only rootfs, ENTRYPOINT skipped,
    a tmpfs /tmp, $HOME not writable. `engine`: podman, or docker_cli(env) for Docker Engine."""
    cmd = [*engine, "run", "--rm", "--user", "1000:1000", "--read-only", "--entrypoint", "",
           "--tmpfs", "/tmp:rw,mode=1777", "--network", "host", "-e", "HOME=/nonexistent"]
    for src, dst in mounts.items():
        cmd += ["-v", f"{src}:{dst}"]
    for name, value in env.items():
        cmd += ["-e", f"{name}={value}"]
    if workdir:
        cmd += ["--workdir", workdir]
    return [*cmd, image, *argv]


def pyxis_run(image: str, argv: Sequence[str], *, mounts: Mapping[Path, str] = {}, env: Mapping[str, str] = {},
              workdir: str | None = None, timeout: float = 300, engine: Sequence[str] = ("podman",),
              process_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv in the image as pyxis/enroot would (see pyxis_argv) and capture its output."""
    return subprocess.run(pyxis_argv(image, argv, mounts=mounts, env=env, workdir=workdir, engine=engine),
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(process_env) if process_env is not None else None)


def entrypoint_argv(image: str, args: Sequence[str], *, mounts: Mapping[Path, str] = {},
                    engine: Sequence[str] = ("podman",)) -> list[str]:
    """`docker run` as on a single trn1 instance: the image's ENTRYPOINT, uid 1000, read-only rootfs, no network."""
    cmd = [*engine, "run", "--rm", "--user", "1000", "--read-only", "--network", "none", "--tmpfs", "/tmp"]
    for src, dst in mounts.items():
        cmd += ["-v", f"{src}:{dst}"]
    return [*cmd, image, *args]
