"""The `cache` command group: inspect, verify, seed, prune. Parses options and calls; no torch import.

Exit codes: 0 ok / cache hit, 2 bad input (one line on stderr), 3 predicted cache miss, 4 cannot tell (no manifest),
1 `inspect` found problems.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from llama3_hyperpod.cluster import BACKENDS
from llama3_hyperpod.errors import fail, user_errors

EXIT_PROBLEMS = 1


def _cache_dir_arg(value: str | None) -> Path:
    chosen = value or os.environ.get("L3HP_CACHE_DIR")
    if not chosen:
        fail("DIR", "give the cache dir (or set L3HP_CACHE_DIR)")
    path = Path(chosen)
    if not path.is_dir():
        fail(str(path), "no such directory")
    return path


@click.group("cache")
def cache() -> None:
    """The compiled-graph cache (Neuron neuronxcc-*/MODULE_* or Inductor): inspect, verify, seed, prune."""


@cache.command("inspect")
@click.argument("directory", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--expected-version", default=None,
              help="Compiler version to check entries against (default: installed neuronx-cc or torch, "
                   "else the pinned one).")
@click.option("--stale-after", default=2 * 3600, show_default=True, type=float,
              help="Seconds after which a compile lock counts as stale.")
def inspect_cmd(directory: str | None, as_json: bool, expected_version: str | None, stale_after: float) -> None:
    """List the entries of a cache DIR (default $L3HP_CACHE_DIR), their state and size, and its problems.

    Exits 1 when it finds errors (failed or incomplete entries, stale locks, compiler version mismatch).
    """
    from llama3_hyperpod.cache.inspect import inspect_cache, render_report
    from llama3_hyperpod.cache.manifest import layout_of, toolchain

    root = _cache_dir_arg(directory)
    layout = layout_of(root)
    if expected_version is None and layout in ("neuron", "inductor"):
        tools = toolchain("neuron" if layout == "neuron" else "torch")
        expected_version = tools["compiler_version"] if tools["compiler_version"] != "unknown" else None
    report = inspect_cache(root, expected_compiler_version=expected_version, stale_after=stale_after)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from llama3_hyperpod.console import stdout_console

        render_report(report, stdout_console())
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


@cache.command("verify")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="L3HP_BACKEND", show_default=True)
@click.option("--run-name", default=None)
@click.option("--output-dir", default="runs", envvar="L3HP_OUTPUT_DIR", show_default=True)
@click.option("--nxdt-examples", default=None, envvar="NXDT_EXAMPLES_DIR")
@click.option("--cache-dir", default=None, envvar="L3HP_CACHE_DIR",
              help="The cache to check (default: the config's compiler_cache_url).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify_cmd(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
               nxdt_examples: str | None, cache_dir: str | None, as_json: bool) -> None:
    """Say, before anything runs, whether CONFIG (with overrides, on this node count) will hit the compile cache.

    Exits 0 on a hit, 3 on a predicted miss (naming the fields that differ from the manifest), 4 when it cannot
    tell (a cache without manifest), 2 on bad input.
    """
    with user_errors():
        from llama3_hyperpod.cache.verify import verify
        from llama3_hyperpod.plan import make_plan

        plan = make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples)
        verdict = verify(plan, cache_dir)
    if as_json:
        click.echo(json.dumps(verdict.to_dict(), indent=2, default=str))
    else:
        click.echo(verdict.message())
    sys.exit(verdict.exit_code)


@cache.command("seed")
@click.option("--baked", default=None, envvar="L3HP_BAKED_CACHE",
              help="The read-only cache baked into the image [default: /opt/app/neuron_cache].")
@click.option("--runtime", "runtime", envvar="L3HP_CACHE_DIR", required=True,
              help="The writable, node-local run-time cache dir (env L3HP_CACHE_DIR).")
@click.option("--copy", "force_copy", is_flag=True, help="Copy even when hard links are possible.")
@click.option("--json", "as_json", is_flag=True)
def seed_cmd(baked: str | None, runtime: str, force_copy: bool, as_json: bool) -> None:
    """Make the baked cache available in the run-time dir: copies only what is missing; safe from many ranks."""
    from llama3_hyperpod.cache.seed import DEFAULT_BAKED_DIR, seed_cache

    with user_errors():
        report = seed_cache(Path(baked or DEFAULT_BAKED_DIR), Path(runtime), link=False if force_copy else None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"seeded {report.runtime} from {report.baked}: {report.entries_copied} entries, "
                   f"{report.files_copied} files copied, {report.files_linked} linked, {report.files_skipped} "
                   f"already there, {report.bytes_copied} bytes in {report.seconds:.2f} s")


@cache.command("prune")
@click.argument("directory", required=False)
@click.option("--keep", default=1, show_default=True, type=click.IntRange(min=1),
              help="How many compiler versions (newest first) to keep.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@click.option("--json", "as_json", is_flag=True)
def prune_cmd(directory: str | None, keep: int, dry_run: bool, as_json: bool) -> None:
    """Remove all but the KEEP newest neuronxcc-<version> dirs of a Neuron cache DIR (default $L3HP_CACHE_DIR)."""
    from llama3_hyperpod.cache.prune import prune_cache

    report = prune_cache(_cache_dir_arg(directory), keep, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"kept {', '.join(report.kept) or 'nothing'}; {verb} {', '.join(report.removed) or 'nothing'} "
                   f"({report.freed_bytes} bytes)")


if __name__ == "__main__":  # `python -m llama3_hyperpod.cache.commands ...` works before the group is registered
    cache()
