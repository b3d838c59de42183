"""The cpu image, built for real (podman's Docker API, the local Debian base, an offline wheelhouse) and run the way
pyxis runs it (uid 1000, read-only rootfs, no ENTRYPOINT, tmpfs /tmp, a mounted output dir, $HOME not writable) and
the way `docker run IMAGE smoke` runs it; and the split between the SDK's venv and the project's."""

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

from llama3_hyperpod.image import build, lockfilter
from llama3_hyperpod.image.versions import PROJECT_PYTHON, SDK_PYTHON
from tests import image_ci as ci

pytestmark = [pytest.mark.integration, pytest.mark.container]

# L3HP_CI_IMAGE_TAG: several checkouts on one machine (worktrees) build side by side without clobbering a tag.
TAG = os.environ.get("L3HP_CI_IMAGE_TAG", "localhost/llama3-hyperpod:cpu-ci")
WRAPPER = "/usr/local/bin/llama3-hyperpod"  # what pyxis/enroot jobs run: the project's venv by absolute path
# Every directory, link and file of the SDK venv with mode, size and content hash: equal output = byte-for-byte equal.
SDK_TREE = ("cd /opt/sdk && find . \\( -type d -printf 'd %m %p\\n' \\) -o \\( -type l -printf 'l %p -> %l\\n' \\) "
            "-o \\( -type f -printf 'f %m %s %p\\n' \\) | LC_ALL=C sort "
            "&& find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum")


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
    result = ci.pyxis_run(cpu_image["tag"], [WRAPPER, "plan", "configs/llama3_8b_trn1.yaml",
                                             "--backend", "neuron", "--output-dir", "/out", "--json"],
                          mounts={out: "/out"}, workdir="/opt/app")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    text = json.dumps(plan)
    assert "torchrun" in text or "torch.distributed.run" in text
    assert "/opt/neuronx-distributed-training/examples" in text


def test_launcher_and_package_import_from_anywhere(cpu_image: dict[str, Any]) -> None:
    """torchrun starts `python -m llama3_hyperpod...` from any cwd: the package must import without PYTHONPATH, from
    the project's venv, with the SDK venv's torch."""
    result = ci.pyxis_run(cpu_image["tag"], ["sh", "-c", f"cd /tmp && {WRAPPER} --help && {PROJECT_PYTHON} -c "
                                             "'import os, llama3_hyperpod, torch; print(llama3_hyperpod.__file__, "
                                             "torch.__version__, torch.__file__, os.environ[\"USER_SETTING\"])'"],
                          env={"USER_SETTING": "from-the-job"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("/opt/app/llama3_hyperpod/__init__.py 2.13.0+cpu /opt/sdk/lib/python3.11/site-packages/torch/__init__.py "
            "from-the-job") in result.stdout


def test_image_metadata(cpu_image: dict[str, Any], snapshot: Path) -> None:
    config = cpu_image["inspect"]["Config"]
    labels = config["Labels"]
    assert labels["io.llama3-hyperpod.flavor"] == "cpu"
    assert labels["io.llama3-hyperpod.torch"] == "2.13.0+cpu"
    assert labels["io.llama3-hyperpod.lock-sha256"] == build.hashlib.sha256(
        (snapshot / "requirements.lock").read_bytes()).hexdigest()
    assert labels["io.llama3-hyperpod.cache-manifest-sha256"] == build.tree_sha256(snapshot / "neuron_cache")
    assert labels["org.opencontainers.image.revision"] == "unknown"  # built from a snapshot outside git
    env = dict(item.split("=", 1) for item in config["Env"])
    assert set(env) <= {"PATH", "L3HP_SDK_PYTHON", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "container",
                        "HOSTNAME"}
    assert env["L3HP_SDK_PYTHON"] == SDK_PYTHON["cpu"] and "/opt/venv" not in env["PATH"]
    assert config["Entrypoint"] == [WRAPPER]
    secrets = [line for line in json.dumps(cpu_image["inspect"]).splitlines() if "PASSWORD" in line.upper()]
    assert not secrets


def test_smoke_through_the_entrypoint(cpu_image: dict[str, Any], tmp_path: Path) -> None:
    """`podman run --user 1000 --read-only ... IMAGE smoke`, as `docker run ... smoke` on one instance."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    argv = ci.entrypoint_argv(cpu_image["tag"], ["smoke", "--output-dir", "/out"], mounts={out: "/out"})
    result = subprocess.run(argv, capture_output=True, text=True, timeout=420, check=False)
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
    compiled = ci.pyxis_run(cpu_image["tag"], [WRAPPER, "compile", *config,
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
        verify = ci.pyxis_run(tag, [WRAPPER, "cache", "verify", *config, "--cache-dir",
                                    "/opt/app/neuron_cache"], workdir="/opt/app")
        assert verify.returncode == 0, (verify.stdout, verify.stderr)
        trained = ci.pyxis_run(tag, [WRAPPER, "train", *config, "trainer.max_steps=2",
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
    # The baseline is built right here (from the layer cache: seconds), not taken from the session's image: on a
    # machine shared with other checkouts, their builds may replace the deps image in between.
    lines: list[str] = []
    assert ci.build_cpu_image(context, TAG, podman_env, lines) == 0, "\n".join(lines[-40:])
    entry = context / "entrypoint.py"
    entry.write_text(entry.read_text() + "\n# a code-only change\n")
    tag = TAG + "-edit"
    lines = []
    start = time.monotonic()
    assert ci.build_cpu_image(context, tag, podman_env, lines) == 0, "\n".join(lines[-40:])
    seconds = time.monotonic() - start
    before, after = (json.loads(subprocess.run(["podman", "image", "inspect", t], capture_output=True, text=True,
                                               check=True).stdout)[0]["RootFS"]["Layers"] for t in (TAG, tag))
    shared = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), len(before))
    rebuilt = [line[:60] for i, line in enumerate(lines) if "STEP" in line and "Using cache" not in
               (lines[i + 1] if i + 1 < len(lines) else "")]
    assert 1 <= len(after) - shared <= 2, f"{len(after) - shared} of {len(after)} layers changed: {rebuilt}"
    assert seconds < 60, f"code-only rebuild took {seconds:.0f}s"
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False)


@pytest.fixture(scope="session")
def sdk_stage_image(cpu_image: dict[str, Any], podman_env: dict[str, str], snapshot: Path) -> str:
    """The `sdk-cpu` stage alone: the image before any of the project's layers."""
    lines: list[str] = []
    ci.build_stage(snapshot, "sdk-cpu", TAG + "-sdk", podman_env, lines)
    return TAG + "-sdk"


def _in_image(image: str, script: str, timeout: float = 300) -> str:
    result = ci.pyxis_run(image, ["sh", "-c", script], timeout=timeout)
    assert result.returncode == 0, (script, result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


def test_sdk_venv_is_byte_for_byte_the_same_after_the_project_layers(sdk_stage_image: str,
                                                                     cpu_image: dict[str, Any]) -> None:
    before = _in_image(sdk_stage_image, SDK_TREE)
    after = _in_image(cpu_image["tag"], SDK_TREE)
    files = [line for line in before.splitlines() if line.startswith("f ")]
    assert len(files) > 1000 and any(line.endswith("/torch/__init__.py") for line in files), before[:2000]
    assert before == after, "the project's layers changed the SDK venv"
    freeze = f"{SDK_PYTHON['cpu']} -m pip --disable-pip-version-check freeze --all && cat /etc/llama3-hyperpod/sdk.json"
    assert _in_image(sdk_stage_image, freeze) == _in_image(cpu_image["tag"], freeze)


def test_pip_check_is_clean_in_both_venvs_and_the_sdk_holds_no_project_package(cpu_image: dict[str, Any]) -> None:
    pip = "-m pip --disable-pip-version-check"
    checks = _in_image(cpu_image["tag"], f"{SDK_PYTHON['cpu']} {pip} check && {PROJECT_PYTHON} {pip} check")
    assert checks.splitlines() == ["No broken requirements found."] * 2, checks
    lists = _in_image(cpu_image["tag"], f"{SDK_PYTHON['cpu']} {pip} list --format=json && echo && {PROJECT_PYTHON} "
                      f"{pip} list --format=json --path /opt/venv/lib/python3.11/site-packages")
    sdk_json, project_json = lists.strip().split("\n", 1)
    sdk = {lockfilter.normalize(d["name"]) for d in json.loads(sdk_json)}
    project = {lockfilter.normalize(d["name"]) for d in json.loads(project_json)}
    lock = (build.REPO_ROOT / "requirements.lock").read_text()
    assert sdk == lockfilter.closure(lock, ["torch"]) | {"pip"}, sorted(sdk)
    assert {"click", "omegaconf", "hydra-core", "numpy", "pyarrow"} <= project and "torch" not in project
    assert not (sdk - {"pip", "setuptools"}) & project, "a package in both venvs"


def test_the_launch_uses_the_sdk_interpreter(cpu_image: dict[str, Any]) -> None:
    """The SDK's own torchrun (run by L3HP_SDK_PYTHON) starts the project's python as its workers
    (--no-python); they join one gloo group and import the SDK's torch and the project's package. And whatever
    interpreter the plan's torch and neuron launches name resolves to the SDK's torch in the image."""
    worker = ("import json, os, sys, torch, torch.distributed as dist, llama3_hyperpod; "
              "dist.init_process_group('gloo'); t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t); "
              "agent = open(f'/proc/{os.getppid()}/cmdline').read().split(chr(0)); "
              "sys.stdout.write(json.dumps({'exe': sys.executable, 'torch': torch.__file__, "
              "'pkg': llama3_hyperpod.__file__, 'sum': t.item(), 'agent': agent[:3]}) + chr(10)); "
              "dist.destroy_process_group()")  # one write per rank: PYTHONUNBUFFERED=1 splits print()'s line
    out = _in_image(cpu_image["tag"], f"cd /tmp && \"$L3HP_SDK_PYTHON\" -m torch.distributed.run --standalone "
                    f"--nproc_per_node 2 --no-python {PROJECT_PYTHON} -c \"{worker}\"")
    ranks = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(ranks) == 2, out
    for rank in ranks:
        assert rank["agent"] == [SDK_PYTHON["cpu"], "-m", "torch.distributed.run"], rank
        assert rank["exe"] == PROJECT_PYTHON and rank["sum"] == 3.0
        assert rank["torch"].startswith("/opt/sdk/") and rank["pkg"] == "/opt/app/llama3_hyperpod/__init__.py"
    for backend, config in (("torch-cpu", "tiny_cpu.yaml"), ("neuron", "llama3_8b_trn1.yaml")):
        plan = json.loads(_in_image(cpu_image["tag"], f"cd /opt/app && {WRAPPER} plan configs/{config} "
                                    f"--backend {backend} --output-dir /tmp/o --json"))
        argv0 = plan["commands"]["train"]["argv"][0]
        torch_file = _in_image(cpu_image["tag"], f"p=$(command -v {argv0}); head -c2 \"$p\" | grep -q '#!' "
                               "&& p=$(head -1 \"$p\" | cut -c3-); \"$p\" -c 'import torch; print(torch.__file__)'")
        assert torch_file.strip() == "/opt/sdk/lib/python3.11/site-packages/torch/__init__.py", (backend, argv0)
