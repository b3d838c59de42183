"""The rich console commands print their tables to: complete lines when stdout is a pipe or a log file.

rich sizes a console that is not a terminal to 80 columns (or $COLUMNS) and then cuts table cells with an ellipsis:
`cache inspect > log` showed `MODULE_111111111111…`, so the hash a user greps for was gone. Off a terminal the
console is as wide as the longest line needs; on a terminal, cells that do not fit fold onto the next line.
"""

from __future__ import annotations

from rich.console import Console

UNBOUNDED = 100_000  # columns: wider than any line we print, so nothing is wrapped or cut


def stdout_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=UNBOUNDED)
