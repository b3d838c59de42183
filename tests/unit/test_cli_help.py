"""`entrypoint.py --help` and each command's help describe what exists."""

from __future__ import annotations

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
