"""Packing: concatenate document tokens and cut them into blocks of exactly `seq_len`, carrying the remainder."""

from __future__ import annotations

import numpy as np


class Packer:
    """Streams tokens into (n, seq_len) blocks; `remainder` holds fewer than seq_len tokens (dropped at the end)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.remainder = np.zeros(0, dtype=np.int32)

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        joined = np.concatenate([self.remainder, tokens]) if self.remainder.size else tokens
        n = joined.size // self.seq_len
        cut = n * self.seq_len
        self.remainder = joined[cut:].copy()
        return joined[:cut].reshape(n, self.seq_len)
