"""`./build.sh`: build the image through the Docker API, then optionally push it to ECR and import it into enroot.

The Docker SDK talks to Docker Engine (DOCKER_HOST or the default socket) and to podman's Docker-compatible API
(`podman system service`), so the same tool works on a workstation and on a daemon-less CI machine.
Errors for users are one line; bad input exits 2, a failed build/push/import exits 1.
Over 400 lines: one tool (context, build, push, import) whose steps share the request and the client.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama3_hyperpod.errors import ConfigError, run_main
from llama3_hyperpod.fsutil import sha256_file
from llama3_hyperpod.image.versions import BASE_IMAGE_ARG, FLAVORS, REPO_ROOT, build_args_for, load_versions

# The build context's wheelhouse: the Dockerfile bind-mounts this fixed path (dockerd 20.10's BuildKit does not expand
# build args in RUN --mount options); it holds only a README in git, wheels there make the install offline.
WHEELHOUSE = "wheelhouse"
WHEEL_SUFFIXES = (".whl", ".gz", ".zip")
BAKED_CACHE = "neuron_cache"  # the context folder the app stage copies to /opt/app/neuron_cache
# What each flavor's image runs, so a baked cache can be checked against it: (backend, device or None for any).
FLAVOR_RUNS = {"neuron": ("neuron", None), "cpu": ("torch", "cpu"), "cuda": ("torch", "cuda")}
DEPS_REPO = "localhost/llama3-hyperpod-deps"
API_VERSION = "1.41"  # Docker Engine 20.10+, podman 4
_SECRETISH = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|_KEY$|^KEY$)", re.IGNORECASE)
_ECR = re.compile(r"^(?P<registry>\d{12}\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?)/")
_TAG = re.compile(r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9](:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")


class UsageError(ConfigError):
    """Bad input: exit 2. One text, "--option: what is wrong", split into ConfigError's key and message."""

    def __init__(self, text: str) -> None:
        key, sep, message = text.partition(": ")
        if not sep:
            key, message = "image build", text
        super().__init__(key, message)


class BuildError(Exception):
    """The build, push or import failed: exit 1."""


@dataclass(frozen=True)
class BuildRequest:
    """What to build, validated: every path absolute, every build arg final."""

    context: Path
    flavor: str
    tag: str
    build_args: dict[str, str]
    push: bool = False
    sqsh: Path | None = None
    docker_host: str | None = None
    no_cache: bool = False
    classic: bool = False
    network: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    cache: Path | None = None  # --cache DIR: baked instead of the context's neuron_cache/ (its README kept)
    wheelhouse: Path | None = None  # --wheelhouse DIR outside the context's wheelhouse/: linked in for the build


def files_sha256(files: dict[str, Path]) -> str:
    """Hash of {relative path: file} (path + content), stable across machines; 'empty' when there are none."""
    if not files:
        return "empty"
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(files[rel])))
    return digest.hexdigest()


def tree_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def tree_sha256(root: Path) -> str:
    """Hash of a directory's files (relative path + content); 'empty' when there are none."""
    return files_sha256(tree_files(root))


def check_cache(cache: Path, flavor: str) -> Path:
    """--cache DIR must be a compile cache (with the manifest `compile` writes) made for what this flavor runs."""
    from llama3_hyperpod.cache.manifest import read_manifest

    cache = cache.resolve()
    if not cache.is_dir():
        raise UsageError(f"--cache: {cache} is not a directory")
    try:
        manifest = read_manifest(cache)
    except ValueError as exc:
        raise UsageError(f"--cache: {exc}") from None
    if manifest is None or not manifest["compiles"]:
        raise UsageError(f"--cache: {cache} has no manifest.json with a compile record: fill it with "
                         "`entrypoint.py compile CONFIG` (L3HP_CACHE_DIR or compiler_cache_url pointing there)")
    backend, device = FLAVOR_RUNS[flavor]
    made_for = {(str(c.get("backend")), str(c.get("graph", {}).get("device"))) for c in manifest["compiles"]}
    if not any(b == backend and device in (None, d) for b, d in made_for):
        found = ", ".join(sorted(f"{b} on {d}" for b, d in made_for))
        raise UsageError(f"--cache: {cache} was compiled for {found}; the {flavor} image runs {backend}"
                         + (f" on {device}" if device else ""))
    return cache


def baked_cache_files(context: Path, cache: Path | None) -> dict[str, Path]:
    """What goes to /opt/app/neuron_cache: the context's neuron_cache/, or its README plus the --cache dir's graphs
    and manifest (locks, temp files and other bookkeeping left out)."""
    from llama3_hyperpod.cache.manifest import MANIFEST_NAME, iter_cache_files

    files = tree_files(context / BAKED_CACHE)
    if cache is None:
        return files
    baked = {rel: path for rel, path in files.items() if rel == "README.md"}
    baked |= {rel.as_posix(): cache / rel for rel in iter_cache_files(cache)}
    baked[MANIFEST_NAME] = cache / MANIFEST_NAME
    return baked


def git_commit(context: Path) -> str:
    """HEAD of the context's git checkout (with -dirty when it has changes), 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "-C", str(context), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(context), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def wheels(directory: Path) -> list[Path]:
    """The wheel and sdist files directly in `directory` (none when it does not exist)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WHEEL_SUFFIXES)) \
        if directory.is_dir() else []


def check_wheelhouse(wheelhouse: Path, context: Path) -> Path | None:
    """--wheelhouse DIR: None when DIR is the context's own wheelhouse/, else DIR (resolved) to be linked in."""
    wheelhouse = wheelhouse.resolve()
    if not wheels(wheelhouse):
        raise UsageError(f"--wheelhouse: {wheelhouse} is not a directory of wheels (pip download -r requirements.lock)")
    if wheelhouse == context / WHEELHOUSE:
        return None
    if wheels(context / WHEELHOUSE):
        raise UsageError(f"--wheelhouse: {context / WHEELHOUSE} already holds wheels: remove them, or build with "
                         f"--wheelhouse {context / WHEELHOUSE}")
    return wheelhouse


@contextlib.contextmanager
def staged_wheelhouse(source: Path | None, context: Path) -> Iterator[None]:
    """Hard-link (or copy) the wheels of `source` into the context's wheelhouse/ for one build, then remove them."""
    if source is None:
        yield
        return
    staged = context / WHEELHOUSE
    staged.mkdir(exist_ok=True)
    linked: list[Path] = []
    try:
        for src in wheels(source):
            try:
                os.link(src, staged / src.name)
            except OSError:
                shutil.copy2(src, staged / src.name)
            linked.append(staged / src.name)
        yield
    finally:
        for path in linked:
            path.unlink(missing_ok=True)


def parse_build_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UsageError(f"--build-arg: expected NAME=VALUE, got {text!r}")
    if _SECRETISH.search(name):
        raise UsageError(f"--build-arg {name}: build args are stored in the image history; pass secrets another way")
    return name, value


def make_request(ns: argparse.Namespace) -> BuildRequest:
    """Validate the command line and compute build args and labels (no Docker calls)."""
    context = Path(ns.context).resolve()
    if not (context / "Dockerfile").is_file():
        raise UsageError(f"--context: no Dockerfile in {context}")
    tag = ns.tag or f"llama3-hyperpod:{ns.flavor}"
    if not _TAG.match(tag):
        raise UsageError(f"--tag: {tag!r} is not a valid image reference")
    args = build_args_for(ns.flavor, load_versions(context / "versions" / "neuron.json"))
    if ns.base_image:
        args[BASE_IMAGE_ARG[ns.flavor]] = ns.base_image
    wheelhouse = check_wheelhouse(Path(ns.wheelhouse), context) if ns.wheelhouse else None
    cache = check_cache(Path(ns.cache), ns.flavor) if ns.cache else None
    # Labels that change with every commit go through the API, not ARG/LABEL steps: no layer depends on them.
    labels = {
        "org.opencontainers.image.revision": git_commit(context),
        "io.llama3-hyperpod.cache-manifest-sha256": files_sha256(baked_cache_files(context, cache)),
        "io.llama3-hyperpod.lock-sha256": sha256_file(context / "requirements.lock"),
    }
    if ns.flavor == "cpu":  # the neuron stage labels its own pins; the cpu image's torch is the lock's
        pins = re.search(r"^torch==(\S+)", (context / "requirements.lock").read_text(), flags=re.MULTILINE)
        labels["io.llama3-hyperpod.torch"] = pins.group(1) if pins else "unknown"
    for item in ns.build_arg or ():
        name, value = parse_build_arg(item)
        args[name] = value
    sqsh = Path(ns.sqsh).resolve() if ns.sqsh else None
    if sqsh is not None:
        if shutil.which("mksquashfs") is None:
            raise UsageError("--sqsh: mksquashfs is not installed on this host (apt-get install squashfs-tools)")
        if sqsh.exists():
            raise UsageError(f"--sqsh: {sqsh} exists (never overwritten): remove it or pick another path")
        if not sqsh.parent.is_dir():
            raise UsageError(f"--sqsh: directory {sqsh.parent} does not exist")
    if ns.push and "/" not in tag.split(":")[0]:
        raise UsageError(f"--push: tag {tag!r} names no registry (e.g. ACCOUNT.dkr.ecr.REGION.amazonaws.com/repo:tag)")
    return BuildRequest(context=context, flavor=ns.flavor, tag=tag, build_args=args, push=ns.push, sqsh=sqsh,
                        docker_host=ns.docker_host, no_cache=ns.no_cache, classic=ns.classic_builder,
                        network=ns.network, labels=labels, cache=cache, wheelhouse=wheelhouse)


def connect(docker_host: str | None) -> tuple[Any, str]:
    """A Docker SDK client and the engine behind it ('docker' or 'podman'); one clear line if nothing answers."""
    import docker

    try:
        # A pinned API version: "auto" costs one more round trip (/version) on every build.
        client = docker.DockerClient(base_url=docker_host, version=API_VERSION) if docker_host \
            else docker.from_env(version=API_VERSION)
        ping = client.api.get(client.api._url("/_ping"))  # one request: liveness, and podman says who it is
        ping.raise_for_status()
    except Exception as exc:
        where = docker_host or os.environ.get("DOCKER_HOST") or "the default Docker socket"
        raise BuildError(f"cannot reach a Docker API at {where} ({type(exc).__name__}); start Docker, or "
                         "`podman system service` and pass --docker-host unix:///path/to/podman.sock") from exc
    return client, "podman" if "Libpod-Api-Version" in ping.headers else "docker"


def flavor_dockerfile(text: str, flavor: str, *, classic: bool = False) -> str:
    """The Dockerfile with the other flavors' SDK stages left out and `sdk-${FLAVOR}` resolved.

    BuildKit and buildah skip stages the target does not need, but Docker Engine's classic builder (the one the
    Docker API and SDK drive) builds every stage: without this a cpu build would also build the Neuron SDK.
    `classic` also turns `RUN --mount=type=bind,source=X,target=Y` (which that builder lacks) into COPY X Y + RUN;
    the wheelhouse then stays in a layer of the image, the price of building through Docker Engine's API. The stages
    left form one chain (sdk -> deps -> app), so a second mount of the same files only needs the RUN: an earlier
    stage's COPY put them there already.
    """
    out: list[str] = []
    skipping = False
    copied: set[tuple[str, str]] = set()
    for line in text.splitlines(keepends=True):
        match = re.match(r"^FROM\s+\S+\s+AS\s+sdk-(\w+)\s*$", line, flags=re.IGNORECASE)
        if line.upper().startswith("FROM "):
            skipping = match is not None and match.group(1) != flavor
        if skipping:
            continue
        mount = re.match(r"^RUN --mount=type=bind,source=(\S+?),target=(\S+)\s+(.*)$", line, flags=re.DOTALL)
        if classic and mount:
            key = (mount.group(1), mount.group(2))
            out.append(("" if key in copied else f"COPY {key[0]}/ {key[1]}/\n") + f"RUN {mount.group(3)}")
            copied.add(key)
            continue
        out.append(line.replace("sdk-${FLAVOR}", f"sdk-{flavor}"))
    return "".join(out)


APP_STAGE = re.compile(r"^FROM deps AS app\s*$", flags=re.MULTILINE)


def split_app_stage(text: str) -> tuple[str, str]:
    """(everything up to the deps stage, the app stage's instructions after its FROM line)."""
    match = APP_STAGE.search(text)
    if match is None:
        raise UsageError("Dockerfile: no `FROM deps AS app` stage")
    return text[: match.start()], text[match.end():].lstrip("\n")


def app_sources(app_body: str) -> list[str]:
    """The build-context paths a part of the Dockerfile copies (COPY lines without --from)."""
    sources: list[str] = []
    for line in app_body.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += [p.rstrip("/") for p in parts[1:-1] if not p.startswith("--")]
    return sources


def deps_key(req: BuildRequest, deps_text: str) -> str:
    """Everything the deps image depends on: its Dockerfile part, build args, the files it copies, the wheels."""
    digest = hashlib.sha256(deps_text.encode())
    digest.update(json.dumps(req.build_args, sort_keys=True).encode())
    for name in sorted(set(app_sources(deps_text)) - {WHEELHOUSE}):  # the wheelhouse: by name and size, below
        files = tree_files(req.context / name) if (req.context / name).is_dir() else {"": req.context / name}
        for rel, path in sorted(files.items()):
            digest.update(f"{name}/{rel}\0".encode() + path.read_bytes())
    for path in wheels(req.context / WHEELHOUSE):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def app_context(req: BuildRequest, dockerfile_text: str, sources: Iterable[str]) -> io.BytesIO:
    """A tar of only what the app stage copies (plus its Dockerfile), honouring .dockerignore: small, so a code-only
    rebuild does not ship the wheelhouse again. The baked cache comes from baked_cache_files (--cache)."""
    from docker.utils.build import exclude_paths

    ignore = req.context / ".dockerignore"
    patterns = [p for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")] \
        if ignore.exists() else []
    allowed = exclude_paths(str(req.context), patterns)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = dockerfile_text.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        for rel in sorted(allowed):
            if rel.startswith(BAKED_CACHE + "/"):
                continue
            if any(rel == src or rel.startswith(src + "/") for src in sources):
                tar.add(req.context / rel, arcname=rel, recursive=False)
        if BAKED_CACHE in sources:
            tar.add(req.context / BAKED_CACHE, arcname=BAKED_CACHE, recursive=False)
            for rel, path in sorted(baked_cache_files(req.context, req.cache).items()):
                tar.add(path, arcname=f"{BAKED_CACHE}/{rel}", filter=_readable_by_all)
    buf.seek(0)
    return buf


def _readable_by_all(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Baked cache files as root-owned and world-readable: the run-time uid is not the one that compiled them."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o755 if info.mode & 0o111 else 0o644
    return info


def run_build(client: Any, emit: Callable[[str], None], start: float, **kwargs: Any) -> str:
    """One API build with its log streamed (elapsed time on each step); returns the image id."""
    image_id = ""
    chunks: Iterator[dict[str, Any]] = client.api.build(decode=True, rm=True, forcerm=True, pull=False, **kwargs)
    for chunk in chunks:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "")
            raise BuildError(f"build failed: {str(detail).strip().splitlines()[-1] if detail else 'unknown error'}")
        for line in chunk.get("stream", "").splitlines():
            if line.strip():
                prefix = f"[{time.monotonic() - start:6.1f}s] " if "STEP" in line or line.startswith("Step ") else ""
                emit(prefix + line)
        aux = chunk.get("aux") or {}
        if isinstance(aux, dict) and aux.get("ID"):
            image_id = aux["ID"]
    return image_id or client.images.get(kwargs["tag"]).id


def stream_build(client: Any, req: BuildRequest, emit: Callable[[str], None], *, classic: bool = False) -> str:
    """Build in two API calls; return the image id.

    1. the `deps` target (SDK + locked dependencies) from the full context, only when no image built from the same
       inputs exists (tagged llama3-hyperpod-deps:FLAVOR-KEY);
    2. the app stage FROM that image, from a context holding only the project files.
    The result has exactly the layers a one-shot `docker build` gives; a code-only change sends a few hundred KB.
    """
    start = time.monotonic()
    text = flavor_dockerfile((req.context / "Dockerfile").read_text(), req.flavor, classic=classic)
    deps_text, app_body = split_app_stage(text)
    deps_tag = f"{DEPS_REPO}:{req.flavor}-{deps_key(req, deps_text)[:16]}"
    if req.no_cache or not client.images.list(name=deps_tag):
        # Written under build/ (git-ignored) inside the context: the SDK always sends the named Dockerfile, whatever
        # .dockerignore says (one outside the context gets a random name in the tar, which podman 4.3 rejects).
        dockerfile = req.context / "build" / f"Dockerfile.{req.flavor}"
        dockerfile.parent.mkdir(parents=True, exist_ok=True)
        dockerfile.write_text(deps_text)
        emit(f"building {deps_tag} (SDK + locked dependencies)")
        run_build(client, emit, start, path=str(req.context), dockerfile=dockerfile.relative_to(req.context).as_posix(),
                  tag=deps_tag, target="deps", buildargs=req.build_args, nocache=req.no_cache,
                  network_mode=req.network)
        for image in client.images.list(name=DEPS_REPO):  # untag older deps images of this flavor (disk)
            for old_tag in image.tags:
                if old_tag.startswith(f"{DEPS_REPO}:{req.flavor}-") and old_tag != deps_tag:
                    client.images.remove(old_tag)
    else:
        emit(f"reusing {deps_tag} (same SDK, lock and wheels)")
    app_text = f"FROM {deps_tag}\n{app_body}"
    image_id = run_build(client, emit, start, fileobj=app_context(req, app_text, app_sources(app_body)),
                         custom_context=True, dockerfile="Dockerfile", tag=req.tag, nocache=req.no_cache,
                         network_mode=req.network, labels=req.labels or None)
    emit(f"built {req.tag} ({image_id[:19]}) in {time.monotonic() - start:.1f}s")
    return image_id


def ecr_auth(tag: str) -> dict[str, str] | None:
    """Docker auth for an ECR tag from the AWS CLI (never written to disk or logged); None for other registries."""
    match = _ECR.match(tag)
    if match is None:
        return None
    if shutil.which("aws") is None:
        raise BuildError("--push to ECR needs the AWS CLI (aws ecr get-login-password) on PATH")
    result = subprocess.run(["aws", "ecr", "get-login-password", "--region", match["region"]],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"aws ecr get-login-password failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"username": "AWS", "password": result.stdout.strip()}


def split_tag(tag: str) -> tuple[str, str]:
    """'reg:5000/repo:v1' -> ('reg:5000/repo', 'v1'); no tag means 'latest' (a registry port is not a tag)."""
    repo, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", maxsplit=1)[-1] else (tag, "", "latest")
    return repo, version


def push(client: Any, tag: str, emit: Callable[[str], None]) -> None:
    repo, version = split_tag(tag)
    for chunk in client.images.push(repo, tag=version, stream=True, decode=True, auth_config=ecr_auth(tag)):
        if "error" in chunk:
            raise BuildError(f"push failed: {chunk['error']}")
        if chunk.get("status") and not chunk.get("progressDetail"):
            emit(f"push: {chunk.get('id', '')} {chunk['status']}".strip())


def enroot_import(engine: str, tag: str, sqsh: Path, emit: Callable[[str], None]) -> None:
    """The image as an enroot squashfs, by our own writer (image/sqsh.py): enroot's podman:// import runs `docker rm`
    in its exit trap whatever the engine (enroot src/docker.sh:588), which fails with a daemon-less docker CLI."""
    from llama3_hyperpod.image.sqsh import SqshError, make_sqsh

    try:
        make_sqsh(f"{'podman' if engine == 'podman' else 'dockerd'}://{tag}", sqsh, emit=emit)
    except SqshError as exc:
        raise BuildError(f"--sqsh {sqsh}: {exc}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="build.sh", description=__doc__.splitlines()[0])
    p.add_argument("--flavor", choices=FLAVORS, default="neuron", help="image flavor (default: neuron)")
    p.add_argument("--tag", help="image reference (default: llama3-hyperpod:FLAVOR)")
    p.add_argument("--push", action="store_true", help="push the tag (ECR login through the AWS CLI)")
    p.add_argument("--sqsh", metavar="PATH", help="also import the image into an enroot squashfs at PATH")
    p.add_argument("--wheelhouse", metavar="DIR", help="wheels of requirements.lock: install offline (--no-index)")
    p.add_argument("--cache", metavar="DIR", help="bake this compile cache (filled by `entrypoint.py compile`, "
                   "with its manifest.json) into the image instead of neuron_cache/")
    p.add_argument("--base-image", help="base image for the flavor's SDK stage (e.g. a mirrored or local image)")
    p.add_argument("--docker-host", help="Docker API URL (default: DOCKER_HOST or the default socket)")
    p.add_argument("--build-arg", action="append", metavar="NAME=VALUE", help="extra build arg (repeatable)")
    p.add_argument("--network", help="network mode for RUN steps (e.g. none, host)")
    p.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    p.add_argument("--classic-builder", action="store_true",
                   help="use the Dockerfile form for Docker Engine's classic builder (automatic with Docker Engine)")
    p.add_argument("--context", default=str(REPO_ROOT), help=argparse.SUPPRESS)
    return p


def main(argv: Iterable[str] | None = None, emit: Callable[[str], None] = print) -> int:
    def run() -> None:
        req = make_request(parser().parse_args(list(argv) if argv is not None else None))
        if req.flavor == "neuron" and "@sha256:" not in req.build_args.get("NEURON_BASE_IMAGE", "@sha256:"):
            emit(f"note: {req.build_args['NEURON_BASE_IMAGE']} is pinned by tag only (no digest in "
                 "versions/neuron.json); the build checks every version it must hold")
        client, engine = connect(req.docker_host)
        with staged_wheelhouse(req.wheelhouse, req.context):
            stream_build(client, req, emit, classic=req.classic or engine == "docker")
        if req.push:
            push(client, req.tag, emit)
        if req.sqsh is not None:
            enroot_import(engine, req.tag, req.sqsh, emit)

    return run_main(run, BuildError)


if __name__ == "__main__":
    sys.exit(main())
