"""Hold the image's SDK environment to its pins, inside the build, and record what it holds.

Run by the SDK's own interpreter (the one ENV L3HP_SDK_PYTHON names) in the SDK stage. Stdlib only: nothing of the
project is installed in that environment, and this script writes nothing into it. With `--versions`
(versions/neuron.json) it fails the build, one line per problem, unless AWS's NxDT image holds every pin there: the
Neuron packages, NxDT's requirement set, the modules NxDT imports (apex, Megatron core, NeMo, Lightning, Hydra), the
two NeMo patches, the tools and the launcher scripts beside the interpreter. `--record FILE` writes a JSON record of
the environment (interpreter, site dirs, every distribution and version, `pip check`), which the project reads at
run time instead of importing the SDK, and which the image tests compare before and after the project's layers.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def normalize(name: str) -> str:
    """PEP 503 name normalization (the same rule as lockfilter.normalize; this file must stay stdlib-only)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter sees (the first one on sys.path wins)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return dict(sorted(found.items()))


def version_matches(have: str, want: str) -> bool:
    """'2.9.0.2.12.22436+0f1dac25' matches '2.9.0.2.12.22436' (the local build tag is ignored); '2.2.*' globs."""
    core = have.split("+", 1)[0]
    return fnmatch.fnmatchcase(core, want) if "*" in want else core == want


def dpkg_version(package: str) -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _pins(section: Any) -> dict[str, str]:
    return {k: str(v) for k, v in (section or {}).items() if not k.startswith("_")}


def check(pins: Mapping[str, Any], dists: Mapping[str, str], *, python: Path,
          dpkg: Callable[[str], str | None] = dpkg_version,
          find_spec: Callable[[str], Any] = importlib.util.find_spec,
          locate: Callable[[str, str], Path | None] | None = None,
          executable: Callable[[Path], bool] = lambda p: os.access(p, os.X_OK)) -> list[str]:
    """Every way the environment differs from the pins (empty: it is the pinned one)."""
    problems: list[str] = []
    want_py = str(pins.get("python", ""))
    have_py = ".".join(platform.python_version_tuple()[:2])
    if want_py and have_py != want_py:
        problems.append(f"python: {have_py}, pinned {want_py}")
    for section in ("pip", "nxdt_stack"):
        for name, want in _pins(pins.get(section)).items():
            have = dists.get(normalize(name))
            if have is None:
                problems.append(f"{name}: not installed, pinned {want}")
            elif not version_matches(have, want):
                problems.append(f"{name}: {have}, pinned {want}")
    for package, want in _pins(pins.get("apt")).items():
        have = dpkg(package)
        if have is None:
            problems.append(f"{package} (apt): not installed, pinned {want}")
        elif have != want and not have.startswith(want + "-"):
            problems.append(f"{package} (apt): {have}, pinned {want}")
    for module in pins.get("nxdt_modules", ()):
        try:
            if find_spec(module) is None:
                problems.append(f"module {module}: not importable")
        except (ImportError, ValueError) as exc:
            problems.append(f"module {module}: not importable ({type(exc).__name__}: {exc})")
    locate = locate or _locate
    for rel, gone in _pins(pins.get("nemo_patches")).items():
        path = locate("nemo-toolkit", rel)
        if path is None:
            problems.append(f"nemo patch: {rel} not found in nemo_toolkit")
        elif gone in path.read_text(encoding="utf-8", errors="replace"):
            problems.append(f"nemo patch: {rel} still contains {gone.strip()!r} (nxdt_install_setup.sh not applied)")
    for tool in pins.get("tools", ()):
        if not executable(Path(tool)):
            problems.append(f"tool {tool}: missing")
    for script in pins.get("sdk_scripts", ()):
        if not executable(python.parent / script):
            problems.append(f"{script}: not beside the SDK interpreter ({python.parent / script} missing)")
    return problems


def _locate(dist: str, rel: str) -> Path | None:
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def record(python: Path) -> dict[str, Any]:
    """What the environment holds, as the project and the tests read it."""
    pip = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "check"], capture_output=True,
                         text=True, check=False)
    sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {"python": str(python), "python_version": platform.python_version(), "site_packages": sites,
            "distributions": distributions(), "pip_check": {"exit": pip.returncode, "output": pip.stdout.strip()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=Path, help="versions/neuron.json: fail unless every pin there holds")
    parser.add_argument("--record", type=Path, help="write the environment's record (JSON) to this file")
    parser.add_argument("--share-with-project", type=Path, metavar="DIR",
                        help="let the project's venv see this environment: DIR/lock-exclude (what the project's "
                             "install leaves out) and DIR/sdk.pth (the site dirs it appends)")
    args = parser.parse_args(argv)
    python = Path(sys.executable)
    expected = os.environ.get("L3HP_SDK_PYTHON")
    if expected and Path(expected) != python:
        print(f"sdkcheck: run by {python}, but L3HP_SDK_PYTHON is {expected}", file=sys.stderr)
        return 1
    if args.versions is not None:
        problems = check(json.loads(args.versions.read_text()), distributions(), python=python)
        for line in problems:
            print(f"sdkcheck: {line}", file=sys.stderr)
        if problems:
            print(f"sdkcheck: the SDK environment is not the one {args.versions} pins ({len(problems)} problems)",
                  file=sys.stderr)
            return 1
        print(f"sdkcheck: {python} holds every pin of {args.versions}")
    rec = record(python) if args.record is not None or args.share_with_project is not None else {}
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"sdkcheck: recorded {len(rec['distributions'])} distributions in {args.record}; pip check exit "
              f"{rec['pip_check']['exit']}" + (f": {rec['pip_check']['output']}" if rec["pip_check"]["exit"] else ""))
    if args.share_with_project is not None:
        share(args.share_with_project, rec)
    return 0


def share(directory: Path, rec: Mapping[str, Any]) -> None:
    """What the deps stage needs to give the project's venv this environment at the lowest priority."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lock-exclude").write_text("".join(f"{name}\n" for name in rec["distributions"]))
    (directory / "sdk.pth").write_text("".join(f"{site}\n" for site in rec["site_packages"]))
    print(f"sdkcheck: the project's venv will see {', '.join(rec['site_packages'])} and leave out "
          f"{len(rec['distributions'])} distributions")


if __name__ == "__main__":
    raise SystemExit(main())
