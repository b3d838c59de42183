"""The embedded default dataset: the Python standard library's own sources, present on every machine.

A bounded, sorted subset of the stdlib's *.py files trains a small byte-level BPE and is packed like any corpus, so
the tiny model trains out of the box with no download. It is built once per (Python version, vocab, seq len) under
`dest`, atomically, with a lock so concurrent callers build it once and all get the finished folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from llama3_hyperpod.data.check import METADATA_FILE
from llama3_hyperpod.data.errors import DataError
from llama3_hyperpod.data.sources import LocalFile
from llama3_hyperpod.fsutil import locked

BUDGET_BYTES = 4_000_000
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}


def stdlib_files(budget: int = BUDGET_BYTES) -> list[LocalFile]:
    """The first stdlib sources in sorted path order that are UTF-8, up to about `budget` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[LocalFile] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        chosen.append(LocalFile(path, f"stdlib/{rel.as_posix()}", "txt"))
        total += len(data)
        if total >= budget:
            break
    if not chosen:
        raise DataError("data.train_dir", f"no Python sources found under {root} to build the default dataset")
    return chosen


def default_name(seq_len: int, vocab_size: int) -> str:
    return f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}-s{seq_len}"


def ensure_default_dataset(dest: Path, seq_len: int, vocab_size: int, *, workers: int | None = None) -> Path:
    """Return `dest/<name>` holding the default dataset (with its tokenizer.json), building it first if missing."""
    dest = Path(dest)
    out = dest / default_name(seq_len, vocab_size)
    if (out / METADATA_FILE).is_file():
        return out
    # Only a build needs these (numpy, tokenizers): a start with the dataset in place skips their import.
    from llama3_hyperpod.data.prepare import Corpus, prepare
    from llama3_hyperpod.data.tokenizer import load_tokenizer, train_bpe

    dest.mkdir(parents=True, exist_ok=True)
    with locked(dest / f".{out.name}.lock"):
        if (out / METADATA_FILE).is_file():  # another process built it while we waited
            return out
        files = stdlib_files()
        corpus = Corpus(list(files), text_field="text", txt_split="file")
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".{out.name}.tok-") as tmp:
            tok = train_bpe(
                (f.path.read_text(encoding="utf-8") for f in files),
                vocab_size=vocab_size,
                output=Path(tmp) / "tokenizer.json",
            )
            got = load_tokenizer(tok).vocab_size
            if got != vocab_size:
                raise DataError("data.train_dir", f"the default corpus yields a vocab of {got}, not {vocab_size}")
            if out.exists():  # a leftover without metadata.json cannot be a finished build: replace it
                shutil.rmtree(out)
            prepare(corpus, out, tokenizer=tok, seq_len=seq_len, workers=workers or min(2, os.cpu_count() or 1))
    return out
