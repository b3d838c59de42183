"""The enroot image format written by llama3_hyperpod/image/sqsh.py, from hand-made image archives: layers applied
with their whiteouts, enroot's /etc/rc, /etc/environment and /etc/fstab, a squashfs that unsquashfs reads, and no
partial file after a failure. (The same from podman's own images: tests/integration/test_enroot_image.py.)"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from llama3_hyperpod.image import sqsh
from tests.enroot_support import SQUASH, ensure_squashfs_tools

CONFIG = {
    "architecture": "amd64",
    "config": {
        "Env": ["PATH=/opt/venv/bin:/usr/bin:/bin", "PYTHONUNBUFFERED=1"],
        "WorkingDir": "/opt/app",
        "Entrypoint": ["python", "/opt/app/entrypoint.py"],
        "Cmd": ["--help"],
        "Volumes": {"/data": {}},
        "Labels": {"org.opencontainers.image.title": "llama3-hyperpod", "multi": "line\none"},
    },
}


def run_rc(tmp_path: Path, config: dict[str, Any], *args: str, rc_local: str = "", stdin: str = "") -> str:
    """Run the generated /etc/rc with sh on this host (its /etc/rc.local pointed at a file of the test)."""
    local = tmp_path / "rc.local"
    local.write_text(rc_local)
    rc = tmp_path / "rc"
    rc.write_text(sqsh.rc_script(config).replace("/etc/rc.local", str(local)))
    result = subprocess.run(["sh", str(rc), *args], input=stdin, capture_output=True, text=True, check=False,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_rc_runs_entrypoint_and_cmd_like_enroot(tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    config = {"WorkingDir": str(workdir), "Entrypoint": ["printf", "[%s]"], "Cmd": ["x y", "it's"]}
    assert run_rc(tmp_path, config) == "[x y][it's]"  # no arguments: ENTRYPOINT CMD
    assert run_rc(tmp_path, config, "a b", "c") == "[a b][c]"  # arguments replace CMD
    assert workdir.is_dir()  # made when missing, and the script runs there
    assert run_rc(tmp_path, {**config, "Entrypoint": ["sh", "-c", 'printf "%s" "$PWD"']}) == str(workdir)
    # pyxis without the entrypoint: rc.local execs the arguments themselves.
    assert run_rc(tmp_path, config, "printf", "<%s>", "q", rc_local='exec "$@"\n') == "<q>"
    # Neither: /bin/sh when started without arguments; arguments are the command.
    assert run_rc(tmp_path, {"WorkingDir": str(workdir)}, stdin="echo plain sh") == "plain sh\n"
    assert run_rc(tmp_path, {"WorkingDir": str(workdir)}, "echo", "args") == "args\n"


def test_rc_keeps_labels_as_comments() -> None:
    text = sqsh.rc_script(CONFIG["config"])  # type: ignore[arg-type]
    assert text.startswith("# multi line one\n# org.opencontainers.image.title llama3-hyperpod\n\n")
    assert "exec python /opt/app/entrypoint.py \"$@\"\n" in text
    assert "exec python /opt/app/entrypoint.py --help\n" in text


Entry = tuple[str, bytes | str | None, int]


def _tar(entries: list[Entry], compress: bool = False) -> bytes:
    """A layer tar: (name, file bytes | symlink target (str) | None for a dir, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type = tarfile.SYMTYPE
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


LAYER1: list[Entry] = [
    ("./", None, 0o755), ("./etc", None, 0o755), ("./dev/console-copy", b"x", 0o644),
    ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644), ("etc/environment", b"FROM_BASE=1\n", 0o644),
    ("usr", None, 0o755), ("usr/bin", None, 0o755), ("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
    ("bin", "usr/bin", 0o777), ("opt", None, 0o755), ("opt/old", None, 0o755), ("opt/old/a", b"a", 0o644),
    ("opt/old/b", b"b", 0o644), ("opt/gone.txt", b"gone", 0o644), ("opt/secret", b"s", 0o000), ("dev", None, 0o755),
    ("dev/null-copy", b"x", 0o644), (".dockerenv", b"", 0o644),
]
LAYER2: list[Entry] = [
    ("opt", None, 0o755), ("opt/.wh.gone.txt", b"", 0o644), ("opt/old", None, 0o755),
    ("opt/old/.wh..wh..opq", b"", 0o644), ("opt/old/new", b"new", 0o644), ("opt/app", None, 0o755),
    ("opt/app/entrypoint.py", b"print('hi')\n", 0o644), ("etc", None, 0o755), ("etc/.wh.ignored-missing", b"", 0o644),
]


def docker_archive(path: Path) -> Path:
    layers = [_tar(LAYER1), _tar(LAYER2)]
    config = json.dumps(CONFIG).encode()
    with tarfile.open(path, "w") as tar:
        names = []
        for i, layer in enumerate(layers):
            names.append(f"layer{i}/layer.tar")
            info = tarfile.TarInfo(names[-1])
            info.size = len(layer)
            tar.addfile(info, io.BytesIO(layer))
        for name, data in (("config.json", config),
                           ("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["t:1"],
                                                          "Layers": names}]).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def oci_archive(path: Path) -> Path:
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layers = [{**blob(_tar(layer, compress=True)), "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
              for layer in (LAYER1, LAYER2)]
    manifest = {"schemaVersion": 2, "config": blob(json.dumps(CONFIG).encode()), "layers": layers}
    index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode())]}
    with tarfile.open(path, "w") as tar:
        members = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", json.dumps(index).encode()),
                   *((f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items())]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def unpack(image: Path, dest: Path) -> Path:
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(dest), str(image)], check=True, capture_output=True)
    return dest


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
def test_archive_becomes_an_enroot_image(tmp_path: Path, kind: str) -> None:
    ensure_squashfs_tools()
    archive = (docker_archive if kind == "docker-archive" else oci_archive)(tmp_path / "image.tar")
    out = tmp_path / "out" / "image.sqsh"
    out.parent.mkdir()
    messages: list[str] = []
    sqsh.make_sqsh(str(archive), out, squash_options=SQUASH, tmpdir=tmp_path, emit=messages.append)
    assert [p.name for p in out.parent.iterdir()] == ["image.sqsh"]  # no partial file beside it
    assert not list(tmp_path.glob("l3hp-sqsh-*")), "the unpacked rootfs is removed"
    root = unpack(out, tmp_path / "root")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # whiteouts: gone.txt removed, opt/old emptied of the lower layer's files, the markers themselves absent
    assert "opt/gone.txt" not in files and "opt/old/a" not in files and "opt/old/b" not in files
    assert "opt/old/new" in files and not [f for f in files if ".wh." in f]
    # enroot's excludes (the host's /dev is mounted; .dockerenv), a link kept as a link
    assert [f for f in files if f.startswith("dev/")] == [] and ".dockerenv" not in files
    assert (root / "bin").is_symlink() and (root / "bin" / "tool").read_text() == "#!/bin/sh\necho tool\n"
    assert (root / "opt" / "secret").stat().st_mode & 0o400, "owner-readable, as enroot makes it"
    etc = root / "etc"
    assert (etc / "environment").read_text() == "PATH=/opt/venv/bin:/usr/bin:/bin\nPYTHONUNBUFFERED=1\n"
    assert (etc / "fstab").read_text() == "${ENROOT_ROOTFS}/data /data none x-create=dir,bind,rw,nosuid,nodev\n"
    assert (etc / "rc").read_text() == sqsh.rc_script(CONFIG["config"])  # type: ignore[arg-type]
    assert (etc / "rc.local").read_text().startswith("# This file is sourced by /etc/rc")
    assert (root / "opt" / "app" / "entrypoint.py").read_text() == "print('hi')\n"
    listing = subprocess.run(["unsquashfs", "-lln", str(out)], capture_output=True, text=True, check=True).stdout
    owners = {line.split()[1] for line in listing.splitlines() if "squashfs-root" in line}
    assert owners == {"0/0"}, owners  # mksquashfs -all-root, as enroot makes it
    assert "applying the 2 layers of" in messages[0] and "layer 2/2: 9 entries, 3 removed by whiteouts" in messages
    assert messages[-1].startswith(f"wrote {out} (")


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    ensure_squashfs_tools()
    out = tmp_path / "out" / "x.sqsh"
    out.parent.mkdir()
    not_image = tmp_path / "plain.tar"
    with tarfile.open(not_image, "w") as tar:
        tar.addfile(tarfile.TarInfo("hello"), io.BytesIO(b""))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    cases = [
        (str(not_image), "not an image archive (no manifest.json or index.json)"),
        (str(garbage), "not a readable tar archive"),
        (str(tmp_path / "missing.tar"), "no such image archive"),
        ("ftp://x/y", "unsupported source ftp://x/y"),
    ]
    for source, message in cases:
        result = subprocess.run(["python3", sqsh.__file__, "--squash-options", SQUASH, source, str(out)],
                                capture_output=True, text=True, check=False, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert list(out.parent.iterdir()) == []
    out.write_bytes(b"old")
    result = subprocess.run(["python3", sqsh.__file__, str(docker_archive(tmp_path / "a.tar")), str(out)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2 and "exists: pass --force" in result.stderr
    assert out.read_bytes() == b"old"
    assert subprocess.run(["python3", sqsh.__file__, "--force", "--squash-options", SQUASH, str(tmp_path / "a.tar"),
                           str(out)], capture_output=True, check=False, timeout=60).returncode == 0
    assert out.read_bytes()[:4] == b"hsqs"  # replaced by a squashfs, atomically
    assert [p.name for p in out.parent.iterdir()] == ["x.sqsh"]
