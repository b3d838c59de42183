"""The environment rules of the pyxis+enroot-like runner (llama3_hyperpod/image/pyxis_podman.py), without podman:
what enroot builds for the container and what pyxis hands the task (the podman runs: test_enroot_image.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama3_hyperpod.image import pyxis_podman as pp


def test_options_are_pyxis_options() -> None:
    o = pp.parse(["--container-image=/fsx/x.sqsh", "--container-name=job-1:exec", "--container-workdir=/opt/app",
                  "--container-mounts=/fsx:/fsx,/data:/in:ro+rbind,/scratch", "--container-env=A,B",
                  "--no-container-entrypoint", "--container-mount-home", "--container-writable", "--", "python", "-V"])
    assert (o.image, o.name, o.workdir) == ("/fsx/x.sqsh", "job-1", "/opt/app")
    assert o.mounts == [("/fsx", "/fsx", ""), ("/data", "/in", "ro+rbind"), ("/scratch", "/scratch", "")]
    assert (o.env_names, o.entrypoint, o.mount_home, o.writable) == (["A", "B"], False, True, True)
    assert o.command == ["python", "-V"]
    assert pp.parse(["--remove", "job-1"]).remove == "job-1"
    for bad, message in ((["--container-save=/x", "--", "true"], "unsupported option --container-save=/x"),
                         (["--container-image=/x.sqsh"], "no command given"),
                         (["true"], "--container-image or --container-name is needed")):
        with pytest.raises(pp.PyxisError, match=message):
            pp.parse(bad)


def test_envfmt_follows_enroot() -> None:
    lines = ["  A=1", "# comment", "", "B='quoted'", 'C="two words"  ', "ENROOT_X=dropped", "bad-name=1", "noequals",
             "A=2"]
    assert pp.envfmt(lines) == [("A", "1"), ("B", "quoted"), ("C", "two words"), ("A", "2")]


def rootfs_with(tmp_path: Path, environment: str, login_defs: str = "ENV_PATH\tPATH=/usr/bin:/bin:/games\n") -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "environment").write_text(environment)
    (root / "etc" / "login.defs").write_text(login_defs)
    return root


USER = pp.User(1000, 1000, "someone", "/home/someone", "/bin/bash")


def test_the_container_starts_with_the_image_env_not_the_job_env(tmp_path: Path) -> None:
    """enroot clears the environment: the image's /etc/environment (with the job's ${VAR}s, but never the job's
    PATH or LD_*), TERM, the --container-env names, then the login defaults where still unset."""
    root = rootfs_with(tmp_path, "PATH=/opt/venv/bin:/usr/bin\nWHERE=${FSX}/data\nHOSTPATH=${PATH}\n"
                                 "LIB=${LD_PRELOAD}\n")
    job = {"FSX": "/fsx", "PATH": "/job/bin", "LD_PRELOAD": "/evil.so", "TERM": "xterm", "OMP_NUM_THREADS": "4",
           "UNLISTED": "x", "HOME": "/job/home"}
    opts = pp.Options(image="/x.sqsh", env_names=["OMP_NUM_THREADS"], command=["true"])
    env = pp.container_start_env(root, job, opts, USER, login=True)
    assert env == {"PATH": "/opt/venv/bin:/usr/bin", "WHERE": "/fsx/data", "HOSTPATH": pp.SLURMSTEPD_PATH,
                   "LIB": "", "TERM": "xterm", "OMP_NUM_THREADS": "4", "HOME": "/home/someone",
                   "SHELL": "/bin/bash", "USER": "someone", "LOGNAME": "someone"}
    no_path = pp.container_start_env(rootfs_with(tmp_path / "b", "A=1\n"), job, opts, USER, login=True)
    assert no_path["PATH"] == "/usr/bin:/bin:/games", "login.defs ENV_PATH when the image sets none"
    assert "HOME" not in pp.container_start_env(root, job, opts, USER, login=False)


def test_the_task_gets_the_container_env_over_the_job_env(tmp_path: Path) -> None:
    """pyxis: the job's environment, minus LANG/LANGUAGE/LC_ALL, with every container variable written over it,
    except the --container-env names, which keep the job's value."""
    job = {"PATH": "/job/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "SLURM_PROCID": "1", "PYTHONUNBUFFERED": "0",
           "OMP_NUM_THREADS": "4", "LD_LIBRARY_PATH": "/host/lib"}
    container = {"PATH": "/usr/local/bin:/usr/bin", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                 "HOME": "/home/someone", "NEW": "n"}
    opts = pp.Options(env_names=["OMP_NUM_THREADS", "LC_ALL"])
    assert pp.task_env(job, container, opts) == {
        "PATH": "/usr/local/bin:/usr/bin", "LC_ALL": "C", "SLURM_PROCID": "1", "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "4", "LD_LIBRARY_PATH": "/host/lib", "HOME": "/home/someone", "NEW": "n"}


def test_paths_resolve_inside_the_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "bash").write_text("#!/bin/false\n")
    (root / "usr" / "bin" / "bash").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "escape").symlink_to("/")
    assert pp.in_rootfs(root, "/bin/bash") == root / "usr" / "bin" / "bash"
    assert pp._executable(root, "/bin/bash") and not pp._executable(root, "/bin/zsh")
    assert pp.in_rootfs(root, "/escape/etc/passwd") == root / "etc" / "passwd"  # "/" is the rootfs' own root
    assert pp.in_rootfs(root, "/../../etc") == root / "etc"
