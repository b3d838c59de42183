"""Docs as tests: every command block of README.md and enroot/README.md runs as written, or says what it needs.

Each block (fenced or indented) is preceded by a marker line `<!-- docs-test: KIND [why] -->`:

- run:   each command runs with bash in the repository; a line `$ CMD` is followed by CMD's exact output
- image: the same, with podman set up and the cpu image built
- slurm: each command submits a job to the test cluster (it runs in a work dir linked to the repository, so the
         batch log does not land in the checkout); the job must complete
- skip:  not run here; `why` names what it needs (AWS, Trainium)
- ci:    the CI command itself (.ci/run runs it; it cannot run inside itself)
- text:  not a command (a synopsis, a line a script prints, a file listing)

The environment the commands get (printed with the results): the repository's .venv/bin first on PATH (so `python`
is the project's), FSX and L3HP_OUTPUT_DIR in a temporary dir (so nothing lands in the checkout or in /fsx),
ENROOT_SQUASH_OPTIONS as enroot/enroot.conf sets it on HyperPod (uncompressed: quick to pack), CI's podman and
Slurm. The only rewrite: where this checkout builds its cpu image under another tag (L3HP_CI_IMAGE_TAG, for
parallel checkouts), the documented `localhost/llama3-hyperpod:cpu-ci` names that tag.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.enroot_support import SQUASH, TAG, build_cpu_image, ensure_squashfs_tools, podman_env
from tests.slurm_support import Cluster, free_ports, read_log

DOCS = (REPO / "README.md", REPO / "enroot" / "README.md")
KINDS = {"run", "image", "slurm", "skip", "ci", "text"}
DOC_TAG = "localhost/llama3-hyperpod:cpu-ci"
MARKER = re.compile(r"^<!-- docs-test: (\w+)(?: (.*?))? -->$")
COMMAND_TIMEOUT = 1200


@dataclass
class Command:
    text: str
    expected: str | None = None  # the output shown after a `$ ` command


@dataclass
class Block:
    doc: Path
    line: int
    kind: str
    why: str
    commands: list[Command] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def _commands(lines: list[str]) -> list[Command]:
    """Commands of a block: `\\` continuations joined, blank lines dropped; `$ ` lines carry their output."""
    out: list[Command] = []
    joined: list[str] = []
    for raw in lines:
        joined.append(raw.rstrip())
        if raw.rstrip().endswith("\\"):
            continue
        text = " ".join(part.rstrip("\\").strip() for part in joined).strip()
        joined = []
        if not text:
            continue
        if text.startswith("$ "):
            out.append(Command(text[2:], ""))
        elif out and out[-1].expected is not None:
            out[-1].expected = (out[-1].expected + "\n" + text).strip()
        else:
            out.append(Command(text))
    return out


def parse(doc: Path) -> list[Block]:
    """The code blocks of a markdown file with the marker line above each (kind "" when there is none)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(```|~~~)", line)
        indented = line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip())
        if not fence and not indented:
            i += 1
            continue
        start = i
        if fence:
            j = i + 1
            while j < len(lines) and not lines[j].startswith(fence.group(1)):
                j += 1
            body, i = lines[i + 1:j], j + 1
        else:
            depth = len(line) - len(line.lstrip())
            j = i
            while j < len(lines) and (lines[j].startswith(" " * depth) or not lines[j].strip()):
                j += 1
            body, i = [x[depth:] for x in lines[start:j]], j
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k].strip()) if k >= 0 else None
        kind, why = (marker.group(1), marker.group(2) or "") if marker else ("", "")
        blocks.append(Block(doc, start + 1, kind, why, _commands(body)))
    return blocks


BLOCKS = [block for doc in DOCS for block in parse(doc)]


def test_every_command_block_says_how_it_is_tested() -> None:
    unmarked = [f"{b.id}: {b.commands[0].text if b.commands else ''}" for b in BLOCKS if b.kind not in KINDS]
    assert not unmarked, "blocks without a <!-- docs-test: KIND --> line: " + "; ".join(unmarked)
    for block in BLOCKS:
        if block.kind == "skip":
            assert re.search(r"\bneeds (AWS|Trainium)\b", block.why), f"{block.id}: say what it needs: {block.why!r}"


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("docs")
    for shared in (tmp / "fsx", tmp / "fsx" / "runs"):  # a user's own dirs: root's container jobs run as uid 1000
        shared.mkdir()
        shared.chmod(0o777)
    (tmp / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{REPO / '.venv' / 'bin'}:{env['PATH']}", "FSX": str(tmp / "fsx"),
                "L3HP_OUTPUT_DIR": str(tmp / "runs"), "HOME": str(tmp / "home"), "TMPDIR": str(tmp),
                "MASTER_PORT": str(free_ports(1)), "ENROOT_SQUASH_OPTIONS": SQUASH})
    print("\ndocs-test environment: " + ", ".join(f"{k}={env[k]}" for k in ("FSX", "L3HP_OUTPUT_DIR", "HOME",
                                                                              "TMPDIR", "MASTER_PORT",
                                                                              "ENROOT_SQUASH_OPTIONS"))
          + f", PATH starts with {REPO / '.venv' / 'bin'}")
    yield env
    shutil.rmtree(tmp / "fsx" / "enroot", ignore_errors=True)  # the imported .sqsh: GBs


@pytest.fixture(scope="module")
def docs_image(docs_env: dict[str, str]) -> dict[str, str]:
    """podman set up, squashfs-tools, and the cpu image built (once for the module): the env for image/slurm blocks."""
    env = podman_env()
    ensure_squashfs_tools()
    build_cpu_image(Path(docs_env["TMPDIR"]))
    return env


def as_written(text: str) -> str:
    """The one rewrite: this checkout's cpu image tag (and the .sqsh named after it) for the documented one."""
    if TAG == DOC_TAG:
        return text
    doc_file, tag_file = DOC_TAG.rsplit("/", 1)[1].replace(":", "-"), TAG.rsplit("/", 1)[1].replace(":", "-")
    return text.replace(DOC_TAG, TAG).replace(doc_file, tag_file)


def run_line(text: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = subprocess.run(["bash", "-c", f"set -eo pipefail\n{as_written(text)}"], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    return result, time.monotonic() - start


def report(block: Block, command: Command, result: str, seconds: float) -> None:
    print(f"\n[{block.id}] {as_written(command.text)}\n    -> {result} ({seconds:.0f} s)")


def work_dir(env: dict[str, str]) -> Path:
    """A dir whose entries link to the repository's, for commands that write into their working dir (sbatch's
    %x-%j.out) or resolve `$PWD/...`."""
    work = Path(env["TMPDIR"]) / "work"
    if not work.exists():
        work.mkdir()
        for entry in REPO.iterdir():
            if entry.name not in (".git", "runs"):
                (work / entry.name).symlink_to(entry)
    return work


@pytest.mark.integration
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_commands(block: Block, docs_env: dict[str, str], request: pytest.FixtureRequest) -> None:
    if block.kind in ("skip", "ci", "text", ""):
        shown = block.commands[:1] if block.kind == "text" else block.commands
        for command in shown:
            report(block, command, f"not run: {block.kind} {block.why}".strip(), 0)
        if block.kind == "ci":  # what .ci/run runs, so CI runs it by definition
            ci_script = (REPO / ".ci" / "run").read_text()
            for command in block.commands:
                for part in command.text.split(" && "):
                    assert part in ci_script, f"{block.id}: .ci/run does not run `{part}`"
        return
    env = dict(docs_env)
    cwd = REPO
    cluster: Cluster | None = None
    if block.kind in ("image", "slurm"):
        env.update(request.getfixturevalue("docs_image"))
    if block.kind == "slurm":
        cluster = request.getfixturevalue("slurm")
        env.update({"SLURM_CONF": cluster.env["SLURM_CONF"], "OMP_NUM_THREADS": "1"})
        cwd = work_dir(env)
        sqsh = Path(env["FSX"]) / "enroot" / as_written("llama3-hyperpod-cpu-ci.sqsh")
        if not sqsh.exists():  # made by the import block above when the whole file runs
            made, _ = run_line(f"enroot/import.sh podman://{DOC_TAG}", env, REPO)
            assert made.returncode == 0, made.stderr
    for command in block.commands:
        start = time.monotonic()
        result, seconds = run_line(command.text, env, cwd)
        output = (result.stdout + result.stderr).strip()
        if command.expected is not None:  # an example of output (an error, here and there): the output is the test
            assert output == command.expected, f"{block.id}: output differs from the documented one:\n{output}"
            report(block, command, f"exit {result.returncode}, output as documented", seconds)
            continue
        if result.returncode != 0:
            report(block, command, f"FAILED, exit {result.returncode}", seconds)
            pytest.fail(f"{block.id}: `{as_written(command.text)}` exited {result.returncode}:\n{output[-4000:]}")
        if cluster is not None:
            submitted = re.search(r"Submitted batch job (\d+)", result.stdout)
            assert submitted, output
            job = submitted.group(1)
            log = cwd / f"llama3-train-{job}.out"
            state, code = cluster.wait(job, log, timeout=COMMAND_TIMEOUT)
            seconds = time.monotonic() - start
            assert (state, code) == ("COMPLETED", "0:0"), f"{block.id}: job {job} {state} {code}:\n{read_log(log)}"
            report(block, command, f"job {job} {state} {code}", seconds)
        else:
            report(block, command, "ok, exit 0", seconds)


if __name__ == "__main__":  # list the blocks and how each is tested
    for b in BLOCKS:
        for c in b.commands or [Command("(empty)")]:
            print(f"{b.id:22} {b.kind or 'UNMARKED':6} {c.text[:90]}", file=sys.stdout)
