"""preflight's rules on the figures they judge, the host readers on files laid out like /proc and /sys, the
network probes on real sockets, and which checks a plan gets on each backend."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from llama3_hyperpod.cluster import Accelerator
from llama3_hyperpod.plan import build_plan
from llama3_hyperpod.preflight import checks, host
from llama3_hyperpod.preflight.result import FAIL, PASS, WARN, Check, Report
from llama3_hyperpod.preflight.run import Roots, checkpoint_need, run_preflight
from tests.conftest import CONFIG_TINY

GIB = 2**30


def test_line_format_and_report_verdict() -> None:
    ok = Check("ram", PASS, "1 GiB of 2 GiB")
    bad = Check("run dir", FAIL, "/x is not writable: Read-only file system", "use a writable --output-dir")
    assert ok.line() == "PASS  ram: 1 GiB of 2 GiB"
    assert bad.line() == "FAIL  run dir: /x is not writable: Read-only file system — use a writable --output-dir"
    report = Report("n2", 1, 2, "torch", "cpu", "train", "/x", [ok, Check("c", WARN, "w"), bad, bad])
    assert not report.ok and report.exit_code == 2
    assert report.failure_line() == ("preflight: FAIL on n2 (node 1): run dir: /x is not writable: Read-only file "
                                     "system — use a writable --output-dir (+1 more failed check)")
    assert Report("n1", 0, 1, "torch", "cpu", "train", "/x", [ok]).exit_code == 0
    with pytest.raises(ValueError):
        Check("x", "OK", "y")


def test_compile_parallelism_follows_neuron_parallel_compile_default() -> None:
    """--num_parallel defaults to ceil(total RAM / 64 GiB) of the host; a smaller cgroup limit breaks that plan."""
    trn1 = 512 * GIB  # trn1.32xlarge
    assert checks.default_num_parallel(trn1) == 8
    assert checks.default_num_parallel(500 * GIB) == 8 and checks.default_num_parallel(32 * GIB) == 1
    ok = checks.check_compile_parallelism(trn1, None, None)
    assert ok.status == PASS and ok.measured == ("8 compiler processes (ceil(512.0 GiB / 64 GiB), its default) in "
                                                 "512.0 GiB: 64.0 GiB each")
    limited = checks.check_compile_parallelism(trn1, 128 * GIB, None)
    assert limited.status == FAIL and "in 128.0 GiB (cgroup limit): 16.0 GiB each" in limited.measured
    assert "2 compiler processes fit" in limited.fix
    assert checks.check_compile_parallelism(trn1, None, 16).status == FAIL  # an explicit --num_parallel 16


def test_checkpoint_count_and_space() -> None:
    assert checks.checkpoint_count(2, 25, 100) == 3  # two kept + the one being written
    assert checks.checkpoint_count(1, 200, 100) == 1  # only the final save
    assert checks.checkpoint_count(-1, 10, 100) == 11  # keep all: every save
    need = checks.CheckpointNeed(7_300_000, 12, 3, 0, True)
    space = host.DiskSpace("/x", 100 * 2**20, 2 * GIB, "/x (tmpfs)")
    full = checks.check_checkpoint_space(need, space)
    assert full.status == FAIL and full.measured.startswith("0.10 GiB free on /x (tmpfs), 0.24 GiB more needed: 3 "
                                                             "checkpoints x 7.3M parameters x 12 B")
    resumed = checks.CheckpointNeed(7_300_000, 12, 3, 2 * 7_300_000 * 12, True)  # two already on disk
    assert resumed.more == 7_300_000 * 12 and checks.check_checkpoint_space(resumed, space).status == PASS
    assert checks.check_checkpoint_space(checks.CheckpointNeed(1, 1, 1, 0, False), space).status == PASS


def test_memory_cpus_and_gpus() -> None:
    assert checks.check_ram(GIB, 8 * GIB, None, 1).status == PASS
    assert checks.check_ram(GIB, 8 * GIB, GIB // 2, 1).measured.endswith("(cgroup limit)")
    assert checks.check_ram(GIB, 8 * GIB, GIB // 2, 1).status == FAIL
    assert checks.check_ram(int(7.5 * GIB), 8 * GIB, None, 2).status == WARN
    assert checks.check_cpus(2, 1, 2).status == PASS
    assert checks.check_cpus(2, 4, 1).status == WARN
    assert checks.check_cpus(4, 2, 4).measured == "4 usable CPUs for 2 ranks x 4 threads (oversubscribed)"
    gpus = [checks.Gpu(0, 80 * GIB, 0), checks.Gpu(1, 80 * GIB, 75 * GIB)]
    assert checks.check_gpus(gpus, 1, 10 * GIB).status == PASS
    busy = checks.check_gpus(gpus, 2, 10 * GIB)
    assert busy.status == FAIL and "GPU 1 has 5.00 GiB free" in busy.measured
    assert checks.check_gpus(gpus, 4, GIB).measured == "2 GPUs, the plan needs 4 (trainer.devices)"
    assert checks.check_gpus("nvidia-smi not found", 1, GIB).status == FAIL


def test_efa_devices_and_data_and_cache_rules() -> None:
    assert checks.check_efa_devices([], 2).status == FAIL
    assert checks.check_efa_devices([f"/dev/infiniband/uverbs{i}" for i in range(8)], 4).measured.startswith("8 (")
    assert checks.check_data("/d", False, False, False, 0).measured == "/d does not exist on this node"
    assert checks.check_data("/d", False, True, True, 0).status == FAIL
    assert checks.check_data("s3://b/d", False, False, False, 0).status == WARN
    hit = checks.check_compile_cache("train", "hit", "matches", None, "/c", None, None)
    miss = checks.check_compile_cache("train", "miss", "the cache /c is empty", "about 20 s", "/c", None, None)
    assert hit.status == PASS and miss.status == FAIL and "(a miss costs about 20 s)" in miss.fix
    baked = checks.check_compile_cache("train", "miss", "empty", None, "/c", None, ("hit", "/opt/app/neuron_cache"))
    assert baked.status == PASS and "baked cache" in baked.measured
    filling = checks.check_compile_cache("compile", "miss", "empty", None, "/c", host.WriteProbe(True, "ok"), None)
    assert filling.status == PASS and "will be filled" in filling.measured
    ro = checks.check_compile_cache("compile", "miss", "empty", None, "/c", host.WriteProbe(False, "Read-only"), None)
    assert ro.status == FAIL


# -------------------------------------------------------------------------------------------------- host readers


def test_meminfo_cgroup_and_driver_readers(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       527988564 kB\nMemAvailable:   500000000 kB\nHugePages_Total: 0\n")
    assert host.meminfo(str(proc)) == {"MemTotal": 527988564 * 1024, "MemAvailable": 500000000 * 1024,
                                       "HugePages_Total": 0}
    cgroup = tmp_path / "cgroup"
    (proc / "self" / "cgroup").write_text("0::/system.slice/slurmstepd.scope/job_7/step_0\n")
    job = cgroup / "system.slice" / "slurmstepd.scope" / "job_7" / "step_0"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("137438953472\n")
    (cgroup / "memory.max").write_text("max\n")
    assert host.cgroup_memory_limit(str(proc), str(cgroup)) == 128 * GIB
    (job / "memory.max").write_text("max\n")
    assert host.cgroup_memory_limit(str(proc), str(cgroup)) is None
    (proc / "self" / "cgroup").write_text("12:memory:/slurm/uid_0/job_8\n0::/\n")
    v1 = cgroup / "memory" / "slurm" / "uid_0" / "job_8"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert host.cgroup_memory_limit(str(proc), str(cgroup)) is None
    (v1 / "memory.limit_in_bytes").write_text(str(64 * GIB))
    assert host.cgroup_memory_limit(str(proc), str(cgroup)) == 64 * GIB
    sys_root = tmp_path / "sys"
    assert host.neuron_driver_version(str(sys_root)) is None
    (sys_root / "module" / "neuron").mkdir(parents=True)
    (sys_root / "module" / "neuron" / "version").write_text("2.26.5.0\n")
    assert host.neuron_driver_version(str(sys_root)) == "2.26.5.0"
    dev = tmp_path / "dev"
    (dev / "infiniband").mkdir(parents=True)
    for name in ("uverbs1", "uverbs0", "rdma_cm"):
        (dev / "infiniband" / name).touch()
    assert host.efa_device_files(str(dev)) == [f"{dev}/infiniband/uverbs0", f"{dev}/infiniband/uverbs1"]


def test_probe_write_and_disk_space(tmp_path: Path) -> None:
    ok = host.probe_write(tmp_path / "a" / "b", "t")
    assert ok.ok and (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    blocked = host.probe_write(tmp_path / "file" / "sub", "t")
    assert not blocked.ok and "Not a directory" in blocked.detail
    space = host.disk_space(tmp_path / "not" / "yet")
    assert space.path == str(tmp_path) and space.free > 0 and space.filesystem.endswith(")")
    (tmp_path / "t" / "d").mkdir(parents=True)
    (tmp_path / "t" / "d" / "f").write_bytes(b"x" * 1000)
    (tmp_path / "t" / "g").write_bytes(b"x" * 24)
    assert host.tree_bytes(tmp_path / "t") == 1024 and host.tree_bytes(tmp_path / "missing") == 0


def test_port_probes_on_real_sockets() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        taken = host.probe_bind("127.0.0.1", port)
        assert taken.outcome == "in-use" and taken.holder is not None and "python" in taken.holder
        check = checks.check_rendezvous(taken, 0, 1, "gloo")
        assert check.status == FAIL and f"127.0.0.1:{port} is taken by pid" in check.measured
        assert host.probe_connect("127.0.0.1", port).outcome == "accepted"
    free = host.probe_bind("127.0.0.1", port)
    assert free.outcome == "bound" and checks.check_rendezvous(free, 0, 1, "gloo").status == PASS
    assert checks.check_rendezvous(free, 0, 2, "gloo").status == WARN  # loopback cannot serve other nodes
    refused = host.probe_connect("127.0.0.1", port)
    assert refused.outcome == "refused" and checks.check_rendezvous(refused, 1, 2, "gloo").status == PASS
    assert host.probe_bind("192.0.2.1", port).outcome == "not-local"  # TEST-NET-1: never this host's address
    unresolved = host.probe_connect("no-such-host.invalid", port)
    assert unresolved.outcome == "unresolved" and checks.check_rendezvous(unresolved, 1, 2, "gloo").status == FAIL


# ------------------------------------------------------------------------------------------ which checks, in order


TORCH = Accelerator("torch", "cpu", 2, 16 * GIB, True)
NEURON = Accelerator("neuron", "neuron", None, 16 * GIB, False)


def names(report: Report) -> list[str]:
    return [c.name for c in report.checks]


def test_checks_planned_per_backend_mode_and_node_count(tmp_path: Path) -> None:
    env = {"L3HP_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": "0"}
    plan = build_plan(CONFIG_TINY, [], TORCH, env, output_dir=tmp_path / "runs")
    roots = Roots(container_root=str(tmp_path))
    assert names(run_preflight(plan, "train", env, roots)) == [
        "cpus", "ram", "rendezvous", "data", "run dir", "checkpoint space", "container disk", "compile cache"]
    assert "checkpoint space" not in names(run_preflight(plan, "compile", env, roots))
    tp2 = ["trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2", "data.train_dir=/nonexistent"]
    neuron = build_plan(CONFIG_TINY, tp2, NEURON, env, output_dir=tmp_path / "runs")
    single = names(run_preflight(neuron, "compile", env, roots))
    assert single == ["neuron devices", "neuroncores free", "neuron driver", "neuron runtime", "compile parallelism",
                      "rendezvous", "data", "run dir", "container disk", "compile cache"]
    two_env = {**env, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    two = build_plan(CONFIG_TINY, [*tp2, "data.micro_batch_size=4"], NEURON, two_env, output_dir=tmp_path / "runs")
    report = run_preflight(two, "train", two_env, roots)
    assert names(report)[:6] == ["neuron devices", "neuroncores free", "neuron driver", "neuron runtime",
                                 "efa devices", "efa provider"]
    assert report.node_rank == 1 and report.num_nodes == 2
    assert report.first_failure is not None and report.first_failure.name == "neuron devices"  # no Trainium here


def test_checkpoint_need_from_the_plan(tmp_path: Path) -> None:
    plan = build_plan(CONFIG_TINY, [], TORCH, {}, output_dir=tmp_path)
    need = checkpoint_need(plan)
    assert (need.parameters, need.bytes_per_parameter, need.count) == (plan.model["parameters"], 12, 3)
    neuron = build_plan(CONFIG_TINY, ["precision.type=mixed_precision"], NEURON, {}, output_dir=tmp_path)
    assert checkpoint_need(neuron).bytes_per_parameter == 14  # bf16 weights + fp32 master weights and moments


def test_runtime_check_with_the_real_dpkg_query() -> None:
    """dpkg-query itself (Debian's, as in the Ubuntu-based neuron image): an installed package at its version passes,
    another version fails, a missing package fails, each in one line."""
    import shutil

    from llama3_hyperpod.preflight.tools import run_tool

    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg-query on this machine (CI runs on Debian, which has it)")
    installed = run_tool(["dpkg-query", "-W", "-f", "${Version}", "bash"], package="dpkg").stdout
    core = installed.split("-")[0]

    def check(pins: dict[str, str]) -> Check:
        return checks.check_neuron_runtime(
            run_tool(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *pins], package="dpkg"), pins)

    assert check({"bash": core}).status == PASS
    assert check({"bash": "0.0.1"}).measured == f"bash {installed} (pinned 0.0.1)"
    missing = check({"bash": core, "aws-neuronx-runtime-lib": "2.30.51.0"})
    assert missing.status == FAIL and missing.measured == "aws-neuronx-runtime-lib not installed in this image"


def test_missing_pins_file_warns_instead_of_guessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no versions file is shipped, the driver and runtime checks say they cannot tell (WARN)."""
    from llama3_hyperpod import sdkinfo

    monkeypatch.setattr(sdkinfo, "CHECKOUT_PINS", tmp_path / "checkout.json")
    monkeypatch.setattr(sdkinfo, "IMAGE_DIR", tmp_path)
    (tmp_path / "neuron.json").unlink(missing_ok=True)
    env = {"L3HP_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": "0"}
    tp2 = ["trainer.devices=2", "distributed_strategy.tensor_model_parallel_size=2"]
    plan = build_plan(CONFIG_TINY, tp2, NEURON, env, output_dir=tmp_path / "runs")
    found = {c.name: c for c in run_preflight(plan, "train", env, Roots(container_root=str(tmp_path))).checks}
    for name in ("neuron driver", "neuron runtime"):
        assert found[name].status == WARN
        assert found[name].measured == (f"cannot tell: the pins ({tmp_path / 'neuron.json'}) are unreadable here: "
                                        "No such file or directory")


def test_the_image_copy_of_the_pins_is_used_where_the_checkout_has_none(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In the neuron image the project runs from /opt/app without versions/: the pins baked into
    /etc/llama3-hyperpod/neuron.json (Dockerfile) are the ones checked."""
    from llama3_hyperpod import sdkinfo

    monkeypatch.setattr(sdkinfo, "CHECKOUT_PINS", tmp_path / "checkout.json")
    monkeypatch.setattr(sdkinfo, "IMAGE_DIR", tmp_path)
    (tmp_path / "neuron.json").write_text(json.dumps({"neuron_sdk": "9.9", "pip": {"neuronx-cc": "1.2.3"}}))
    assert sdkinfo.pins_file() == tmp_path / "neuron.json"
    assert sdkinfo.load_pins()["pip"]["neuronx-cc"] == "1.2.3"


def test_a_write_probe_in_a_shared_cache_dir_is_not_a_cache_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes' preflights on one shared cache dir: while one node's probe file exists, the other must still see
    an empty cache (a miss), not "a cache with files but no manifest"."""
    from llama3_hyperpod.cache.manifest import iter_cache_files
    from llama3_hyperpod.preflight.host import probe_write

    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # the probe as another node sees it
    assert probe_write(tmp_path, "cache").ok
    assert list(tmp_path.iterdir()), "the probe file should still be there"
    assert list(iter_cache_files(tmp_path)) == []
