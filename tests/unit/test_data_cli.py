"""The `data` CLI: exit code 2 and one line on stderr for bad input, a summary line on success."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama3_hyperpod.data.commands import data
from llama3_hyperpod.data.tokenizer import train_bpe

TEXT = "Packing documents into blocks: BOS, tokens, EOS. Ünïcode too. " * 30


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe([TEXT] * 3, vocab_size=320, output=tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(data, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_prepare_and_check(tmp_path: Path, tok_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": TEXT[: 50 * i]}) + "\n" for i in range(1, 30)), encoding="utf-8")
    out = tmp_path / "ds"
    code, stdout, stderr = _run(
        "prepare",
        str(src),
        "-o",
        str(out),
        "-t",
        str(tok_path.parent),
        "--seq-len",
        "32",
        "--text-field",
        "body",
        "--workers",
        "1",
        "--quiet",
    )
    assert (code, stderr) == (0, ""), stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["documents"] == 29
    vocab = str(meta["vocab_size"])
    code, stdout, _ = _run("check", str(out), "--seq-len", "32", "--vocab-size", vocab, "--tokenizer", str(tok_path))
    assert code == 0 and stdout.startswith("ok:")
    code, _, stderr = _run("check", str(out), "--seq-len", "64", "--vocab-size", vocab)
    assert code == 2 and stderr.startswith("error: data.train_dir: ") and stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("setup", "expect"),
    [
        (lambda d: None, "missing.txt: no such file or folder"),
        (lambda d: (d / "missing.txt").write_text(""), "inputs: no documents found"),
        (lambda d: (d / "missing.txt").write_bytes(b"\xff\xfe bad"), "not valid UTF-8"),
        (lambda d: (d / "missing.txt").write_text("short"), "fewer than one block"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, tok_path: Path, setup: object, expect: str) -> None:
    setup(tmp_path)  # type: ignore[operator]
    code, stdout, stderr = _run(
        "prepare",
        str(tmp_path / "missing.txt"),
        "-o",
        str(tmp_path / "ds"),
        "-t",
        str(tok_path),
        "--seq-len",
        "4096",
        "--workers",
        "1",
    )
    assert code == 2
    assert stderr.startswith("error: ") and expect in stderr and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_train_tokenizer_command(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text(TEXT, encoding="utf-8")
    code, stdout, stderr = _run("train-tokenizer", str(src), "-o", str(tmp_path), "--vocab-size", "300")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {tmp_path / 'tokenizer.json'} (vocab size ")
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert [t["content"] for t in vocab] == ["<|begin_of_text|>", "<|end_of_text|>"]
    code, _, stderr = _run("train-tokenizer", str(src), "-o", str(tmp_path), "--vocab-size", "300")
    assert code == 2 and "already exists" in stderr
    code, _, stderr = _run("train-tokenizer", str(src), "-o", str(tmp_path / "x.json"), "--vocab-size", "100")
    assert code == 2 and "vocab-size: 100 is too small" in stderr
