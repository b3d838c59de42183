#!/usr/bin/env python3
"""The container's command line: `python entrypoint.py --help` lists the commands (plan, compile, train, ...)."""

from llama3_hyperpod.cli import main

if __name__ == "__main__":
    main()
