"""`prepare` end to end on small corpora: NxDT's layout, exact token accounting, determinism, atomic failure."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.data.check import check_dataset_matches
from llama3_hyperpod.data.errors import DataError
from llama3_hyperpod.data.prepare import corpus_from_inputs, prepare
from llama3_hyperpod.data.tokenizer import BOS_TOKEN, EOS_TOKEN, train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦙🔥, Ελληνικά, עברית.",
    "def f(x):\n    return x * 2\n",
    "",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20,
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_bpe(TEXTS * 5, vocab_size=400, output=out)


def _write_corpus(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    pq.write_table(pa.table({"text": TEXTS[::-1]}), root / "sub" / "c.parquet")
    (root / "sub" / "empty.txt").write_text("")
    return root


def _expected_tokens(tok_path: Path, docs: list[str]) -> list[int]:
    tok = Tokenizer.from_file(str(tok_path))
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    assert bos is not None and eos is not None
    out: list[int] = []
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False).ids
        if ids:
            out += [bos, *ids, eos]
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_layout_and_exact_token_accounting(tmp_path: Path, tok_path: Path) -> None:
    root = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    meta = prepare(corpus_from_inputs([str(root)]), out, tokenizer=tok_path, seq_len=16, workers=1)
    # folder order: a.txt, sub/b.jsonl, sub/c.parquet, sub/empty.txt
    docs = [TEXTS[0], *TEXTS, *TEXTS[::-1], ""]
    expected = _expected_tokens(tok_path, docs)
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["input_ids", "labels"]
    assert ds.features["input_ids"].feature.dtype == "int32"
    table = ds.with_format("numpy")[:]
    assert table["input_ids"].shape == (meta["blocks"], 16)
    np.testing.assert_array_equal(table["input_ids"], table["labels"])
    packed = table["input_ids"].reshape(-1).tolist()
    assert meta["tokens_total"] == len(expected)
    assert meta["dropped_tokens"] == len(expected) % 16
    assert packed == expected[: len(expected) - meta["dropped_tokens"]]
    assert meta["documents"] == sum(1 for d in docs if d) and meta["empty_documents_skipped"] == 3
    assert meta["tokens"] == meta["blocks"] * 16 == meta["tokens_total"] - meta["dropped_tokens"]
    assert [s["path"] for s in meta["sources"]] == [
        "corpus/a.txt",
        "corpus/sub/b.jsonl",
        "corpus/sub/c.parquet",
        "corpus/sub/empty.txt",
    ]
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    assert json.loads((out / "metadata.json").read_text()) == meta
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_same_inputs_give_byte_identical_output(tmp_path: Path, tok_path: Path) -> None:
    root = _write_corpus(tmp_path / "corpus")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(corpus_from_inputs([str(root)]), a, tokenizer=tok_path, seq_len=8, workers=1)
    prepare(corpus_from_inputs([str(root)]), b, tokenizer=tok_path, seq_len=8, workers=1)
    assert _files(a) == _files(b)
    assert "time" not in (a / "metadata.json").read_text()


def test_refuses_to_overwrite_unless_forced(tmp_path: Path, tok_path: Path) -> None:
    root = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    prepare(corpus_from_inputs([str(root)]), out, tokenizer=tok_path, seq_len=8, workers=1)
    before = _files(out)
    with pytest.raises(DataError, match="already exists"):
        prepare(corpus_from_inputs([str(root)]), out, tokenizer=tok_path, seq_len=16, workers=1)
    assert _files(out) == before
    meta = prepare(corpus_from_inputs([str(root)]), out, tokenizer=tok_path, seq_len=16, workers=1, force=True)
    assert meta["seq_len"] == 16 and json.loads((out / "metadata.json").read_text())["seq_len"] == 16


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"short.txt": "tiny"}, "fewer than one block of seq_len 4096"),
        ({"empty.txt": "", "empty.jsonl": ""}, "no documents found"),
        ({"ok.txt": TEXTS[4], "bad.jsonl": '{"text": "x"}\nnot json\n'}, "bad.jsonl:2: not a JSON object"),
        ({"ok.txt": TEXTS[4], "latin.txt": b"caf\xe9"}, "not valid UTF-8"),
    ],
)
def test_bad_corpora_fail_clearly_and_leave_nothing(
    tmp_path: Path, tok_path: Path, files: dict[str, str | bytes], message: str
) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, content in files.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as e:
        prepare(corpus_from_inputs([str(root)]), tmp_path / "ds", tokenizer=tok_path, seq_len=4096, workers=1)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_tokenizer_errors(tmp_path: Path, tok_path: Path) -> None:
    root = _write_corpus(tmp_path / "corpus")
    with pytest.raises(DataError, match=r"no tokenizer\.json there"):
        prepare(corpus_from_inputs([str(root)]), tmp_path / "ds", tokenizer=tmp_path, seq_len=8, workers=1)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match=r"not a Hugging Face tokenizer\.json"):
        prepare(corpus_from_inputs([str(root)]), tmp_path / "ds", tokenizer=bad, seq_len=8, workers=1)
    tok = Tokenizer.from_file(str(tok_path))
    assert tok.get_vocab_size() == 400
    assert tok.decode(tok.encode(TEXTS[1]).ids) == TEXTS[1]  # byte-level: Unicode round-trips


def test_check_dataset_matches(tmp_path: Path, tok_path: Path) -> None:
    root = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    prepare(corpus_from_inputs([str(root)]), out, tokenizer=tok_path, seq_len=8, workers=1)
    check_dataset_matches(out, seq_len=8, vocab_size=400, tokenizer_path=tok_path.parent)
    other = tmp_path / "other.json"
    train_bpe(["something else entirely"] * 3, vocab_size=300, output=other)
    cases = [
        ({"seq_len": 16, "vocab_size": 400}, "blocks of 8 tokens but the model's seq len is 16"),
        ({"seq_len": 8, "vocab_size": 8192}, "vocab size 400 but the model has 8192"),
        ({"seq_len": 8, "vocab_size": 400, "tokenizer_path": other}, "another tokenizer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            check_dataset_matches(out, **kwargs)  # type: ignore[arg-type]
        assert e.value.key == "data.train_dir"
    with pytest.raises(ConfigError, match=r"not a dataset written by datasets\.save_to_disk"):
        check_dataset_matches(root, seq_len=8, vocab_size=400)


def test_check_dataset_made_elsewhere_by_row_length(tmp_path: Path) -> None:
    """A save_to_disk dataset without our metadata (e.g. AWS's own prep script) is checked by its row length."""
    rows = {"input_ids": [[1, 2, 3, 4]] * 3, "labels": [[1, 2, 3, 4]] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "aws"))
    check_dataset_matches(tmp_path / "aws", seq_len=4, vocab_size=128256)
    with pytest.raises(ConfigError, match="rows of 4 tokens but the model's seq len is 8192"):
        check_dataset_matches(tmp_path / "aws", seq_len=8192, vocab_size=128256)
