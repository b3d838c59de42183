"""Write an enroot image (a squashfs file) from a local container image, without enroot and without leaving a
container or a partial file behind.

Why: `enroot import podman://IMAGE` runs `docker rm -f -v` in its EXIT trap whatever the engine (NVIDIA/enroot
v4.1.2 src/docker.sh:588), so with a `docker` CLI that has no daemon it fails after writing the file and leaves its
podman container behind; and no enroot scheme reads a local image archive. The format is simple and documented
(enroot doc/image-format.md): a squashfs of the image's root filesystem holding `/etc/rc` (the command script),
`/etc/fstab` (mounts) and `/etc/environment` (the image's Env), made with `mksquashfs -all-root`. What goes into
those files follows enroot's own conversion (src/docker.sh:332-390, `docker::configure`):

- `/etc/environment`: the image config's `Env`, one `NAME=value` a line;
- `/etc/fstab`: one `${ENROOT_ROOTFS}PATH PATH none x-create=dir,bind,rw,nosuid,nodev` line per `Volumes` entry;
- `/etc/rc`: the labels as `# key value` comments, then `cd` to `WorkingDir` (made if missing), source
  `/etc/rc.local` when not empty (pyxis writes `exec "$@"` there to skip the entrypoint), then
  `exec ENTRYPOINT "$@"` or, without arguments, `exec ENTRYPOINT CMD` (`/bin/sh` when the image has neither);
- `/etc/rc.local`: an empty script (comments only).

The root filesystem comes from the engine the way enroot takes it (src/docker.sh:595-602: `create`, `export` piped
into `tar -px` without `dev/*` and `.dockerenv`, then read/write permissions for the owner) or, for an archive made
by `docker save` / `podman save` (docker-archive or OCI layout), by applying its layers in order with their OCI
whiteouts. Standard library only: import.sh runs it with the login node's python3 (3.8 or later).

    python3 sqsh.py podman://IMAGE[:TAG] OUT.sqsh
    python3 sqsh.py dockerd://IMAGE[:TAG] OUT.sqsh
    python3 sqsh.py ARCHIVE.tar OUT.sqsh

Over 400 lines: a standalone script (run as a file by enroot/import.sh, no package imports).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

# enroot's default (enroot.in:88) without -exit-on-error, which squashfs-tools before 4.6 do not know.
DEFAULT_SQUASH_OPTIONS = "-comp lzo -noD"
ENGINES = {"podman": "podman", "dockerd": "docker"}
RC_LOCAL = "# This file is sourced by /etc/rc when the container starts.\n" \
           "# It can be used to manipulate the entrypoint or the command of the container.\n"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class SqshError(Exception):
    """Bad input or a failed step, said in one line."""


def say(message: str) -> None:
    print(f"sqsh: {message}", file=sys.stderr, flush=True)


# ---- the image config -> enroot's /etc/rc, /etc/fstab, /etc/environment ---------------------------------------

def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def rc_script(config: dict[str, Any]) -> str:
    """The command script enroot writes for this image config (what `enroot start` and pyxis run)."""
    labels = config.get("Labels") or {}
    lines = [f"# {key} {str(value).replace(chr(10), ' ')}" for key, value in sorted(labels.items())]
    if lines:
        lines.append("")
    workdir = config.get("WorkingDir") or "/"
    entrypoint, cmd = _strings(config.get("Entrypoint")), _strings(config.get("Cmd"))
    if not entrypoint and not cmd:
        cmd = ["/bin/sh"]
    with_args = " ".join([*(shlex.quote(a) for a in entrypoint), '"$@"'])
    default = " ".join(shlex.quote(a) for a in [*entrypoint, *cmd])
    lines += [
        f'mkdir -p "{workdir}" 2> /dev/null',
        f'cd "{workdir}" && unset OLDPWD || exit 1',
        "",
        "if [ -s /etc/rc.local ]; then",
        "    . /etc/rc.local",
        "fi",
        "",
        "if [ $# -gt 0 ]; then",
        f"    exec {with_args}",
        "else",
        f"    exec {default}",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def configure_rootfs(rootfs: Path, config: dict[str, Any]) -> None:
    """Write the files enroot reads at start into an unpacked root filesystem."""
    etc = rootfs / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for name in ("rc", "rc.local", "fstab", "environment"):
        path = etc / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            _remove(path)  # never write through a link into somewhere else
    volumes = sorted((config.get("Volumes") or {}).keys())
    (etc / "fstab").write_text("".join(f"${{ENROOT_ROOTFS}}{v} {v} none x-create=dir,bind,rw,nosuid,nodev\n"
                                       for v in volumes))
    (etc / "environment").write_text("".join(f"{e}\n" for e in _strings(config.get("Env"))))
    (etc / "rc").write_text(rc_script(config))
    (etc / "rc.local").write_text(RC_LOCAL)
    workdir = str(config.get("WorkingDir") or "/").lstrip("/")
    if workdir:
        (rootfs / workdir).mkdir(parents=True, exist_ok=True)


# ---- the root filesystem ---------------------------------------------------------------------------------------

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def fix_permissions(rootfs: Path) -> None:
    """Owner read (and search on dirs) everywhere, owner write on dirs: what enroot does (src/common.sh:230-237) so
    that a non-root user can read every file and remove the tree."""
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = st.st_mode | stat.S_IRUSR
            if stat.S_ISDIR(st.st_mode):
                want |= stat.S_IXUSR | stat.S_IWUSR
            elif st.st_mode & (stat.S_IXGRP | stat.S_IXOTH):
                want |= stat.S_IXUSR
            if want != st.st_mode:
                os.chmod(path, stat.S_IMODE(want))
    os.chmod(rootfs, 0o755)


def _untar(source: IO[bytes] | None, rootfs: Path, errors: IO[bytes], *,
           skip_whiteouts: bool) -> subprocess.Popen[bytes]:
    """GNU tar, as enroot uses it: keep modes, drop dev/* (the host's /dev is mounted) and .dockerenv (layer tars
    name their members ./dev/..., an export dev/...)."""
    cmd = ["tar", "-C", str(rootfs), "--warning=no-timestamp", "--anchored", "--exclude=dev/*", "--exclude=./dev/*",
           "--exclude=.dockerenv", "--exclude=./.dockerenv", "--no-anchored"]
    if skip_whiteouts:
        cmd.append(f"--exclude={WHITEOUT}*")
    cmd += ["-px", "-f", "-"]
    return subprocess.Popen(cmd, stdin=source if source is not None else subprocess.PIPE, stderr=errors)


def _text(errors: IO[bytes]) -> str:
    errors.seek(0)
    return errors.read().decode(errors="replace").strip()


def _inside(rootfs: Path, member: str) -> Path | None:
    """rootfs/member without following any symlink on the way; None when it would leave the tree."""
    parts = [p for p in PurePosixPath(member).parts if p not in ("/", ".")]
    if any(p == ".." for p in parts):
        return None
    path = rootfs
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink():
            return None
    return path / parts[-1] if parts else rootfs


def apply_whiteouts(rootfs: Path, names: list[str]) -> int:
    """Delete what a layer's whiteout entries hide from the layers below (OCI image spec, layer.md): `.wh.NAME`
    removes NAME, `.wh..wh..opq` empties its directory. Applied before the layer's own files are extracted."""
    removed = 0
    for name in names:
        base = PurePosixPath(name).name
        parent = str(PurePosixPath(name).parent)
        if base == OPAQUE:
            target = _inside(rootfs, parent + "/x")
            if target is not None and target.parent.is_dir() and not target.parent.is_symlink():
                for child in target.parent.iterdir():
                    _remove(child)
                    removed += 1
        elif base.startswith(WHITEOUT):
            target = _inside(rootfs, f"{parent}/{base[len(WHITEOUT):]}")
            if target is not None and (target.exists() or target.is_symlink()):
                _remove(target)
                removed += 1
    return removed


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill and reap children still running (after an error or a signal), before their files are removed."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def _run_engine(engine: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([engine, *args], capture_output=True, text=True, check=False)


def _engine_error(result: subprocess.CompletedProcess[str], what: str) -> SqshError:
    detail = (result.stderr or result.stdout).strip().splitlines()
    return SqshError(f"{what}: {detail[-1] if detail else f'exit {result.returncode}'}")


def check_engine(engine: str) -> None:
    """One line when the engine cannot be used here (no CLI, or a docker CLI with no daemon behind it)."""
    if shutil.which(engine) is None:
        raise SqshError(f"{engine} is not installed on this host")
    result = _run_engine(engine, "version", "--format", "{{.Server.Version}}" if engine == "docker" else
                         "{{.Client.Version}}")
    if result.returncode != 0:
        raise _engine_error(result, f"{engine} cannot reach its daemon"
                            if engine == "docker" else f"{engine} does not work here")


def engine_rootfs(engine: str, image: str, rootfs: Path, emit: Callable[[str], None] = say) -> dict[str, Any]:
    """Flatten IMAGE into rootfs through a created (never started) container, removed again whatever happens."""
    inspected = _run_engine(engine, "image", "inspect", image)
    if inspected.returncode != 0:
        raise _engine_error(inspected, f"{engine} has no image {image}")
    config = json.loads(inspected.stdout)[0]
    emit(f"exporting {image} from {engine}")
    name = f"l3hp-sqsh-{secrets.token_hex(4)}"
    created = _run_engine(engine, "create", "--name", name, image)
    if created.returncode != 0:
        raise _engine_error(created, f"{engine} create {image}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryFile() as export_err, tempfile.TemporaryFile() as tar_err:
            exporter = subprocess.Popen([engine, "export", name], stdout=subprocess.PIPE, stderr=export_err)
            procs.append(exporter)
            untar = _untar(exporter.stdout, rootfs, tar_err, skip_whiteouts=False)
            procs.append(untar)
            assert exporter.stdout is not None
            exporter.stdout.close()
            untar.wait()
            exporter.wait()
            if exporter.returncode != 0:
                raise SqshError(f"{engine} export {name}: {_text(export_err)}")
            if untar.returncode != 0:
                raise SqshError(f"tar: {_text(tar_err)}")
    finally:
        _stop(procs)
        removed = _run_engine(engine, "rm", "-f", "-v", name)
        if removed.returncode != 0:
            say(f"warning: could not remove the temporary container {name}: {removed.stderr.strip()}")
        else:
            say(f"removed the temporary container {name}")
    lowered = {k.lower(): v for k, v in config.items()}
    return dict(lowered.get("config") or {})


# ---- image archives (docker save / podman save: docker-archive or OCI layout) ---------------------------------

def _read_json(archive: tarfile.TarFile, name: str) -> Any:
    try:
        member = archive.extractfile(name)
    except KeyError:
        raise SqshError(f"{name} is missing from the archive") from None
    if member is None:
        raise SqshError(f"{name} in the archive is not a file")
    return json.loads(member.read())


def _blob(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"blobs/{algo}/{hexdigest}"


def archive_layout(archive: tarfile.TarFile) -> tuple[dict[str, Any], list[str]]:
    """(image config, layer member names bottom-up) of a docker-archive or an OCI image layout."""
    names = set(archive.getnames())
    if "manifest.json" in names:  # docker-archive (docker save, podman save); Docker 25+ writes it beside the OCI index
        manifest = _read_json(archive, "manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise SqshError("manifest.json of the archive lists no image")
        if len(manifest) > 1:
            raise SqshError(f"the archive holds {len(manifest)} images: save one image per archive")
        entry = manifest[0]
        return _read_json(archive, entry["Config"]), list(entry["Layers"])
    if "index.json" in names:  # OCI image layout (podman save --format oci-archive)
        index = _read_json(archive, "index.json")
        manifests = index.get("manifests") or []
        while True:
            if len(manifests) != 1:
                raise SqshError(f"the archive's OCI index lists {len(manifests)} manifests: save one image")
            doc = _read_json(archive, _blob(manifests[0]["digest"]))
            if "layers" in doc:
                break
            manifests = [m for m in doc.get("manifests") or []
                         if (m.get("platform") or {}).get("architecture") in (None, "amd64", "arm64")][:1]
        layers = []
        for layer in doc["layers"]:
            media = str(layer.get("mediaType", ""))
            if "zstd" in media:
                raise SqshError(f"layer {layer['digest']} is zstd-compressed, which this reader does not handle: "
                                "save the image as docker-archive")
            layers.append(_blob(layer["digest"]))
        return _read_json(archive, _blob(doc["config"]["digest"])), layers
    raise SqshError("not an image archive (no manifest.json or index.json): make it with `docker save` or "
                    "`podman save`")


@contextlib.contextmanager
def _layer_stream(archive: tarfile.TarFile, name: str) -> Iterator[IO[bytes]]:
    raw = archive.extractfile(name)
    if raw is None:
        raise SqshError(f"layer {name} is missing from the archive")
    head = raw.read(2)
    raw.seek(0)
    stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw  # type: ignore[assignment]
    try:
        yield stream
    finally:
        stream.close()


def archive_rootfs(path: Path, rootfs: Path, emit: Callable[[str], None] = say) -> dict[str, Any]:
    """Apply the archive's layers in order into rootfs; returns the image config's `config` section."""
    try:
        archive = tarfile.open(path)  # noqa: SIM115  # closed by the with below; open errors are bad input
    except (OSError, tarfile.TarError) as exc:
        raise SqshError(f"{path}: not a readable tar archive ({exc})") from None
    with archive:
        image_config, layers = archive_layout(archive)
        emit(f"applying the {len(layers)} layers of {path}")
        for i, name in enumerate(layers, 1):
            with _layer_stream(archive, name) as stream:
                try:
                    with tarfile.open(fileobj=stream, mode="r|") as layer:
                        members = layer.getnames()
                except tarfile.TarError as exc:
                    raise SqshError(f"layer {i} ({name}): {exc}") from None
            removed = apply_whiteouts(rootfs, [m for m in members if PurePosixPath(m).name.startswith(WHITEOUT)])
            with _layer_stream(archive, name) as stream, tempfile.TemporaryFile() as tar_err:
                untar = _untar(None, rootfs, tar_err, skip_whiteouts=True)
                try:
                    assert untar.stdin is not None
                    with contextlib.suppress(BrokenPipeError):
                        shutil.copyfileobj(stream, untar.stdin, 1 << 20)
                    with contextlib.suppress(BrokenPipeError):
                        untar.stdin.close()
                    untar.wait()
                finally:
                    _stop([untar])
                if untar.returncode != 0:
                    raise SqshError(f"tar, layer {i} ({name}): {_text(tar_err)}")
            emit(f"layer {i}/{len(layers)}: {len(members)} entries, {removed} removed by whiteouts")
    lowered = {k.lower(): v for k, v in image_config.items()}
    return dict(lowered.get("config") or {})


# ---- the whole import ------------------------------------------------------------------------------------------

def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """TERM/HUP/INT end the import through the normal clean-up path (temporary files and container removed)."""
    def stop(signum: int, _frame: Any) -> None:
        raise SqshError(f"interrupted by signal {signum}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def make_sqsh(source: str, out: Path, *, squash_options: str = DEFAULT_SQUASH_OPTIONS, tmpdir: Path | None = None,
              force: bool = False, emit: Callable[[str], None] = say) -> Path:
    """SOURCE (podman://IMAGE, dockerd://IMAGE or an archive path) -> OUT, an enroot image.

    OUT appears only when complete (written under a temporary name in its directory, then renamed)."""
    out = out.absolute()
    if out.suffix != ".sqsh":
        raise SqshError(f"output {out} must end in .sqsh")
    if out.exists() and not force:
        raise SqshError(f"{out} exists: pass --force to replace it")
    if not out.parent.is_dir():
        raise SqshError(f"directory {out.parent} does not exist")
    if shutil.which("mksquashfs") is None:
        raise SqshError("mksquashfs is not installed (apt-get install squashfs-tools)")
    scheme, sep, image = source.partition("://")
    if sep and scheme not in ENGINES:
        raise SqshError(f"unsupported source {source}: use podman://IMAGE, dockerd://IMAGE or an archive path")
    if sep:
        check_engine(ENGINES[scheme])
    elif not Path(source).is_file():
        raise SqshError(f"{source}: no such image archive")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    start = time.monotonic()
    with _signals_exit(), tempfile.TemporaryDirectory(prefix="l3hp-sqsh-", dir=tmpdir) as tmp:
        rootfs = Path(tmp) / "rootfs"
        rootfs.mkdir()
        try:
            if sep:
                config = engine_rootfs(ENGINES[scheme], image, rootfs, emit)
            else:
                config = archive_rootfs(Path(source), rootfs, emit)
            fix_permissions(rootfs)
            configure_rootfs(rootfs, config)
            emit(f"root filesystem ready ({time.monotonic() - start:.0f} s): /etc/rc, /etc/fstab and "
                 f"/etc/environment ({len(_strings(config.get('Env')))} variables) written")
            cmd = ["mksquashfs", str(rootfs), str(partial), "-all-root", "-noappend", "-no-progress",
                   "-processors", str(os.cpu_count() or 1), *shlex.split(squash_options)]
            emit(" ".join(shlex.quote(c) for c in cmd))
            made = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
            if made.returncode != 0:
                raise SqshError(f"mksquashfs failed: {made.stderr.strip().splitlines()[-1:]}")
            os.chmod(partial, 0o644)
            os.replace(partial, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            # Files extracted without owner write permission would stop TemporaryDirectory's clean-up.
            if rootfs.exists():
                fix_permissions(rootfs)
    emit(f"wrote {out} ({_size(out)}, {time.monotonic() - start:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sqsh.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="podman://IMAGE[:TAG], dockerd://IMAGE[:TAG] or an image archive "
                   "(docker save / podman save)")
    p.add_argument("output", help="the .sqsh to write")
    p.add_argument("--force", action="store_true", help="replace OUTPUT when it exists")
    p.add_argument("--squash-options", default=os.environ.get("ENROOT_SQUASH_OPTIONS", DEFAULT_SQUASH_OPTIONS),
                   help="mksquashfs options (default: $ENROOT_SQUASH_OPTIONS, else enroot's default)")
    p.add_argument("--tmpdir", default=os.environ.get("ENROOT_TEMP_PATH") or None,
                   help="where the root filesystem is unpacked (default: $ENROOT_TEMP_PATH, else $TMPDIR)")
    ns = p.parse_args(argv)
    try:
        make_sqsh(ns.source, Path(ns.output), squash_options=ns.squash_options,
                  tmpdir=Path(ns.tmpdir) if ns.tmpdir else None, force=ns.force)
    except SqshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2  # errors.EXIT_BAD_INPUT: this script runs as a file, without the package
    print(f"done: use IMAGE={Path(ns.output).absolute()} with enroot/train.sbatch and enroot/compile.sbatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
