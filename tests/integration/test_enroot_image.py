"""The cpu image as pyxis + enroot see it: enroot/import.sh turns it into an enroot .sqsh (podman:// with a docker CLI
that has no daemon, dockerd:// through a Docker API, image archives), and the image runs from that .sqsh the way
pyxis + enroot run it (llama3_hyperpod/image/pyxis_podman.py): through a login shell that sources the image's
/etc/profile, the image's ENV from /etc/environment with pyxis' precedence, read-only root, uid 1000, an empty home,
no entrypoint. enroot itself cannot be installed here; what it would do is cited in the runner, from its source."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.enroot_support import (
    SQUASH,
    TAG,
    build_cpu_image,
    daemonless_docker,
    ensure_squashfs_tools,
    import_sh,
    podman_containers,
    podman_env,
    pyxis_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.container]

NO_ENTRYPOINT = ["--no-container-entrypoint", "--no-container-mount-home"]
DEBIAN_USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"  # bookworm's /etc/profile, uid != 0


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """`enroot/import.sh podman://TAG` on a host whose `docker` CLI has no daemon, as a user runs it."""
    ensure_squashfs_tools()
    tmp = tmp_path_factory.mktemp("enroot-image")
    tag = build_cpu_image(tmp)
    env = {**daemonless_docker(tmp / "bin"), "ENROOT_TEMP_PATH": str(tmp / "enroot-tmp")}
    out = tmp / "fsx" / "enroot" / "l3.sqsh"
    start = time.monotonic()
    result = import_sh("-o", str(out), f"podman://{tag}", env=env)
    record = {"result": result, "seconds": time.monotonic() - start, "after": podman_containers(), "out": out,
              "env": env, "tmp": tmp}
    yield record
    shutil.rmtree(tmp / "fsx", ignore_errors=True)


@pytest.fixture(scope="module")
def sqsh(imported: dict[str, object]) -> Path:
    result = imported["result"]
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 0, result.stdout + result.stderr
    out = imported["out"]
    assert isinstance(out, Path)
    return out


def test_import_from_podman_with_a_daemonless_docker_cli(imported: dict[str, object], sqsh: Path) -> None:
    result = imported["result"]
    assert isinstance(result, subprocess.CompletedProcess)
    env = imported["env"]
    assert isinstance(env, dict)
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env={**os.environ, **env},
                            capture_output=True, text=True, check=False)
    assert docker.returncode != 0, "the docker CLI of this test must have no daemon"
    text = result.stdout + result.stderr
    made = re.search(r"removed the temporary container (l3hp-sqsh-[0-9a-f]+)", text)
    assert made, text
    after = imported["after"]
    assert isinstance(after, list)
    assert made.group(1) not in after, "no container left behind"  # (other users' containers may come and go)
    assert [p.name for p in sqsh.parent.iterdir()] == [sqsh.name], "no partial file beside the image"
    tmp = imported["tmp"]
    assert isinstance(tmp, Path)
    assert list((tmp / "enroot-tmp").iterdir()) == [], "the unpacked rootfs is gone from ENROOT_TEMP_PATH"
    assert f"importing podman://{TAG} -> {sqsh}" in text
    assert f"done: use IMAGE={sqsh} with enroot/train.sbatch" in text
    assert f"-all-root -noappend -no-progress -processors {os.cpu_count()} {SQUASH}" in text
    listing = subprocess.run(["unsquashfs", "-l", str(sqsh)], capture_output=True, text=True, check=True).stdout
    for path in ("etc/rc", "etc/environment", "etc/fstab", "etc/rc.local", "usr/local/bin/llama3-hyperpod",
                 "etc/profile.d/llama3-hyperpod-path.sh", "opt/app/entrypoint.py"):
        assert f"squashfs-root/{path}\n" in listing, path
    environment = subprocess.run(["unsquashfs", "-cat", str(sqsh), "etc/environment"], capture_output=True,
                                 text=True, check=True).stdout
    inspect = json.loads(subprocess.run(["podman", "image", "inspect", TAG], capture_output=True, text=True,
                                        check=True).stdout)[0]
    assert environment.splitlines() == inspect["Config"]["Env"]
    print(f"import.sh podman:// of the cpu image: {imported['seconds']:.0f} s, {sqsh.stat().st_size / 1e9:.2f} GB")


def test_an_interrupted_import_leaves_no_container_and_no_partial_file(imported: dict[str, object]) -> None:
    env = imported["env"]
    tmp = imported["tmp"]
    assert isinstance(env, dict) and isinstance(tmp, Path)
    out = tmp / "interrupted" / "l3.sqsh"
    proc = subprocess.Popen(["bash", str(Path(__file__).parents[2] / "enroot" / "import.sh"), "-o", str(out),
                             f"podman://{TAG}"], env={**os.environ, "ENROOT_SQUASH_OPTIONS": SQUASH, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ours := [n for n in podman_containers() if n.startswith("l3hp-sqsh-")]):
        assert proc.poll() is None and time.monotonic() < deadline, "the import never created its container"
        time.sleep(0.2)
    time.sleep(1)  # mid-export
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr
    assert "error: interrupted by signal 15" in stderr
    assert not set(ours) & set(podman_containers()), "its container is removed"
    assert list(out.parent.iterdir()) == []
    assert list((tmp / "enroot-tmp").iterdir()) == []


SMALL_DOCKERFILE = """\
FROM {base}
RUN mkdir -p /data/keep /data/opq && echo a > /data/keep/a && echo b > /data/opq/b && echo c > /data/gone \\
    && ln -s /data/keep/a /data/link && chmod 0600 /data/keep/a
RUN rm /data/gone /data/link && rm -rf /data/opq && mkdir /data/opq && echo new > /data/opq/new
ENV FOO="bar baz" PATH=/opt/x/bin:/usr/local/bin:/usr/bin:/bin
WORKDIR /work
VOLUME /vol
LABEL io.example.label="two words"
ENTRYPOINT ["/bin/echo", "it's"]
CMD ["x y"]
"""


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small image with deletions in its second layer (whiteouts), Env, WorkingDir, a volume and labels."""
    env = podman_env()
    ensure_squashfs_tools()
    ctx = tmp_path_factory.mktemp("small-image")
    (ctx / "Dockerfile").write_text(SMALL_DOCKERFILE.format(base=env["LLAMA3_CI_BASE_IMAGE"]))
    tag = f"{TAG}-small"
    built = subprocess.run(["podman", "build", "-t", tag, str(ctx)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False)


def tree(image: Path, dest: Path) -> dict[str, tuple[object, ...]]:
    """Every entry of an image: type, mode, size, link target or content hash."""
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(dest), str(image)], check=True, capture_output=True)
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted(dest.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(dest))] = ("link", os.readlink(path))
        elif path.is_dir():
            out[str(path.relative_to(dest))] = ("dir", oct(st.st_mode))
        elif not path.is_file():  # a device node or fifo: never read it
            out[str(path.relative_to(dest))] = ("special", oct(st.st_mode), st.st_rdev)
        else:
            out[str(path.relative_to(dest))] = ("file", oct(st.st_mode), st.st_size,
                                                hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("archive_format", ["docker-archive", "oci-archive"])
def test_an_image_archive_imports_to_what_the_engine_exports(small_image: str, tmp_path: Path,
                                                              archive_format: str) -> None:
    """The layers of `podman save` applied with their whiteouts give exactly the tree podman itself flattens."""
    archive = tmp_path / "small.tar"
    subprocess.run(["podman", "save", "--format", archive_format, "-o", str(archive), small_image], check=True,
                   capture_output=True)
    from_archive = import_sh("-o", str(tmp_path / "a.sqsh"), str(archive), cwd=tmp_path)
    assert from_archive.returncode == 0, from_archive.stderr
    assert "removed by whiteouts" in from_archive.stderr
    from_engine = import_sh("-o", str(tmp_path / "e.sqsh"), f"podman://{small_image}", cwd=tmp_path)
    assert from_engine.returncode == 0, from_engine.stderr
    a, e = tree(tmp_path / "a.sqsh", tmp_path / "a"), tree(tmp_path / "e.sqsh", tmp_path / "e")
    assert a == e
    assert "data/gone" not in a and "data/link" not in a and "data/opq/b" not in a and "data/opq/new" in a
    assert a["data/keep/a"][1] == "0o100600"
    env = json.loads(subprocess.run(["podman", "image", "inspect", small_image], capture_output=True, text=True,
                                    check=True).stdout)[0]["Config"]["Env"]
    assert sorted(env) == ["FOO=bar baz", "PATH=/opt/x/bin:/usr/local/bin:/usr/bin:/bin"]
    assert (tmp_path / "a" / "etc" / "environment").read_text().splitlines() == env
    assert (tmp_path / "a" / "etc" / "fstab").read_text() == (
        "${ENROOT_ROOTFS}/vol /vol none x-create=dir,bind,rw,nosuid,nodev\n")
    rc = (tmp_path / "a" / "etc" / "rc").read_text()
    assert "# io.example.label two words\n" in rc and "exec /bin/echo 'it'\"'\"'s' 'x y'\n" in rc
    assert (tmp_path / "a" / "work").is_dir()


def test_dockerd_import_through_a_docker_api_and_without_one(small_image: str, tmp_path: Path) -> None:
    """dockerd:// goes through the docker CLI: here pointed at podman's Docker-compatible API; with no daemon behind
    it, one line says so and nothing is written."""
    env = podman_env()
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine (dockerd:// needs one)")
    ok = import_sh("-o", str(tmp_path / "d.sqsh"), f"dockerd://{small_image}",
                   env={"DOCKER_HOST": env["DOCKER_HOST"]}, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "removed the temporary container l3hp-sqsh-" in ok.stderr
    ref = import_sh("-o", str(tmp_path / "p.sqsh"), f"podman://{small_image}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    assert tree(tmp_path / "d.sqsh", tmp_path / "d") == tree(tmp_path / "p.sqsh", tmp_path / "p")
    down = import_sh("-o", str(tmp_path / "x.sqsh"), f"dockerd://{small_image}", cwd=tmp_path,
                     env=daemonless_docker(tmp_path / "bin"))
    assert down.returncode == 2
    assert down.stderr.splitlines()[-1].startswith("error: docker cannot reach its daemon: "), down.stderr
    assert not (tmp_path / "x.sqsh").exists()


# ---- the image run the way pyxis + enroot run it --------------------------------------------------------------

PROBE = ('echo "PATH=$PATH"; echo "UID=$(id -u)"; echo "HOME=$HOME"; echo "HOME_FILES=$(ls -A "$HOME" | '
         'tr "\\n" " ")"; echo "PWD=$PWD"; echo "UNBUFFERED=$PYTHONUNBUFFERED"; echo "JOB=$MY_JOB_VAR"; '
         'echo "LANG=${LANG-unset}"; echo "OMP=$OMP_NUM_THREADS"; echo "SHELL=$SHELL"; '
         'touch /opt/app/x 2>&1 | sed "s/^/ROOTFS: /"; touch /tmp/ok && echo TMP=writable; '
         'which python; cat /proc/self/status | grep -E "^(Uid|Gid):"')


def probe(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if re.match(r"^[A-Z_]+=", line))


def test_the_container_looks_like_an_enroot_one(sqsh: Path, tmp_path: Path) -> None:
    env = {"PYTHONUNBUFFERED": "0", "MY_JOB_VAR": "from-the-job", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "3"}
    result = pyxis_run(["--container-image=" + str(sqsh), *NO_ENTRYPOINT, "--container-env=OMP_NUM_THREADS"],
                       ["sh", "-c", PROBE], data=tmp_path / "data", env=env)
    assert result.returncode == 0, result.stderr
    seen = probe(result.stdout)
    inspect = json.loads(subprocess.run(["podman", "image", "inspect", TAG], capture_output=True, text=True,
                                        check=True).stdout)[0]
    image_env = dict(item.split("=", 1) for item in inspect["Config"]["Env"])
    assert seen["PATH"] == image_env["PATH"], "the image's PATH survives the login shell (its profile.d line)"
    assert seen["UID"] == "1000" and "Uid:\t1000\t1000\t1000\t1000" in result.stdout
    assert seen["HOME"].startswith("/home/") and seen["HOME_FILES"].split() == [".bash_logout", ".bashrc",
                                                                                ".profile"]  # /etc/skel only
    assert seen["PWD"] == "/opt/app"  # the image's WORKDIR, from /etc/rc
    assert seen["UNBUFFERED"] == "1", "the image's ENV wins over the job's value"
    assert seen["JOB"] == "from-the-job", "other job variables come through"
    assert seen["LANG"] == "unset", "pyxis drops LANG"
    assert seen["OMP"] == "3", "a --container-env name keeps the job's value"
    assert "ROOTFS: touch: cannot touch '/opt/app/x': Read-only file system" in result.stdout
    assert seen["TMP"] == "writable"
    # bare `python` is the SDK's (NxDT's environment); entrypoint.py re-runs itself in the project's venv (the smoke
    # test below starts it that way)
    assert image_env["L3HP_SDK_PYTHON"] + "\n" in result.stdout
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").rglob("pyxis_*")), \
        "a container without a name is removed after the step"


def test_without_the_login_profile_line_python_is_not_found_as_under_real_enroot(sqsh: Path, tmp_path: Path) -> None:
    """The image before the fix: Debian's /etc/profile resets PATH in enroot's login shell, so the task's bare
    `python` is not found (slurmstepd: `execve(): python: No such file or directory`). With the site setting
    ENROOT_LOGIN_SHELL=n it works: the runner's login shell is what matters."""
    data = tmp_path / "data"
    first = pyxis_run(["--container-image=" + str(sqsh), "--container-name=old", *NO_ENTRYPOINT], ["true"],
                      data=data)
    assert first.returncode == 0, first.stderr
    [rootfs] = data.glob("*/pyxis_old")
    (rootfs / "etc" / "profile.d" / "llama3-hyperpod-path.sh").unlink()
    try:
        broken = pyxis_run(["--container-name=old", *NO_ENTRYPOINT], ["python", "-c", "print('ran')"], data=data)
        assert broken.returncode == 127, broken.stdout + broken.stderr
        assert 'exec: "python": executable file not found in $PATH' in broken.stderr
        path = pyxis_run(["--container-name=old", *NO_ENTRYPOINT], ["sh", "-c", 'echo "$PATH"'], data=data)
        assert path.stdout.strip() == DEBIAN_USER_PATH
        no_login = pyxis_run(["--container-name=old", *NO_ENTRYPOINT], ["python", "-c", "print('ran')"], data=data,
                             env={"ENROOT_LOGIN_SHELL": "n"})
        assert no_login.returncode == 0 and no_login.stdout == "ran\n", no_login.stderr
        launcher = pyxis_run(["--container-name=old", *NO_ENTRYPOINT], ["/usr/local/bin/llama3-hyperpod",
                                                                         "--help"], data=data)
        assert launcher.returncode == 0, launcher.stderr  # the absolute launcher needs no PATH
        assert "Usage:" in launcher.stdout
    finally:
        removed = pyxis_run(["--remove", "old"], [], data=data)
        assert removed.returncode == 0
    assert not rootfs.exists()


def test_smoke_with_no_options_like_pyxis(sqsh: Path, tmp_path: Path) -> None:
    """`srun --container-image=IMAGE python /opt/app/entrypoint.py smoke`: bare python through the login shell,
    the default output dir (/opt/app/runs) read-only, so the run goes to the temporary dir and says so."""
    start = time.monotonic()
    result = pyxis_run(["--container-image=" + str(sqsh), *NO_ENTRYPOINT, "--container-env=OMP_NUM_THREADS"],
                       ["python", "/opt/app/entrypoint.py", "smoke"], data=tmp_path / "data",
                       env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)}, timeout=600)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    assert "smoke: PASS (cpu)" in text
    assert ("smoke: /opt/app/runs is not writable here (a read-only container?); writing to "
            "/tmp/llama3-hyperpod/runs instead (set --output-dir to keep the output)") in text
    print(f"pyxis-like smoke: {time.monotonic() - start:.0f} s")


COMMANDS = [  # (command line, allowed exit codes, a line it must print)
    ("--help", {0}, "Usage:"),
    ("plan configs/tiny_cpu.yaml", {0}, "torch"),
    ("train configs/tiny_cpu.yaml", {2}, "error: --output-dir: cannot create /opt/app/runs (Read-only file system): "
                                          "set --output-dir to a writable directory"),
    ("compile configs/tiny_cpu.yaml", {2}, "error: --output-dir: cannot create /opt/app/runs"),
    ("train configs/llama3_8b_trn1.yaml --backend neuron --output-dir /tmp/out", {2}, "error: "),
    ("report /ro/run", {2}, "error: --output: cannot write /ro/run/report.png (Read-only file system)"),
    ("report /opt/app/configs", {2}, "has no metrics.jsonl"),
    ("data prepare", {2}, "Usage:"),
    ("data default", {2}, "Usage:"),
    ("cache inspect", {2}, "error: DIR: give the cache dir"),
    ("cache inspect /opt/app/neuron_cache", {0, 1}, ""),
    ("cache verify configs/tiny_cpu.yaml", {0, 3, 4}, ""),
    ("cache seed", {2}, "Usage:"),
    ("cache prune /opt/app/neuron_cache", {0}, "kept"),
    ("checkpoint list /opt/app", {0, 2}, ""),
]


def test_every_command_with_no_options_writes_only_where_it_may(sqsh: Path, tmp_path: Path) -> None:
    """In a read-only container each command either works (writing nowhere but /tmp) or stops with one line naming
    what to set; never a traceback."""
    run = tmp_path / "ro" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0, "lr": 1e-3, "tokens_per_s": 1.0}) + "\n")
    script = "; ".join(f'echo "=== {cmd}"; llama3-hyperpod {cmd} 2>&1; echo "=== rc=$?"' for cmd, _, _ in COMMANDS)
    result = pyxis_run(["--container-image=" + str(sqsh), *NO_ENTRYPOINT,
                        f"--container-mounts={tmp_path / 'ro'}:/ro:ro"], ["sh", "-c", script],
                       data=tmp_path / "data", timeout=600)
    assert result.returncode == 0, result.stderr
    blocks = re.findall(r"=== (.*?)\n(.*?)=== rc=(\d+)\n", result.stdout, re.S)
    assert [b[0] for b in blocks] == [c[0] for c in COMMANDS], result.stdout[-3000:]
    for (cmd, codes, needle), (_, output, rc) in zip(COMMANDS, blocks, strict=True):
        assert "Traceback" not in output, f"{cmd}:\n{output}"
        assert int(rc) in codes, f"{cmd} exited {rc}:\n{output}"
        assert needle in output, f"{cmd}:\n{output}"
        if int(rc) == 2 and "Usage:" not in output:
            assert len([line for line in output.splitlines() if line.strip()]) == 1, f"{cmd}:\n{output}"
    print("\n".join(f"{cmd!r}: rc {rc}" for cmd, _, rc in blocks))
