"""Real processes: the embedded default dataset (built once under concurrency, hash-stable), worker-count
independence of the output, and the one-line failure for a hub dataset while offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from llama3_hyperpod.data.check import check_dataset_matches
from llama3_hyperpod.data.default import ensure_default_dataset
from llama3_hyperpod.data.prepare import corpus_from_inputs, prepare
from llama3_hyperpod.data.tokenizer import train_bpe

pytestmark = pytest.mark.integration

BUILD = "import sys; from pathlib import Path; from llama3_hyperpod.data.default import ensure_default_dataset as e\n"
BUILD += "if __name__ == '__main__': print(e(Path(sys.argv[1]), 256, 8192))"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_default_dataset_built_once_by_concurrent_callers_and_stable(tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD, str(dest)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    out = Path(outs[0])
    assert sorted(p.name for p in dest.iterdir()) == [f".{out.name}.lock", out.name]  # no temp leftovers
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["seq_len"], meta["vocab_size"], meta["tokenizer"]["vocab_size"]) == (256, 8192, 8192)
    assert meta["blocks"] > 1000 and meta["tokens"] == 256 * meta["blocks"]
    assert all(s["path"].startswith("stdlib/") and s["kind"] == "txt" for s in meta["sources"])
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == meta["blocks"] and len(ds[0]["input_ids"]) == 256
    check_dataset_matches(out, seq_len=256, vocab_size=8192, tokenizer_path=out)
    assert ensure_default_dataset(dest, 256, 8192) == out  # second call: already there
    # ...and what every start does before the trainer (cli.prepare_torch_data) imports none of the build's libraries
    warm = (BUILD.split("\n")[0] + "\nfrom llama3_hyperpod.data.check import check_dataset_matches as c\n"
            f"c(e(Path(sys.argv[1]), 256, 8192), seq_len=256, vocab_size=8192, tokenizer_path={str(out)!r})\n"
            "print(sorted(m for m in ('numpy', 'tokenizers', 'datasets', 'pyarrow') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", warm, str(dest)], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]", imported.stdout

    again = ensure_default_dataset(tmp_path / "other", 256, 8192, workers=1)
    assert _digest(again) == _digest(out)


def test_output_does_not_depend_on_worker_count(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"Document {i}: " + "wörds and more words, 🦙 " * (i % 17) for i in range(400)]
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = train_bpe(texts, vocab_size=320, output=tmp_path / "tokenizer.json")
    one = prepare(corpus_from_inputs([str(corpus)]), tmp_path / "w1", tokenizer=tok, seq_len=64, workers=1)
    two = prepare(corpus_from_inputs([str(corpus)]), tmp_path / "w2", tokenizer=tok, seq_len=64, workers=2)
    assert one == two
    assert _digest(tmp_path / "w1") == _digest(tmp_path / "w2")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, "cannot stream it"),
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}, "hub.invalid cannot be reached"),
    ],
)
def test_hub_dataset_offline_fails_in_one_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    tok = train_bpe(["a few words to learn from"] * 4, vocab_size=300, output=tmp_path / "tokenizer.json")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    cmd = "from llama3_hyperpod.data.commands import data; data()"
    args = ["prepare", "someone/some-corpus", "-o", str(tmp_path / "ds"), "-t", str(tok), "--seq-len", "16"]
    result = subprocess.run(
        [sys.executable, "-c", cmd, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: someone/some-corpus (Hugging Face hub): ")
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "ds").exists()
