"""Packing never loses, duplicates or reorders a token; only the final partial block is held back."""

from __future__ import annotations

import numpy as np

from llama3_hyperpod.data.pack import Packer


def test_packing_keeps_every_token_in_order() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 1000, size=n, dtype=np.int32) for n in (0, 3, 7, 1, 16, 0, 5, 9, 2)]
    packer = Packer(seq_len=4)
    blocks = [packer.feed(c) for c in chunks]
    assert all(b.shape[1] == 4 and b.dtype == np.int32 for b in blocks)
    packed = np.concatenate([b.reshape(-1) for b in blocks])
    everything = np.concatenate(chunks)
    assert packed.size + packer.remainder.size == everything.size
    assert packer.remainder.size < 4
    np.testing.assert_array_equal(np.concatenate([packed, packer.remainder]), everything)


def test_remainder_is_not_a_view_of_caller_data() -> None:
    packer = Packer(seq_len=4)
    data = np.arange(6, dtype=np.int32)
    packer.feed(data)
    data[:] = -1
    np.testing.assert_array_equal(packer.remainder, [4, 5])
