"""`smoke --backend neuron`: does the Neuron stack train on this node? A tiny NxDT run on two NeuronCores.

The steps are this project's own commands, so the smoke runs exactly what a job runs: `preflight --mode compile`,
`compile` (neuron_parallel_compile with COMPILE=1, which fills the compile cache and writes its manifest),
`preflight` (train: the cache must now be predicted to hit), `train` (NxDT, a few steps). Evidence: NxDT's own
TensorBoard scalars in the run dir (`reduced_train_loss`, `throughput` in sequences/s: lightning_modules/model/
base.py log_metrics, NeMo's exp_manager writes them under explicit_log_dir) and the compile cache's graph count
before and after the training step (no new graph = every graph came from the cache). `--dry-run` prints all of it.
Not run in this repository's CI (no Trainium): tests check the plan, the criteria and the evidence readers.
"""

from __future__ import annotations

import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from llama3_hyperpod.errors import ConfigError, report_bad_input
from llama3_hyperpod.launchspec import Launch

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "entrypoint.py"
SMOKE_CONFIG = REPO / "configs" / "tiny_neuron.yaml"
LOSS_TAG, THROUGHPUT_TAG = "reduced_train_loss", "throughput"
MIN_LOSS_DROP = 1.0  # nats, first 5 vs last 5 logged steps: as the torch smoke (torch_backend/commands.py)
WINDOW = 5


@dataclass(frozen=True)
class SmokeStep:
    name: str
    argv: list[str]
    what: str
    runs: Launch | None = None  # the launch this command starts (compile / train), as the plan has it


@dataclass(frozen=True)
class NeuronSmokePlan:
    config: str
    run_name: str
    run_dir: str
    dataset: str
    cache_dir: str
    layout: str
    steps: list[SmokeStep]
    criteria: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [
            "smoke (neuron): a tiny NxDT run, planned for this node",
            f"  config    {self.config}: {self.layout}",
            f"  data      the embedded default dataset at {self.dataset} (built first when missing)",
            f"  cache     {self.cache_dir}",
            f"  run dir   {self.run_dir}",
        ]
        for i, step in enumerate(self.steps, 1):
            lines.append(f"  {i}. {step.name}: {step.what}")
            lines.append(f"       $ {shlex.join(step.argv)}")
            if step.runs is not None:
                lines.append(f"       which runs: {step.runs.shell()}")
        lines.append("PASS when:")
        lines += [f"  - {c}" for c in self.criteria]
        lines.append("evidence printed: loss first 5 -> last 5 steps, throughput (sequences/s), compile cache graphs "
                     "after compile and after train")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def build_smoke_plan(config: Path, steps: int, output_dir: Path, overrides: Sequence[str],
                     env: Mapping[str, str] | None = None, python: str = sys.executable,
                     run_name: str | None = None) -> NeuronSmokePlan:
    """The smoke's steps and criteria for `config` (tiny_neuron.yaml by default). Reads files, the clock (the
    default run name) and this machine's devices; writes nothing."""
    from llama3_hyperpod.cluster import detect_accelerator
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.data.default import default_name
    from llama3_hyperpod.overrides import assignment
    from llama3_hyperpod.plan import build_plan, default_data_root

    if not config.is_file():
        raise ConfigError(str(config), "config file not found")
    rc = load_config(config, list(overrides))
    dataset = rc.cfg.data.train_dir or str(default_data_root(output_dir) / default_name(rc.seq_len,
                                                                                         rc.model.vocab_size))
    all_overrides = [assignment("trainer.max_steps", steps, rc.present), *overrides]
    if not rc.cfg.data.train_dir:
        all_overrides.append(assignment("data.train_dir", dataset, rc.present))
    name = run_name or f"smoke-neuron-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = build_plan(config, all_overrides, detect_accelerator("neuron"), env, run_name=name,
                      output_dir=output_dir, python=python)
    common = [str(config), "--backend", "neuron", "--run-name", name, "--output-dir", str(Path(output_dir).resolve()),
              *all_overrides]
    cli = [python, str(ENTRYPOINT)]
    lay = plan.layout
    return NeuronSmokePlan(
        config=str(config),
        run_name=name,
        run_dir=plan.run_dir,
        dataset=dataset,
        cache_dir=plan.compile_cache_dir,
        layout=(f"{plan.model['parameters'] / 1e6:.1f}M parameters, TP {lay.tp} x PP {lay.pp} x DP {lay.dp} on "
                f"{lay.devices_per_node} NeuronCores of a {plan.instance}, {steps} steps, seq {plan.model['seq_len']}, "
                f"{plan.memory.precision}"),
        steps=[
            SmokeStep("preflight", [*cli, "preflight", *common, "--mode", "compile"],
                      "this node can compile the plan (devices, versions, memory, disks)"),
            SmokeStep("compile", [*cli, "compile", *common],
                      "neuron_parallel_compile fills the compile cache (COMPILE=1: 10 steps of graph extraction)",
                      plan.commands["compile"]),
            SmokeStep("preflight", [*cli, "preflight", *common, "--mode", "train"],
                      "this node can train it and the cache now holds its graphs (predicted hit)"),
            SmokeStep("train", [*cli, "train", *common], f"NxDT trains {steps} steps on the NeuronCores",
                      plan.commands["train"]),
        ],
        criteria=[
            "every step exits 0 (preflight 2 names the failing check; compile's code is its failed-graph count)",
            f"loss ({LOSS_TAG}) finite at every logged step and falling by >= {MIN_LOSS_DROP} nat "
            f"(mean of the first {WINDOW} vs the last {WINDOW} steps)",
            f"{THROUGHPUT_TAG} > 0 sequences/s (NxDT's own measure)",
            "the compile cache was used: it holds graphs after compile and the training step added none",
        ],
        warnings=[w for w in plan.warnings if "does not have" not in w and "does not exist" not in w],
    )


# ------------------------------------------------------------------------------------------------------ evidence


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag from every TensorBoard event file under run_dir (the compile step's dir excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {t: {} for t in tags}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        if "compile" in events.relative_to(run_dir).parts[:-1]:
            continue
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        available = set(acc.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                for event in acc.Scalars(tag):
                    out[tag][int(event.step)] = float(event.value)  # a later file (a resume) wins for a step
    return {t: sorted(v.items()) for t, v in out.items()}


def cache_graphs(cache_dir: str) -> int:
    """Compiled graphs (MODULE_* entries with a NEFF) in a Neuron cache dir; 0 for S3 or a missing dir."""
    from llama3_hyperpod.cache.manifest import neuron_entries

    if cache_dir.startswith("s3://") or not Path(cache_dir).is_dir():
        return 0
    return len(neuron_entries(Path(cache_dir)))


@dataclass(frozen=True)
class Verdict:
    checks: dict[str, bool]
    evidence: str

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


def judge(losses: Sequence[float], throughputs: Sequence[float], graphs_after_compile: int,
          graphs_after_train: int) -> Verdict:
    """The smoke's criteria applied to what the run left behind."""
    enough = len(losses) >= 2 * WINDOW
    head = statistics.mean(losses[:WINDOW]) if losses else math.nan
    tail = statistics.mean(losses[-WINDOW:]) if losses else math.nan
    steady = [t for t in throughputs[1:] if t > 0] or [t for t in throughputs if t > 0]  # the first is warm-up
    rate = statistics.mean(steady) if steady else 0.0
    new = graphs_after_train - graphs_after_compile
    checks = {
        "loss finite": bool(losses) and all(map(math.isfinite, losses)),
        f"loss falls by >= {MIN_LOSS_DROP} (first {WINDOW} vs last {WINDOW} logged steps)":
            enough and head - tail >= MIN_LOSS_DROP,
        "throughput > 0": rate > 0,
        "compile cache used (graphs after compile, none added by train)": graphs_after_compile > 0 and new <= 0,
    }
    evidence = (f"loss {head:.3f} -> {tail:.3f} over {len(losses)} logged steps (drop {head - tail:.3f}) | "
                f"{rate:.2f} sequences/s | compile cache: {graphs_after_compile} graphs after compile, "
                f"{graphs_after_train} after train ({'+' if new >= 0 else ''}{new})")
    return Verdict(checks, evidence)


# ----------------------------------------------------------------------------------------------------- running


def run_smoke(plan: NeuronSmokePlan) -> int:
    """Build the dataset if needed, run the steps in order (stop at the first that fails), judge the evidence."""
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.data.default import ensure_default_dataset

    dataset = Path(plan.dataset)
    if not dataset.exists():
        rc = load_config(plan.config, [])
        t0 = time.perf_counter()
        ensure_default_dataset(dataset.parent, rc.seq_len, rc.model.vocab_size)
        click.echo(f"dataset: embedded default at {dataset} ({time.perf_counter() - t0:.1f} s)")
    graphs: dict[str, int] = {"start": cache_graphs(plan.cache_dir)}
    for i, step in enumerate(plan.steps, 1):
        click.echo(f"smoke step {i}/{len(plan.steps)}: {step.name}: {step.what}", err=True)
        code = subprocess.run(step.argv, check=False).returncode
        graphs[step.name] = cache_graphs(plan.cache_dir)
        if code != 0:
            click.echo(f"smoke: FAIL (neuron): step {i} ({step.name}) exited {code}", err=True)
            return code
    scalars = read_scalars(Path(plan.run_dir), [LOSS_TAG, THROUGHPUT_TAG])
    verdict = judge([v for _, v in scalars[LOSS_TAG]], [v for _, v in scalars[THROUGHPUT_TAG]],
                    graphs["compile"], graphs["train"])
    click.echo(f"evidence: {verdict.evidence} | run dir {plan.run_dir}")
    for name, ok in verdict.checks.items():
        click.echo(f"  [{'ok' if ok else 'FAIL'}] {name}")
    click.echo(f"smoke: {'PASS' if verdict.passed else 'FAIL'} (neuron)")
    return 0 if verdict.passed else 1


def smoke_command(config: Path | None, steps: int, output_dir: Path, overrides: Sequence[str], dry_run: bool) -> int:
    """`smoke --backend neuron`: plan, then print it (--dry-run) or run it. Bad input is one line and exit 2."""
    try:
        plan = build_smoke_plan(config or SMOKE_CONFIG, steps, output_dir, overrides)
        if dry_run:
            click.echo(plan.render())
            return 0
        return run_smoke(plan)
    except ConfigError as exc:
        return report_bad_input(exc.key, exc.message)
