"""The cpu image, built for real (podman's Docker API, the local Debian base, an offline wheelhouse) and run the way
pyxis runs it: uid 1000, read-only rootfs, no ENTRYPOINT, tmpfs /tmp, a mounted output dir, $HOME not writable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from llama3_hyperpod.image import build, ci

pytestmark = [pytest.mark.integration, pytest.mark.container]

# L3HP_CI_IMAGE_TAG: several checkouts on one machine (worktrees) build side by side without clobbering a tag.
TAG = os.environ.get("L3HP_CI_IMAGE_TAG", "localhost/llama3-hyperpod:cpu-ci")


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    """podman + API socket + local base image; never silently skipped in CI."""
    try:
        return ci.setup_podman()
    except (OSError, RuntimeError) as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"podman setup failed in CI: {exc}")
        pytest.skip(f"podman setup failed: {exc}")


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build context frozen at session start, so later edits to the checkout cannot change what is compared."""
    return ci.copy_context(tmp_path_factory.mktemp("context"))


@pytest.fixture(scope="session")
def cpu_image(podman_env: dict[str, str], snapshot: Path) -> dict[str, Any]:
    lines: list[str] = []
    start = time.monotonic()
    rc = ci.build_cpu_image(snapshot, TAG, podman_env, lines)
    assert rc == 0, "\n".join(lines[-40:])
    inspect = json.loads(subprocess.run(["podman", "image", "inspect", TAG], capture_output=True, text=True,
                                        check=True).stdout)[0]
    return {"tag": TAG, "inspect": inspect, "seconds": time.monotonic() - start, "log": lines}


def test_plan_runs_like_pyxis(cpu_image: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    result = ci.pyxis_run(cpu_image["tag"], ["python", "/opt/app/entrypoint.py", "plan", "configs/llama3_8b_trn1.yaml",
                                             "--backend", "neuron", "--output-dir", "/out", "--json"],
                          mounts={out: "/out"}, workdir="/opt/app")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    text = json.dumps(plan)
    assert "torchrun" in text and "/opt/neuronx-distributed-training/examples" in text


def test_launcher_and_package_import_from_anywhere(cpu_image: dict[str, Any]) -> None:
    """torchrun starts `python -m llama3_hyperpod...` from any cwd: the package must import without PYTHONPATH."""
    result = ci.pyxis_run(cpu_image["tag"], ["sh", "-c", "cd /tmp && llama3-hyperpod --help && python -c "
                                             "'import os, llama3_hyperpod, torch; print(llama3_hyperpod.__file__, "
                                             "torch.__version__, os.environ[\"USER_SETTING\"])'"],
                          env={"USER_SETTING": "from-the-job"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "/opt/app/llama3_hyperpod/__init__.py 2.13.0+cpu from-the-job" in result.stdout


def test_image_metadata(cpu_image: dict[str, Any], snapshot: Path) -> None:
    config = cpu_image["inspect"]["Config"]
    labels = config["Labels"]
    assert labels["io.llama3-hyperpod.flavor"] == "cpu"
    assert labels["io.llama3-hyperpod.torch"] == "2.13.0+cpu"
    assert labels["io.llama3-hyperpod.lock-sha256"] == build.hashlib.sha256(
        (snapshot / "requirements.lock").read_bytes()).hexdigest()
    assert labels["io.llama3-hyperpod.cache-manifest-sha256"] == build.tree_sha256(snapshot / "neuron_cache")
    assert labels["org.opencontainers.image.revision"] == "unknown"  # built from a snapshot outside git
    env = {item.split("=", 1)[0] for item in config["Env"]}
    assert env <= {"PATH", "LD_LIBRARY_PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "container", "HOSTNAME"}
    secrets = [line for line in json.dumps(cpu_image["inspect"]).splitlines() if "PASSWORD" in line.upper()]
    assert not secrets


def test_smoke_runs_like_pyxis(cpu_image: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    argv = ["python", "/opt/app/entrypoint.py", "smoke", "--output-dir", "/out"]
    result = ci.pyxis_run(cpu_image["tag"], argv, mounts={out: "/out"}, workdir="/out", timeout=420)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "smoke: PASS (cpu)" in result.stdout + result.stderr


def test_compile_in_the_image_then_the_baked_cache_hits_in_a_fresh_container(
        cpu_image: dict[str, Any], podman_env: dict[str, str], snapshot: Path, tmp_path: Path) -> None:
    """`compile` (torch.compile, Inductor's C++ kernels) works in the cpu image; `build.sh --cache` bakes what it
    wrote; a fresh read-only container seeds it into its tmpfs and trains without compiling anything."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    for path in (out, cache):
        path.mkdir()
        path.chmod(0o777)
    config = ["configs/tiny_cpu.yaml", "torch_backend.compile=true", "model.encoder_seq_length=64"]
    compiled = ci.pyxis_run(cpu_image["tag"], ["python", "/opt/app/entrypoint.py", "compile", *config,
                                               "--output-dir", "/out"],
                            mounts={out: "/out", cache: "/cache"}, env={"L3HP_CACHE_DIR": "/cache"},
                            workdir="/opt/app", timeout=600)
    assert compiled.returncode == 0, (compiled.stdout[-2000:], compiled.stderr[-3000:])
    assert "compile: cache manifest /cache/manifest.json" in compiled.stderr
    assert list((cache / "inductor").rglob("*.so")), "Inductor compiled no C++ kernel"

    lines: list[str] = []
    tag = TAG + "-cache"
    assert ci.build_cpu_image(snapshot, tag, podman_env, lines, "--cache", str(cache)) == 0, "\n".join(lines[-40:])
    try:
        verify = ci.pyxis_run(tag, ["python", "/opt/app/entrypoint.py", "cache", "verify", *config, "--cache-dir",
                                    "/opt/app/neuron_cache"], workdir="/opt/app")
        assert verify.returncode == 0, (verify.stdout, verify.stderr)
        trained = ci.pyxis_run(tag, ["python", "/opt/app/entrypoint.py", "train", *config, "trainer.max_steps=2",
                                     "--output-dir", "/out", "--run-name", "warm"], mounts={out: "/out"},
                               workdir="/opt/app", timeout=600)
        text = trained.stdout + trained.stderr
        assert trained.returncode == 0, text[-4000:]
        assert "cache: seeded /tmp/llama3-hyperpod-cache from /opt/app/neuron_cache" in text
        hits = re.search(r"fx graph hit (\d+) miss (\d+)", text)
        assert hits and int(hits.group(1)) > 0 and int(hits.group(2)) == 0, text[-3000:]
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False)


def test_code_only_change_rebuilds_only_the_last_layers(cpu_image: dict[str, Any], podman_env: dict[str, str],
                                                        snapshot: Path, tmp_path: Path) -> None:
    context = tmp_path / "context"
    shutil.copytree(snapshot, context)
    entry = context / "entrypoint.py"
    entry.write_text(entry.read_text() + "\n# a code-only change\n")
    tag = TAG + "-edit"
    lines: list[str] = []
    start = time.monotonic()
    assert ci.build_cpu_image(context, tag, podman_env, lines) == 0, "\n".join(lines[-40:])
    seconds = time.monotonic() - start
    before = cpu_image["inspect"]["RootFS"]["Layers"]
    after = json.loads(subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True,
                                      check=True).stdout)[0]["RootFS"]["Layers"]
    shared = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), len(before))
    rebuilt = [line[:60] for i, line in enumerate(lines) if "STEP" in line and "Using cache" not in
               (lines[i + 1] if i + 1 < len(lines) else "")]
    assert 1 <= len(after) - shared <= 2, f"{len(after) - shared} of {len(after)} layers changed: {rebuilt}"
    assert seconds < 60, f"code-only rebuild took {seconds:.0f}s"
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False)
