"""Tokenizers: find a local HF `tokenizer.json`, identify it by hash, and train a Llama 3-style byte-level BPE."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llama3_hyperpod.data.errors import DataError
from llama3_hyperpod.fsutil import sha256_file, tmp_name

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
# Llama 3's pre-tokenizer split (the tiktoken cl100k-style pattern its tokenizer.json carries).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MIN_VOCAB = 256 + 2 + 1  # the byte alphabet, BOS/EOS and at least one merge


@dataclass(frozen=True)
class TokenizerInfo:
    """What a dataset records about its tokenizer; `sha256` is of the tokenizer.json bytes."""

    path: Path
    sha256: str
    vocab_size: int
    bos_token: str
    bos_id: int
    eos_token: str
    eos_id: int

    def as_json(self) -> dict[str, object]:
        return {
            "file": "tokenizer.json",
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token,
            "bos_id": self.bos_id,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
        }


def tokenizer_file(path: Path, *, key: str = "tokenizer") -> Path:
    """`path` itself or `path/tokenizer.json`: users pass either the file or the folder they downloaded."""
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(key, f"{path}: no tokenizer.json there (give a tokenizer.json file or a folder holding one)")
    return candidate


def load_tokenizer(path: Path, *, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> TokenizerInfo:
    """Open and check a tokenizer: it must load and know the BOS/EOS tokens documents are joined with."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise DataError(
            "tokenizer", f"{file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})"
        ) from None
    ids = {}
    for name, token in (("bos", bos_token), ("eos", eos_token)):
        tid = tok.token_to_id(token)
        if tid is None:
            raise DataError("tokenizer", f"{file}: has no {name.upper()} token {token!r} (set --{name}-token)")
        ids[name] = tid
    return TokenizerInfo(
        path=file.resolve(),
        sha256=sha256_file(file),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        bos_token=bos_token,
        bos_id=ids["bos"],
        eos_token=eos_token,
        eos_id=ids["eos"],
    )


def train_bpe(texts: Iterable[str], *, vocab_size: int, output: Path, show_progress: bool = False) -> Path:
    """Train a byte-level BPE with Llama 3's split pattern and special tokens; writes `output` (a tokenizer.json).

    Training keeps word counts, not the corpus, so `texts` may be a stream. The result is deterministic for the
    same texts in the same order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError("vocab-size", f"{vocab_size} is too small (at least {MIN_VOCAB}: 256 bytes + BOS/EOS + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) <= MIN_VOCAB - 1:
        raise DataError("inputs", "corpus is too small to learn any merge")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(output)  # a fresh name, then renamed: a link at `output` is replaced, never written through
    try:
        tok.save(str(tmp))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
