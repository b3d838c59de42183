"""Checking a prepared dataset against the model before training: seq len, vocab size and tokenizer must match."""

from __future__ import annotations

import json
from pathlib import Path

from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.data.tokenizer import tokenizer_file
from llama3_hyperpod.fsutil import sha256_file

METADATA_FILE = "metadata.json"  # a prepared folder's record (prepare.py writes it); here so a check needs no numpy

KEY = "data.train_dir"


def read_metadata(train_dir: Path) -> dict[str, object] | None:
    """The dataset's metadata.json, or None for a save_to_disk dataset made elsewhere; ConfigError if not a dataset."""
    if not (train_dir / "state.json").is_file() or not (train_dir / "dataset_info.json").is_file():
        raise ConfigError(KEY, f"{train_dir} is not a dataset written by datasets.save_to_disk (no state.json)")
    meta_file = train_dir / METADATA_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(KEY, f"{meta_file} is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise ConfigError(KEY, f"{meta_file} is not a JSON object")
    return meta


def check_dataset_matches(
    train_dir: Path, *, seq_len: int, vocab_size: int, tokenizer_path: Path | None = None
) -> None:
    """Raise ConfigError(data.train_dir) when the dataset was made for another seq len, vocab or tokenizer.

    A dataset without our metadata (made by another tool) is checked by its row length only.
    """
    train_dir = Path(train_dir)
    meta = read_metadata(train_dir)
    if meta is None:
        _check_foreign(train_dir, seq_len)
        return
    fix = "re-run `data prepare` with the model's tokenizer and --seq-len"
    if meta.get("seq_len") != seq_len:
        raise ConfigError(
            KEY,
            f"{train_dir} holds blocks of {meta.get('seq_len')} tokens but the model's seq len is {seq_len} ({fix})",
        )
    if meta.get("vocab_size") != vocab_size:
        raise ConfigError(
            KEY,
            f"{train_dir} was tokenized with vocab size {meta.get('vocab_size')} "
            f"but the model has {vocab_size} ({fix})",
        )
    if tokenizer_path is not None:
        tok_file = tokenizer_file(Path(tokenizer_path), key="data.tokenizer")
        tok_meta = meta.get("tokenizer")
        recorded = tok_meta.get("sha256") if isinstance(tok_meta, dict) else None
        if sha256_file(tok_file) != recorded:
            raise ConfigError(KEY, f"{train_dir} was tokenized with another tokenizer than {tok_file} ({fix})")


def _check_foreign(train_dir: Path, seq_len: int) -> None:
    import datasets

    try:
        ds = datasets.load_from_disk(str(train_dir))
    except Exception as e:  # datasets raises many types for a broken folder
        raise ConfigError(KEY, f"{train_dir} cannot be loaded with datasets.load_from_disk ({e})") from None
    if not isinstance(ds, datasets.Dataset) or "input_ids" not in ds.column_names:
        raise ConfigError(KEY, f"{train_dir} has no input_ids column")
    if ds.num_rows == 0:
        raise ConfigError(KEY, f"{train_dir} is empty")
    length = len(ds[0]["input_ids"])
    if length != seq_len:
        raise ConfigError(KEY, f"{train_dir} holds rows of {length} tokens but the model's seq len is {seq_len}")
