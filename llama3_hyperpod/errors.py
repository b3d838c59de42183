"""The user-error type, the exit codes and the one wrapper that turns a user error into its line and exit 2.

The bottom of the import graph: imports nothing of the package, so every layer may raise ConfigError. Exit codes
have a meaning outside this program (the sbatch scripts read them): enroot/job.sh repeats 85. The standalone
scripts that run without the package (image/lockfilter.py, image/sqsh.py, image/pyxis_podman.py, run as files)
cannot import this and say 2 themselves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

EXIT_BAD_INPUT = 2  # bad config, override or environment: one line on stderr names the key
EXIT_FAILED = 1  # the work itself failed (a build, a conversion): one line on stderr says what
EXIT_REQUEUE = 85  # a checkpoint was saved on SIGTERM/SIGUSR1: requeue the job and it resumes from there
REQUEUE_MARKER = ".requeue"  # written in the run dir by the trainer when it checkpointed and exits for a requeue


class ConfigError(Exception):
    """Bad user input: `key` is the dotted config key (or file, option, variable) to fix, `message` what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        key, message = _one_line(key), _one_line(message)  # a user error is one line, whatever input it quotes
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# Every character str.splitlines() breaks at (\n, \r, \x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029).
_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode()
                              for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)


def report_bad_input(key: str, message: str) -> int:
    """Say a user error as its one line on stderr; returns EXIT_BAD_INPUT for a main() to return."""
    print(f"error: {_one_line(key)}: {_one_line(message)}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def fail(key: str, message: str) -> NoReturn:
    """End the command on a user error: one line on stderr, exit 2."""
    sys.exit(report_bad_input(key, message))


def run_main(body: Callable[[], object], failure: type[Exception], say: Callable[[Exception], str] = str) -> int:
    """A script's main() around its body: a ConfigError is its one line and EXIT_BAD_INPUT, `failure` (the work
    failed, not the input) the line `error: <say(exc)>` and EXIT_FAILED, anything else a bug with its traceback."""
    try:
        body()
    except ConfigError as exc:
        return report_bad_input(exc.key, exc.message)
    except failure as exc:
        print(f"error: {_one_line(say(exc))}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A ConfigError raised inside ends the command in one line and exit 2; anything else is a bug and keeps its
    traceback. A with-block or a decorator (`@user_errors()`)."""
    try:
        yield
    except ConfigError as exc:
        fail(exc.key, exc.message)


def requeue_marker(run_dir: Path, node_rank: int) -> Path:
    """One marker per node: each node's launcher reads and removes its own, so nodes sharing a run dir do not race
    (with one shared marker, the first node's launcher consumed it and the others reported torchrun's exit 1)."""
    return Path(run_dir) / f"{REQUEUE_MARKER}-node{node_rank}"
