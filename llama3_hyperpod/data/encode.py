"""Tokenization of a batch of pieces into one flat int32 array, run in worker processes (or in-process).

Documents follow Llama 3's convention: BOS before the first piece of a document, EOS after its last. A document
that tokenizes to nothing is skipped (no lone BOS/EOS pair) and counted as empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llama3_hyperpod.data.sources import Piece

_STATE: dict[str, Any] = {}


@dataclass(frozen=True)
class Encoded:
    """One batch's result: `tokens` in document order, with counts for the metadata and progress."""

    tokens: np.ndarray
    documents: int
    empty_documents: int
    nbytes: int


def init_worker(tokenizer_path: str, bos_id: int, eos_id: int, *, in_process: bool = False) -> None:
    """Load the tokenizer once per process; workers encode serially (the processes are the parallelism)."""
    from tokenizers import Tokenizer

    if not in_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE.update(tokenizer=Tokenizer.from_file(tokenizer_path), bos=bos_id, eos=eos_id)


def reset() -> None:
    """Drop the in-process tokenizer once a prepare is done with it."""
    _STATE.clear()


def encode_pieces(pieces: list[Piece]) -> Encoded:
    tok = _STATE["tokenizer"]
    bos, eos = [_STATE["bos"]], [_STATE["eos"]]
    encodings = tok.encode_batch_fast([p.text for p in pieces], add_special_tokens=False)
    parts: list[list[int]] = []
    documents = empty = total = 0
    for piece, enc in zip(pieces, encodings, strict=True):
        ids = enc.ids
        if piece.bos and piece.eos and not ids:
            empty += 1
            continue
        if piece.bos:
            documents += 1
            parts.append(bos)
        parts.append(ids)
        if piece.eos:
            parts.append(eos)
        total += len(ids) + piece.bos + piece.eos
    tokens = np.fromiter(chain.from_iterable(parts), dtype=np.int32, count=total)
    return Encoded(tokens, documents, empty, sum(p.nbytes for p in pieces))
