"""The image's static parts: Dockerfile lint, pinned versions vs the one source of truth, the lock filter, build.sh."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llama3_hyperpod.image import build, lockfilter
from llama3_hyperpod.image.versions import NEURON_ARGS, VERSIONS_FILE, build_args_for, load_versions

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
REFERENCE = Path("/work/shared/reference/neuron-nxdt.md")
# The Neuron 2.28 training set the project is built on (reference/neuron-nxdt.md, from the AWS training DLC).
EXPECTED = {
    ("pip", "torch"): "2.9.0",
    ("pip", "torch-neuronx"): "2.9.0.2.12.22436",
    ("pip", "neuronx-cc"): "2.23.6484.0",
    ("pip", "neuronx-distributed"): "0.17.26814",
    ("pip", "neuronx-distributed-training"): "1.7.0",
    ("apt", "aws-neuronx-runtime-lib"): "2.30.51.0",
    ("apt", "aws-neuronx-collectives"): "2.30.59.0",
    ("apt", "aws-neuronx-tools"): "2.28.23.0",
    ("python",): "3.12",
}
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed (it is in requirements.lock)")
    return path


def dockerfile_args() -> dict[str, list[str]]:
    """Every ARG default in the Dockerfile (an ARG may appear in several stages: all values are kept)."""
    found: dict[str, list[str]] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG "):
            for item in line[4:].split():
                name, _, value = item.partition("=")
                found.setdefault(name, []).append(value)
    return found


def test_hadolint_clean() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_clean() -> None:
    scripts = [ROOT / "build.sh", ROOT / "scripts" / "ci" / "setup_podman.sh"]
    result = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_defaults_equal_versions_file() -> None:
    """A plain `docker build .` (no build args) must pin exactly what versions/neuron.json says."""
    args = dockerfile_args()
    for name, value in load_versions().build_args().items():
        assert args.get(name) and set(args[name]) == {value}, \
            f"ARG {name}={args.get(name)}, {VERSIONS_FILE.name}: {value}"


def test_versions_file_matches_reference() -> None:
    versions = load_versions()
    for path, value in EXPECTED.items():
        assert versions.get(*path) == value, f"{'.'.join(path)}"
    ubuntu = versions.base_image("neuron").rsplit(":", 1)[-1]
    assert UBUNTU_PYTHON.get(ubuntu) == versions.get("python"), "the Neuron base image's Python must be the SDK's"
    if REFERENCE.exists():  # the shared reference notes, where this checkout has them
        text = REFERENCE.read_text()
        for path, value in EXPECTED.items():
            assert value in text, f"{'.'.join(path)}={value} is not in {REFERENCE}"


def test_every_neuron_pin_reaches_the_build() -> None:
    """Each pinned version is a build arg of the neuron flavor and is used by a RUN/LABEL in the Dockerfile."""
    text = DOCKERFILE.read_text()
    args = build_args_for("neuron", load_versions())
    for name in NEURON_ARGS:
        assert name in args
        assert "${" + name + "}" in text, f"ARG {name} is declared but never used"
    cpu = build_args_for("cpu", load_versions())
    assert cpu == {"CPU_BASE_IMAGE": load_versions().base_image("cpu"), "FLAVOR": "cpu",
                   "TORCH_CPU_INDEX": "https://download.pytorch.org/whl/cpu"}


def test_dockerfile_shape() -> None:
    """Default flavor neuron, flavor picked by FROM sdk-${FLAVOR}, app is the last stage, no heredocs (buildah 1.28)."""
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.MULTILINE)
    assert [stage for _, stage in froms] == ["sdk-neuron", "sdk-cpu", "sdk-cuda", "deps", "app"]
    assert ("sdk-${FLAVOR}", "deps") in froms and ("deps", "app") in froms
    assert dockerfile_args()["FLAVOR"][0] == "neuron"
    assert "<<" not in text
    assert "aws-neuronx-dkms" not in text, "the driver belongs on the host"
    assert "--skip-kmod --skip-limit-conf --no-verify" in text
    assert "--require-hashes" in text
    instructions = re.sub(r"\\\n\s*", " ", text).splitlines()
    env_names = {item.split("=")[0] for line in instructions if line.startswith("ENV ") for item in line[4:].split()}
    assert env_names == {"PATH", "LD_LIBRARY_PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}, env_names


@pytest.mark.parametrize("classic", [False, True])
@pytest.mark.parametrize("flavor", ["neuron", "cpu", "cuda"])
def test_flavor_dockerfile_keeps_one_sdk_stage(flavor: str, classic: bool) -> None:
    """The classic builder builds every stage and has no RUN --mount: the tool hands it a Dockerfile without both."""
    text = DOCKERFILE.read_text()
    derived = build.flavor_dockerfile(text, flavor, classic=classic)
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", derived, flags=re.MULTILINE)
    assert [stage for _, stage in stages] == [f"sdk-{flavor}", "deps", "app"]
    has_mount = re.search(r"^RUN --mount=", derived, flags=re.MULTILINE) is not None
    assert has_mount is not classic
    if classic:
        assert "COPY ${WHEELHOUSE}/ /tmp/wheelhouse/\nRUN \\\n    python /opt/deps/lockfilter.py" in derived
    assert "${FLAVOR}" not in "".join(base for base, _ in stages)
    kept = [line for line in text.splitlines() if line not in derived.splitlines()]
    assert all(not line.startswith("COPY") for line in kept)
    assert f'io.llama3-hyperpod.flavor="{flavor}"' in derived


def test_app_stage_split_and_sources() -> None:
    """The build tool builds the app stage alone from a small context: it must find every file the stage copies."""
    deps_part, app_body = build.split_app_stage(DOCKERFILE.read_text())
    assert "AS deps" in deps_part and "FROM" not in app_body
    assert build.app_sources(app_body) == ["neuron_cache", "configs", "enroot", "llama3_hyperpod", "entrypoint.py"]


def test_deps_key_follows_its_inputs(tmp_path: Path) -> None:
    """The deps image is reused only when the SDK part, build args, lock and wheels are the same."""
    context = tmp_path / "context"
    (context / "llama3_hyperpod" / "image").mkdir(parents=True)
    (context / "versions").mkdir()
    for name in ("Dockerfile", "requirements.lock", "llama3_hyperpod/image/lockfilter.py", "versions/neuron.json"):
        shutil.copy(ROOT / name, context / name)
    req = build.BuildRequest(context=context, flavor="cpu", tag="t", build_args={"FLAVOR": "cpu"})
    deps_text, _ = build.split_app_stage(build.flavor_dockerfile((context / "Dockerfile").read_text(), "cpu"))
    key = build.deps_key(req, deps_text)
    assert build.deps_key(req, deps_text) == key
    assert build.deps_key(req, deps_text + "# changed\n") != key
    other = build.BuildRequest(context=context, flavor="cpu", tag="t", build_args={"FLAVOR": "cpu", "X": "1"})
    assert build.deps_key(other, deps_text) != key
    with (context / "requirements.lock").open("a") as lock:
        lock.write("# changed\n")
    assert build.deps_key(req, deps_text) != key


def test_dockerignore_sends_only_what_is_copied() -> None:
    from docker.utils.build import exclude_paths

    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    sent = exclude_paths(str(ROOT), patterns)
    for needed in ("requirements.lock", "entrypoint.py", "llama3_hyperpod/image/lockfilter.py", "versions/neuron.json"):
        assert needed in sent
    assert not [p for p in sent if p.startswith((".git/", ".venv/", "tests/", "bench/")) or p.endswith(".pyc")]


def test_lockfilter_drops_dev_tools_and_sdk_provided() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    kept = lockfilter.filter_lock(lock, ["torch", "Transformers"])
    names = lockfilter.pinned_names(kept)
    assert names < lockfilter.pinned_names(lock)
    assert not names & (lockfilter.DEV_ONLY | {"torch", "transformers"})
    assert {"click", "omegaconf", "numpy"} <= names
    for block in re.split(r"\n(?=[a-z])", kept):
        if re.match(r"^[a-z0-9][a-z0-9._-]*==", block):
            assert "--hash=sha256:" in block, block.splitlines()[0]
    cpu = lockfilter.filter_lock(lock, [])
    assert "torch" in lockfilter.pinned_names(cpu)


def test_lockfilter_runs_as_a_script_with_stdlib_only(tmp_path: Path) -> None:
    """Inside the build it runs before any dependency is installed (python -S -I: no site-packages, no project)."""
    (tmp_path / "exclude").write_text("torch\n")
    script = ROOT / "llama3_hyperpod" / "image" / "lockfilter.py"
    out = subprocess.run([sys.executable, "-I", "-S", str(script), "--exclude-file", str(tmp_path / "exclude"),
                          str(ROOT / "requirements.lock")], capture_output=True, text=True, check=True).stdout
    assert "torch" not in lockfilter.pinned_names(out) and "click" in lockfilter.pinned_names(out)


def test_tree_sha256(tmp_path: Path) -> None:
    assert build.tree_sha256(tmp_path / "missing") == "empty"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    first = build.tree_sha256(tmp_path)
    assert build.tree_sha256(tmp_path) == first
    (tmp_path / "a" / "x").write_text("2")
    assert build.tree_sha256(tmp_path) != first


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--flavor", "gpu"], "invalid choice"),
        (["--wheelhouse", "/nonexistent"], "--wheelhouse"),
        (["--build-arg", "PIP_PASSWORD=x"], "secrets"),
        (["--build-arg", "novalue"], "NAME=VALUE"),
        (["--tag", "Bad Tag"], "--tag"),
        (["--push", "--tag", "plain:1"], "--push"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_sqsh_without_enroot_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("enroot"):
        pytest.skip("enroot is installed here: the missing-enroot message cannot show")
    assert build.main(["--sqsh", str(tmp_path / "img.sqsh")]) == 2
    assert "enroot is not installed" in capsys.readouterr().err


def test_request_labels_and_wheelhouse_staging(tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "versions").mkdir(parents=True)
    for name in ("Dockerfile", "requirements.lock", "versions/neuron.json"):
        shutil.copy(ROOT / name, context / name)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"zip")
    ns = build.parser().parse_args(["--flavor", "cpu", "--base-image", "localhost/debian:bookworm",
                                    "--wheelhouse", str(wheels), "--tag", "localhost/l3:t", "--context", str(context)])
    req = build.make_request(ns)
    assert req.build_args["CPU_BASE_IMAGE"] == "localhost/debian:bookworm"
    assert req.build_args["WHEELHOUSE"] == "build/wheelhouse"
    assert (context / "build" / "wheelhouse" / "x-1.0-py3-none-any.whl").exists()
    assert re.fullmatch(r"[0-9a-f]{64}", req.labels["io.llama3-hyperpod.lock-sha256"])
    assert req.labels["org.opencontainers.image.revision"] == "unknown"
    assert req.labels["io.llama3-hyperpod.cache-manifest-sha256"] == "empty"


def test_git_commit_label_value() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert build.git_commit(ROOT) in (head, head + "-dirty")


def test_split_tag_and_ecr_detection() -> None:
    assert build.split_tag("reg:5000/team/img:v1") == ("reg:5000/team/img", "v1")
    assert build.split_tag("reg:5000/team/img") == ("reg:5000/team/img", "latest")
    assert build.ecr_auth("localhost/img:1") is None  # not ECR: no AWS CLI call
    match = build._ECR.match("123456789012.dkr.ecr.us-west-2.amazonaws.com/llama3:neuron")
    assert match is not None and match["region"] == "us-west-2"


def test_unreachable_docker_api_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--flavor", "cpu", "--docker-host", "unix:///nonexistent/docker.sock"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach a Docker API at unix:///nonexistent/docker.sock")
    assert err.count("\n") == 1


def test_build_sh_help() -> None:
    result = subprocess.run([str(ROOT / "build.sh"), "--help"], capture_output=True, text=True, check=True)
    for flag in ("--flavor", "--tag", "--push", "--sqsh", "--wheelhouse", "--base-image", "--docker-host", "--cache"):
        assert flag in result.stdout


def test_versions_file_is_json_with_comment() -> None:
    assert "_comment" in json.loads(VERSIONS_FILE.read_text())


def _cache_dir(root: Path, backend: str, device: str) -> Path:
    """A compile cache as `compile` leaves it: graphs, a manifest record, and bookkeeping that must not be baked."""
    (root / "inductor" / "fxgraph" / "ab").mkdir(parents=True)
    (root / "inductor" / "fxgraph" / "ab" / "entry").write_bytes(b"graph")
    kernel = root / "inductor" / "ab" / "kernel.so"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"\x7fELF")
    kernel.chmod(0o700)  # written by another uid with a private mode: must still be readable in the image
    (root / ".seed.lock").touch()
    (root / "inductor" / ".x.tmp-12").write_text("half")
    record = {"key": "k", "backend": backend, "graph": {"backend": backend, "device": device}}
    (root / "manifest.json").write_text(json.dumps({"compiles": [record], "files": []}))
    return root


def _request(context: Path, *argv: str) -> build.BuildRequest:
    return build.make_request(build.parser().parse_args([*argv, "--tag", "localhost/l3:t", "--context", str(context)]))


def _minimal_context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    (context / "versions").mkdir(parents=True)
    (context / "neuron_cache").mkdir()
    (context / "neuron_cache" / "README.md").write_text("what this is")
    (context / "neuron_cache" / "stale.txt").write_text("not baked when --cache is given")
    for name in ("Dockerfile", "requirements.lock", "versions/neuron.json", ".dockerignore"):
        shutil.copy(ROOT / name, context / name)
    return context


def test_cache_flag_bakes_that_cache_with_its_manifest_and_readme(tmp_path: Path) -> None:
    context = _minimal_context(tmp_path)
    cache = _cache_dir(tmp_path / "cache", "torch", "cpu")
    plain = _request(context, "--flavor", "cpu")
    req = _request(context, "--flavor", "cpu", "--cache", str(cache))
    assert req.cache == cache.resolve()
    baked = build.baked_cache_files(context, req.cache)
    assert sorted(baked) == ["README.md", "inductor/ab/kernel.so", "inductor/fxgraph/ab/entry", "manifest.json"]
    label = "io.llama3-hyperpod.cache-manifest-sha256"
    assert req.labels[label] == build.files_sha256(baked) != plain.labels[label]
    _, app_body = build.split_app_stage((context / "Dockerfile").read_text())
    with tarfile.open(fileobj=build.app_context(req, "FROM x\n", build.app_sources(app_body))) as tar:
        members = {m.name: m for m in tar.getmembers() if m.name.startswith("neuron_cache/")}
    assert sorted(members) == [f"neuron_cache/{rel}" for rel in sorted(baked)]
    kernel = members["neuron_cache/inductor/ab/kernel.so"]
    assert (kernel.uid, kernel.mode) == (0, 0o755)


@pytest.mark.parametrize(
    ("flavor", "backend", "device", "message"),
    [
        ("neuron", "torch", "cpu", "was compiled for torch on cpu; the neuron image runs neuron"),
        ("cpu", "neuron", "neuron", "was compiled for neuron on neuron; the cpu image runs torch on cpu"),
        ("cuda", "torch", "cpu", "the cuda image runs torch on cuda"),
    ],
)
def test_cache_for_another_flavor_is_refused(tmp_path: Path, flavor: str, backend: str, device: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cache = _cache_dir(tmp_path / "cache", backend, device)
    assert build.main(["--flavor", flavor, "--cache", str(cache), "--context", str(_minimal_context(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cache: ") and message in err and err.count("\n") == 1, err


def test_cache_without_manifest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cache" / "inductor").mkdir(parents=True)
    context = _minimal_context(tmp_path)
    assert build.main(["--flavor", "cpu", "--cache", str(tmp_path / "cache"), "--context", str(context)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert build.main(["--flavor", "cpu", "--cache", str(tmp_path / "nope"), "--context", str(context)]) == 2
    assert "is not a directory" in capsys.readouterr().err
