"""Run a command from an enroot image (.sqsh) with podman the way pyxis + enroot run it under `srun`.

enroot and pyxis are not Debian packages and need a real Slurm+kernel setup, so CI (and a cluster without pyxis)
uses this instead: `CONTAINER=podman` in enroot/job.sh hands it the very `--container-*` options it would give
srun. What is reproduced, each from the upstream source (NVIDIA/enroot v4.1.2, NVIDIA/pyxis v0.24.0):

- The rootfs: the .sqsh unpacked once per container name (`pyxis_NAME` in the data dir, kept until removed, as
  with pyxis' default container_scope=global; pyxis_slurmstepd.c:1305-1309) or per step (`pyxis_JOB.STEP`, removed
  at the end: :1346-1352, :1753-1757). Read-only unless writable is asked for (src/runtime.sh:263-266).
- The hooks that matter: the user's passwd/group entries and an empty home made from /etc/skel
  (conf/hooks/10-shadow.sh); `exec "$@"` into /etc/rc.local unless the entrypoint is wanted
  (pyxis_slurmstepd.c:1043-1058; pyxis runs no entrypoint by default, config.c:36).
- The container's environment: cleared, then the image's /etc/environment with `${VAR}` taken from the job
  (src/runtime.sh:32-62, src/common.sh:155-202, bin/common.h:148-167), `TERM` (conf/environ/10-terminal.env) and the
  `--container-env` names (pyxis_slurmstepd.c:1061-1075); the job's PATH, LD_* and ENROOT_*_PATH never reach enroot
  (pyxis_slurmstepd.c:368-389). Then login: TERM, HOME, SHELL, USER, LOGNAME and PATH (login.defs ENV_PATH) where
  unset, cd $HOME (bin/enroot-switchroot.c:580-666), and the user's shell started as a login shell, so the image's
  /etc/profile runs (ENROOT_LOGIN_SHELL defaults to yes, enroot.in:94; src/runtime.sh:278-280; `-` in argv[0],
  bin/enroot-switchroot.c:701) with /etc/rc, which cds to WORKDIR and execs pyxis' `sh -c ...` (:1134-1135).
- The task's environment: the job's, minus LANG/LANGUAGE/LC_ALL, with every variable of that container process
  written over it except the `--container-env` names (pyxis_slurmstepd.c:650-712); its cwd is --container-workdir
  or the container's (:1653-1664); the command is looked up in that PATH.
- The job's uid and gid (a root job runs as L3HP_PODMAN_UID, 1000: enroot refuses root by default, enroot.in:95),
  host network, PID and IPC namespaces, the host's /etc/hosts, a tmpfs /tmp (conf/mounts/10-system.fstab,
  20-config.fstab).

Not reproduced: the host's /dev (enroot binds it whole), pyxis' PYTORCH_VERSION remapping, `--container-save`,
root remapping. podman adds `container` and `HOSTNAME` to the environment; they are dropped again.

    python3 pyxis_podman.py [--container-image=SQSH] [--container-name=NAME] [--container-workdir=DIR]
        [--container-mounts=SRC[:DST[:FLAGS]],...] [--container-env=NAME,...] [--[no-]container-entrypoint]
        [--[no-]container-mount-home] [--container-writable|--container-readonly] [--] COMMAND [ARG...]
    python3 pyxis_podman.py --remove NAME      what a job's clean-up runs: `enroot remove -f pyxis_NAME`

Settings (environment): L3HP_PODMAN_DATA_PATH (the data dir; a subdir per Slurm node), L3HP_PODMAN_UID/GID,
ENROOT_LOGIN_SHELL, ENROOT_ROOTFS_WRITABLE (as enroot reads them: the environment wins, enroot.in:27-29).
Standard library only; runs as root (podman --rootfs). Over 400 lines: a standalone script (run as a file, no
package imports), so what pyxis and enroot do is reproduced here in one piece.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pyxis never hands these from the job to enroot (pyxis_slurmstepd.c:368-389).
ENROOT_DENY = ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_TASK_PID",
               "PMIX_RANK", "PMI_FD", "ENROOT_LIBRARY_PATH", "ENROOT_SYSCONF_PATH", "ENROOT_RUNTIME_PATH",
               "ENROOT_CACHE_PATH", "ENROOT_DATA_PATH", "ENROOT_TEMP_PATH", "ENROOT_ZSTD_OPTIONS",
               "ENROOT_TRANSFER_RETRIES", "ENROOT_CONNECT_TIMEOUT", "ENROOT_MAX_CONNECTIONS", "ENROOT_ALLOW_HTTP")
# ... and drops these from the task's environment unless named in --container-env (pyxis_slurmstepd.c:650-655).
TASK_DENY = ("LANG", "LANGUAGE", "LC_ALL")
SLURMSTEPD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFPATH, STDPATH = "/usr/bin:/bin", "/usr/sbin:/usr/bin:/sbin:/bin"  # glibc's _PATH_DEFPATH / _PATH_STDPATH
PODMAN_ADDED = ("container", "HOSTNAME")
MARK = "@@l3hp-pyxis-container-cwd@@"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FALSE = re.compile(r"^(no?|N[oO]?|[fF](alse)?|FALSE)$")  # enroot's "unset" values (enroot.in:63-69)


class PyxisError(Exception):
    """What pyxis would log before failing the task: one line."""


@dataclass
class Options:
    image: str | None = None
    name: str | None = None
    workdir: str | None = None
    mounts: list[tuple[str, str, str]] = field(default_factory=list)
    env_names: list[str] = field(default_factory=list)
    entrypoint: bool = False
    mount_home: bool = False
    writable: bool | None = None
    remove: str | None = None
    command: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Options:
    o = Options()
    args = list(argv)
    while args and args[0].startswith("--"):
        arg = args.pop(0)
        if arg == "--":
            break
        key, has_value, value = arg.partition("=")
        if key == "--remove":
            o.remove = value if has_value else (args.pop(0) if args else "")
            continue
        if has_value:
            if key == "--container-image":
                o.image = value
            elif key == "--container-name":
                o.name = value.split(":", 1)[0]
            elif key == "--container-workdir":
                o.workdir = value
            elif key == "--container-mounts":
                for spec in filter(None, value.split(",")):
                    src, _, rest = spec.partition(":")
                    dst, _, flags = rest.partition(":")
                    o.mounts.append((src, dst or src, flags))
            elif key == "--container-env":
                o.env_names += [n for n in value.split(",") if n]
            else:
                raise PyxisError(f"unsupported option {arg}")
        elif key in ("--container-entrypoint", "--no-container-entrypoint"):
            o.entrypoint = key == "--container-entrypoint"
        elif key in ("--container-mount-home", "--no-container-mount-home"):
            o.mount_home = key == "--container-mount-home"
        elif key in ("--container-writable", "--container-readonly"):
            o.writable = key == "--container-writable"
        elif key == "--no-container-remap-root":
            pass
        else:
            raise PyxisError(f"unsupported option {arg}")
    o.command = args
    if o.remove is None:
        if not o.command:
            raise PyxisError("no command given")
        if o.image is None and o.name is None:
            raise PyxisError("--container-image or --container-name is needed")
    return o


def setting(name: str) -> bool:
    """An enroot boolean setting from the environment (enroot.in:27-29: the environment wins over enroot.conf)."""
    value = os.environ.get(name, "")
    return bool(value) and not FALSE.match(value)


def data_dir() -> Path:
    """Where unpacked containers live: one dir per Slurm node (several slurmd may share this host)."""
    base = os.environ.get("L3HP_PODMAN_DATA_PATH") or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                   f"l3hp-pyxis-podman-{os.getuid()}")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return Path(base) / node


# ---- identity and hooks -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    name: str
    home: str
    shell: str


def identity() -> User:
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        uid = int(os.environ.get("L3HP_PODMAN_UID", "1000"))
        gid = int(os.environ.get("L3HP_PODMAN_GID", str(uid)))
    try:
        entry = pwd.getpwuid(uid)
        return User(uid, gid, entry.pw_name, entry.pw_dir, entry.pw_shell)
    except KeyError:  # a typical cluster user that this host does not know
        return User(uid, gid, f"user{uid}", f"/home/user{uid}", "/bin/bash")


def login_defs(rootfs: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    path = rootfs / "etc" / "login.defs"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and not parts[0].startswith("#"):
                out[parts[0]] = parts[1].strip().strip('"')
    return out


def in_rootfs(rootfs: Path, path: str) -> Path:
    """PATH as the container sees it: symlinks resolved inside rootfs (merged /usr: /bin -> usr/bin)."""
    parts, current, hops = [p for p in path.split("/") if p], rootfs, 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != rootfs else rootfs
            continue
        candidate = current / part
        if candidate.is_symlink() and hops < 40:
            hops += 1
            link = os.readlink(candidate)
            parts = [p for p in link.split("/") if p] + parts
            if link.startswith("/"):
                current = rootfs
            continue
        current = candidate
    return current


def _executable(rootfs: Path, path: str) -> bool:
    target = in_rootfs(rootfs, path)
    return target.is_file() and os.access(target, os.X_OK)


def run_hooks(rootfs: Path, user: User, entrypoint: bool) -> User:
    """conf/hooks/10-shadow.sh (the user in passwd/group, a home from /etc/skel) and pyxis' rc.local hook."""
    shell = user.shell if _executable(rootfs, user.shell) else "/bin/sh"
    user = User(user.uid, user.gid, user.name, user.home, shell)
    etc = rootfs / "etc"
    passwd, group = etc / "passwd", etc / "group"
    if not any(line.split(":")[2:3] == [str(user.uid)] for line in passwd.read_text().splitlines()):
        with passwd.open("a") as f:
            f.write(f"{user.name}:x:{user.uid}:{user.gid}::{user.home}:{user.shell}\n")
    if not any(line.split(":")[2:3] == [str(user.gid)] for line in group.read_text().splitlines()):
        with group.open("a") as f:
            f.write(f"{user.name}:x:{user.gid}:\n")
    home = in_rootfs(rootfs, user.home)
    if not home.exists():
        umask = int(login_defs(rootfs).get("UMASK", "077"), 8)
        home.mkdir(parents=True, mode=0o777 & ~umask)
        home.chmod(0o777 & ~umask)
        skel = etc / "skel"
        if skel.is_dir():
            shutil.copytree(skel, home, dirs_exist_ok=True, symlinks=True)
        for path in [home, *home.rglob("*")]:
            os.lchown(path, user.uid, user.gid)
    if not entrypoint:
        (etc / "rc.local").write_text('exec "$@"\n')
    return user


# ---- rootfs -----------------------------------------------------------------------------------------------------

def unpack(image: str, dest: Path) -> None:
    """`enroot create`: the squashfs unpacked into the data dir, under a temporary name until complete."""
    if not os.path.isfile(image):
        raise PyxisError(f"{image}: no such squashfs file (pyxis reads --container-image paths that start with / "
                         "or ./ as squashfs files)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    try:
        done = subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-d", str(partial), image],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            raise PyxisError(f"unsquashfs {image}: {done.stderr.strip()[-300:]}")
        try:
            partial.rename(dest)
        except OSError:  # another task of this node unpacked it first
            if not dest.is_dir():
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def remove(name: str) -> int:
    """Remove this node's named container (`pyxis_NAME`), like `enroot remove -f`; says what it did."""
    if not name or "/" in name:
        print(f"error: invalid container name {name!r}", file=sys.stderr)
        return 2  # errors.EXIT_BAD_INPUT: this script runs as a file, without the package
    target = data_dir() / f"pyxis_{name}"
    if target.is_dir():
        shutil.rmtree(target)
        print(f"removed container pyxis_{name} on {data_dir().name}")
    return 0


# ---- environment ------------------------------------------------------------------------------------------------

def envsubst(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), text)


def envfmt(lines: list[str]) -> list[tuple[str, str]]:
    out = []
    for raw in lines:
        line = raw.lstrip()
        if not line or line.startswith("#") or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            continue
        if line.startswith("ENROOT_"):
            continue
        key, _, value = line.partition("=")
        quoted = re.match(r"^[\"'](.*)[\"']\s*$", value)
        out.append((key, quoted.group(1) if quoted else value))
    return out


def container_start_env(rootfs: Path, job_env: dict[str, str], opts: Options, user: User,
                        login: bool) -> dict[str, str]:
    """The environment enroot-switchroot execs the login shell with."""
    enroot_env = {k: v for k, v in job_env.items() if k not in ENROOT_DENY}
    enroot_env["PATH"] = SLURMSTEPD_PATH
    lines: list[str] = []
    environment = rootfs / "etc" / "environment"
    if environment.is_file():
        lines += envsubst(environment.read_text(errors="replace"), enroot_env).splitlines()
    lines.append(envsubst("TERM=${TERM}", enroot_env))
    lines += [f"{n}={enroot_env[n]}" for n in opts.env_names if enroot_env.get(n)]
    env = dict(envfmt(lines))
    if login:
        defs = login_defs(rootfs)
        path = defs.get("ENV_SUPATH" if user.uid == 0 else "ENV_PATH", "")
        path = path[len("PATH="):] if path.startswith("PATH=") else path
        for key, value in (("TERM", "dumb"), ("HOME", user.home), ("SHELL", user.shell), ("USER", user.name),
                           ("LOGNAME", user.name), ("PATH", path or (STDPATH if user.uid == 0 else DEFPATH))):
            env.setdefault(key, value)
    return env


def task_env(job_env: dict[str, str], container: dict[str, str], opts: Options) -> dict[str, str]:
    env = {k: v for k, v in job_env.items() if k not in TASK_DENY or k in opts.env_names}
    for key, value in container.items():
        if key in opts.env_names:
            env.setdefault(key, value)
        else:
            env[key] = value
    return env


# ---- podman -----------------------------------------------------------------------------------------------------

def podman_argv(rootfs: Path, user: User, env: dict[str, str], workdir: str, opts: Options,
                writable: bool) -> list[str]:
    cmd = ["podman", "run", "--rm", "--user", f"{user.uid}:{user.gid}",
           "--network", "host", "--pid", "host", "--ipc", "host", "--no-hosts",
           "-v", "/etc/hosts:/etc/hosts:ro", "--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777", "--workdir", workdir]
    if not writable:
        cmd.append("--read-only")
    for src, dst, flags in opts.mounts:
        cmd += ["-v", f"{src}:{dst}" + (":ro" if "ro" in flags.split("+") else "")]
    if opts.mount_home and user.home and os.path.isdir(user.home):
        cmd += ["-v", f"{user.home}:{user.home}"]
    for key, value in sorted(env.items()):
        if NAME_RE.match(key) and "\n" not in value:
            cmd += ["-e", f"{key}={value}"]
    return [*cmd, "--rootfs", str(rootfs)]  # --rootfs: the "image" argument is an unpacked root filesystem


def start_container(rootfs: Path, user: User, env: dict[str, str], opts: Options, writable: bool,
                    login: bool) -> tuple[dict[str, str], str]:
    """The container's init (pyxis' `sh -c 'kill -STOP $$'`): its environment and cwd, as pyxis reads them."""
    home = env.get("HOME", "/")
    if not in_rootfs(rootfs, home).is_dir():
        if login_defs(rootfs).get("DEFAULT_HOME", "yes") != "yes":
            raise PyxisError(f"container start failed: failed to change directory: {home}")
        home = "/"
    shell = env.get("SHELL") or "/bin/sh"
    if not _executable(rootfs, shell):
        shell = "/bin/sh"
    probe = f"printf '%s%s\\n' '{MARK}' \"$(pwd -P)\"; cat /proc/$$/environ"
    init = ["sh", "-c", probe]
    argv = [shell, "-l"] if login else [shell]
    argv += ["/etc/rc", *init] if (rootfs / "etc" / "rc").exists() else ["-c", 'exec "$@"', shell, *init]
    started = subprocess.run([*podman_argv(rootfs, user, env, home, opts, writable), *argv], capture_output=True,
                             check=False)
    out = started.stdout
    at = out.rfind(MARK.encode())
    if started.returncode != 0 or at < 0:
        detail = started.stderr.decode(errors="replace").strip().splitlines()
        raise PyxisError(f"container start failed with error code: {started.returncode}"
                         + (f": {detail[-1]}" if detail else ""))
    cwd_line, _, environ = out[at + len(MARK):].partition(b"\n")
    container: dict[str, str] = {}
    for item in environ.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep and (key not in PODMAN_ADDED or key in env):
            container[key] = value
    return container, cwd_line.decode(errors="replace").strip() or "/"


def run_task(argv: list[str]) -> int:
    """podman in the foreground; the signals srun sends the task (USR1 at the time limit, TERM, INT) go on to it,
    and podman passes them to the command (--sig-proxy)."""
    proc = subprocess.Popen(argv)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            return proc.wait()
        except InterruptedError:
            continue


def run(opts: Options) -> int:
    job_env = dict(os.environ)
    user = identity()
    login = setting("ENROOT_LOGIN_SHELL") if "ENROOT_LOGIN_SHELL" in os.environ else True
    writable = opts.writable if opts.writable is not None else setting("ENROOT_ROOTFS_WRITABLE")
    data = data_dir()
    if opts.name:
        rootfs = data / f"pyxis_{opts.name}"
        temporary = False
        if rootfs.is_dir():
            print(f"pyxis: reusing existing container filesystem pyxis_{opts.name}", file=sys.stderr)
        elif opts.image is None:
            raise PyxisError(f'a container with name "pyxis_{opts.name}" does not exist, and --container-image '
                             "is not set")
        else:
            unpack(opts.image, rootfs)
    else:
        assert opts.image is not None
        step = f"{os.environ.get('SLURM_JOB_ID') or os.getpid()}.{os.environ.get('SLURM_STEP_ID') or 0}"
        rootfs = data / f"pyxis_{step}"
        temporary = True
        unpack(opts.image, rootfs)
    try:
        user = run_hooks(rootfs, user, opts.entrypoint)
        start = container_start_env(rootfs, job_env, opts, user, login)
        container, cwd = start_container(rootfs, user, start, opts, writable, login)
        env = task_env(job_env, container, opts)
        return run_task([*podman_argv(rootfs, user, env, opts.workdir or cwd, opts, writable), *opts.command])
    finally:
        if temporary:
            shutil.rmtree(rootfs, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
        if opts.remove is not None:
            return remove(opts.remove)
        return run(opts)
    except PyxisError as exc:
        print(f"pyxis: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
