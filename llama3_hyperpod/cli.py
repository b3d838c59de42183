"""The command line: parse options, plan, call; bad input ends in one line and exit 2 (errors.py)."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from llama3_hyperpod import __version__
from llama3_hyperpod.cluster import BACKENDS
from llama3_hyperpod.errors import ConfigError, fail, user_errors
from llama3_hyperpod.plan import Plan, make_plan
from llama3_hyperpod.writable import require_writable_dir

F = TypeVar("F", bound=Callable[..., Any])


class UserErrorGroup(click.Group):
    """The top-level group: a user error raised by any command (and subgroup) ends in one line and exit 2, and so
    does the environment's (a read-only or full disk, a missing permission): OSError names the file."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(exc.key, exc.message)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # stdout closed early (`| head`): click's own handling
                raise
            fail(str(exc.filename or ctx.invoked_subcommand or "error"), exc.strerror or str(exc))


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


def plan_for_this_machine(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None,
                          output_dir: str, nxdt_examples: str | None) -> Plan:
    """`plan` with --backend auto on a machine without NeuronCores (a login node, a laptop): a config that cannot run
    on this CPU is planned for Trainium instead, with a warning saying so, rather than refused for CPU memory."""
    planned = make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples)
    if backend != "auto" or planned.backend != "torch" or planned.device != "cpu" or planned.memory.fits is not False:
        return planned
    neuron = make_plan(config, overrides, "neuron", run_name, output_dir, nxdt_examples)
    neuron.warnings.insert(0, f"no NeuronCores here and this config needs {planned.memory.total / 2**30:.1f} GiB per "
                              f"CPU rank: planned for {neuron.instance} (--backend torch-cpu plans for this CPU)")
    return neuron


def check_memory(plan: Plan) -> None:
    mem = plan.memory
    if mem.fits is False:
        assert mem.device_memory is not None
        raise ConfigError("memory", f"the estimate of {mem.total / 2**30:.1f} GiB per device exceeds the "
                          f"{mem.device_memory / 2**30:.1f} GiB available on {plan.device}: raise tensor parallel, "
                          "enable ZeRO-1 or recompute, or lower the micro batch or sequence length")


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="llama3-hyperpod")
def main() -> None:
    """Train Llama 3 on AWS Trainium (NxDT) with SageMaker HyperPod, or anywhere with the PyTorch backend.

    CONFIG is an NxDT-format YAML (see configs/); overrides are key.path=value pairs, as for hydra.
    Every command checks the whole config first and stops with one line naming the key when something is wrong.
    """


@main.command()
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of tables.")
@user_errors()
def plan(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
         nxdt_examples: str | None, as_json: bool) -> None:
    """Show what `compile` and `train` would run on this node: layout, memory per device, FLOPs, commands, env.

    Exits 2 when the memory estimate does not fit the device.
    """
    planned = plan_for_this_machine(config, overrides, backend, run_name, output_dir, nxdt_examples)
    if as_json:
        click.echo(json.dumps(planned.to_dict(), indent=2))
    else:
        from llama3_hyperpod.console import stdout_console
        from llama3_hyperpod.plan_view import render_plan

        render_plan(planned, stdout_console())
    check_memory(planned)


def prepare_torch_data(planned: Plan) -> None:
    """Build the embedded default dataset when no data is configured; refuse data made for another model."""
    from llama3_hyperpod.data.check import check_dataset_matches
    from llama3_hyperpod.data.default import ensure_default_dataset

    assert planned.train_dir is not None
    seq_len, vocab = planned.model["seq_len"], planned.model["vocab_size"]
    if planned.uses_default_dataset:
        built = ensure_default_dataset(Path(planned.train_dir).parent, seq_len=seq_len, vocab_size=vocab)
        assert str(built.resolve()) == planned.train_dir, (built, planned.train_dir)
    tokenizer = Path(planned.tokenizer) if planned.tokenizer else None
    check_dataset_matches(Path(planned.train_dir), seq_len=seq_len, vocab_size=vocab, tokenizer_path=tokenizer)


def _execute(mode: str, config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None,
             output_dir: str, nxdt_examples: str | None, dry_run: bool) -> None:
    planned = make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples, require_data=True)
    check_memory(planned)
    launch = planned.commands[mode]
    if dry_run:
        click.echo(launch.shell())
        return
    from llama3_hyperpod import runlock

    require_writable_dir(Path(output_dir), "--output-dir")
    run_dir = Path(planned.run_dir)
    node_rank = planned.cluster["node_rank"]
    run_dir.mkdir(parents=True, exist_ok=True)
    # Node 0 owns the run dir for the run's life (torchrun inherits the lock); other nodes of the job never take it.
    lock = runlock.acquire(run_dir, purpose=mode) if node_rank == 0 else None
    try:
        code, cache_is_local, start = _launch_locked(mode, planned, launch, run_dir, node_rank, lock)
    finally:
        if lock is not None:
            lock.release()
    if mode == "compile" and code == 0 and cache_is_local:
        from llama3_hyperpod.cache.manifest import write_manifest

        written = write_manifest(planned.compile_cache_dir, planned, compile_seconds=time.monotonic() - start)
        click.echo(f"compile: cache manifest {written}", err=True)
    sys.exit(code)


def _launch_locked(mode: str, planned: Plan, launch: Any, run_dir: Path, node_rank: int,
                   lock: Any) -> tuple[int, bool, float]:
    """Everything a launch does once the run dir is ours: checks that refuse in one line, then the run itself."""
    from llama3_hyperpod.errors import requeue_marker
    from llama3_hyperpod.fsutil import write_text
    from llama3_hyperpod.launch import check_port_free, run

    if node_rank == 0:  # the rendezvous store listens here; a taken port is otherwise a torchrun traceback
        check_port_free(int(planned.cluster["master_port"]))
    if planned.backend == "torch":  # NxDT reads its data itself; for our trainer we check (and make) it first
        from llama3_hyperpod.torch_backend.checkpoint_files import CHECKPOINTS, check_identity
        from llama3_hyperpod.torch_backend.rundir import refuse_links_in

        refuse_links_in(run_dir)
        if mode == "train":
            check_identity(run_dir / CHECKPOINTS, planned.checkpoints["identity"])
        prepare_torch_data(planned)
    if planned.backend == "neuron":
        Path(launch.cwd).mkdir(parents=True, exist_ok=True)
        if mode == "train":
            pin_neuron_resume(planned)
    write_text(run_dir / f"plan-{mode}-node{node_rank}.json", json.dumps(planned.to_dict(), indent=2))
    cache_is_local = not planned.compile_cache_dir.startswith("s3://")
    if cache_is_local:
        seed_baked_cache(Path(planned.compile_cache_dir))
    if mode == "train":
        from llama3_hyperpod.cache.verify import verify

        verdict = verify(planned)
        if verdict.status in ("miss", "unknown"):
            click.echo(f"warning: {verdict.message()}", err=True)
    start = time.monotonic()
    code = run(launch, planned.rlimits, requeue_marker=requeue_marker(run_dir, node_rank),
               keep_fds=[lock.fd] if lock is not None else [])
    return code, cache_is_local, start


def pin_neuron_resume(planned: Plan) -> None:
    """Say which checkpoint NxDT resumes from (the plan pinned it) and, on node 0, move incomplete newer ones aside
    so neither NxDT's newest-by-mtime rule nor a later save can use them."""
    from llama3_hyperpod.neuron import checkpoints

    ckpt = planned.checkpoints
    if planned.cluster["node_rank"] == 0 and ckpt.get("incomplete_newer"):
        checkpoints.move_aside(checkpoints.choose(Path(ckpt["dir"])), Path(ckpt["dir"]))
    click.echo(f"resume: {ckpt.get('resume', 'no checkpoint')}", err=True)


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
@user_errors()
def compile_(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
             nxdt_examples: str | None, dry_run: bool) -> None:
    """Fill the compiled-graph cache: neuron_parallel_compile + NxDT on Trainium, a few torch.compile steps elsewhere.

    Use the same node count as the training run: a different data-parallel degree makes different graphs.
    """
    _execute("compile", config, overrides, backend, run_name, output_dir, nxdt_examples, dry_run)


@main.command()
@plan_options
@click.option("--dry-run", is_flag=True, help="Print the command line and env, run nothing.")
@user_errors()
def train(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
          nxdt_examples: str | None, dry_run: bool) -> None:
    """Train: one torchrun per node running NxDT (neuron) or the project's trainer (torch); exit code passed through."""
    _execute("train", config, overrides, backend, run_name, output_dir, nxdt_examples, dry_run)


@main.command()
@plan_options
@click.option("--mode", type=click.Choice(["train", "compile"]), default="train", show_default=True,
              help="The job step this node is about to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON instead of lines.")
@user_errors()
def preflight(config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None, output_dir: str,
              nxdt_examples: str | None, mode: str, as_json: bool) -> None:
    """Check that this node can run the plan: devices, versions, network, disks, compile cache. Starts nothing.

    One line per check (PASS / WARN / FAIL, the figure measured, what to do); exit 0 when none fails, else 2 with
    the first failure named on stderr. The report is also written to RUN_DIR/preflight/MODE-nodeR.json.
    """
    from llama3_hyperpod.preflight.commands import report_preflight

    sys.exit(report_preflight(make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples), mode,
                              as_json))


@click.command(name="import")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@plan_options
@click.option("--dry-run", is_flag=True, help="Check everything and print every step, write nothing.")
@user_errors()
def checkpoint_import(hf_dir: Path, config: Path, overrides: tuple[str, ...], backend: str, run_name: str | None,
                      output_dir: str, nxdt_examples: str | None, dry_run: bool) -> None:
    """Start the run from a Hugging Face Llama folder (config.json + safetensors, sharded or not, + tokenizer).

    The folder must hold the config's model (layers, heads, KV heads, hidden, intermediate, vocab, rope, tied
    embeddings; one line names what differs, exit 2, nothing written) and the run no checkpoints yet. torch: writes
    the run's step-0 checkpoint (weights only; any TP/DP layout resumes it); neuron: consolidates the safetensors and
    runs NxDT's checkpoint converter for the run's layout, and `train` starts from the result. Both keep the tokenizer
    files and a manifest in RUN_DIR/import.
    """
    from llama3_hyperpod.checkpoint_transfer import ImportTarget, import_hf
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.plan import DEFAULT_NXDT_EXAMPLES

    planned = make_plan(config, overrides, backend, run_name, output_dir, nxdt_examples)
    rc = load_config(planned.config_path, planned.overrides, num_nodes=planned.cluster["num_nodes"])
    lay = planned.layout
    target = ImportTarget(Path(planned.run_dir), planned.backend, planned.instance,
                          {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "kv_replicator": lay.kv_replicator})
    examples = nxdt_examples or os.environ.get("NXDT_EXAMPLES_DIR") or DEFAULT_NXDT_EXAMPLES
    sys.exit(import_hf(hf_dir, rc, target, examples=examples, env=os.environ, dry_run=dry_run, echo=click.echo))


def _register_command_groups() -> None:
    """Commands that live beside their code; their modules import heavy libraries only when a command runs."""
    from llama3_hyperpod.cache.commands import cache
    from llama3_hyperpod.data.commands import data
    from llama3_hyperpod.torch_backend.checkpoint_commands import checkpoint
    from llama3_hyperpod.torch_backend.commands import report, smoke

    main.add_command(cache)
    checkpoint.add_command(checkpoint_import)
    main.add_command(checkpoint)
    main.add_command(data)
    main.add_command(smoke)
    main.add_command(report)


_register_command_groups()
