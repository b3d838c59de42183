"""Sharded, atomic, verified, resumable training checkpoints (torch.distributed.checkpoint) for the torch backend.

The layout and what counts as complete / intact: checkpoint_files.py. A save writes into a temp dir (DCP, one file per
writer thread); every rank then hashes the files it wrote while fsyncing them (checkpoint_files.DIGEST; for an async
save in the background, off the training loop), rank 0 gathers the digests, fsyncs the directories, renames the dir
to step_N and writes the `done` marker last.
So a crash or a full disk at any moment leaves the previous checkpoints as they were, and any later change to a byte
of a checkpoint is seen before it is loaded.

Resume refuses a run dir holding checkpoints of another model (identity.json, one line, nothing deleted), then takes
the newest checkpoint that is complete and intact (each rank hashes a share of its files) and loads it into fresh
tensors: the model, optimizer and scheduler are changed only once the whole load has succeeded, so a checkpoint that
fails half way leaves nothing behind and the run continues from the next older one (or starts fresh). Every skipped
checkpoint is named with the reason and left where it is. DCP reshards between any (dp, tp) split on load.

Retention keeps the newest `keep` intact checkpoints of this run and deletes only older complete ones of this run and
this run's own interrupted saves; never one it could not read, a corrupt one, a link, or another run's.

The family: Checkpointer here is checkpoint_base.py (its state, the collectives, the errors, what DCP saves) plus one
class per path: checkpoint_save.py, checkpoint_load.py (verify, load, resume) and checkpoint_retention.py (prune);
checkpoint_files.py is the files on disk (no torch), checkpoint_commands.py the `checkpoint` commands.
"""

from __future__ import annotations

from llama3_hyperpod.torch_backend.checkpoint_base import CheckpointError, Restored, stderr_log
from llama3_hyperpod.torch_backend.checkpoint_load import LoadPath
from llama3_hyperpod.torch_backend.checkpoint_save import SavePath

__all__ = ["CheckpointError", "Checkpointer", "Restored", "stderr_log"]


class Checkpointer(SavePath, LoadPath):
    """Saves (sync or async), finalises, prunes and resumes one run's checkpoints; every rank holds one.

    Collective calls (save, wait, finish_pending, verify, load, resume) must be made by every rank at the same step.
    """
