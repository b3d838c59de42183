"""Benchmark `data prepare`: throughput against raw `tokenizers` encode_batch, and peak memory at 1x and 10x input.

    .venv/bin/python bench/data_prepare.py [--budget-mb 4] [--workers N]

The corpus is the Python standard library's sources (the embedded default's corpus, about --budget-mb MB) as .txt
files; the 10x input is ten copies of them. Each `prepare` runs in a child process; its memory is sampled as the sum
of RSS over the child and its tokenizer workers (psutil, every 20 ms), and also reported as ru_maxrss of the child
(main process) and of its largest worker. Throughput compares the same 10x input: `prepare` wall time (reading,
hashing, tokenizing in workers, packing, writing Arrow) against `Tokenizer.encode_batch` over the texts already in
memory with all cores. Pass criteria: ratio >= 0.75 and peak(10x) <= 2 x peak(1x).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from llama3_hyperpod.data.prepare import corpus_from_inputs, prepare
if __name__ == "__main__":
    src, out, tok, seq, workers = sys.argv[1:6]
    t0 = time.perf_counter()
    meta = prepare(corpus_from_inputs([src]), Path(out), tokenizer=Path(tok), seq_len=int(seq), workers=int(workers))
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "tokens": meta["tokens_total"], "blocks": meta["blocks"],
                      "main_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "worker_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_prepare(src: Path, out: Path, tok: Path, seq_len: int, workers: int) -> dict[str, float]:
    """Run one prepare in a child process, sampling the summed RSS of the child and its workers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(out), str(tok), str(seq_len), str(workers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, _tree_rss(ps))
        time.sleep(0.02)
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_rss_mb"] = peak / 2**20
    return result


def raw_encode(texts: list[str], tok_path: Path) -> tuple[int, float]:
    """Tokens and seconds for Tokenizer.encode_batch over in-memory texts (rayon, all cores), counting BOS/EOS for
    each non-empty document as prepare does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 64):
        n += sum(
            len(e.ids) + 2 * bool(e.ids) for e in tok.encode_batch_fast(texts[i : i + 64], add_special_tokens=False)
        )
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mb", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    from llama3_hyperpod.data.default import stdlib_files
    from llama3_hyperpod.data.tokenizer import train_bpe

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp_s:
        tmp = Path(tmp_s)
        t_start = time.perf_counter()
        files = stdlib_files(int(args.budget_mb * 1e6))
        one, ten = tmp / "x1", tmp / "x10"
        for f in files:
            dst = one / (f.name.replace("/", "__") + ".txt")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.path, dst)
        for k in range(10):
            shutil.copytree(one, ten / f"copy{k}")
        texts = [f.path.read_bytes().decode("utf-8") for f in files]  # no newline translation, as prepare
        tok = train_bpe(texts, vocab_size=8192, output=tmp / "tokenizer.json")
        size1 = sum(p.stat().st_size for p in one.iterdir())
        print(
            f"corpus: {len(files)} stdlib files, {size1 / 1e6:.1f} MB (x1) / {10 * size1 / 1e6:.1f} MB (x10); "
            f"workers {args.workers}, seq_len {args.seq_len}, {os.cpu_count()} CPUs"
        )

        t_setup = time.perf_counter() - t_start
        r1 = run_prepare(one, tmp / "out1", tok, args.seq_len, args.workers)
        r10 = run_prepare(ten, tmp / "out10", tok, args.seq_len, args.workers)
        raw_tokens, raw_s = raw_encode(texts * 10, tok)

        if r10["tokens"] != raw_tokens:
            raise SystemExit(f"token count mismatch: prepare {r10['tokens']} vs raw {raw_tokens}")
        prep_rate = r10["tokens"] / r10["seconds"]
        raw_rate = raw_tokens / raw_s
        ratio = prep_rate / raw_rate
        mem_ratio = r10["tree_peak_rss_mb"] / r1["tree_peak_rss_mb"]
        for name, r in (("x1", r1), ("x10", r10)):
            print(
                f"prepare {name:>3}: {r['tokens']:>11,} tokens in {r['seconds']:6.2f} s = "
                f"{r['tokens'] / r['seconds'] / 1e3:8,.0f}k tok/s; peak RSS {r['tree_peak_rss_mb']:7.1f} MB (all "
                f"processes), main {r['main_maxrss_kb'] / 1024:6.1f} MB, largest worker "
                f"{r['worker_maxrss_kb'] / 1024:6.1f} MB"
            )
        print(
            f"raw encode_batch x10: {raw_tokens:>11,} tokens in {raw_s:6.2f} s = "
            f"{raw_rate / 1e3:8,.0f}k tok/s (BOS/EOS counted as prepare counts them)"
        )
        print(f"setup (copying, training the tokenizer) {t_setup:.1f} s")
        print(f"throughput ratio prepare/raw = {ratio:.2f} (need >= 0.75): {'PASS' if ratio >= 0.75 else 'FAIL'}")
        print(f"peak RSS x10/x1 = {mem_ratio:.2f} (need <= 2): {'PASS' if mem_ratio <= 2 else 'FAIL'}")


if __name__ == "__main__":
    main()
