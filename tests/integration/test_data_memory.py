"""`data prepare` in bounded memory for any input shape: a 50 MB text file that is one single line.

Before, the line reached the tokenizer whole and the run took 9 GB of RSS (284 MB for the same text with newlines).
Now it is read in 1 MiB segments and tokenized in pieces cut where Llama 3's pre-tokenizer splits anyway; the whole
process tree (main process + tokenizer workers) must stay under 1 GiB.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

SIZE = 50_000_000
LIMIT = 2**30


def peak_tree_rss(argv: list[str]) -> tuple[int, int, str]:
    """(exit code, peak RSS summed over the process and all its children, stderr), sampled every 20 ms."""
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        time.sleep(0.02)
    assert proc.stderr is not None
    return proc.returncode, peak, proc.stderr.read()


def test_a_50_mb_single_line_stays_under_1_gib(tmp_path: Path) -> None:
    text = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += path.read_bytes().replace(b"\n", b" ").replace(b"\r", b" ")
        if len(text) >= SIZE:
            break
    while len(text) < SIZE:
        text += text[: SIZE - len(text)]
    line = tmp_path / "line.txt"
    line.write_bytes(bytes(text[:SIZE]))
    sample = tmp_path / "sample.txt"
    sample.write_bytes(bytes(text[:2_000_000]))
    tok = tmp_path / "tok.json"
    trained = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "data", "train-tokenizer", str(sample),
                              "-o", str(tok), "--vocab-size", "2048"], cwd=REPO, capture_output=True, text=True,
                             timeout=300, check=False)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "ds"
    code, peak, err = peak_tree_rss([sys.executable, str(REPO / "entrypoint.py"), "data", "prepare", str(line),
                                     "-o", str(out), "-t", str(tok), "--seq-len", "256", "--workers", "2",
                                     "--txt-split", "line", "-q"])
    assert code == 0, err
    print(f"peak RSS of the process tree {peak / 2**20:.0f} MiB")  # 627 MiB here (--txt-split file: 629 MiB)
    assert peak < LIMIT, f"{peak / 2**20:.0f} MiB"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["documents"] == 1 and meta["tokens_total"] > SIZE // 8
