"""The srun lines enroot/*.sbatch render (DRY_RUN=1), checked against the pyxis/enroot/HyperPod facts in
shared/reference/slurm-enroot-pyxis.md, and the input checks of the sbatch scripts and import.sh."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CONFIG_TINY, REFERENCE, REPO

ENROOT = REPO / "enroot"
SCRIPTS = ("train.sbatch", "compile.sbatch")
LAUNCHER = "/usr/local/bin/llama3-hyperpod"
BASH = shutil.which("bash") or "/bin/bash"


@pytest.fixture(scope="session")
def pyxis_reference() -> str:
    path = REFERENCE / "slurm-enroot-pyxis.md"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with shared/ beside the repository")
        pytest.skip(f"{path} not present in this checkout")
    return path.read_text(encoding="utf-8")


def documented_pyxis_flags(reference: str) -> set[str]:
    """Every pyxis option the reference's "pyxis options" section names; `--[no-]x` counts as --x and --no-x."""
    section = reference.split("## pyxis options", 1)[1].split("\n## ", 1)[0]
    flags: set[str] = set()
    for match in re.finditer(r"--(\[no-\])?(container-[a-z-]+)", section):
        flags.add(f"--{match.group(2)}")
        if match.group(1):
            flags.add(f"--no-{match.group(2)}")
    return flags


def render(script: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the sbatch script as bash with DRY_RUN=1 in a clean env that looks like a 2-node allocation."""
    fsx, nvme = tmp_path / "fsx", tmp_path / "nvme"
    fsx.mkdir(exist_ok=True)
    nvme.mkdir(exist_ok=True)
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DRY_RUN": "1", "FSX": str(fsx), "NVME": str(nvme),
            "L3HP_HYPERPOD_MARKER": str(tmp_path / "no-sagemaker-cluster"), "SLURM_JOB_ID": "42",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(tmp_path), "L3HP_ENROOT_DIR": str(ENROOT)}
    return subprocess.run([BASH, str(ENROOT / script), *args], env={**base, **env}, capture_output=True,
                          text=True, cwd=tmp_path, timeout=30, check=False)


def srun_lines(script: str, tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
    """The step's srun line, then (with a container) the clean-up step's."""
    result = render(script, tmp_path, *args, **env)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert all(argv[0] == "srun" for argv in lines), result.stdout
    return lines


def srun_line(script: str, tmp_path: Path, *args: str, **env: str) -> list[str]:
    return srun_lines(script, tmp_path, *args, **env)[0]


def options(argv: list[str]) -> dict[str, str]:
    """srun's own --name=value options (those before the program)."""
    out = {}
    for arg in argv[1:]:
        if not arg.startswith("--"):
            break
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def program(argv: list[str]) -> list[str]:
    return argv[next(i for i, a in enumerate(argv[1:], 1) if not a.startswith("--")):]


def sbatch_headers(script: str) -> list[str]:
    text = (ENROOT / script).read_text(encoding="utf-8")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_pyxis_srun_line_follows_the_reference(script: str, tmp_path: Path, pyxis_reference: str) -> None:
    argv = srun_line(script, tmp_path, "configs/tiny_cpu.yaml", "trainer.max_steps=5",
                     IMAGE="/fsx-images/l3.sqsh", NEURON_CC_FLAGS="-O1", OMP_NUM_THREADS="4", UNRELATED="x")
    opts = options(argv)
    pyxis = {name for name in opts if "container" in name}
    assert pyxis <= documented_pyxis_flags(pyxis_reference), pyxis - documented_pyxis_flags(pyxis_reference)
    # A squashfs path must start with / (or ./): a bare name is pulled from Docker Hub.
    assert "squashfs path that MUST start with `/`" in pyxis_reference
    assert opts["--container-image"] == "/fsx-images/l3.sqsh"
    # The image ENTRYPOINT is not run: the command line calls the program explicitly, by absolute path (a login
    # shell's /etc/profile may reset PATH: the reference's "login shell" fact).
    assert "--no-container-entrypoint" in opts
    assert "`ENROOT_LOGIN_SHELL` defaults to yes" in pyxis_reference
    assert program(argv)[:3] == [LAUNCHER, script.removesuffix(".sbatch"), "configs/tiny_cpu.yaml"]
    assert opts["--container-workdir"] == "/opt/app"
    # Shared storage and node-local NVMe at their host paths (SRC:DST).
    mounts = opts["--container-mounts"].split(",")
    assert mounts == [f"{tmp_path / 'fsx'}:{tmp_path / 'fsx'}", f"{tmp_path / 'nvme'}:{tmp_path / 'nvme'}"]
    # The user's tunables reach the program although the image ENV would win over them otherwise.
    passed = opts["--container-env"].split(",")
    assert {"NEURON_CC_FLAGS", "OMP_NUM_THREADS"} <= set(passed)
    assert "UNRELATED" not in passed and "PATH" not in passed
    assert opts["--container-name"] == "llama3-hyperpod-42"
    assert "--no-container-mount-home" in opts
    # One task per node on every node of the allocation; HyperPod's auto-resume only off HyperPod is absent.
    assert opts["--ntasks-per-node"] == "1" and opts["--nodes"] == "2"
    assert "--auto-resume" not in opts
    # Logs per job, restart and node.
    assert opts["--output"] == f"{tmp_path}/fsx/llama3-hyperpod/runs/slurm-logs/%x-%j-restart0-%N-node%t.log"
    assert program(argv)[3:] == ["--output-dir", f"{tmp_path}/fsx/llama3-hyperpod/runs", "trainer.max_steps=5",
                                 f"compiler_cache_url='{tmp_path}/fsx/llama3-hyperpod/cache'"]


def test_auto_resume_only_on_hyperpod(tmp_path: Path, pyxis_reference: str) -> None:
    assert "`/opt/sagemaker_cluster` exists" in pyxis_reference
    marker = tmp_path / "sagemaker_cluster"
    marker.mkdir()
    opts = options(srun_line("train.sbatch", tmp_path, L3HP_HYPERPOD_MARKER=str(marker),
                             SLURM_RESTART_COUNT="3", IMAGE="/x.sqsh"))
    assert opts["--auto-resume"] == "1"
    assert "-restart3-" in opts["--output"]


def test_extra_mounts_and_env_names_are_added(tmp_path: Path) -> None:
    opts = options(srun_line("train.sbatch", tmp_path, IMAGE="/x.sqsh", CONTAINER_MOUNTS="/data:/data:ro",
                             CONTAINER_ENV="MY_KNOB"))
    assert opts["--container-mounts"].endswith(",/data:/data:ro")
    assert opts["--container-env"].split(",")[-1] == "MY_KNOB"


def test_venv_mode_runs_the_same_entrypoint_without_pyxis(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    argv = srun_line("train.sbatch", tmp_path, "configs/tiny_cpu.yaml", CONTAINER="none", VENV=str(venv),
                     OUTPUT_DIR=str(tmp_path / "out"), BACKEND="torch-cpu", RUN_NAME="r1")
    opts = options(argv)
    assert not [name for name in opts if "container" in name]
    assert opts["--chdir"] == str(REPO)
    assert program(argv) == [f"{venv}/bin/python", f"{REPO}/entrypoint.py", "train", "configs/tiny_cpu.yaml",
                             "--output-dir", str(tmp_path / "out"), "--run-name", "r1", "--backend", "torch-cpu",
                             f"compiler_cache_url='{tmp_path}/fsx/llama3-hyperpod/cache'"]


@pytest.mark.parametrize(("env", "message"), [
    ({"IMAGE": "images/l3.sqsh"}, "IMAGE=images/l3.sqsh must be an absolute path to a .sqsh file"),
    ({"IMAGE": "/x.sqsh", "CONTAINER": "docker"}, "CONTAINER=docker must be pyxis, podman or none"),
    ({"IMAGE": "/x.sqsh", "OUTPUT_DIR": "/elsewhere"}, "OUTPUT_DIR=/elsewhere is not under a container mount"),
    ({"IMAGE": "/x.sqsh", "OUTPUT_DIR": "runs"}, "OUTPUT_DIR=runs must be an absolute path"),
    ({"IMAGE": "/x.sqsh", "CACHE_DIR": "cache"}, "CACHE_DIR=cache must be an absolute path"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result = render("train.sbatch", tmp_path, **env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_image_file_is_refused_at_run_time(tmp_path: Path) -> None:
    result = render("train.sbatch", tmp_path, DRY_RUN="", IMAGE=str(tmp_path / "missing.sqsh"))
    assert result.returncode == 2
    assert "does not exist: make it with enroot/import.sh" in result.stderr


def write_cache_manifest(cache: Path, *node_counts: int) -> None:
    """A manifest as `compile` writes it (llama3_hyperpod.cache.manifest), one record per node count."""
    from llama3_hyperpod.cache.manifest import make_record, update_manifest
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.graphkey import graph_fields_from_config

    for nodes in node_counts:
        rc = load_config(CONFIG_TINY, ("data.micro_batch_size=1",), num_nodes=nodes)
        fields = graph_fields_from_config(rc, backend="torch", device="cpu", threads=1, cc_flags=None)
        update_manifest(cache, make_record(fields, {}, cache, created="2026-01-01T00:00:00+00:00",
                                           compile_seconds=None, config_path=str(CONFIG_TINY), overrides=[]))


def test_train_refuses_a_cache_compiled_for_other_node_counts(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_cache_manifest(cache, 4, 1)
    result = render("train.sbatch", tmp_path, IMAGE="/x.sqsh", CACHE_DIR=str(cache))
    assert result.returncode == 2
    assert result.stderr == (f"error: compile cache {cache} was compiled for 1,4 nodes (layout.num_nodes in "
                             f"{cache}/manifest.json) but this job has 2: submit with -N 1, or run compile.sbatch "
                             "with -N 2 first\n")
    assert render("train.sbatch", tmp_path, IMAGE="/x.sqsh", CACHE_DIR=str(cache),
                  SLURM_JOB_NUM_NODES="4").returncode == 0
    # compile adds graphs for another node count beside the others, and says so.
    compiled = render("compile.sbatch", tmp_path, IMAGE="/x.sqsh", CACHE_DIR=str(cache))
    assert compiled.returncode == 0
    assert "holds graphs for 1,4 nodes; adding graphs for 2 nodes" in compiled.stderr


@pytest.mark.parametrize(("manifest", "ok"), [(None, True), ({"num_nodes": 2}, True), ({"num_nodes": 3}, False),
                                              ({"compiles": []}, True)])
def test_minimal_manifest_and_no_manifest(tmp_path: Path, manifest: dict[str, object] | None, ok: bool) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    if manifest is not None:
        (cache / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert (render("train.sbatch", tmp_path, IMAGE="/x.sqsh", CACHE_DIR=str(cache)).returncode == 0) is ok


def test_sbatch_headers() -> None:
    for script in SCRIPTS:
        headers = sbatch_headers(script)
        assert {"--ntasks-per-node=1", "--exclusive", "--open-mode=append"} <= set(headers), script
    train = sbatch_headers("train.sbatch")
    assert "--requeue" in train
    assert any(re.fullmatch(r"--signal=USR1@\d+", h) for h in train), train


def test_requeue_exit_code_is_defined_once() -> None:
    """85 = "checkpointed, requeue me": one definition on the Slurm side, which the trainer must match."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in ENROOT.iterdir() if p.is_file()}
    assert [name for name, text in texts.items() if "L3HP_EXIT_REQUEUE=" in text] == ["job.sh"]
    assert re.search(r"^L3HP_EXIT_REQUEUE=85$", texts["job.sh"], re.M)
    assert not [name for name, text in texts.items() if re.search(r"\b85\b", text) and name != "job.sh"
                and "L3HP_EXIT_REQUEUE" not in text and name != "README.md"]


def test_enroot_conf_has_the_hyperpod_settings(pyxis_reference: str) -> None:
    settings = {}
    for line in (ENROOT / "enroot.conf").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split(None, 1)
            settings[key] = value.strip()
    assert settings["ENROOT_SQUASH_OPTIONS"] == "-comp lzo -noI -noD -noF -noX -no-duplicates"
    assert settings["ENROOT_SQUASH_OPTIONS"] in pyxis_reference
    assert (settings["ENROOT_ROOTFS_WRITABLE"], settings["ENROOT_MOUNT_HOME"], settings["ENROOT_RESTRICT_DEV"]) == (
        "yes", "no", "no")
    for key in ("ENROOT_RUNTIME_PATH", "ENROOT_DATA_PATH", "ENROOT_CACHE_PATH"):
        assert settings[key].startswith("/opt/dlami/nvme/"), key  # node-local NVMe, not the root volume or /fsx
    assert "$(id -u)" in settings["ENROOT_RUNTIME_PATH"] and "$(id -u)" in settings["ENROOT_DATA_PATH"]
    assert settings["ENROOT_CONFIG_PATH"] == "${HOME}/enroot"


def import_sh(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FSX": str(tmp_path / "fsx"),
            "ENROOT_CONFIG_PATH": str(tmp_path / "enroot-config")}
    return subprocess.run([BASH, str(ENROOT / "import.sh"), *args], env={**base, **env}, capture_output=True,
                          text=True, cwd=tmp_path, timeout=30, check=False)


@pytest.mark.parametrize(("source", "uri", "name"), [
    ("123456789012.dkr.ecr.us-west-2.amazonaws.com/l3/train:v1",
     "docker://123456789012.dkr.ecr.us-west-2.amazonaws.com#l3/train:v1", "train-v1"),
    ("docker://nvcr.io#nvidia/pytorch:24.01-py3", "docker://nvcr.io#nvidia/pytorch:24.01-py3", "pytorch-24.01-py3"),
    ("docker://me@registry.example.com/img", "docker://me@registry.example.com#img", "img-latest"),
    ("library/ubuntu:22.04", "docker://library/ubuntu:22.04", "ubuntu-22.04"),
])
def test_import_from_a_registry_goes_through_enroot(tmp_path: Path, source: str, uri: str, name: str) -> None:
    result = import_sh(tmp_path, source, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("would add")]
    out = tmp_path / "fsx" / "enroot" / f"{name}.sqsh"
    assert lines[0][:3] == ["enroot", "import", "--output"] and lines[0][4] == uri
    assert lines[1] == ["mv", "-f", lines[0][3], str(out)]


@pytest.mark.parametrize(("source", "name"), [
    ("dockerd://llama3-hyperpod:neuron", "llama3-hyperpod-neuron"),
    ("podman://localhost/llama3-hyperpod:cpu", "llama3-hyperpod-cpu"),
    ("ARCHIVE", "l3-image"),
])
def test_import_of_local_images_is_converted_here(tmp_path: Path, source: str, name: str) -> None:
    """podman://, dockerd:// and archives never reach `enroot import` (its podman path runs `docker rm` in its exit
    trap, src/docker.sh:588; no scheme reads archives): llama3_hyperpod/image/sqsh.py writes the image format."""
    if source == "ARCHIVE":
        source = str(tmp_path / "l3-image.tar")
        Path(source).write_bytes(b"")
    result = import_sh(tmp_path, source, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    [argv] = [shlex.split(line) for line in result.stdout.splitlines()]
    assert argv[0] == "python3" and Path(argv[1]).resolve() == REPO / "llama3_hyperpod" / "image" / "sqsh.py"
    assert argv[-2:] == [source, str(tmp_path / "fsx" / "enroot" / f"{name}.sqsh")]
    assert argv[argv.index("--squash-options") + 1] == "-comp lzo -noD"  # enroot's default: no conf, no env


def test_import_reads_enroot_settings_as_enroot_does(tmp_path: Path) -> None:
    """enroot.in:27-58: the environment wins; else the first definition in enroot.conf, then in its .d drop-ins,
    evaluated by the shell; else enroot's default."""
    conf = tmp_path / "enroot.conf"
    conf.write_text("# site settings\nENROOT_SQUASH_OPTIONS -comp lzo -noI   # trailing comment\n"
                    "ENROOT_SQUASH_OPTIONS -comp xz\nENROOT_TEMP_PATH /scratch/$(echo user)-tmp\n")
    (tmp_path / "enroot.conf.d").mkdir()
    (tmp_path / "enroot.conf.d" / "50-more.conf").write_text("ENROOT_TEMP_PATH /dropin\n"
                                                              "ENROOT_CONFIG_PATH ${HOME}/from-dropin\n")

    def settings(**env: str) -> tuple[str, str]:
        result = import_sh(tmp_path, "podman://x:y", DRY_RUN="1", L3HP_ENROOT_CONF=str(conf), **env)
        assert result.returncode == 0, result.stderr
        argv = shlex.split(result.stdout)
        return argv[argv.index("--squash-options") + 1], argv[argv.index("--tmpdir") + 1]

    assert settings() == ("-comp lzo -noI", "/scratch/user-tmp")
    assert settings(ENROOT_SQUASH_OPTIONS="-comp gzip", ENROOT_TEMP_PATH="/env") == ("-comp gzip", "/env")
    conf.write_text("")
    assert settings() == ("-comp lzo -noD", "/dropin")
    # The credentials file of a registry import follows the same rule (the drop-in here; no env given).
    base = {k: v for k, v in os.environ.items() if k == "PATH"}
    result = subprocess.run([BASH, str(ENROOT / "import.sh"), "123456789012.dkr.ecr.eu-west-1.amazonaws.com/l3:x"],
                            env={**base, "HOME": str(tmp_path), "DRY_RUN": "1", "L3HP_ENROOT_CONF": str(conf),
                                 "FSX": str(tmp_path)}, capture_output=True, text=True, check=False, timeout=30)
    assert f"would add to {tmp_path}/from-dropin/.credentials: machine" in result.stdout, result.stderr


def test_import_ecr_login_in_enroot_netrc_format(tmp_path: Path, pyxis_reference: str) -> None:
    result = import_sh(tmp_path, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/l3:neuron", DRY_RUN="1")
    line = ("machine 123456789012.dkr.ecr.eu-west-1.amazonaws.com login AWS password "
            "$(aws ecr get-login-password --region eu-west-1)")
    assert f"would add to {tmp_path}/enroot-config/.credentials: {line}" in result.stdout
    assert "login AWS password $(aws ecr get-login-password --region <region>)" in pyxis_reference
    credentials = tmp_path / "enroot-config" / ".credentials"
    credentials.parent.mkdir()
    credentials.write_text(line + "\n", encoding="utf-8")
    assert "would add" not in import_sh(tmp_path, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/l3:neuron",
                                        DRY_RUN="1").stdout


def test_import_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    existing = tmp_path / "l3.sqsh"
    existing.write_bytes(b"old")
    result = import_sh(tmp_path, "-o", str(existing), "dockerd://l3:neuron")
    assert result.returncode == 2
    assert result.stderr == f"error: {existing} exists: pass --force to replace it " \
                            "(running jobs keep the old file open and are not disturbed)\n"
    assert import_sh(tmp_path, "--force", "-o", str(existing), "dockerd://l3:neuron", DRY_RUN="1").returncode == 0
    assert existing.read_bytes() == b"old"


@pytest.mark.parametrize(("args", "message"), [
    ((), "no SOURCE given"),
    (("ftp://x/y",), "unsupported SOURCE scheme"),
    (("-o", "x.tar", "dockerd://a"), "must end in .sqsh"),
    (("--bogus", "dockerd://a"), "unknown option --bogus"),
    (("dockerd://a", "dockerd://b"), "one SOURCE only"),
])
def test_import_bad_input(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = import_sh(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


def test_import_without_its_tools_says_so(tmp_path: Path) -> None:
    """A PATH with the tools import.sh needs but no enroot, python3 or mksquashfs (whatever this machine has)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sed", "grep", "tail", "mkdir", "dirname", "basename", "rm", "mv", "tr"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    result = import_sh(tmp_path, "docker://nvcr.io#nvidia/pytorch:24.01-py3", PATH=str(bin_dir))
    assert result.returncode == 2
    assert result.stderr.startswith("error: enroot is not installed on this node"), result.stderr
    result = import_sh(tmp_path, "podman://a:b", PATH=str(bin_dir))
    assert result.returncode == 2
    assert result.stderr == "error: python3 is needed to convert podman://a:b (or import from a registry instead)\n"
    (bin_dir / "python3").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    result = import_sh(tmp_path, "podman://a:b", PATH=str(bin_dir))
    assert result.returncode == 2
    assert result.stderr == "error: mksquashfs is not installed here (apt-get install squashfs-tools)\n"
    assert not (tmp_path / "fsx").exists(), "nothing written"


def test_the_launcher_and_the_login_profile_exist_in_the_image() -> None:
    """The srun line calls LAUNCHER by absolute path; the Dockerfile must make it, and keep the image's PATH for
    login shells (enroot's default), written once PATH is final (no ENV PATH after it, in any flavor)."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert f"> {LAUNCHER}" in text, "the Dockerfile no longer writes the launcher"
    found = re.search(r"""printf 'export PATH="%s"\\n' "\$PATH" > /etc/profile\.d/\S+\.sh""", text)
    assert found, "the Dockerfile no longer writes the login profile"
    before, after = text[:found.start()], text[found.end():]
    assert before.rsplit("\nFROM ", 1)[1].startswith("sdk-${FLAVOR} AS deps")  # the stage every flavor shares
    assert not re.search(r"^ENV PATH=", after, re.MULTILINE) and "\nFROM deps AS app" in after


def test_podman_mode_hands_the_runner_the_pyxis_options(tmp_path: Path) -> None:
    pyxis = srun_line("train.sbatch", tmp_path, IMAGE="/x.sqsh", OMP_NUM_THREADS="2")
    podman = srun_line("train.sbatch", tmp_path, IMAGE="/x.sqsh", OMP_NUM_THREADS="2", CONTAINER="podman")
    container_opts = [a for a in pyxis if a.startswith("--container") or a.startswith("--no-container")]
    assert [a for a in podman if "container" in a and a.startswith("--")] == container_opts
    prog = program(podman)
    assert prog[0] == "python3" and Path(prog[1]).resolve() == REPO / "llama3_hyperpod" / "image" / "pyxis_podman.py"
    assert prog[2:2 + len(container_opts)] == container_opts
    assert prog[2 + len(container_opts):] == ["--", *program(pyxis)]
    assert [a for a in podman[:podman.index(prog[0])] if "container" in a] == [], "srun itself gets no pyxis options"


def test_the_job_removes_its_container_from_every_node(tmp_path: Path) -> None:
    """The clean-up step, run for real against an `enroot` stand-in that keeps containers as dirs (what enroot's
    `list` and `remove -f` do on ENROOT_DATA_PATH, src/runtime.sh:598-620): both of pyxis' names for this job's
    container go (container_scope global and job), other containers stay, and the user's ENROOT_DATA_PATH is not
    used (pyxis strips it, so its enroot used the site's)."""
    data = tmp_path / "site-data"
    for name in ("pyxis_llama3-hyperpod-42", "pyxis_42_llama3-hyperpod-42", "pyxis_llama3-hyperpod-421",
                 "pyxis_other", "llama3-hyperpod-42"):
        (data / name).mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "enroot").write_text(f"""#!/bin/bash
set -eu
data=${{ENROOT_DATA_PATH:-{data}}}
echo "$*" >> {tmp_path}/enroot-calls
case $1 in
  list) ls -1 "$data" ;;
  remove) [[ $2 == -f && -d $data/$3 ]] && rm -rf "${{data:?}}/$3" ;;
esac
""")
    (bin_dir / "enroot").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    (bin_dir / "srun").chmod(0o755)
    _, cleanup = srun_lines("train.sbatch", tmp_path, IMAGE="/x.sqsh")
    opts = options(cleanup)
    assert (opts["--nodes"], opts["--ntasks-per-node"]) == ("2", "1")
    assert not [o for o in opts if "container" in o], "runs on the host, where enroot is"
    result = subprocess.run(cleanup, env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                          "ENROOT_DATA_PATH": str(tmp_path / "users-own")},
                            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in data.iterdir()) == ["llama3-hyperpod-42", "pyxis_llama3-hyperpod-421",
                                                      "pyxis_other"]
    assert result.stdout.count("removed container pyxis_") == 2
    podman_cleanup = srun_lines("train.sbatch", tmp_path, IMAGE="/x.sqsh", CONTAINER="podman")[1]
    assert program(podman_cleanup)[2:] == ["--remove", "llama3-hyperpod-42"]
    assert len(srun_lines("train.sbatch", tmp_path, CONTAINER="none", VENV=str(tmp_path))) == 1
