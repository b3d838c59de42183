"""Exit codes with a meaning outside this program (the sbatch scripts read them). enroot/job.sh repeats 85."""

EXIT_BAD_INPUT = 2  # bad config, override or environment: one line on stderr names the key
EXIT_REQUEUE = 85  # a checkpoint was saved on SIGTERM/SIGUSR1: requeue the job and it resumes from there
REQUEUE_MARKER = ".requeue"  # written in the run dir by the trainer when it checkpointed and exits for a requeue
