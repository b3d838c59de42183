"""`entrypoint.py --help` and each command's help describe what exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama3_hyperpod.cli import main
from tests.conftest import run_cli

EXPECTED = {"plan", "compile", "train", "preflight", "smoke", "report", "cache", "data", "checkpoint"}


def test_top_level_help_lists_every_command() -> None:
    assert set(main.commands) == EXPECTED
    result = run_cli("--help")
    assert result.returncode == 0
    for name in main.commands:
        assert name in result.stdout
    assert "NxDT" in result.stdout


@pytest.mark.parametrize("command", sorted(main.commands))
def test_each_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    doc = main.commands[command].help or ""
    assert doc.split("\n")[0][:40] in " ".join(result.stdout.split())


def test_version_is_the_release_in_pyproject_without_installed_metadata() -> None:
    """The image runs the package from /opt/app without installing it: --version must not ask pip's metadata."""
    import tomllib

    from llama3_hyperpod import __version__

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"llama3-hyperpod, version {__version__}"
