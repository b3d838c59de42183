"""What this node measures for the checks: memory (with the cgroup's limit), CPUs, free disk, device files and the
loaded Neuron driver. Plain reads of /proc, /sys and /dev; the roots are parameters so tests can point them at files.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llama3_hyperpod.cache.manifest import TEMP_MARK

PROBE_BYTES = 4096


def node_name(env: Mapping[str, str]) -> str:
    """The name a job log should use for this node: Slurm's node name when run as a step, else the hostname."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def meminfo(proc_root: str = "/proc") -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    out: dict[str, int] = {}
    for line in Path(proc_root, "meminfo").read_text(encoding="ascii").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def _cgroup_paths(proc_root: str) -> dict[str, str]:
    """controller -> cgroup path of this process ('' for the unified v2 hierarchy)."""
    out: dict[str, str] = {}
    try:
        text = Path(proc_root, "self", "cgroup").read_text(encoding="ascii")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") or [""]:
                out[controller] = parts[2]
    return out


def cgroup_memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max or v1 memory.limit_in_bytes), None when unlimited.

    Checks the process's own cgroup and, inside a container that mounts only its own subtree, the mount's root.
    """
    paths = _cgroup_paths(proc_root)
    candidates = []
    if "" in paths:
        candidates += [Path(cgroup_root, paths[""].lstrip("/"), "memory.max"), Path(cgroup_root, "memory.max")]
    if "memory" in paths:
        base = Path(cgroup_root, "memory")
        candidates += [base / paths["memory"].lstrip("/") / "memory.limit_in_bytes", base / "memory.limit_in_bytes"]
    limits = []
    for path in candidates:
        try:
            raw = path.read_text(encoding="ascii").strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:  # v1 prints a huge number for "no limit", v2 prints "max"
            limits.append(int(raw))
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: Slurm and containers restrict it), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def existing_ancestor(path: str | Path) -> Path:
    """`path` itself or the nearest parent that exists (what a mkdir -p would create the rest under)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@dataclass(frozen=True)
class DiskSpace:
    path: str  # the existing directory measured
    free: int  # bytes an unprivileged writer may still use (f_bavail)
    total: int
    filesystem: str  # mount point and type, from /proc/self/mounts, for the message


def mount_of(path: Path, proc_root: str = "/proc") -> str:
    """'<mount point> (<fstype>)' of the mount holding path (the longest matching mount point)."""
    best, kind = "/", "?"
    try:
        lines = Path(proc_root, "self", "mounts").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "?"
    target = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, parts[2]
    return f"{best} ({kind})"


def disk_space(path: str | Path, proc_root: str = "/proc") -> DiskSpace:
    where = existing_ancestor(path)
    st = os.statvfs(where)
    return DiskSpace(str(where), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, mount_of(where, proc_root))


@dataclass(frozen=True)
class WriteProbe:
    ok: bool
    detail: str  # on success: bytes and time; on failure: the OS error in words
    error: int | None = None  # errno


def probe_write(directory: Path, label: str) -> WriteProbe:
    """Create `directory` (and parents) and write, fsync and remove a small file in it: what a checkpoint save and
    the trainer's logs will need first. Returns the OS's own reason when it cannot."""
    # a temp name to the cache's own listing: another node's preflight, looking at a shared cache dir while this
    # probe exists, must not see a cache that "holds files but no manifest"
    probe = directory / f".preflight-probe{TEMP_MARK}{label}-{os.getpid()}"
    start = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        with_path = f" ({exc.filename})" if exc.filename else ""
        return WriteProbe(False, f"{exc.strerror or exc}{with_path}", exc.errno)
    return WriteProbe(True, f"{PROBE_BYTES // 1024} KiB written, fsynced and removed in "
                            f"{(time.perf_counter() - start) * 1000:.0f} ms")


def tree_bytes(root: Path) -> int:
    """Bytes of the files under root (0 when it does not exist); symlinks are not followed."""
    total = 0
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
    return total


def neuron_driver_version(sys_root: str = "/sys") -> str | None:
    """The loaded Neuron driver's version: the kernel's /sys/module/neuron/version (MODULE_VERSION in the driver's
    neuron_module.c). `modinfo` would show the installed file instead, which can differ until a reload."""
    try:
        return Path(sys_root, "module", "neuron", "version").read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def neuron_device_files(dev_root: str = "/dev") -> list[str]:
    return sorted(str(p) for p in Path(dev_root).glob("neuron[0-9]*"))


def efa_device_files(dev_root: str = "/dev") -> list[str]:
    """/dev/infiniband/uverbs*: what libfabric's efa provider opens (one per EFA interface)."""
    return sorted(str(p) for p in Path(dev_root, "infiniband").glob("uverbs*"))


# ---------------------------------------------------------------------------------------------- the master's port

CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PortProbe:
    """What binding (node 0) or connecting to (other nodes) the rendezvous port showed.

    outcome: bound | in-use | not-local | refused | accepted | timeout | unreachable | unresolved | error
    """

    action: str
    address: str
    outcome: str
    detail: str
    ip: str | None = None
    holder: str | None = None  # the process listening there, when this node can see it


def _resolve(host: str) -> str:
    return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])


def _listener(port: int) -> str | None:
    """'pid N (name)' of the process listening on `port`, when /proc lets us see it."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return "a process of another user"
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        return None
    return None


def probe_bind(host: str, port: int) -> PortProbe:
    """Node 0 will host the rendezvous store on `port` (torchrun's TCPStore listens on every interface): bind the
    address `host` resolves to, which fails when the port is taken or the address is not this node's."""
    address = f"{host}:{port}"
    try:
        ip = _resolve(host)
    except OSError as exc:
        return PortProbe("bind", address, "unresolved", f"cannot resolve {host}: {exc.strerror or exc}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does: TIME_WAIT is no conflict
        try:
            sock.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return PortProbe("bind", address, "in-use", exc.strerror or str(exc), ip, _listener(port))
            if exc.errno == errno.EADDRNOTAVAIL:
                return PortProbe("bind", address, "not-local", exc.strerror or str(exc), ip)
            return PortProbe("bind", address, "error", exc.strerror or str(exc), ip)
    return PortProbe("bind", address, "bound", "bound and released", ip)


def probe_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> PortProbe:
    """Other nodes: open a TCP connection to the master. Refused proves the host answers (nothing listens before the
    job starts); a timeout or 'no route' proves nothing reaches it."""
    address = f"{host}:{port}"
    try:
        ip = _resolve(host)
    except OSError as exc:
        return PortProbe("connect", address, "unresolved", f"cannot resolve {host}: {exc.strerror or exc}")
    start = time.perf_counter()
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return PortProbe("connect", address, "refused", f"refused in {(time.perf_counter() - start) * 1000:.0f} ms",
                         ip)
    except TimeoutError:
        return PortProbe("connect", address, "timeout", f"no answer within {timeout:.0f} s", ip)
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return PortProbe("connect", address, "unreachable", exc.strerror or str(exc), ip)
        return PortProbe("connect", address, "error", exc.strerror or str(exc), ip)
    return PortProbe("connect", address, "accepted",
                     f"connected in {(time.perf_counter() - start) * 1000:.0f} ms", ip)
