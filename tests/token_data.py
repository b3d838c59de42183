"""Small token datasets the tests train on, in the format the trainer reads (save_to_disk rows).

Fixtures, not product: the trainer's own default dataset is llama3_hyperpod/data/default.py (a BPE over stdlib
sources, built by `train` and `smoke`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama3_hyperpod.torch_backend.data import write_token_dataset


def stdlib_text(max_bytes: int) -> bytes:
    """Real English-and-code text available everywhere: the Python standard library's own sources."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def write_byte_text_dataset(out_dir: Path, seq_len: int, max_bytes: int = 2_000_000) -> int:
    """A byte-level (ids 0..255) dataset of stdlib source text, for tests without a tokenizer."""
    tokens = np.frombuffer(stdlib_text(max_bytes), dtype=np.uint8)
    return write_token_dataset(out_dir, tokens, seq_len)
