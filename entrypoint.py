#!/usr/bin/env python3
"""The container's command line: `python entrypoint.py --help` lists the commands (plan, compile, train, ...)."""

import os
import signal
import sys

from llama3_hyperpod.image.versions import PROJECT_PYTHON

if __name__ == "__main__" and os.environ.get("L3HP_SDK_PYTHON") and os.access(PROJECT_PYTHON, os.X_OK) \
        and sys.prefix != os.path.dirname(os.path.dirname(PROJECT_PYTHON)):
    # In the image, `python` on PATH is the SDK's (NxDT runs there) and the CLI's packages live in the project's venv:
    # a bare `python /opt/app/entrypoint.py ...` (srun --container-image, the docs) re-runs itself there.
    os.execv(PROJECT_PYTHON, [PROJECT_PYTHON, *sys.argv])

from llama3_hyperpod.procs import record_early

if __name__ == "__main__" and sys.argv[1:2] in (["train"], ["compile"]):
    # First thing: a USR1 (Slurm's time-limit warning) that comes while the launch is being planned is kept and
    # forwarded once the trainer runs (launch.py), instead of killing this process.
    record_early(signal.SIGUSR1, signal.SIGUSR2)

from llama3_hyperpod.cli import main

if __name__ == "__main__":
    main()
