"""What the torch trainer writes in a run dir, by name (no torch import), and the check that none of it is a link.

The CLI runs the check before it launches (one line, exit 2) and the trainer's rank 0 again before it writes.
"""

from __future__ import annotations

from pathlib import Path

from llama3_hyperpod.fsutil import refuse_links

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def refuse_links_in(run_dir: Path) -> None:
    """PathError when the checkpoints dir, metrics file or TensorBoard dir of `run_dir` is a symbolic link."""
    refuse_links(run_dir, *(run_dir / name for name in (CHECKPOINTS, METRICS, TENSORBOARD)))
