"""Safe resume on Neuron: the newest checkpoint with NxD's `done` marker is pinned, newer incomplete ones are moved
aside (never deleted), on checkpoint trees in NxD's layout (neuron/checkpoints.py has the upstream facts)."""

from __future__ import annotations

import os
from pathlib import Path

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.neuron import checkpoints
from llama3_hyperpod.plan import Plan, build_plan
from tests.conftest import CONFIG_8B, run_cli

TAG = "llama3_8B--step={step}-consumed_samples={samples}.0.ckpt"


def nxd_checkpoint(root: Path, step: int, *, done: bool, mtime: float) -> Path:
    """One NxD checkpoint tag as NxDT writes it: markers, model and optimizer shards, user_content.pt."""
    tag = root / TAG.format(step=step, samples=step * 1024)
    for part in ("model", "optim"):
        (tag / part).mkdir(parents=True)
        (tag / part / "dp_rank_00_tp_rank_00_pp_rank_00.pt").write_bytes(os.urandom(64))
    (tag / "checkpoint").write_text("1")
    if done:
        (tag / "user_content.pt").write_bytes(b"scheduler")
        (tag / "done").write_text("1")
    for path in [tag, *tag.rglob("*")]:
        os.utime(path, (mtime, mtime))
    return tag


def tree(run_dir: Path) -> dict[str, Path]:
    ckpts = run_dir / "checkpoints"
    return {
        "old": nxd_checkpoint(ckpts, 200, done=True, mtime=1_000),
        "good": nxd_checkpoint(ckpts, 400, done=True, mtime=2_000),
        "killed": nxd_checkpoint(ckpts, 600, done=False, mtime=3_000),  # killed mid-save: the newest by mtime
    }


def plan_for(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> Plan:
    return build_plan(CONFIG_8B, [f"exp_manager.explicit_log_dir={run_dir}", *overrides],
                      detect_accelerator("neuron"), env or {})


def test_scan_sees_what_nxdt_sees(tmp_path: Path) -> None:
    made = tree(tmp_path)
    found = checkpoints.scan(tmp_path / "checkpoints")
    assert [(c.path, c.step, c.complete) for c in found] == [
        (made["old"], 200, True), (made["good"], 400, True), (made["killed"], 600, False)]
    # NxDT's own choice (newest *.ckpt by mtime, exp_manager.py:370-385) would be the broken one
    assert max(found, key=lambda c: c.mtime).path == made["killed"]


def test_train_pins_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    made = tree(tmp_path)
    plan = plan_for(tmp_path)
    assert f"exp_manager.resume_from_checkpoint='{made['good']}'" in plan.commands["train"].argv
    assert "resume_from_checkpoint" not in " ".join(plan.commands["compile"].argv)
    assert plan.checkpoints["resume_from"] == str(made["good"])
    assert plan.checkpoints["incomplete_newer"] == [str(made["killed"])]


def test_a_complete_but_older_mtime_still_wins_over_a_half_deleted_one(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    good = nxd_checkpoint(ckpts, 400, done=True, mtime=2_000)
    half_deleted = nxd_checkpoint(ckpts, 200, done=False, mtime=5_000)  # retention removed `done` first
    choice = checkpoints.choose(ckpts)
    assert choice.resume_from is not None and choice.resume_from.path == good
    assert [c.path for c in choice.incomplete_newer] == [half_deleted]


def test_no_checkpoint_no_pin_and_resume_off_no_pin(tmp_path: Path) -> None:
    assert "resume_from_checkpoint" not in " ".join(plan_for(tmp_path).commands["train"].argv)
    tree(tmp_path)
    off = plan_for(tmp_path, "exp_manager.resume_if_exists=false")
    assert "resume_from_checkpoint" not in " ".join(off.commands["train"].argv)
    assert any("resume_if_exists is false" in w for w in off.warnings)


def test_the_runs_own_checkpoint_wins_over_a_configured_starting_point(tmp_path: Path) -> None:
    made = tree(tmp_path)
    plan = plan_for(tmp_path, "exp_manager.resume_from_checkpoint=/fsx/pretrained/llama3.ckpt")
    argv = plan.commands["train"].argv
    assert argv.index(f"exp_manager.resume_from_checkpoint='{made['good']}'") > \
        argv.index("exp_manager.resume_from_checkpoint=/fsx/pretrained/llama3.ckpt")  # Hydra applies the last
    assert any("is replaced by this run's own newer checkpoint" in w for w in plan.warnings)


def test_dirpath_is_where_nxdt_saves_and_resumes(tmp_path: Path) -> None:
    made = tree(tmp_path / "elsewhere")
    plan = plan_for(tmp_path / "run",
                    f"+exp_manager.checkpoint_callback_params.dirpath={tmp_path / 'elsewhere' / 'checkpoints'}")
    assert plan.checkpoints["dir"] == str(tmp_path / "elsewhere" / "checkpoints")
    assert plan.checkpoints["resume_from"] == str(made["good"])


def test_cli_train_moves_the_killed_checkpoint_aside_and_says_where_it_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    made = tree(run_dir)
    data = tmp_path / "data"
    data.mkdir()
    result = run_cli("train", str(CONFIG_8B), "--backend", "neuron", f"exp_manager.explicit_log_dir={run_dir}",
                     f"data.train_dir={data}", env={"L3HP_SDK_PYTHON": str(tmp_path / "no-sdk" / "python"),
                                                    "L3HP_CACHE_DIR": str(tmp_path / "cache")})
    # No SDK here, so the launch itself fails (127); what must have happened before it is ours to test.
    assert result.returncode == 127, result.stderr
    assert f"resume: from {made['good']}" in result.stderr
    moved = list((run_dir / checkpoints.ASIDE_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(made["killed"].name + ".moved-")
    assert (moved[0] / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").is_file()  # moved, not deleted
    assert not made["killed"].exists() and (made["good"] / "done").is_file() and (made["old"] / "done").is_file()
    assert checkpoints.scan(run_dir / "checkpoints")[-1].path == made["good"]  # now NxDT's own rule agrees
