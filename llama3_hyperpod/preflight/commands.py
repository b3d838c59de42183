"""`entrypoint.py preflight` after its plan is made (cli.py parses and plans): run, print, write, exit code."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from llama3_hyperpod.preflight.run import result_path, run_preflight, write_result

if TYPE_CHECKING:
    from llama3_hyperpod.plan import Plan


def report_preflight(plan: Plan, mode: str, as_json: bool) -> int:
    """Print every check (lines or JSON), write the report into the run dir, name the first failure on stderr."""
    report = run_preflight(plan, mode)
    path = result_path(plan, mode)
    run_dir_ok = next((c.status != "FAIL" for c in report.checks if c.name == "run dir"), False)
    why = write_result(report, path) if run_dir_ok else "the run dir is not writable"
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for check in report.checks:
            click.echo(check.line())
        click.echo(report.summary_line())
    if why:
        click.echo(f"preflight: report not written to {path}: {why}", err=True)
    if not report.ok:
        click.echo(report.failure_line(), err=True)
    sys.stdout.flush()
    return report.exit_code
