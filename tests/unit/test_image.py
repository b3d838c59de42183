"""The image's static parts: Dockerfile lint, pinned versions vs the one source of truth, the lock filter, build.sh."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llama3_hyperpod.image import build, lockfilter, sdkcheck
from llama3_hyperpod.image.versions import NEURON_ARGS, SDK_PYTHON, VERSIONS_FILE, build_args_for, load_versions

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
# AWS's NxDT training image for that set (aws-neuron/deep-learning-containers 2.28.0, README.md line 55).
DLC_IMAGE = "public.ecr.aws/neuron/pytorch-training-neuronx:2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04"
# The project's own top-level packages: none may land in an SDK environment.
PROJECT_ONLY = {"click", "omegaconf", "hydra-core", "rich", "docker", "python-hostlist", "pyarrow", "datasets",
                "tensorboard", "matplotlib", "psutil", "pyyaml", "safetensors", "tokenizers", "transformers", "numpy"}


def stage(name: str) -> str:
    """The text of one stage of the Dockerfile (its FROM line up to the next FROM)."""
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {re.escape(name)}\n(.*?)(?=^FROM |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no stage {name}"
    return match.group(0)


def instructions(text: str) -> list[str]:
    """Dockerfile instructions with their continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line for line in joined.splitlines() if line.strip()]


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed (it is in requirements.lock)")
    return path


def dockerfile_args() -> dict[str, list[str]]:
    """Every ARG default in the Dockerfile (an ARG may appear in several stages: all values are kept; a bare
    `ARG NAME` inside a stage only brings the global one into scope and is left out)."""
    found: dict[str, list[str]] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG "):
            for item in line[4:].split():
                name, sep, value = item.partition("=")
                if sep:
                    found.setdefault(name, []).append(value)
    return found


def test_hadolint_clean() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_clean() -> None:
    scripts = [ROOT / "build.sh", *sorted((ROOT / "scripts" / "ci").glob("*.sh"))]
    assert {"setup_podman.sh", "setup_docker.sh", "debian_rootfs.sh"} <= {p.name for p in scripts}
    result = subprocess.run([tool("shellcheck"), "-x", *map(str, scripts)], capture_output=True, text=True,
                            check=False)
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
    assert versions.get("base_images", "neuron") == DLC_IMAGE
    assert f"py{versions.get('python').replace('.', '')}" in DLC_IMAGE, "the DLC's Python must be the pinned one"
    digest = versions.digest("neuron")
    assert versions.base_image("neuron") == (f"{DLC_IMAGE}@{digest}" if digest else DLC_IMAGE)
    if REFERENCE.exists():  # the shared reference notes, where this checkout has them
        text = REFERENCE.read_text()
        for path, value in EXPECTED.items():
            assert value in text, f"{'.'.join(path)}={value} is not in {REFERENCE}"
        assert DLC_IMAGE.split("/", 1)[1].removeprefix("neuron/") in text


def test_nxdt_stack_pins_are_the_references(neuron_reference: str) -> None:
    """Each NxDT requirement the neuron build checks is pinned the way the reference says AWS's recipe pins it, and
    the NeMo patches it checks are the reference's two."""
    raw = load_versions().raw
    text = neuron_reference
    section = text[text.index("## What NxDT needs installed"):]
    section = section[: section.index("\n## ", 4)]
    flat = re.sub(r"\s+", " ", section)
    for name, want in raw["nxdt_stack"].items():
        if name.startswith("_"):
            continue
        spellings = {name, name.replace("-", "_")}
        if want.endswith(".*"):
            major, minor = want[:-2].split(".")
            specs = {f"{n}=={want}" for n in spellings} | {f"{n}>={major}.{minor},<{major}.{int(minor) + 1}"
                                                           for n in spellings}
        else:
            specs = {f"{n}=={want}" for n in spellings}
        assert any(spec in flat for spec in specs), f"{name} {want}: none of {sorted(specs)} in the reference"
    for rel, gone in raw["nemo_patches"].items():
        if not rel.startswith("_"):
            assert rel in flat and gone.strip().removeprefix("and ").removeprefix("self.") in flat, rel
    assert "apex" in raw["nxdt_modules"] and "megatron.core" in raw["nxdt_modules"] and "apex at tag 25.07" in flat
    assert "core_r0.10.0" in flat


def test_neuron_stage_is_aws_image_unchanged_and_checked() -> None:
    """FROM AWS's NxDT image (tag, @digest when recorded); nothing installed into it; the build fails unless it holds
    every pin (sdkcheck against the copied versions file); NxDT's examples from the pinned public commit."""
    text = stage("sdk-neuron")
    steps = instructions(text)
    assert steps[0] == "FROM ${NEURON_BASE_IMAGE} AS sdk-neuron"
    assert dockerfile_args()["NEURON_BASE_IMAGE"] == [load_versions().base_image("neuron")]
    assert not re.search(r"pip3? install|apt-get install|apt install|conda install|setup\.py", text)
    assert "COPY versions/neuron.json /etc/llama3-hyperpod/neuron.json" in steps
    check = next(s for s in steps if "sdkcheck.py" in s and s.startswith("RUN"))
    assert '"${L3HP_SDK_PYTHON}" /opt/deps/sdkcheck.py --versions /etc/llama3-hyperpod/neuron.json' in check
    assert f"L3HP_SDK_PYTHON={SDK_PYTHON['neuron']}" in text
    examples = next(s for s in steps if "NXDT_EXAMPLES_COMMIT" in s and s.startswith("RUN"))
    assert 'fetch --quiet --depth 1 "${NXDT_GIT_URL}" "${NXDT_EXAMPLES_COMMIT}"' in examples
    assert 'test "$(git -C /tmp/nxdt rev-parse HEAD)" = "${NXDT_EXAMPLES_COMMIT}"' in examples
    assert load_versions().get("nxdt_examples", "dir") in examples
    assert re.fullmatch(r"[0-9a-f]{40}", load_versions().get("nxdt_examples", "commit"))
    assert "HEALTHCHECK NONE" in steps
    assert "echo torch > /etc/llama3-hyperpod/lock-exclude" in check, "no second torch beside the SDK's"


def test_no_project_package_goes_into_an_sdk_environment() -> None:
    """The SDK stages install only the SDK (neuron: nothing; cpu: torch's closure of the lock; cuda: torch); the
    deps stage installs into /opt/venv alone."""
    lock = (ROOT / "requirements.lock").read_text()
    sdk_cpu = lockfilter.closure(lock, ["torch"])
    assert "torch" in sdk_cpu and not sdk_cpu & PROJECT_ONLY, sorted(sdk_cpu & PROJECT_ONLY)
    assert "--closure torch" in stage("sdk-cpu")
    for name in ("sdk-cpu", "sdk-cuda"):
        pips = re.findall(r"(\S*pip\S*) install ", stage(name))
        assert pips and set(pips) == {"/opt/sdk/bin/pip"}, (name, pips)
    assert re.findall(r"(\S*pip\S*) install ", stage("deps")) == ["/opt/venv/bin/pip", "/opt/venv/bin/pip"]
    assert '"${L3HP_SDK_PYTHON}" -m venv /opt/venv' in stage("deps")
    for name in ("sdk-cpu", "sdk-cuda", "deps"):
        assert "pip --disable-pip-version-check check" in stage(name), name


def test_sdkcheck_finds_every_kind_of_difference(tmp_path: Path) -> None:
    """The check the neuron build runs, on a synthetic environment: quiet when everything holds, one line per
    deviation otherwise."""
    pins = load_versions().raw
    nemo = tmp_path / "site"
    for rel in pins["nemo_patches"]:
        if not rel.startswith("_"):
            (nemo / rel).parent.mkdir(parents=True, exist_ok=True)
            (nemo / rel).write_text("patched\n")
    python = Path("/usr/local/bin/python3.12")
    good = {sdkcheck.normalize(k): v + ("+0f1dac25" if k == "torch-neuronx" else "")
            for section in ("pip", "nxdt_stack") for k, v in pins[section].items() if not k.startswith("_")}
    good["omegaconf"], good["transformers"] = "2.2.3", "4.56.2"
    apt = {k: f"{v}-faafe26f0" for k, v in pins["apt"].items() if not k.startswith("_")}
    here = f"{sys.version_info.major}.{sys.version_info.minor}"

    def run(dists: dict[str, str], *, dpkg: dict[str, str] = apt, missing: frozenset[str] = frozenset(),
            tools: set[str] | None = None, patched: bool = True) -> list[str]:
        if not patched:
            for rel, gone in pins["nemo_patches"].items():
                if not rel.startswith("_"):
                    (nemo / rel).write_text(f"x{gone}y\n")
        present = tools if tools is not None else {*pins["tools"], *(str(python.parent / s)
                                                                      for s in pins["sdk_scripts"])}
        return sdkcheck.check({**pins, "python": here}, dists, python=python, dpkg=dpkg.get,
                              find_spec=lambda m: None if m in missing else object(),
                              locate=lambda dist, rel: nemo / rel, executable=lambda p: str(p) in present)

    assert run(good) == []
    assert run({**good, "torch-neuronx": "2.9.0.2.13.24727+8e870898"}) == \
        ["torch-neuronx: 2.9.0.2.13.24727+8e870898, pinned 2.9.0.2.12.22436"]
    assert run({k: v for k, v in good.items() if k != "nemo-toolkit"}) == ["nemo-toolkit: not installed, pinned 2.1.0"]
    assert run({**good, "omegaconf": "2.3.0"}) == ["omegaconf: 2.3.0, pinned 2.2.*"]
    assert run(good, dpkg={**apt, "aws-neuronx-tools": "2.30.10.0-39feaa591"}) == \
        ["aws-neuronx-tools (apt): 2.30.10.0-39feaa591, pinned 2.28.23.0"]
    assert run(good, missing=frozenset({"apex", "megatron.core"})) == ["module apex: not importable",
                                                              "module megatron.core: not importable"]
    assert run(good, tools=set(pins["tools"])) == [
        f"{s}: not beside the SDK interpreter ({python.parent / s} missing)" for s in pins["sdk_scripts"]]
    assert [p.split(" still contains")[0] for p in run(good, patched=False)] == [
        f"nemo patch: {rel}" for rel in pins["nemo_patches"] if not rel.startswith("_")]


def test_sdkcheck_records_the_running_environment(tmp_path: Path) -> None:
    """--record and --share-with-project on a real interpreter (this one): what the deps stage reads."""
    env = {k: v for k, v in os.environ.items() if k != "L3HP_SDK_PYTHON"}
    out = subprocess.run([sys.executable, "-I", str(ROOT / "llama3_hyperpod" / "image" / "sdkcheck.py"),
                          "--record", str(tmp_path / "sdk.json"), "--share-with-project", str(tmp_path / "share")],
                         capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "sdk.json").read_text())
    assert rec["python"] == sys.executable and rec["distributions"]["torch"].startswith("2.")
    assert (tmp_path / "share" / "lock-exclude").read_text().split() == list(rec["distributions"])
    assert (tmp_path / "share" / "sdk.pth").read_text().split() == rec["site_packages"]
    wrong = subprocess.run([sys.executable, "-I", str(ROOT / "llama3_hyperpod" / "image" / "sdkcheck.py")],
                           capture_output=True, text=True, check=False, env={**env, "L3HP_SDK_PYTHON": "/x/python"})
    assert wrong.returncode == 1 and "but L3HP_SDK_PYTHON is /x/python" in wrong.stderr


def test_every_neuron_pin_reaches_the_build() -> None:
    """Each versions-file build arg is declared and used in the Dockerfile; the rest of the file is checked in it."""
    text = DOCKERFILE.read_text()
    args = build_args_for("neuron", load_versions())
    for name in NEURON_ARGS:
        assert "${" + name + "}" in text, f"ARG {name} is declared but never used"
    assert set(args) == {"NEURON_BASE_IMAGE", "FLAVOR", "TORCH_CPU_INDEX", "NEURON_SDK_VERSION", "NXDT_GIT_URL",
                         "NXDT_EXAMPLES_COMMIT"}
    cpu = build_args_for("cpu", load_versions())
    assert cpu == {"CPU_BASE_IMAGE": load_versions().base_image("cpu"), "FLAVOR": "cpu",
                   "TORCH_CPU_INDEX": "https://download.pytorch.org/whl/cpu"}


def test_dockerfile_shape() -> None:
    """Default flavor neuron, flavor picked by FROM sdk-${FLAVOR}, app is the last stage, no heredocs (buildah 1.28);
    every SDK stage names its interpreter; the ENTRYPOINT is the project's wrapper, not a `python` on PATH."""
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.MULTILINE)
    assert [stage for _, stage in froms] == ["sdk-neuron", "sdk-cpu", "sdk-cuda", "deps", "app"]
    assert ("sdk-${FLAVOR}", "deps") in froms and ("deps", "app") in froms
    assert dockerfile_args()["FLAVOR"][0] == "neuron"
    assert "<<" not in text
    assert "aws-neuronx-dkms" not in text, "the driver belongs on the host"
    assert "--require-hashes" in stage("sdk-cpu") and "--require-hashes" in stage("deps")
    env_names = {item.split("=")[0] for line in instructions(text) if line.startswith("ENV ")
                 for item in line[4:].split()}
    assert env_names == {"PATH", "L3HP_SDK_PYTHON", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}, env_names
    for flavor in ("neuron", "cpu", "cuda"):
        assert f"L3HP_SDK_PYTHON={SDK_PYTHON[flavor]}" in stage(f"sdk-{flavor}")
        path = re.search(r"PATH=(\S+)", stage(f"sdk-{flavor}"))
        assert path and "/opt/venv" not in path.group(1), "the project's venv stays off PATH"
    assert 'ENTRYPOINT ["/usr/local/bin/llama3-hyperpod"]' in stage("app")
    assert "exec /opt/venv/bin/python /opt/app/entrypoint.py" in stage("deps")


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
    if classic:  # one COPY of the wheelhouse, in the first stage that mounts it; later stages inherit it
        assert derived.count("COPY wheelhouse/ /tmp/wheelhouse/\n") == 1
        mounts = len(re.findall(r"^RUN --mount=", text, flags=re.MULTILINE))
        assert mounts == 2 and text.count("--mount=type=bind,source=wheelhouse,target=/tmp/wheelhouse ") == 2
    assert "${FLAVOR}" not in "".join(base for base, _ in stages)
    copies = [line for name in (f"sdk-{flavor}", "deps", "app") for line in stage(name).splitlines()
              if line.startswith("COPY")]
    assert copies and all(line in derived.splitlines() for line in copies)
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
    for name in ("Dockerfile", "requirements.lock", "llama3_hyperpod/image/lockfilter.py",
                 "llama3_hyperpod/image/sdkcheck.py", "versions/neuron.json"):
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
    changed = build.deps_key(req, deps_text)
    assert changed != key
    with (context / "llama3_hyperpod" / "image" / "sdkcheck.py").open("a") as script:
        script.write("# changed\n")  # copied into the SDK stage: part of the deps image
    assert build.deps_key(req, deps_text) != changed


def test_dockerignore_sends_only_what_is_copied() -> None:
    from docker.utils.build import exclude_paths

    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    sent = exclude_paths(str(ROOT), patterns)
    for needed in ("requirements.lock", "entrypoint.py", "llama3_hyperpod/image/lockfilter.py",
                   "llama3_hyperpod/image/sdkcheck.py", "versions/neuron.json"):
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


def test_lockfilter_closure_follows_the_via_notes() -> None:
    """torch's closure: torch and what it needs, directly (sympy) or not (mpmath via sympy); nothing torch does not
    need (numpy is required by others only); an unknown root is an error."""
    lock = (ROOT / "requirements.lock").read_text()
    by = lockfilter.dependents(lock)
    assert "torch" in by["sympy"] and "sympy" in by["mpmath"] and "-r" not in "".join(by["click"])
    torch = lockfilter.closure(lock, ["torch"])
    assert {"torch", "sympy", "mpmath", "jinja2", "markupsafe", "networkx", "filelock", "fsspec"} <= torch
    assert "numpy" not in torch and "click" not in torch
    for name in torch - {"torch"}:
        chain = {name}
        while not chain & {"torch"}:
            chain = set().union(*(by[n] for n in chain)) or {"<none>"}
            assert "<none>" not in chain, f"{name} does not lead to torch"
    selected = lockfilter.select_lock(lock, torch)
    assert lockfilter.pinned_names(selected) == torch and selected.count("--hash=sha256:") > len(torch)
    with pytest.raises(ValueError, match="not in the lock: nosuch"):
        lockfilter.closure(lock, ["nosuch"])


def test_lockfilter_runs_as_a_script_with_stdlib_only(tmp_path: Path) -> None:
    """Inside the build it runs before any dependency is installed (python -S -I: no site-packages, no project)."""
    (tmp_path / "exclude").write_text("torch\n")
    script = ROOT / "llama3_hyperpod" / "image" / "lockfilter.py"
    out = subprocess.run([sys.executable, "-I", "-S", str(script), "--exclude-file", str(tmp_path / "exclude"),
                          str(ROOT / "requirements.lock")], capture_output=True, text=True, check=True).stdout
    assert "torch" not in lockfilter.pinned_names(out) and "click" in lockfilter.pinned_names(out)
    names = subprocess.run([sys.executable, "-I", "-S", str(script), "--closure", "torch", "--names",
                            str(ROOT / "requirements.lock")], capture_output=True, text=True, check=True).stdout
    assert set(names.split()) == lockfilter.closure((ROOT / "requirements.lock").read_text(), ["torch"])
    only = subprocess.run([sys.executable, "-I", "-S", str(script), "--only", "setuptools",
                           str(ROOT / "requirements.lock")], capture_output=True, text=True, check=True).stdout
    assert lockfilter.pinned_names(only) == {"setuptools"} and "--hash=sha256:" in only


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


def test_sqsh_without_mksquashfs_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "mksquashfs" else real_which(name))
    assert build.main(["--sqsh", str(tmp_path / "img.sqsh")]) == 2
    assert "mksquashfs is not installed" in capsys.readouterr().err


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
    assert req.wheelhouse == wheels and "WHEELHOUSE" not in req.build_args
    staged = context / "wheelhouse" / "x-1.0-py3-none-any.whl"
    with build.staged_wheelhouse(req.wheelhouse, context):
        assert staged.read_bytes() == b"zip"
    assert not staged.exists(), "the staged wheels are removed after the build"
    (context / "wheelhouse" / "mine-1.0-py3-none-any.whl").write_bytes(b"own")
    with pytest.raises(build.UsageError, match="already holds wheels"):
        build.make_request(ns)
    own = build.parser().parse_args(["--flavor", "cpu", "--wheelhouse", str(context / "wheelhouse"),
                                     "--context", str(context)])
    assert build.make_request(own).wheelhouse is None  # the context's own: used in place
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
