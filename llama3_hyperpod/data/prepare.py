"""`data prepare`: sources -> tokenizer workers -> packer -> Arrow shards, streamed in bounded memory.

The main process reads pieces in order and hands batches of about BATCH_BYTES to worker processes, keeping at most
a few batches per worker in flight and taking results back in submission order; so memory stays bounded whatever
the corpus size, and the output does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama3_hyperpod.data import encode
from llama3_hyperpod.data.check import METADATA_FILE
from llama3_hyperpod.data.errors import DataError
from llama3_hyperpod.data.pack import Packer
from llama3_hyperpod.data.sources import TXT_SPLITS, HubDataset, LocalFile, Piece, Source, iter_pieces, sha256_file
from llama3_hyperpod.data.tokenizer import TokenizerInfo, load_tokenizer
from llama3_hyperpod.data.writer import ShardWriter, atomic_folder, check_destination, write_json
from llama3_hyperpod.fsutil import is_inside

FORMAT = "llama3_hyperpod.data/1"
BATCH_BYTES = 256 * 1024
IN_FLIGHT_PER_WORKER = 3


@dataclass
class Progress:
    """Counters the progress display reads; `total_bytes` is None when a source has no known size (hub)."""

    total_bytes: int | None
    bytes_done: int = 0
    tokens: int = 0
    documents: int = 0


@dataclass
class Corpus:
    """The sources with what the metadata records about them (sha256 for files, name/config/split for the hub)."""

    sources: list[Source]
    text_field: str = "text"
    txt_split: str = "file"
    records: list[dict[str, Any]] = field(default_factory=list)

    def inspect(self) -> int | None:
        """Hash and size every local file up front: unreadable inputs fail before any output is started."""
        if self.txt_split not in TXT_SPLITS:
            raise DataError("txt-split", f"{self.txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
        total: int | None = 0
        self.records = []
        for s in self.sources:
            if isinstance(s, LocalFile):
                digest = sha256_file(s.path)
                size = s.size
                self.records.append({"path": s.name, "kind": s.kind, "bytes": size, "sha256": digest})
                total = None if total is None else total + size
            else:
                self.records.append({"hub_dataset": s.name, "config": s.config, "split": s.split})
                total = None
        return total

    def pieces(self) -> Iterator[Piece]:
        for s in self.sources:
            yield from iter_pieces(s, text_field=self.text_field, txt_split=self.txt_split)


def _batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for p in pieces:
        batch.append(p)
        size += len(p.text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(corpus: Corpus, tok: TokenizerInfo, workers: int) -> Iterator[encode.Encoded]:
    """Encoded batches in corpus order; at most IN_FLIGHT_PER_WORKER batches per worker are pending."""
    init_args = (str(tok.path), tok.bos_id, tok.eos_id)
    if workers <= 1:
        encode.init_worker(*init_args, in_process=True)
        try:
            for batch in _batches(corpus.pieces()):
                yield encode.encode_pieces(batch)
        finally:
            encode.reset()
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (progress bar, tokenizers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=encode.init_worker, initargs=init_args) as pool:
        pending: deque[Future[encode.Encoded]] = deque()
        try:
            for batch in _batches(corpus.pieces()):
                pending.append(pool.submit(encode.encode_pieces, batch))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def prepare(
    corpus: Corpus,
    output: Path,
    *,
    tokenizer: Path,
    seq_len: int,
    workers: int | None = None,
    force: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Tokenize, pack and write `corpus` to `output` atomically; returns the metadata written beside the data."""
    workers = _checked_workers(seq_len, workers)
    check_destination(output, force=force)
    _check_no_overlap(output, corpus)
    tok = load_tokenizer(tokenizer)
    progress = Progress(total_bytes=corpus.inspect())
    packer = Packer(seq_len)
    with atomic_folder(output, force=force) as tmp:
        writer = ShardWriter(tmp, seq_len)
        empty = _pack(corpus, tok, workers, packer, writer, progress, on_progress)
        if progress.documents == 0:
            raise DataError("inputs", "no documents found (all inputs are empty)")
        if writer.rows == 0:
            raise DataError(
                "inputs",
                f"corpus has {progress.tokens} tokens, fewer than one block of seq_len {seq_len}: nothing to write",
            )
        content = writer.digest.hexdigest()
        writer.finish(fingerprint=hashlib.sha256(f"{tok.sha256}:{seq_len}:{content}".encode()).hexdigest()[:16])
        shutil.copyfile(tok.path, tmp / "tokenizer.json")
        metadata = {
            "format": FORMAT,
            "seq_len": seq_len,
            "vocab_size": tok.vocab_size,
            "dtype": "int32",
            "columns": ["input_ids", "labels"],
            "tokenizer": tok.as_json(),
            "documents": progress.documents,
            "empty_documents_skipped": empty,
            "tokens_total": progress.tokens,
            "tokens": writer.rows * seq_len,
            "blocks": writer.rows,
            "dropped_tokens": int(packer.remainder.size),
            "content_sha256": content,
            "text_field": corpus.text_field,
            "txt_split": corpus.txt_split,
            "sources": corpus.records,
        }
        write_json(tmp / METADATA_FILE, metadata)
    return metadata


def _checked_workers(seq_len: int, workers: int | None) -> int:
    """The tokenizer processes to use (all CPUs unless told); a seq_len or worker count below 1 is a DataError."""
    if seq_len < 1:
        raise DataError("seq-len", f"must be positive, got {seq_len}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise DataError("workers", f"must be at least 1, got {workers}")
    return workers


def _pack(corpus: Corpus, tok: TokenizerInfo, workers: int, packer: Packer, writer: ShardWriter,
          progress: Progress, on_progress: Callable[[Progress], None] | None) -> int:
    """Encode every document, pack the tokens into rows and write them, counting in `progress`; returns how many
    documents were empty."""
    empty = 0
    for result in _encoded(corpus, tok, workers):
        empty += result.empty_documents
        writer.write(packer.feed(result.tokens))
        progress.bytes_done += result.nbytes
        progress.tokens += result.tokens.size
        progress.documents += result.documents
        if on_progress is not None:
            on_progress(progress)
    return empty


def _check_no_overlap(output: Path, corpus: Corpus) -> None:
    """Refuse an output that is an input or holds one: replacing it (--force) would delete the corpus."""
    for source in corpus.sources:
        if isinstance(source, LocalFile) and is_inside(source.path, [output]) is not None:
            raise DataError(str(output), f"overlaps the input {source.path}: writing the dataset there would replace "
                            "its own inputs; choose another --output")


def corpus_from_inputs(
    inputs: Sequence[str],
    *,
    text_field: str = "text",
    txt_split: str = "file",
    hub_config: str | None = None,
    hub_split: str = "train",
) -> Corpus:
    from llama3_hyperpod.data.sources import resolve_inputs

    return Corpus(resolve_inputs(inputs, hub_config=hub_config, hub_split=hub_split), text_field, txt_split)


__all__ = ["Corpus", "HubDataset", "LocalFile", "Progress", "corpus_from_inputs", "prepare"]
