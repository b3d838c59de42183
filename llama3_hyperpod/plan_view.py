"""Render a plan for people (rich tables); `--json` prints the same data for programs.

Not the `report` command: that one plots a run's metrics (torch_backend/commands.py plot_metrics).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from llama3_hyperpod.plan import Plan


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def render_plan(plan: Plan, console: Console) -> None:
    """The plan as people read it: where it runs, the model and layout, memory, the commands, the warnings."""
    _print_header(plan, console)
    console.print(_model_table(plan))
    console.print(_memory_table(plan))
    _print_commands(plan, console)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _print_header(plan: Plan, console: Console) -> None:
    cl = plan.cluster
    console.print(f"[bold]Plan[/bold] {plan.run_name}  ({plan.config_path})")
    on = f"{plan.instance} ({plan.device})" if plan.instance else plan.device
    console.print(f"backend [bold]{plan.backend}[/bold] on {on}"
                  f"{'' if plan.accelerator_detected else ' (not on this machine)'}; run dir {plan.run_dir}",
                  markup=True, highlight=False)
    console.print(f"cluster: {cl['num_nodes']} node(s), this is node {cl['node_rank']}, master "
                  f"{cl['master_addr']}:{cl['master_port']} (from {cl['source']})")


def _model_table(plan: Plan) -> Table:
    lay, summary = plan.layout, plan.model
    t = Table(title="Model and layout", show_header=False)
    t.add_row("parameters", f"{summary['parameters'] / 1e9:.3f} B ({summary['num_layers']} layers, hidden "
              f"{summary['hidden_size']}, {summary['num_attention_heads']} heads, "
              f"{summary['num_key_value_heads']} KV heads)")
    t.add_row("parallelism", f"TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp} = {lay.world_size} ranks "
              f"({lay.devices_per_node} per node); ZeRO-1 {'on' if lay.zero1 else 'off'}, sequence parallel "
              f"{'on' if lay.sequence_parallel else 'off'}, kv_replicator {lay.kv_replicator}")
    t.add_row("per device", f"{lay.heads_per_device} attention heads, {lay.kv_heads_per_device} KV heads, "
              f"{lay.layers_per_stage} layers")
    t.add_row("batch", f"seq {summary['seq_len']}, {plan.tokens_per_step:,} tokens per step, "
              f"{lay.grad_accum_steps} accumulation step(s)")
    t.add_row("compute", f"{plan.flops_per_token / 1e9:.1f} GFLOP per token, {plan.flops_per_step / 1e15:.1f} "
              "PFLOP per step" + (f"; peak {plan.peak_flops_per_device / 1e12:.0f} TFLOP/s per device"
                                  if plan.peak_flops_per_device else ""))
    default_note = " (embedded default, built on first use)" if plan.uses_default_dataset else ""
    t.add_row("data", f"{plan.train_dir}{default_note}")
    t.add_row("compile cache", plan.compile_cache_dir)
    ck = plan.checkpoints
    if ck.get("enabled"):
        every = f"every {ck['every_n_train_steps']} steps" if ck["every_n_train_steps"] else "no step-based saves"
        t.add_row("checkpoints", f"{ck['dir']} {every}, keep {ck['keep']}, "
                  f"resume {'on' if ck['resume_if_exists'] else 'OFF'}, "
                  + ("save + requeue on SIGTERM/SIGUSR1" if ck["save_on_signal"] else "periodic saves only (NxDT)"))
        if "resume" in ck:
            t.add_row("resume", ck["resume"])
    else:
        t.add_row("checkpoints", "off")
    return t


def _memory_table(plan: Plan) -> Table:
    mem = plan.memory
    m = Table(title=f"Memory per device ({mem.precision}, recompute {mem.recompute})")
    m.add_column("part")
    m.add_column("estimate", justify="right")
    m.add_row("parameters held", f"{mem.params_per_device / 1e9:.3f} B")
    m.add_row("weights", gib(mem.weights))
    m.add_row("gradients", gib(mem.gradients))
    m.add_row(f"optimizer states{' (ZeRO-1)' if plan.layout.zero1 else ''}", gib(mem.optimizer))
    m.add_row("activations", gib(mem.activations))
    m.add_row("logits (fp32, loss)", gib(mem.logits))
    if mem.peak_phase:  # torch backends: what else is resident, and when the peak is
        m.add_row("backward working set", gib(mem.transient))
        m.add_row("process (imports, runtime)", gib(mem.baseline))
        m.add_row("allocator slack", gib(mem.allocator))
        if mem.staging:
            m.add_row("async checkpoint copy (host)", gib(mem.staging))
    verdict = "" if mem.fits is None else (" [green]fits[/green]" if mem.fits else " [red]does NOT fit[/red]")
    peak = f" (peak: {mem.peak_phase})" if mem.peak_phase else ""
    m.add_row(f"[bold]total[/bold]{peak}", f"[bold]{gib(mem.total)}[/bold] of {gib(mem.device_memory)}{verdict}")
    if not mem.peak_phase:
        m.add_row("total without ZeRO-1", gib(mem.total_without_zero1))
    return m


def _print_commands(plan: Plan, console: Console) -> None:
    """Each mode's argv and the env the launch adds or keeps; on Neuron what NxDT's orchestrator sets on top."""
    for mode, launch in plan.commands.items():
        console.print(f"[bold]{mode}[/bold] (cwd {launch.cwd}):")
        console.print("  " + " ".join(launch.argv), soft_wrap=True, markup=False, highlight=False)
        for k, v in sorted(launch.env.items()):
            replaced = f" (replaces your {launch.env_replaced[k]!r})" if k in launch.env_replaced else ""
            console.print(f"  env {k}={v}{replaced}", markup=False, highlight=False)
        for k, v in sorted(launch.env_kept.items()):
            console.print(f"  env {k}={v} (yours, kept)", markup=False, highlight=False)
    if plan.nxdt_env:
        console.print("[bold]then NxDT's orchestrator[/bold] sets, in each rank (training_orchestrator.py "
                      "process_config):")
        for k, v in sorted(plan.nxdt_env["train"].items()):
            console.print(f"  {k}={v}", markup=False, highlight=False)
    if plan.effective_neuron_cc_flags is not None:
        console.print(f"NEURON_CC_FLAGS as NxDT will have it: {plan.effective_neuron_cc_flags}", markup=False)
