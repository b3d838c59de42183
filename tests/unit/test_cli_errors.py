"""Every command's user and environment errors are one line and exit 2, with real files, mounts and sockets.

The cases an adversarial pass found as tracebacks: a read-only or full output dir, an unwritable run-time cache or a
malformed manifest beside a baked cache, a taken master port, a damaged done marker, an export into an unwritable
dir, `report` on an empty metrics file; plus links planted in the dirs we write (never written through), piped tables
(never cut), and `data prepare --force` onto its own input (refused: it deleted the corpus).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama3_hyperpod.fsutil import write_text
from tests.conftest import CONFIG_TINY, run_cli


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at `path` (read-only, or tiny): needs root, as the disk-full checkpoint test does."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.token_data import write_byte_text_dataset

    out = tmp_path_factory.mktemp("data") / "bytes64"
    write_byte_text_dataset(out, seq_len=64, max_bytes=64 * 8 * 4)
    return out


def train(out: Path, dataset: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("train", str(CONFIG_TINY), "--backend", "torch-cpu", "--output-dir", str(out), "--run-name", "r",
                   "trainer.max_steps=2", "model.encoder_seq_length=64", "data.micro_batch_size=4",
                   "data.global_batch_size=4", f"data.train_dir={dataset}", *extra, env=env)


def one_line(result: subprocess.CompletedProcess[str], starts: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(starts), lines[0]
    return lines[0]


def test_read_only_output_dir(tmp_path: Path, dataset: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        line = one_line(train(ro, dataset), f"error: --output-dir: {ro} is not writable: ")
    assert "set --output-dir to a writable directory" in line


def test_disk_full_at_start(tmp_path: Path, dataset: Path) -> None:
    with tmpfs(tmp_path / "full", "size=64k") as full:
        with contextlib.suppress(OSError):
            (full / "filler").write_bytes(b"x" * 2**20)
        line = one_line(train(full, dataset), "error: ")
    assert "No space left on device" in line


def test_unwritable_run_time_cache_and_malformed_baked_manifest(tmp_path: Path, dataset: Path) -> None:
    baked = tmp_path / "baked"
    (baked / "inductor" / "fxgraph").mkdir(parents=True)
    (baked / "inductor" / "fxgraph" / "graph").write_bytes(b"g")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    env = {"L3HP_BAKED_CACHE": str(baked), "L3HP_CACHE_DIR": str(blocker / "cache")}
    line = one_line(train(tmp_path / "o1", dataset, env=env), f"error: {blocker / 'cache'}: ")
    assert "cannot create the run-time cache dir" in line and "L3HP_CACHE_DIR" in line
    (baked / "manifest.json").write_text('{"compiles": "not a list"')
    env["L3HP_CACHE_DIR"] = str(tmp_path / "cache")
    one_line(train(tmp_path / "o2", dataset, env=env), f"error: {baked}/manifest.json: malformed cache manifest")


def test_a_taken_master_port(tmp_path: Path, dataset: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line(train(tmp_path / "o", dataset, env={"MASTER_PORT": str(port)}), "error: MASTER_PORT: ")
    assert "set MASTER_PORT to a free port" in line


def test_links_in_the_run_dir_are_refused(tmp_path: Path, dataset: Path) -> None:
    """`metrics.jsonl -> ~/.bashrc` or `checkpoints -> /data` in a run dir: refused before anything runs, the link's
    target untouched (before: appended to, or pruned)."""
    precious = tmp_path / "precious"
    precious.write_text("mine\n")
    for name in ("metrics.jsonl", "checkpoints", "tensorboard"):
        out = tmp_path / name
        (out / "r").mkdir(parents=True)
        (out / "r" / name).symlink_to(precious)
        line = one_line(train(out, dataset), f"error: {out / 'r' / name}: is a symbolic link")
        assert "nothing is written through links" in line
    assert precious.read_text() == "mine\n"


def test_writes_replace_links_instead_of_following_them(tmp_path: Path, small_run: Path) -> None:
    """report.png and an export's files that are links: the link is replaced, its target never written."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text((small_run / "metrics.jsonl").read_text())
    (run / "report.png").symlink_to(precious)
    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stderr
    assert precious.read_bytes() == b"mine" and not (run / "report.png").is_symlink()
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("model.safetensors", "config.json"):
        (out / name).symlink_to(precious)
    result = run_cli("checkpoint", "export", str(small_run), str(out))
    assert result.returncode == 0, result.stderr
    assert precious.read_bytes() == b"mine" and not any(p.is_symlink() for p in out.iterdir())
    link = tmp_path / "plan.json"
    link.symlink_to(precious)
    write_text(link, "{}")  # what the CLI uses for the plan file and the requeue marker
    assert precious.read_bytes() == b"mine" and link.read_text() == "{}"


def test_report_on_empty_and_cut_metrics(tmp_path: Path, small_run: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    one_line(run_cli("report", str(run)), f"error: {run / 'metrics.jsonl'}: holds no step records yet")
    full = (small_run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(full + full.splitlines()[-1][:17])  # a last line cut short by a crash
    result = run_cli("report", str(run))
    assert result.returncode == 0 and (run / "report.png").is_file(), result.stderr


def test_checkpoint_commands_on_a_broken_marker_and_an_unwritable_target(tmp_path: Path, small_run: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run / "checkpoints", run / "checkpoints")
    step = run / "checkpoints" / "step_0000002"
    marker = json.loads((step / "done").read_text())
    (step / "done").write_text(json.dumps({**marker, "files": None}))
    listed = run_cli("checkpoint", "list", str(run))
    assert listed.returncode == 0 and f"{step}  SKIPPED: the done marker lists no files" in listed.stdout
    one_line(run_cli("checkpoint", "export", str(step), str(tmp_path / "x")), f"error: {step}: is not a complete")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    line = one_line(run_cli("checkpoint", "export", str(small_run), str(blocker / "hf")), "error: ")
    assert "Not a directory" in line or "File exists" in line


def test_piped_cache_inspect_keeps_whole_names(tmp_path: Path) -> None:
    name = "MODULE_" + "1" * 60 + "+5d2d81ce"
    entry = tmp_path / "neuronxcc-2.23.6484.0+4a9b2326" / name
    entry.mkdir(parents=True)
    for f in ("model.neff", "model.done", "model.hlo_module.pb"):
        (entry / f).write_bytes(b"x")
    result = run_cli("cache", "inspect", str(tmp_path), env={"COLUMNS": "80"})
    assert name in result.stdout, result.stdout  # before: `MODULE_111111111111…` in a pipe or log


def test_prepare_force_onto_its_own_input_is_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "The quick brown fox jumps over the lazy dog. " * 200
    (corpus / "a.txt").write_text(text)
    tok = tmp_path / "tok.json"
    assert run_cli("data", "train-tokenizer", str(corpus), "-o", str(tok), "--vocab-size", "300").returncode == 0
    for inputs, output in (([str(corpus)], corpus), ([str(corpus / "a.txt")], corpus / "a.txt"),
                           ([str(corpus / "a.txt")], tmp_path)):
        result = run_cli("data", "prepare", *inputs, "-o", str(output), "-t", str(tok), "--seq-len", "16", "--force")
        one_line(result, f"error: {output}: overlaps the input {corpus / 'a.txt'}")
        assert (corpus / "a.txt").read_text() == text
    link = tmp_path / "link-out"
    link.symlink_to(tmp_path / "elsewhere")
    one_line(run_cli("data", "prepare", str(corpus), "-o", str(link), "-t", str(tok), "--seq-len", "16", "--force"),
             f"error: {link}: is a symbolic link")
