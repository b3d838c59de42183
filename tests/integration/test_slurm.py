"""enroot/*.sbatch on a real Slurm cluster (Debian's slurm-wlm, 2 slurmd nodes) started by scripts/ci/setup_slurm.sh.

With CONTAINER=none (the same srun line without a container) what is exercised is Slurm's side: one task per node,
SLURM_* -> torchrun rendezvous across two slurmd nodes, per-node logs, exit codes, requeue, node failure and the
compile-cache node-count check. With CONTAINER=podman the same jobs run from the image's .sqsh in the pyxis+enroot-
like container (llama3_hyperpod/image/pyxis_podman.py), and no container of a job may be left when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.slurm_support import JOB_TIMEOUT, Cluster, free_ports, read_log

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

VENV = Path(sys.executable).parent.parent
# Small enough for 2 shared cores: 3 steps of 8 x 64 tokens. micro 4 so that 2 data-parallel ranks make batch 8.
TINY = ["configs/tiny_cpu.yaml", "trainer.max_steps=3", "model.encoder_seq_length=64", "data.micro_batch_size=4"]


def _slurm_logs(out: Path) -> str:
    logs = sorted((out / "slurm-logs").glob("*.log")) if (out / "slurm-logs").is_dir() else []
    return "\n".join(f"== {p.name}\n{read_log(p)[-3000:]}" for p in logs)


def job_env(out: Path, **extra: str) -> dict[str, str]:
    """The knobs of enroot/*.sbatch for a venv run on this machine, one thread per trainer process."""
    return {"CONTAINER": "none", "VENV": str(VENV), "OUTPUT_DIR": str(out), "BACKEND": "torch-cpu",
            "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_ports(1)), **extra}


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def test_two_nodes_train_like_one_node_with_the_same_global_batch(slurm: Cluster, tmp_path: Path) -> None:
    """sbatch -N2 train.sbatch: two torchrun agents (one per slurmd node, gloo across nodes) with data parallel 2
    give the same per-step losses as one node with 2 processes and the same global batch."""
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *TINY, nodes=2, log=log,
                       env=job_env(out, RUN_NAME="two-nodes"))
    batch_log = tmp_path / f"train-{job}.out"
    state, code = slurm.wait(job, batch_log)
    assert (state, code) == ("COMPLETED", "0:0"), f"{read_log(batch_log)}\n{_slurm_logs(out)}"

    node_logs = {p.name: read_log(p) for p in (out / "slurm-logs").glob(f"llama3-train-{job}-restart0-*.log")}
    assert sorted(re.sub(r".*-(node\d+)\.log", r"\1", n) for n in node_logs) == ["node0", "node1"], node_logs.keys()
    launches = sorted(re.findall(r"--nnodes (\d+) --node_rank (\d+) --master_addr (\S+)", "\n".join(
        node_logs.values())))
    assert launches == [("2", "0", "l3hp-n1"), ("2", "1", "l3hp-n1")], launches

    reference = run_cli("train", *TINY[:1], "--backend", "torch-cpu", "--output-dir", str(out),
                        "--run-name", "one-node", *TINY[1:], "trainer.devices=2",
                        env={"OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_ports(1))}, timeout=JOB_TIMEOUT)
    assert reference.returncode == 0, reference.stderr[-3000:]

    two, one = losses(out / "two-nodes"), losses(out / "one-node")
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


def test_train_refuses_a_cache_compiled_for_another_node_count(slurm: Cluster, tmp_path: Path) -> None:
    """A compile cache holds graphs for the node counts it was compiled for: a 2-node training job on a cache
    compiled for 1 node stops with one clear line before any step starts."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"compiles": [{"graph": {"layout.num_nodes": 1}}]}),
                                         encoding="utf-8")
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *TINY, nodes=2, log=log, env=job_env(out, CACHE_DIR=str(cache)))
    batch_log = tmp_path / f"train-{job}.out"
    state, code = slurm.wait(job, batch_log, timeout=60)
    text = read_log(batch_log)
    assert (state, code) == ("FAILED", "2:0"), text
    assert f"error: compile cache {cache} was compiled for 1 nodes" in text
    assert "submit with -N 1" in text
    assert not (out / "slurm-logs").exists(), "no step may start"


# ---- checkpoint, requeue and resume on Slurm -------------------------------------------------------------------

RESUME_STEPS = 24
RESUMABLE = ["configs/tiny_cpu.yaml", f"trainer.max_steps={RESUME_STEPS}", "model.encoder_seq_length=64",
             "data.micro_batch_size=4", "exp_manager.checkpoint_callback_params.every_n_train_steps=5"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def job_info(slurm: Cluster, job_id: str) -> dict[str, str]:
    out = slurm.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def wait_for_step(slurm: Cluster, job_id: str, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(steps_logged(run_dir)) < step:
        state = job_info(slurm, job_id).get("JobState", "?")
        if state in TERMINAL or time.monotonic() > deadline:
            slurm.run("scancel", job_id)
            pytest.fail(f"job {job_id} is {state} before step {step}:\n{read_log(log)}")
        time.sleep(0.2)


def wait_releasing(slurm: Cluster, job_id: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Wait for the job to end, through any requeue: Slurm itself starts a requeued job again once its begin time
    (cred_expire + 1 s, 21 s on the test cluster: scripts/ci/setup_slurm.sh) has passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(slurm, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    slurm.run("scancel", job_id)
    pytest.fail(f"job {job_id} did not end within {timeout} s; batch log:\n{read_log(log)}")


def resumed_from(out: Path, job_id: str, restart: int) -> int:
    """The step the given restart resumed from, read from its node-0 log."""
    logs = list((out / "slurm-logs").glob(f"llama3-train-{job_id}-restart{restart}-*-node0.log"))
    assert logs, f"no node-0 log of restart {restart}"
    found = re.search(r"checkpoint: resumed from \S+ \(step (\d+),", read_log(logs[0]))
    assert found, read_log(logs[0])[-3000:]
    return int(found.group(1))


def assert_every_step_once(run_dir: Path) -> None:
    assert steps_logged(run_dir) == list(range(1, RESUME_STEPS + 1))


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm: Cluster, tmp_path: Path) -> None:
    """Slurm's time-limit warning (`--signal=USR1@N`, here sent at once with `scancel --signal=USR1`) reaches every
    rank; they checkpoint at the next step boundary, the step exits 85, job.sh requeues the job and the rerun
    resumes from that checkpoint: no step lost or repeated."""
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *RESUMABLE, nodes=2, log=log,
                       env=job_env(out, RUN_NAME="time-limit"))
    batch_log = tmp_path / f"train-{job}.out"
    run = out / "time-limit"
    wait_for_step(slurm, job, run, 7, batch_log)
    seen = len(steps_logged(run))
    sent = slurm.run("scancel", "--signal=USR1", job)
    assert sent.returncode == 0, sent.stderr
    info = wait_releasing(slurm, job, batch_log)
    text = read_log(batch_log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{text}\n{_slurm_logs(out)}"
    assert info["Restarts"] == "1"
    assert "step exited 85" in text and "checkpointed (exit 85), requeueing" in text
    stop = resumed_from(out, job, 1)
    assert seen <= stop <= seen + 2, (seen, stop)  # the signal's step boundary, not the next periodic save
    assert_every_step_once(run)


def _kill_node(slurm: Cluster, node: str) -> int:
    """A node dies: its slurmd and every task process it started (found by SLURMD_NODENAME) get SIGKILL."""
    import psutil

    victims = []
    pid_file = slurm.dir / "run" / f"slurmd-{node}.pid"
    victims.append(psutil.Process(int(pid_file.read_text().strip())))
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("SLURMD_NODENAME") == node:
                victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(victims)


def test_node_failure_fails_the_job_and_the_rerun_resumes_from_the_last_checkpoint(slurm: Cluster,
                                                                                    tmp_path: Path) -> None:
    """Kill node 2 (slurmd + its trainer processes) mid-run: the step fails (node 1's ranks lose their peer) and the
    job ends. HyperPod's auto-resume then reruns it on a healthy node set; here the node comes back and the job is
    requeued. The rerun resumes from the newest complete checkpoint: metrics.jsonl holds every step exactly once."""
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *RESUMABLE, nodes=2, log=log, env=job_env(out, RUN_NAME="node-fail"))
    batch_log = tmp_path / f"train-{job}.out"
    run = out / "node-fail"
    wait_for_step(slurm, job, run, 8, batch_log)
    node = "l3hp-n2"
    try:
        assert _kill_node(slurm, node) >= 2
        checkpoint_dir = run / "checkpoints"
        info = wait_releasing(slurm, job, batch_log)
        assert info["JobState"] in {"FAILED", "NODE_FAIL", "CANCELLED"}, info
        before = [int(p.name.split("_")[1]) for p in checkpoint_dir.glob("step_*") if (p / "done").is_file()]
        assert before, "a checkpoint was saved before the failure"
        assert len(steps_logged(run)) >= max(before)
    finally:
        started = slurm.run("/usr/sbin/slurmd", "-N", node, "-f", slurm.env["SLURM_CONF"])
        assert started.returncode == 0, started.stderr
    for _ in range(60):  # the node re-registers (ReturnToService=2)
        states = slurm.run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        if re.search(rf"{node} (idle|mix|alloc)", states):
            break
        slurm.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
        time.sleep(1)
    requeued = slurm.run("scontrol", "requeue", job)  # what HyperPod's auto-resume does for the job
    assert requeued.returncode == 0, requeued.stderr
    info = wait_releasing(slurm, job, batch_log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{read_log(batch_log)}\n{_slurm_logs(out)}"
    assert resumed_from(out, job, int(info["Restarts"])) == max(before)
    assert_every_step_once(run)


# ---- the same jobs in the pyxis-like container (CONTAINER=podman) ---------------------------------------------

CONTAINER_JOB_TIMEOUT = 900


@pytest.fixture(scope="module")
def enroot_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cpu image as an enroot .sqsh, made by enroot/import.sh as a user would."""
    from tests.enroot_support import build_cpu_image, ensure_squashfs_tools, import_sh

    ensure_squashfs_tools()
    tmp = tmp_path_factory.mktemp("slurm-enroot-image")
    out = tmp / "llama3-hyperpod.sqsh"
    result = import_sh("-o", str(out), f"podman://{build_cpu_image(tmp)}")
    assert result.returncode == 0, result.stdout + result.stderr
    yield out
    out.unlink(missing_ok=True)


def container_job_env(tmp_path: Path, image: Path, **extra: str) -> tuple[dict[str, str], Path, Path]:
    """CONTAINER=podman: the pyxis srun options handed to llama3_hyperpod/image/pyxis_podman.py on each node.
    Root's jobs run as uid 1000 in the container (enroot refuses root), so the shared dirs are world-writable, as
    a user's own dirs would be writable by the user's job."""
    from tests.enroot_support import podman_env

    fsx, data = tmp_path / "fsx", tmp_path / "enroot-data"
    out = fsx / "runs"
    for path in (fsx, out, fsx / "cache"):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
    env = {**podman_env(), "CONTAINER": "podman", "IMAGE": str(image), "FSX": str(fsx), "OUTPUT_DIR": str(out),
           "CACHE_DIR": str(fsx / "cache"), "NVME": str(tmp_path / "no-nvme"), "BACKEND": "torch-cpu",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_ports(1)), "L3HP_PODMAN_DATA_PATH": str(data), **extra}
    return env, out, data


def containers_left(data: Path, job_id: str) -> list[str]:
    return sorted(str(p.relative_to(data)) for p in data.glob(f"*/pyxis_*{job_id}*")) if data.is_dir() else []


def assert_removed_on_both_nodes(text: str, job_id: str, runs: int = 1) -> None:
    for node in ("l3hp-n1", "l3hp-n2"):
        assert text.count(f"removed container pyxis_llama3-hyperpod-{job_id} on {node}") == runs, text


def test_two_nodes_in_the_pyxis_like_container_checkpoint_requeue_resume_and_leave_no_container(
        slurm: Cluster, enroot_image: Path, tmp_path: Path) -> None:
    """sbatch -N2 train.sbatch with the image's .sqsh, run on each node as pyxis + enroot would (login shell,
    /etc/environment, read-only root, uid 1000): 2 ranks across the nodes train; USR1 (the time-limit warning)
    reaches the trainer through the runner and podman, it checkpoints and exits 85, the job removes its container
    from both nodes and requeues; the rerun resumes; at the end no container of the job is left anywhere."""
    env, out, data = container_job_env(tmp_path, enroot_image, RUN_NAME="in-container")
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *RESUMABLE, nodes=2, log=log, env=env)
    batch_log = tmp_path / f"train-{job}.out"
    run = out / "in-container"
    deadline = time.monotonic() + CONTAINER_JOB_TIMEOUT
    while len(steps_logged(run)) < 7:
        state = job_info(slurm, job).get("JobState", "?")
        if state in TERMINAL or time.monotonic() > deadline:
            slurm.run("scancel", job)
            pytest.fail(f"job {job} is {state} before step 7:\n{read_log(batch_log)}\n{_slurm_logs(out)}")
        time.sleep(0.5)
    assert containers_left(data, job) == [f"l3hp-n1/pyxis_llama3-hyperpod-{job}",
                                          f"l3hp-n2/pyxis_llama3-hyperpod-{job}"]
    seen = len(steps_logged(run))
    assert slurm.run("scancel", "--signal=USR1", job).returncode == 0
    info = wait_releasing(slurm, job, batch_log, timeout=CONTAINER_JOB_TIMEOUT)
    text = read_log(batch_log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{text}\n{_slurm_logs(out)}"
    assert info["Restarts"] == "1"
    assert "step exited 85" in text and "checkpointed (exit 85), requeueing" in text
    first_run = text.split("requeueing", 1)[0]
    assert_removed_on_both_nodes(first_run, job)  # removed before the requeue, too
    assert_removed_on_both_nodes(text, job, runs=2)
    assert containers_left(data, job) == []
    stop = resumed_from(out, job, 1)
    assert seen <= stop <= seen + 2, (seen, stop)
    assert_every_step_once(run)
    node_logs = "\n".join(read_log(p) for p in (out / "slurm-logs").glob(f"llama3-train-{job}-restart0-*.log"))
    launches = sorted(re.findall(r"--nnodes (\d+) --node_rank (\d+) --master_addr (\S+)", node_logs))
    assert launches == [("2", "0", "l3hp-n1"), ("2", "1", "l3hp-n1")], launches
    assert run.stat().st_uid == 1000, "the trainer ran as the container's non-root user"
    assert "/usr/local/bin/llama3-hyperpod train" in text  # the launcher by absolute path


def test_a_failed_container_job_leaves_no_container(slurm: Cluster, enroot_image: Path, tmp_path: Path) -> None:
    env, out, data = container_job_env(tmp_path, enroot_image)
    env["PREFLIGHT"] = "0"  # the job step itself must fail here (preflight would refuse the config before it)
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *TINY, "trainer.max_steps=-1", nodes=2, log=log, env=env)
    batch_log = tmp_path / f"train-{job}.out"
    state, code = slurm.wait(job, batch_log, timeout=CONTAINER_JOB_TIMEOUT)
    text = read_log(batch_log)
    assert (state, code) == ("FAILED", "2:0"), f"{text}\n{_slurm_logs(out)}"
    assert "step exited 2" in text
    assert "error: trainer.max_steps" in _slurm_logs(out)  # the trainer's one line, from inside the container
    assert_removed_on_both_nodes(text, job)
    assert containers_left(data, job) == []


# ---- preflight: one step on every node before the job step -----------------------------------------------------


def test_preflight_runs_on_every_node_before_training(slurm: Cluster, tmp_path: Path) -> None:
    """Each node checks the plan in one srun step (the lines come back to the batch log, the reports into the run
    dir), then training starts. This cluster's nodes share one host and 127.0.0.1: node 0 says loopback (WARN)."""
    out = tmp_path / "runs"
    log = tmp_path / "train-%j.out"
    job = slurm.sbatch("enroot/train.sbatch", *TINY, nodes=2, log=log, env=job_env(out, RUN_NAME="pf-ok"))
    batch_log = tmp_path / f"train-{job}.out"
    state, code = slurm.wait(job, batch_log)
    text = read_log(batch_log)
    assert (state, code) == ("COMPLETED", "0:0"), f"{text}\n{_slurm_logs(out)}"
    verdicts = sorted(re.findall(r"preflight: PASS on (\S+) \(node (\d) of 2, torch/cpu, train\)", text))
    assert verdicts == [("l3hp-n1", "0"), ("l3hp-n2", "1")], text
    assert re.search(r"WARN  rendezvous: l3hp-n1:\d+ -> 127\.0\.0\.1 bindable, but that is loopback", text), text
    assert re.search(r"PASS  rendezvous: master l3hp-n1:\d+ \(127\.0\.0\.1\) reachable from node 1: refused", text)
    took = re.search(r"preflight: passed on 2 nodes; the step took ([\d.]+) s", text)
    assert took, text
    print(f"preflight step on 2 nodes: {took.group(1)} s")  # the time preflight adds to this job
    assert text.index("preflight: passed on 2 nodes") < text.index(f"job {job} (train, 2 nodes")
    for rank in (0, 1):
        report = json.loads((out / "pf-ok" / "preflight" / f"train-node{rank}.json").read_text(encoding="utf-8"))
        assert report["ok"] is True and report["node_rank"] == rank and report["num_nodes"] == 2
    assert (out / "slurm-logs" / f"llama3-train-{job}-preflight-restart0.log").is_file()
    assert len(losses(out / "pf-ok")) == 3


ANY_NODE = r"FAIL on l3hp-n[12] \(node [01]\): "


def _occupied_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


@pytest.mark.parametrize("case", ["taken port", "full disk", "unwritable run dir", "cache miss"])
def test_a_failing_preflight_stops_the_job_with_the_node_and_reason(slurm: Cluster, tmp_path: Path,
                                                                    case: str) -> None:
    """Each failure ends the job before its step: FAILED with exit 2, one line naming the node and the check, the
    count of failed nodes, and no training log or metric written. A taken rendezvous port fails node 0 only."""
    from tests.integration.test_preflight import tmpfs

    out, logs = tmp_path / "runs", tmp_path / "logs"
    extra: dict[str, str] = {"LOG_DIR": str(logs)}
    args = list(TINY)
    with contextlib.ExitStack() as stack:
        if case == "taken port":
            holder, port = _occupied_port()
            stack.callback(holder.close)
            extra["MASTER_PORT"] = str(port)
            expected = rf"FAIL on l3hp-n1 \(node 0\): rendezvous: l3hp-n1:{port} is taken by pid {os.getpid()} \("
            failed_nodes = 1
        elif case == "full disk":
            out = stack.enter_context(tmpfs(tmp_path / "small", "size=4m"))
            (out / "filler").write_bytes(b"\0" * (4 * 2**20 - 512 * 1024))
            expected = rf"{ANY_NODE}checkpoint space: 0\.00 GiB free on {re.escape(str(out))} \(tmpfs\)"
            failed_nodes = 2
        elif case == "unwritable run dir":
            out = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=1m"))
            expected = rf"{ANY_NODE}run dir: {re.escape(str(out))}/pf-bad is not writable: Read-only file system"
            failed_nodes = 2
        else:
            cache = tmp_path / "empty-cache"
            cache.mkdir()
            extra["CACHE_DIR"] = str(cache)
            args.append("torch_backend.compile=true")
            expected = rf"{ANY_NODE}compile cache: will MISS: the cache {re.escape(str(cache))} is empty"
            failed_nodes = 2
        env = job_env(out, RUN_NAME="pf-bad", **extra)
        log = tmp_path / "train-%j.out"
        job = slurm.sbatch("enroot/train.sbatch", *args, nodes=2, log=log, env=env)
        batch_log = tmp_path / f"train-{job}.out"
        state, code = slurm.wait(job, batch_log, timeout=120)
        text = read_log(batch_log)
        assert (state, code) == ("FAILED", "2:0"), text
        assert re.search(r"^error: preflight: " + expected, text, re.MULTILINE), text
        assert f"[{failed_nodes} of 2 nodes failed; job step not started; lines in {logs}/" in text
        assert f"job {job} (train" not in text  # the training step never started
        assert not list(logs.glob(f"llama3-train-{job}-restart0-*-node*.log"))
        assert not (out / "pf-bad" / "metrics.jsonl").exists()
