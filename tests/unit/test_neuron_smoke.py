"""`smoke --backend neuron` as a plan (its steps are the project's own commands; the launches they start are the
neuron plan's) and its judge on evidence files of the real formats: TensorBoard event files written by the
TensorBoard writer torch ships (NxDT logs through Lightning's TensorBoardLogger into the same format) and a compile
cache in Neuron's layout. Running it needs Trainium: not done here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llama3_hyperpod.neuron import smoke
from tests.conftest import CONFIGS


@pytest.fixture
def plan(tmp_path: Path) -> smoke.NeuronSmokePlan:
    return smoke.build_smoke_plan(CONFIGS / "tiny_neuron.yaml", 30, tmp_path / "runs", [],
                                  env={"L3HP_CACHE_DIR": str(tmp_path / "cache")}, python="/sdk/bin/python",
                                  run_name="smoke-neuron-t")


def test_the_steps_are_preflight_compile_preflight_train(plan: smoke.NeuronSmokePlan, tmp_path: Path) -> None:
    assert [(s.name, s.argv[2], s.argv[-2:]) for s in plan.steps] == [
        ("preflight", "preflight", ["--mode", "compile"]), ("compile", "compile", plan.steps[1].argv[-2:]),
        ("preflight", "preflight", ["--mode", "train"]), ("train", "train", plan.steps[3].argv[-2:])]
    dataset = str(tmp_path / "runs" / "_data" / "stdlib-py311-v8192-s256")
    common = [str(CONFIGS / "tiny_neuron.yaml"), "--backend", "neuron", "--run-name", "smoke-neuron-t",
              "--output-dir", str(tmp_path / "runs"), "trainer.max_steps=30", f"data.train_dir='{dataset}'"]
    assert plan.steps[3].argv == ["/sdk/bin/python", str(smoke.ENTRYPOINT), "train", *common]
    assert plan.dataset == dataset and plan.cache_dir == str(tmp_path / "cache")
    assert plan.run_dir == str(tmp_path / "runs" / "smoke-neuron-t")


def test_the_launches_are_nxdt_on_two_neuroncores_with_the_cache(plan: smoke.NeuronSmokePlan) -> None:
    compile_ = plan.steps[1].runs
    train = plan.steps[3].runs
    assert compile_ is not None and train is not None
    assert compile_.argv[0].endswith("/neuron_parallel_compile") and compile_.env["COMPILE"] == "1"
    assert train.argv[0].endswith("/torchrun") and train.env["COMPILE"] == "0"
    assert train.argv[1:3] == ["--nproc_per_node", "2"]
    assert "--config-name=tiny_neuron" in train.argv and "trainer.devices=2" in train.argv
    assert any(a.startswith("compiler_cache_url=") for a in train.argv)  # the runtime cache, as planned
    assert "TP 2 x PP 1 x DP 1 on 2 NeuronCores of a trn1.32xlarge, 30 steps, seq 256" in plan.layout
    text = plan.render()
    assert "which runs: cd " in text and "PASS when:" in text and text.count("\n  - ") == 4


def write_events(run_dir: Path, losses: list[float], throughputs: list[float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    for step, (loss, rate) in enumerate(zip(losses, throughputs, strict=True)):
        writer.add_scalar(smoke.LOSS_TAG, loss, step)
        writer.add_scalar(smoke.THROUGHPUT_TAG, rate, step)
        writer.add_scalar("lr", 0.001, step)
    writer.close()


def test_evidence_from_tensorboard_events_and_the_cache(tmp_path: Path) -> None:
    run = tmp_path / "run"
    falling = [9.0 - 0.15 * i for i in range(30)]
    write_events(run, falling, [0.0, *[40.0] * 29])
    write_events(run / "compile", [1.0] * 10, [1.0] * 10)  # compile-mode events (stub execution) are not evidence
    scalars = smoke.read_scalars(run, [smoke.LOSS_TAG, smoke.THROUGHPUT_TAG, "missing"])
    assert [s for s, _ in scalars[smoke.LOSS_TAG]] == list(range(30)) and scalars["missing"] == []
    losses = [v for _, v in scalars[smoke.LOSS_TAG]]
    assert losses == pytest.approx(falling)
    verdict = smoke.judge(losses, [v for _, v in scalars[smoke.THROUGHPUT_TAG]], 12, 12)
    assert verdict.passed, verdict
    assert verdict.evidence == ("loss 8.700 -> 4.950 over 30 logged steps (drop 3.750) | 40.00 sequences/s | compile "
                                "cache: 12 graphs after compile, 12 after train (+0)")


@pytest.mark.parametrize(("losses", "rates", "after_compile", "after_train", "failing"), [
    ([5.0] * 30, [1.0] * 30, 3, 3, "loss falls by >= 1.0 (first 5 vs last 5 logged steps)"),
    ([9.0, math.nan, *[1.0] * 28], [1.0] * 30, 3, 3, "loss finite"),  # (and so no measurable drop either)
    ([9.0 - 0.2 * i for i in range(30)], [0.0] * 30, 3, 3, "throughput > 0"),
    ([9.0 - 0.2 * i for i in range(30)], [1.0] * 30, 3, 5, "compile cache used (graphs after compile, none added "
                                                           "by train)"),
    ([9.0 - 0.2 * i for i in range(30)], [1.0] * 30, 0, 0, "compile cache used (graphs after compile, none added "
                                                           "by train)"),
    ([9.0, 1.0], [1.0, 1.0], 3, 3, "loss falls by >= 1.0 (first 5 vs last 5 logged steps)"),  # too few steps
])
def test_each_criterion_can_fail(losses: list[float], rates: list[float], after_compile: int, after_train: int,
                                 failing: str) -> None:
    verdict = smoke.judge(losses, rates, after_compile, after_train)
    failed = [n for n, ok in verdict.checks.items() if not ok]
    assert not verdict.passed and failed[0] == failing and len(failed) == (2 if failing == "loss finite" else 1)


def test_cache_graphs_counts_neuron_modules(tmp_path: Path) -> None:
    assert smoke.cache_graphs(str(tmp_path / "missing")) == 0 and smoke.cache_graphs("s3://bucket/cache") == 0
    for name in ("MODULE_1+abc", "MODULE_2+abc"):
        entry = tmp_path / "neuronxcc-2.23.6484.0+3b612583" / name
        entry.mkdir(parents=True)
        (entry / "model.neff").write_bytes(b"neff")
    assert smoke.cache_graphs(str(tmp_path)) == 2
