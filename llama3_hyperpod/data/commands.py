"""The `data` command group: prepare, train-tokenizer, default. Parses options and calls; heavy imports stay inside.

Bad input ends with one line `error: <key>: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llama3_hyperpod.errors import user_errors

if TYPE_CHECKING:
    from llama3_hyperpod.data.prepare import Progress as Counters


def _required_path(name: str, short: str, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A required path option (`--output`/`-o` of both writers, prepare's `--tokenizer`/`-t`)."""
    return click.option(name, short, type=click.Path(path_type=Path), required=True, help=help_text)


_TEXT_FIELD = click.option("--text-field", default="text", show_default=True,
                           help="Text field of jsonl/parquet/hub rows.")


@click.group("data")
def data() -> None:
    """Prepare training data: tokenize and pack text into the Arrow dataset NxDT loads."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True)
@_required_path("--output", "-o", "Dataset folder to create.")
@_required_path("--tokenizer", "-t",
                "tokenizer.json, or a folder holding one (e.g. the Llama 3 tokenizer you downloaded).")
@click.option("--seq-len", type=int, required=True, help="Tokens per block (the model's encoder_seq_length).")
@click.option("--workers", type=int, default=None, help="Tokenizer processes [default: all CPUs].")
@_TEXT_FIELD
@click.option(
    "--txt-split",
    type=click.Choice(["file", "paragraph", "line"]),
    default="file",
    show_default=True,
    help="What one document is in a .txt file.",
)
@click.option("--hf-config", default=None, help="Config name of a Hugging Face hub dataset input.")
@click.option("--hf-split", default="train", show_default=True, help="Split of a Hugging Face hub dataset input.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def prepare_cmd(
    inputs: tuple[str, ...],
    output: Path,
    tokenizer: Path,
    seq_len: int,
    workers: int | None,
    text_field: str,
    txt_split: str,
    hf_config: str | None,
    hf_split: str,
    force: bool,
    quiet: bool,
) -> None:
    """Tokenize INPUTS (txt, jsonl, parquet files, folders of them, or a hub dataset name) into packed blocks.

    Each document becomes BOS + tokens + EOS (Llama 3's convention); documents are concatenated and cut into rows of
    exactly --seq-len tokens (input_ids, labels == input_ids, int32); the last partial block is dropped and counted
    in metadata.json. The output appears atomically; the same inputs give byte-identical output.
    """
    from llama3_hyperpod.data.prepare import corpus_from_inputs, prepare

    with user_errors():
        corpus = corpus_from_inputs(
            inputs, text_field=text_field, txt_split=txt_split, hub_config=hf_config, hub_split=hf_split
        )
        with _progress_bar(quiet) as on_progress:
            meta = prepare(
                corpus,
                output,
                tokenizer=tokenizer,
                seq_len=seq_len,
                workers=workers,
                force=force,
                on_progress=on_progress,
            )
    if not quiet:
        _summary(output, meta)


@data.command("train-tokenizer")
@click.argument("inputs", nargs=-1, required=True)
@_required_path("--output", "-o", "tokenizer.json to write (or a folder to write it into).")
@click.option("--vocab-size", type=int, required=True, help="Vocabulary size including BOS/EOS.")
@_TEXT_FIELD
@click.option("--txt-split", type=click.Choice(["file", "paragraph", "line"]), default="file", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing tokenizer file.")
def train_tokenizer_cmd(
    inputs: tuple[str, ...], output: Path, vocab_size: int, text_field: str, txt_split: str, force: bool
) -> None:
    """Train a byte-level BPE (Llama 3 split pattern, <|begin_of_text|>/<|end_of_text|>) on INPUTS."""
    from llama3_hyperpod.data.errors import DataError
    from llama3_hyperpod.data.prepare import corpus_from_inputs
    from llama3_hyperpod.data.tokenizer import train_bpe

    with user_errors():
        if output.is_dir() or output.suffix != ".json":
            output = output / "tokenizer.json"
        if output.exists() and not force:
            raise DataError(str(output), "already exists (use --force to replace it)")
        corpus = corpus_from_inputs(inputs, text_field=text_field, txt_split=txt_split)
        corpus.inspect()
        written = train_bpe(
            (p.text for p in corpus.pieces() if p.text),
            vocab_size=vocab_size,
            output=output,
            show_progress=sys.stderr.isatty(),
        )
    from tokenizers import Tokenizer

    click.echo(f"wrote {written} (vocab size {Tokenizer.from_file(str(written)).get_vocab_size()})")


@data.command("default")
@click.option("--dest", type=click.Path(path_type=Path), required=True, help="Folder the default dataset lives under.")
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--vocab-size", type=int, default=8192, show_default=True)
def default_cmd(dest: Path, seq_len: int, vocab_size: int) -> None:
    """Build (once) the embedded default dataset from the Python standard library's sources; print its folder."""
    from llama3_hyperpod.data.default import ensure_default_dataset

    with user_errors():
        click.echo(ensure_default_dataset(dest, seq_len, vocab_size))


@data.command("check")
@click.argument("train_dir", type=click.Path(path_type=Path))
@click.option("--seq-len", type=int, required=True)
@click.option("--vocab-size", type=int, required=True)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None)
def check_cmd(train_dir: Path, seq_len: int, vocab_size: int, tokenizer: Path | None) -> None:
    """Check that TRAIN_DIR was prepared for this seq len, vocab size (and tokenizer)."""
    from llama3_hyperpod.data.check import check_dataset_matches

    with user_errors():
        check_dataset_matches(train_dir, seq_len=seq_len, vocab_size=vocab_size, tokenizer_path=tokenizer)
    click.echo(f"ok: {train_dir}")


@contextlib.contextmanager
def _progress_bar(quiet: bool) -> Iterator[Any]:
    """A rich bar over input bytes (so the ETA is real) that also shows tokens/s; None when quiet."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate / 1e3:,.0f}k tok/s", style="progress.data.speed")

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        DownloadColumn(),
        TokensPerSecond(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # the summary line replaces it; nothing is left between the bar and an error line
        disable=not console.is_terminal,
    )
    task = bar.add_task("prepare", total=None, tokens=0, start=False)

    def update(p: Counters) -> None:  # the bar appears with the first result, not before inputs are checked
        if not bar.live.is_started:
            bar.start()
            bar.start_task(task)
        bar.update(task, total=p.total_bytes, completed=p.bytes_done, tokens=p.tokens)

    try:
        yield update
    finally:
        bar.stop()


def _summary(output: Path, meta: dict[str, Any]) -> None:
    keys = ("documents", "tokens_total", "blocks", "seq_len", "dropped_tokens", "vocab_size")
    click.echo(f"wrote {output}: " + json.dumps({k: meta[k] for k in keys}))
