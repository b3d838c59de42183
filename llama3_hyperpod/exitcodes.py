"""Exit codes with a meaning outside this program (the sbatch scripts read them). enroot/job.sh repeats 85."""

from pathlib import Path

EXIT_BAD_INPUT = 2  # bad config, override or environment: one line on stderr names the key
EXIT_REQUEUE = 85  # a checkpoint was saved on SIGTERM/SIGUSR1: requeue the job and it resumes from there
REQUEUE_MARKER = ".requeue"  # written in the run dir by the trainer when it checkpointed and exits for a requeue


def requeue_marker(run_dir: Path, node_rank: int) -> Path:
    """One marker per node: each node's launcher reads and removes its own, so nodes sharing a run dir do not race
    (with one shared marker, the first node's launcher consumed it and the others reported torchrun's exit 1)."""
    return Path(run_dir) / f"{REQUEUE_MARKER}-node{node_rank}"
