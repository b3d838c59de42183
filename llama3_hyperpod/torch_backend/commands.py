"""CLI commands of the torch backend: `smoke` (does training work here?) and `report` (plot a run's metrics).

Registered by cli.py. Heavy libraries (torch, matplotlib, datasets) are imported inside the commands so the CLI
starts fast.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import click

from llama3_hyperpod.errors import fail, user_errors

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
SMOKE_MIN_DROP = 1.0  # nats: the tiny model on real text falls by several within 30 steps


@click.command()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Default: configs/tiny_cpu.yaml (torch), configs/tiny_neuron.yaml (neuron).")
@click.option("--steps", type=click.IntRange(min=10), default=30, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--output-dir",
    default="runs",
    envvar="L3HP_OUTPUT_DIR",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder and default dataset go here.",
)
@click.option("--backend", type=click.Choice(["auto", "torch", "neuron"]), default="auto", show_default=True,
              help="auto: neuron where /dev/neuron* exists (a tiny NxDT run on 2 NeuronCores), else torch.")
@click.option("--dry-run", is_flag=True, help="neuron: print the planned steps and PASS criteria, run nothing.")
@click.argument("overrides", nargs=-1)  # fmt: skip
@click.pass_context
def smoke(ctx: click.Context, config: Path | None, steps: int, device: str, output_dir: Path, backend: str,
          dry_run: bool, overrides: tuple[str, ...]) -> None:
    """Train the tiny model for a few dozen steps and say PASS or FAIL, with the evidence."""
    from llama3_hyperpod.cluster import detect_accelerator

    if backend == "neuron" or (backend == "auto" and detect_accelerator("auto").backend == "neuron"):
        from llama3_hyperpod.neuron.smoke import smoke_command

        sys.exit(smoke_command(config, steps, output_dir, overrides, dry_run))
    if dry_run:
        fail("--dry-run", "the torch smoke trains in this process, there is no launch to print")
    config = config or TINY_CONFIG
    import torch

    from llama3_hyperpod.writable import writable_or_temporary

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    with user_errors():
        explicit = ctx.get_parameter_source("output_dir") is not click.core.ParameterSource.DEFAULT
        output_dir, note = writable_or_temporary(output_dir, "--output-dir", explicit=explicit, purpose="runs")
        if note:
            click.echo(f"smoke: {note}", err=True)
        code = _run_smoke(config, steps, dev, output_dir, overrides)
    sys.exit(code)


def _run_smoke(config: Path, steps: int, device: str, output_dir: Path, overrides: tuple[str, ...]) -> int:
    """Plan the run like `train` does (build_plan: data and cache paths, L3HP_CACHE_DIR), then train in-process."""
    from llama3_hyperpod.cluster import detect_accelerator
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.overrides import hydra_value
    from llama3_hyperpod.plan import build_plan
    from llama3_hyperpod.torch_backend.train import train

    base = [f"trainer.max_steps={steps}", "trainer.devices=1", "trainer.num_nodes=1", *overrides]
    # one process on this node: a Slurm allocation around it (srun smoke) does not shape the plan
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    plan = build_plan(config, base, detect_accelerator(f"torch-{device}"), env,
                      run_name=f"smoke-{time.strftime('%Y%m%d-%H%M%S')}", output_dir=output_dir)
    assert plan.train_dir is not None  # the torch plan falls back to the embedded default dataset
    if plan.uses_default_dataset:
        from llama3_hyperpod.data.default import ensure_default_dataset

        t0 = time.perf_counter()
        data = ensure_default_dataset(Path(plan.train_dir).parent, plan.model["seq_len"], plan.model["vocab_size"])
        click.echo(f"dataset: embedded default (Python stdlib sources) at {data} ({time.perf_counter() - t0:.1f} s)")
        base.append(f"data.train_dir={hydra_value(str(data))}")
    rc = load_config(plan.config_path, base)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(plan.compile_cache_dir) / "inductor"))
    run_dir = Path(plan.run_dir)
    result = train(rc, run_dir, device=device)
    if result.stop_signal:  # Ctrl-C, a lost terminal, a scheduler's TERM: no verdict on a run cut short
        click.echo(f"smoke: stopped by a signal after {len(result.losses)} steps (exit {result.exit_code})", err=True)
        return result.exit_code

    losses = result.losses
    head, tail = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    checks = {
        "loss finite": all(map(math.isfinite, losses)),
        f"loss falls by >= {SMOKE_MIN_DROP} (first 5 vs last 5 steps)": head - tail >= SMOKE_MIN_DROP,
        "throughput > 0": result.steady("tokens_per_s") > 0,
    }
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    click.echo(
        f"evidence: loss {head:.3f} -> {tail:.3f} (drop {head - tail:.3f}, {100 * (head - tail) / head:.0f}%) | "
        f"{result.steady('tokens_per_s'):,.0f} tok/s | MFU {100 * result.steady('mfu'):.1f}% of "
        f"{result.peak_flops / 1e12:.3f} TFLOP/s ({result.peak_source}) | torch.compile "
        f"{'on, cache ' + cache if rc.cfg.torch_backend.compile else 'off'} | {result.wall_s:.0f} s | run dir {run_dir}"
    )
    for name, ok in checks.items():
        click.echo(f"  [{'ok' if ok else 'FAIL'}] {name}")
    passed = all(checks.values())
    click.echo(f"smoke: {'PASS' if passed else 'FAIL'} ({device})")
    return 0 if passed else 1


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write (default: RUN_DIR/report.png).")  # fmt: skip
def report(run_dir: Path, output: Path | None) -> None:
    """Plot loss, learning rate and tokens/s per step from RUN_DIR/metrics.jsonl into a PNG."""
    target = output or run_dir / "report.png"
    try:
        with user_errors():
            out = plot_metrics(run_dir, target)
    except OSError as exc:
        fail("--output", f"cannot write {target} ({exc.strerror or exc}): set --output to a writable file")
    click.echo(str(out))


def plot_metrics(run_dir: Path, output: Path) -> Path:
    from llama3_hyperpod.writable import quiet_matplotlib

    quiet_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llama3_hyperpod.fsutil import replace_from, tmp_name
    from llama3_hyperpod.torch_backend.metrics import read_metrics

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for ax, key, label in zip(
        axes, ("loss", "lr", "tokens_per_s"), ("loss", "learning rate", "tokens / s"), strict=True
    ):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(output)
    try:
        fig.savefig(tmp, dpi=100, format="png")  # then renamed: a link at `output` is replaced, not written through
        replace_from(tmp, output)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return output
