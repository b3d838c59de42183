"""Reading inputs: file kinds, folders, document splitting, streaming pieces and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_hyperpod.data import sources
from llama3_hyperpod.data.errors import DataError
from llama3_hyperpod.data.sources import HubDataset, LocalFile, iter_pieces, resolve_inputs


def _docs(source: LocalFile, split: str = "file", field: str = "text") -> list[str]:
    """Whole documents reassembled from pieces (a piece run from bos to eos)."""
    docs, cur = [], ""
    for p in iter_pieces(source, text_field=field, txt_split=split):
        if p.bos:
            cur = ""
        cur += p.text
        if p.eos:
            docs.append(cur)
    return docs


def test_folder_is_recursive_and_sorted(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.txt").write_text("z")
    (root / "a.jsonl").write_text('{"text": "a"}\n')
    (root / "b" / "c.parquet").write_bytes(b"")
    (root / "notes.md").write_text("ignored")
    found = resolve_inputs([str(root)])
    assert [s.name for s in found if isinstance(s, LocalFile)] == [
        "corpus/a.jsonl",
        "corpus/b/c.parquet",
        "corpus/b/z.txt",
    ]
    assert [s.kind for s in found if isinstance(s, LocalFile)] == ["jsonl", "parquet", "txt"]


def test_resolve_errors_and_hub_names(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="no input files"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(DataError, match="no such file"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    assert resolve_inputs(["Salesforce/wikitext"], hub_config="wikitext-2-raw-v1") == [
        HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
    ]


def test_txt_splits(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n\nthree\nfour\n\nfive")
    src = LocalFile(f, "a.txt", "txt")
    assert _docs(src, "file") == ["one\ntwo\n\n\nthree\nfour\n\nfive"]
    assert _docs(src, "paragraph") == ["one\ntwo\n", "three\nfour\n", "five"]
    assert _docs(src, "line") == ["one", "two", "", "", "three", "four", "", "five"]
    assert sum(p.nbytes for p in iter_pieces(src, text_field="text", txt_split="paragraph")) == f.stat().st_size


def test_long_txt_is_streamed_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 64)
    f = tmp_path / "long.txt"
    text = "".join(f"line {i} ünïcode\n" for i in range(100))
    f.write_text(text, encoding="utf-8")
    pieces = list(iter_pieces(LocalFile(f, "long.txt", "txt"), text_field="text", txt_split="file"))
    assert len(pieces) > 10
    assert [p.bos for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.eos for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == text
    assert sum(p.nbytes for p in pieces) == f.stat().st_size


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    j = tmp_path / "d.jsonl"
    j.write_text('{"body": "héllo", "id": 1}\n\n{"body": ""}\n{"body": null}\n', encoding="utf-8")
    assert _docs(LocalFile(j, "d.jsonl", "jsonl"), field="body") == ["héllo", "", ""]
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "日本語"] * 700, "n": list(range(2100))}), p, row_group_size=500)
    pieces = list(iter_pieces(LocalFile(p, "d.parquet", "parquet"), text_field="text", txt_split="file"))
    assert [x.text for x in pieces] == ["a", "", "日本語"] * 700
    assert sum(x.nbytes for x in pieces) == p.stat().st_size


@pytest.mark.parametrize(
    ("name", "content", "field", "message"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "text", r"bad.jsonl:2: not a JSON object"),
        ("nofield.jsonl", b'{"body": "x"}\n', "text", r"no field 'text'"),
        ("notstr.jsonl", b'{"text": 3}\n', "text", r"field 'text' is int, not text"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "text", r"not valid UTF-8 \(byte 3\)"),
        ("corrupt.parquet", b"PAR1 not really", "text", r"cannot read as Parquet"),
    ],
)
def test_unreadable_inputs_name_the_file(tmp_path: Path, name: str, content: bytes, field: str, message: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    (src,) = resolve_inputs([str(f)])
    with pytest.raises(DataError, match=message) as e:
        list(iter_pieces(src, text_field=field, txt_split="file"))
    assert "\n" not in str(e.value)


def test_parquet_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a"]}), p)
    with pytest.raises(DataError, match="no column 'text' \\(columns: content\\)"):
        list(iter_pieces(LocalFile(p, "d.parquet", "parquet"), text_field="text", txt_split="file"))


def test_broken_symlink_is_unreadable(tmp_path: Path) -> None:
    link = tmp_path / "gone.txt"
    link.symlink_to(tmp_path / "nowhere.txt")
    (src,) = resolve_inputs([str(link)])
    with pytest.raises(DataError, match="cannot read"):
        sources.sha256_file(src.path)  # type: ignore[union-attr]


# ---- long documents: bounded pieces with the whole document's tokens --------------------------------------------

TEXT_CHARS = st.sampled_from([
    *"abcdefghijXYZéß日本", " ", " ", " ", "\t", "\n", "\n", "\r\n", "  ", "'s", "'", ".", ",", ":", "(", ")", "-", "_",
    "0", "12", "345", "🦙", "\u00a0",
])
LONG_TEXT = st.lists(TEXT_CHARS, min_size=1, max_size=400).map("".join)


def _pre_tokens(text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    from llama3_hyperpod.data.tokenizer import LLAMA3_SPLIT

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return [t for t, _ in split.pre_tokenize_str(text)]


@settings(max_examples=300, deadline=None)
@given(LONG_TEXT)
def test_every_cut_point_keeps_the_pre_tokens(text: str) -> None:
    """Llama 3's pre-tokenizer (the tokenizer.json split pattern + byte level) gives the same pre-tokens for the two
    sides of any place `cut_point` may choose as for the whole text: BPE works within pre-tokens, so the token ids
    of a long document cut there are the whole document's."""
    whole = _pre_tokens(text)
    for pattern, end in ((sources._WORD_START, False), (sources._LINE_END, True)):
        for match in pattern.finditer(text):
            cut = match.end() if end else match.start()
            assert _pre_tokens(text[:cut]) + _pre_tokens(text[cut:]) == whole, (text[:cut], text[cut:])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LONG_TEXT, min_size=1, max_size=6).map("".join), st.sampled_from(["file", "line", "paragraph"]))
def test_long_documents_come_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                               split: str) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 48)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 64)
    f = tmp_path / "doc.txt"
    f.write_bytes(text.encode("utf-8"))
    pieces = list(iter_pieces(LocalFile(f, "doc.txt", "txt"), text_field="text", txt_split=split))
    assert all(len(p.text) <= 64 for p in pieces)
    assert sum(p.nbytes for p in pieces) == f.stat().st_size
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 1 << 20)
    whole = list(iter_pieces(LocalFile(f, "doc.txt", "txt"), text_field="text", txt_split=split))
    assert _docs_of(pieces) == _docs_of(whole)  # the same documents, only cut into more pieces


def _docs_of(pieces: list[sources.Piece]) -> list[str]:
    docs, cur = [], ""
    for p in pieces:
        if p.bos:
            cur = ""
        cur += p.text
        if p.eos:
            docs.append(cur)
    return docs
