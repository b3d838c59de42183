"""How many tokens the fused output layer + cross-entropy (model.py `_LinearCrossEntropy`) takes at a time: one rule
for the model and for the plan's memory estimate (memory.py), so it imports no torch.

A chunk's rows are the inner dimension of the output layer's weight-gradient GEMM, which adds each chunk's
(vocab, rows) x (rows, h) product into the (vocab, h) gradient: every chunk reads and writes that whole gradient.
Sized by elements alone (2^23, 32 MiB of fp32 logits), Llama 3's 128256 words gave 65 rows and the loss node's
forward + backward ran 1.85x slower than with 1024 rows (1024 tokens, h 512, 2 threads, median of 5 interleaved
rounds: 8.62 vs 4.41 s); at the bench's 32000 words, 1024 rows (not 262) was about 10% faster.
"""

from __future__ import annotations

MIN_ROWS = 1024  # the weight-gradient GEMM's inner dimension, at least
MIN_ELEMENTS = 2**23  # a small vocabulary takes more rows, up to this many logits per chunk


def ce_chunk_rows(tokens: int, vocab: int) -> int:
    """Rows of one chunk of the (tokens, vocab) logits; its fp32 buffer is reused for every chunk."""
    return max(1, min(tokens, max(MIN_ROWS, MIN_ELEMENTS // max(vocab, 1))))
