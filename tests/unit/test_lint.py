"""ruff, mypy and shellcheck run as part of the test suite, so README's one test command checks them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def test_ruff() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck() -> None:
    scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("*.sh"), *REPO.glob("scripts/**/*.sh"),
                                                        *REPO.glob("enroot/*.sh"), *REPO.glob("enroot/*.sbatch"),
                                                        REPO / ".ci" / "run"] if p.is_file())
    assert scripts
    result = run(str(BIN / "shellcheck"), "-x", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr
