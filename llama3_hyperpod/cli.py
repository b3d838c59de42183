"""The command line: parse, call, and turn bad input into one line and exit code 2. No logic lives here."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from llama3_hyperpod.cluster import BACKENDS, detect_accelerator
from llama3_hyperpod.config import ConfigError
from llama3_hyperpod.exitcodes import EXIT_BAD_INPUT
from llama3_hyperpod.plan import Plan, build_plan
from llama3_hyperpod.writable import require_writable_dir

F = TypeVar("F", bound=Callable[..., Any])


def fail(key: str, message: str) -> None:
    click.echo(f"error: {key}: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def user_errors(func: F) -> F:
    """Report ConfigError as one line + exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(exc.key, exc.message)

    return wrapper  # type: ignore[return-value]


def plan_options(func: F) -> F:
    """CONFIG, overrides and the options every planned command shares."""
    decorators = [
        click.argument("config", type=click.Path(dir_okay=False, path_type=Path)),
        click.argument("overrides", nargs=-1),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="L3HP_BACKEND",
                     show_default=True,
                     help="auto: /dev/neuron* -> neuron, an NVIDIA GPU -> torch-cuda, else torch-cpu."),
        click.option("--run-name", default=None, help="Names the run folder (default: the config's `name`). "
                     "The same name resumes the same run."),
        click.option("--output-dir", default="runs", envvar="L3HP_OUTPUT_DIR", show_default=True,
                     type=click.Path(file_okay=False), help="Where run folders (logs, checkpoints) are made."),
        click.option("--nxdt-examples", default=None, envvar="NXDT_EXAMPLES_DIR",
                     help="NxDT's examples/ folder (holds training_orchestrator.py) for the neuron backend."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def make_plan(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
              nxdt_examples: str | None, require_data: bool = False) -> Plan:
    if not config.is_file():
        raise ConfigError(str(config), "config file not found")
    return build_plan(config, overrides, detect_accelerator(backend), run_name=run_name, output_dir=output_dir,
                      nxdt_examples=nxdt_examples, require_data=require_data)


def check_memory(plan: Plan) -> None:
    mem = plan.memory
    if mem.fits is False:
        assert mem.device_memory is not None
        raise ConfigError("memory", f"the estimate of {mem.total / 2**30:.1f} GiB per device exceeds the "
                          f"{mem.device_memory / 2**30:.1f} GiB available on {plan.device}: raise tensor parallel, "
                          "enable ZeRO-1 or recompute, or lower the micro batch or sequence length")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="llama3-hyperpod")
def main() -> None:
    """Train Llama 3 on AWS Trainium (NxDT) with SageMaker HyperPod, or anywhere with the PyTorch backend.

    CONFIG is an NxDT-format YAML (see configs/); overrides are key.path=value pairs, as for hydra.
    Every command checks the whole config first and stops with one line naming the key when something is wrong.
    """


@main.command()
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of tables.")
@user_errors
def plan(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
         nxdt_examples: str | None, as_json: bool) -> None:
    """Show what `compile` and `train` would run on this node: layout, memory per device, FLOPs, commands, env.

    Exits 2 when the memory estimate does not fit the device.
    """
    result = make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console

        from llama3_hyperpod.report import render_plan

        render_plan(result, Console())
    check_memory(result)


def prepare_torch_data(result: Plan) -> None:
    """Build the embedded default dataset when no data is configured; refuse data made for another model."""
    from llama3_hyperpod.data.check import check_dataset_matches
    from llama3_hyperpod.data.default import ensure_default_dataset

    assert result.train_dir is not None
    seq_len, vocab = result.model["seq_len"], result.model["vocab_size"]
    if result.uses_default_dataset:
        built = ensure_default_dataset(Path(result.train_dir).parent, seq_len=seq_len, vocab_size=vocab)
        assert str(built.resolve()) == result.train_dir, (built, result.train_dir)
    tokenizer = Path(result.tokenizer) if result.tokenizer else None
    check_dataset_matches(Path(result.train_dir), seq_len=seq_len, vocab_size=vocab, tokenizer_path=tokenizer)


def _execute(mode: str, config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None,
             output_dir: str, nxdt_examples: str | None, dry_run: bool) -> None:
    result = make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples, require_data=True)
    check_memory(result)
    launch = result.commands[mode]
    if dry_run:
        click.echo(launch.shell())
        return
    require_writable_dir(Path(output_dir), "--output-dir")
    if result.backend == "torch":  # NxDT reads its data itself; for our trainer we check (and make) it first
        prepare_torch_data(result)
    run_dir = Path(result.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"plan-{mode}-node{result.cluster['node_rank']}.json").write_text(json.dumps(result.to_dict(), indent=2))
    cache_is_local = not result.compile_cache_dir.startswith("s3://")
    if cache_is_local:
        seed_baked_cache(Path(result.compile_cache_dir))
    if mode == "train":
        from llama3_hyperpod.cache.verify import verify

        verdict = verify(result)
        if verdict.status in ("miss", "unknown"):
            click.echo(f"warning: {verdict.message()}", err=True)
    from llama3_hyperpod.exitcodes import requeue_marker
    from llama3_hyperpod.launch import run

    start = time.monotonic()
    code = run(launch, result.rlimits, requeue_marker=requeue_marker(run_dir, result.cluster["node_rank"]))
    if mode == "compile" and code == 0 and cache_is_local:
        from llama3_hyperpod.cache.manifest import write_manifest

        written = write_manifest(result.compile_cache_dir, result, compile_seconds=time.monotonic() - start)
        click.echo(f"compile: cache manifest {written}", err=True)
    sys.exit(code)


def seed_baked_cache(runtime: Path) -> None:
    """Make the image's read-only baked cache available in the writable run-time cache dir (copies what is missing)."""
    from llama3_hyperpod.cache.seed import DEFAULT_BAKED_DIR, ENV_BAKED_DIR, seed_cache

    baked = Path(os.environ.get(ENV_BAKED_DIR, DEFAULT_BAKED_DIR))
    if baked.resolve() == runtime.resolve():
        raise ConfigError("compiler_cache_url", f"{runtime} is the image's read-only baked cache; point "
                          "compiler_cache_url (or L3HP_CACHE_DIR) at a writable dir, it is seeded from there")
    report = seed_cache(baked, runtime)
    if report.changed:
        click.echo(f"cache: seeded {runtime} from {baked} ({report.seconds:.1f} s)", err=True)


@main.command(name="compile")
@plan_options
@click.option("--dry-run", is_flag=True, help="Print the command line and env, run nothing.")
@user_errors
def compile_(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
             nxdt_examples: str | None, dry_run: bool) -> None:
    """Fill the compiled-graph cache: neuron_parallel_compile + NxDT on Trainium, a few torch.compile steps elsewhere.

    Use the same node count as the training run: a different data-parallel degree makes different graphs.
    """
    _execute("compile", config, overrides, backend, run_name, output_dir, nxdt_examples, dry_run)


@main.command()
@plan_options
@click.option("--dry-run", is_flag=True, help="Print the command line and env, run nothing.")
@user_errors
def train(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
          nxdt_examples: str | None, dry_run: bool) -> None:
    """Train: one torchrun per node running NxDT (neuron) or the project's trainer (torch); exit code passed through."""
    _execute("train", config, overrides, backend, run_name, output_dir, nxdt_examples, dry_run)


def _register_command_groups() -> None:
    """Commands that live beside their code; their modules import heavy libraries only when a command runs."""
    from llama3_hyperpod.cache.commands import cache
    from llama3_hyperpod.data.commands import data
    from llama3_hyperpod.torch_backend.checkpoint_commands import checkpoint
    from llama3_hyperpod.torch_backend.commands import report, smoke

    main.add_command(cache)
    main.add_command(checkpoint)
    main.add_command(data)
    main.add_command(smoke)
    main.add_command(report)


_register_command_groups()
