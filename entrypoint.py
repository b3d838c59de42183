#!/usr/bin/env python3
"""The container's command line: `python entrypoint.py --help` lists the commands (plan, compile, train, ...)."""

import signal
import sys

from llama3_hyperpod.procs import record_early

if __name__ == "__main__" and sys.argv[1:2] in (["train"], ["compile"]):
    # First thing: a USR1 (Slurm's time-limit warning) that comes while the launch is being planned is kept and
    # forwarded once the trainer runs (launch.py), instead of killing this process.
    record_early(signal.SIGUSR1, signal.SIGUSR2)

from llama3_hyperpod.cli import main

if __name__ == "__main__":
    main()
