"""The cpu image on a real Docker Engine (Debian's docker.io, started by scripts/ci/setup_docker.sh on a private
socket and stopped at the end of the session): built with the plain `docker build` CLI (BuildKit, the Dockerfile as
written, only --build-arg) and with build.sh (the Docker SDK, Docker Engine's classic builder), then
`docker run --user 1000 --read-only ... IMAGE smoke` in each."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import image_ci as ci

pytestmark = [pytest.mark.integration, pytest.mark.container]

TAG = os.environ.get("L3HP_CI_IMAGE_TAG", "localhost/llama3-hyperpod:cpu-ci")


@pytest.fixture(scope="session")
def docker_env() -> Iterator[dict[str, str]]:
    """Docker Engine + the local base; never silently skipped in CI. The daemon is stopped (by its pid) at the end
    of the session when this session started it."""
    try:
        env = ci.setup_docker()
    except (OSError, RuntimeError) as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Docker Engine setup failed in CI: {exc}")
        pytest.skip(f"Docker Engine setup failed: {exc}")
    yield env
    if env.get("L3HP_DOCKERD_STARTED"):
        ci.stop_docker()


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ci.copy_context(tmp_path_factory.mktemp("docker-context"))


def _inspect(env: dict[str, str], tag: str) -> dict[str, object]:
    out = subprocess.run([*ci.docker_cli(env), "image", "inspect", tag], capture_output=True, text=True, check=True,
                         env=ci.docker_env(env)).stdout
    inspect: dict[str, object] = json.loads(out)[0]
    return inspect


def _smoke(env: dict[str, str], tag: str, tmp_path: Path) -> str:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    argv = ci.entrypoint_argv(tag, ["smoke", "--output-dir", "/out"], mounts={out: "/out"}, engine=ci.docker_cli(env))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=420, check=False, env=ci.docker_env(env))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    return text


def test_plain_docker_build_then_smoke(docker_env: dict[str, str], snapshot: Path, tmp_path: Path) -> None:
    """`/usr/bin/docker build` with BuildKit from the context root, only build args (flavor, the local base; the
    wheelhouse sits in the context's wheelhouse/), then smoke as uid 1000 on a read-only root filesystem."""
    tag = TAG + "-docker"
    context = tmp_path / "context"
    shutil.copytree(snapshot, context)  # plain_build_argv links the wheels into this copy's wheelhouse/
    argv = ci.plain_build_argv(context, tag, docker_env)
    cli = ci.docker_cli(docker_env)
    assert argv[len(cli)] == "build" and all(a in ("--build-arg", "--tag", "--network") or not a.startswith("-")
                                             for a in argv[len(cli):]), argv
    start = time.monotonic()
    built = subprocess.run(argv, capture_output=True, text=True, timeout=1500, check=False,
                           env=ci.docker_env(docker_env))
    assert built.returncode == 0, built.stderr[-4000:]
    assert "[sdk-cpu" in built.stderr and "[sdk-neuron" not in built.stderr, "BuildKit builds only the cpu stages"
    config = _inspect(docker_env, tag)["Config"]
    assert isinstance(config, dict) and config["Entrypoint"] == ["/usr/local/bin/llama3-hyperpod"]
    assert "L3HP_SDK_PYTHON=/opt/sdk/bin/python" in config["Env"]
    print(f"plain docker build: {time.monotonic() - start:.0f} s")
    assert "smoke: PASS (cpu)" in _smoke(docker_env, tag, tmp_path)


def test_build_sh_on_docker_engine_then_smoke(docker_env: dict[str, str], snapshot: Path, tmp_path: Path) -> None:
    """build.sh through the Docker SDK against Docker Engine (its classic builder: build.sh hands it the Dockerfile
    with the wheelhouse mount as one COPY), then the same smoke."""
    tag = TAG + "-docker-sdk"
    lines: list[str] = []
    rc = ci.build_cpu_image(snapshot, tag, docker_env, lines)
    assert rc == 0, "\n".join(lines[-40:])
    assert any(re.search(r"\] Step \d+/\d+ : ", line) for line in lines), "not the classic builder's log"
    history = subprocess.run([*ci.docker_cli(docker_env), "history", "--no-trunc", "--format", "{{.CreatedBy}}", tag],
                             capture_output=True, text=True, check=True, env=ci.docker_env(docker_env)).stdout
    assert history.count(" in /tmp/wheelhouse/") == 1, "the wheelhouse is copied once (the SDK stage), not twice"
    labels = _inspect(docker_env, tag)["Config"]
    assert isinstance(labels, dict) and labels["Labels"]["io.llama3-hyperpod.flavor"] == "cpu"
    assert "smoke: PASS (cpu)" in _smoke(docker_env, tag, tmp_path)
