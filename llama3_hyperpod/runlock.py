"""One owner per run dir: an exclusive flock on `<run dir>/.owner.lock`, with who holds it written inside.

Who takes it: the launcher of node 0 (`entrypoint.py train|compile`, node rank 0 holds global rank 0), before it
writes anything into the run dir; torchrun inherits the locked descriptor, so the lock lives exactly as long as some
process of the run does. The torch trainer's rank 0 checks it too: it finds it held by its own launcher (an ancestor
process on this host), or takes it itself when started without the launcher. Other nodes never take it, so multi-node
jobs and requeues work as before: a requeued job starts after the old one has ended, and the kernel released the lock
when the old holder died (SIGKILL included).

Shared filesystems: Linux NFS clients implement flock() as a whole-file POSIX lock on the server (flock(2), "since
Linux 2.6.12"); FSx for Lustre honours it across clients when mounted with `-o flock`, which is how AWS's guide mounts
it (FSx for Lustre User Guide, "Mounting from an Amazon EC2 instance": `mount -t lustre -o relatime,flock ...`).
When a holder's node dies, the server frees its locks once the client's lease expires (NFSv4: 90 s by default;
Lustre: on eviction), so a contender whose recorded holder is not a live process on its own host waits up to
L3HP_RUN_LOCK_WAIT seconds (default 150) before refusing; a live holder on this host is refused at once. A
filesystem without locks gets a warning, not a refusal (ownership cannot be enforced there).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.fsutil import PathError, link_message

LOCK_NAME = ".owner.lock"
ENV_WAIT = "L3HP_RUN_LOCK_WAIT"
DEFAULT_WAIT_S = 150.0
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirBusyError(ConfigError):
    """Another process owns the run dir; `holder` says who (empty when it could not be read)."""

    def __init__(self, key: str, message: str, holder: dict[str, Any]) -> None:
        super().__init__(key, message)
        self.holder = holder


@dataclass
class RunLock:
    """A held lock: keep `fd` open (and pass it to children) for as long as the run lives."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor of the open file frees the flock
            self.fd = -1


def _holder_record(purpose: str) -> dict[str, Any]:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_RESTART_COUNT"):
        job += f" (restart {os.environ['SLURM_RESTART_COUNT']})"
    return {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose, "slurm_job": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_holder(path: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file ({} while it is still being written, or if unreadable)."""
    try:
        data = json.loads(path.read_bytes()[:4096] or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not said who it is yet"
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"{holder.get('purpose', 'a run')} pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, "
            f"since {holder.get('since', '?')}")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(run_dir: Path, *, purpose: str, wait_s: float | None = None,
            log: Any = None) -> RunLock | None:
    """Take the run dir's lock or raise RunDirBusyError naming the holder; None when the filesystem has no locks."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    path = run_dir / LOCK_NAME
    if path.is_symlink():
        raise PathError(str(path), link_message())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    if wait_s is None:
        try:
            wait_s = float(os.environ.get(ENV_WAIT, DEFAULT_WAIT_S))
        except ValueError:
            os.close(fd)
            raise ConfigError(ENV_WAIT, f"must be a number of seconds, got {os.environ[ENV_WAIT]!r}") from None
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = read_holder(path)
            here = holder.get("host") == socket.gethostname()
            if (here and _pid_alive(holder.get("pid"))) or time.monotonic() >= deadline:
                os.close(fd)
                raise RunDirBusyError(str(run_dir), f"is in use by {describe(holder)}: wait for that run to end, or "
                                 "choose another --run-name (two runs in one dir would overwrite each other's "
                                 "checkpoints and metrics)", holder) from None
            if not announced:
                say(f"{purpose}: {run_dir} is locked by {describe(holder)}; waiting up to {wait_s:.0f} s for a "
                    f"dead holder's lock to expire ({ENV_WAIT})")
                announced = True
            time.sleep(1.0)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                say(f"warning: {run_dir}: this filesystem does not support file locks ({exc.strerror}); nothing "
                    "stops a second run from using the same run dir (mount FSx for Lustre with -o flock)")
                return None
            raise
    record = json.dumps(_holder_record(purpose)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    os.fsync(fd)
    return RunLock(path, fd)


def _ancestors() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        return set()


def hold_or_inherit(run_dir: Path, *, purpose: str) -> RunLock | None:
    """For the trainer's rank 0: take the lock, or accept it when it is held by an ancestor (our own launcher)."""
    try:
        return acquire(run_dir, purpose=purpose, wait_s=0.0)
    except RunDirBusyError as busy:
        holder = busy.holder
        if holder.get("host") == socket.gethostname() and holder.get("pid") in _ancestors():
            return None
        raise
