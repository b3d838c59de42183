"""`entrypoint.py preflight` for real on this node (torch-cpu): a passing run, and failing runs for a full disk (a
small tmpfs), an unwritable run dir, a compile cache that will miss and a taken rendezvous port, each with the right
line and exit code and nothing started. The tmpfs cases need root (CI runs as root: there they must run, not skip).
Also the neuron backend's checks as they run on a machine without Trainium, and `smoke --backend neuron --dry-run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CONFIG_TINY, REPO, run_cli

pytestmark = pytest.mark.integration

TORCH_TRAIN_CHECKS = ["cpus", "ram", "rendezvous", "data", "run dir", "checkpoint space", "container disk",
                      "compile cache"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preflight(tmp_path: Path, *args: str, out: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`preflight configs/tiny_cpu.yaml --backend torch-cpu` with its run and cache dirs under tmp_path."""
    base = {"L3HP_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": str(free_port())}
    return run_cli("preflight", str(CONFIG_TINY), "--backend", "torch-cpu", "--output-dir",
                   str(out or tmp_path / "runs"), "--run-name", "pf", *args, env={**base, **(env or {})})


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """check name -> its line, from stdout."""
    out = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition("  ")
        if status in {"PASS", "WARN", "FAIL"}:
            out[rest.split(":", 1)[0]] = line
    return out


def failure_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line naming the first failure (plus, when the run dir is what failed, the unwritten report)."""
    verdicts = [line for line in result.stderr.splitlines() if line.startswith("preflight: FAIL on ")]
    assert len(verdicts) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return verdicts[0]


def only_preflight_written(run_dir: Path) -> None:
    """Nothing started: the run dir holds the preflight report at most (no metrics, checkpoints, TensorBoard)."""
    if run_dir.exists():
        assert sorted(p.name for p in run_dir.iterdir()) in ([], ["preflight"]), list(run_dir.iterdir())


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `path` (root only: in CI, where the suite runs as root, a missing root fails)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("mounting a tmpfs needs root, and CI must run this test (it runs the suite as root)")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def test_passing_run_prints_every_check_writes_the_report_and_exits_0(tmp_path: Path) -> None:
    result = preflight(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert list(found) == TORCH_TRAIN_CHECKS
    assert all(not line.startswith("FAIL") for line in found.values()), result.stdout
    assert found["compile cache"] == "PASS  compile cache: torch_backend.compile is false: nothing is compiled"
    assert "preflight: PASS on " in result.stdout and result.stderr == ""
    report = json.loads((tmp_path / "runs" / "pf" / "preflight" / "train-node0.json").read_text())
    assert report["ok"] is True and [c["name"] for c in report["checks"]] == TORCH_TRAIN_CHECKS
    assert report["lines"] == [found[n] for n in TORCH_TRAIN_CHECKS]
    only_preflight_written(tmp_path / "runs" / "pf")
    assert not (tmp_path / "runs" / "_data").exists()  # the default dataset is built by train, not by preflight
    as_json = preflight(tmp_path, "--json")
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and data["ok"] is True
    assert [c["name"] for c in data["checks"]] == TORCH_TRAIN_CHECKS and len(data["lines"]) == len(TORCH_TRAIN_CHECKS)


def test_full_disk_fails_the_checkpoint_space_check(tmp_path: Path) -> None:
    """A 4 MiB tmpfs, nearly full: the run dir is still writable, three checkpoints of 7.3M parameters are not."""
    with tmpfs(tmp_path / "small", "size=4m") as small:
        filler = small / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):  # fill it up, then give back 256 KiB
            while True:
                f.write(b"\0" * 2**20)
        filler.write_bytes(b"\0" * (filler.stat().st_size - 256 * 1024))
        result = preflight(tmp_path, out=small / "runs")
        assert result.returncode == 2, result.stdout + result.stderr
        found = lines(result)
        assert found["run dir"].startswith("PASS")
        check = found["checkpoint space"]
        assert check.startswith(f"FAIL  checkpoint space: 0.00 GiB free on {small} (tmpfs), 0.25 GiB more needed: "
                                "3 checkpoints x 7.3M parameters x 12 B — free space there or lower "), check
        assert failure_line(result) == f"preflight: FAIL on {socket.gethostname()} (node 0): " + check[6:]
        only_preflight_written(small / "runs" / "pf")


def test_unwritable_run_dir_fails_with_the_os_reason(tmp_path: Path) -> None:
    """Read-only storage (a read-only tmpfs as root; a 0555 directory otherwise: root writes through modes)."""
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            out = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=1m"))
            reason = "Read-only file system"
        else:
            out = tmp_path / "ro"
            out.mkdir()
            out.chmod(0o555)
            stack.callback(out.chmod, 0o755)
            reason = "Permission denied"
        result = preflight(tmp_path, out=out)
        assert result.returncode == 2, result.stdout + result.stderr
        check = lines(result)["run dir"]
        assert check == (f"FAIL  run dir: {out}/pf is not writable: {reason} ({out}/pf) — use a writable "
                         "--output-dir / OUTPUT_DIR (a shared filesystem every node mounts read-write)")
        assert failure_line(result).startswith(f"preflight: FAIL on {socket.gethostname()} (node 0): {check[6:]}")
        assert f"preflight: report not written to {out}/pf/preflight/train-node0.json" in result.stderr
        assert list(out.iterdir()) == []


def test_cache_that_will_miss_fails_before_anything_compiles(tmp_path: Path) -> None:
    result = preflight(tmp_path, "torch_backend.compile=true")
    assert result.returncode == 2, result.stdout + result.stderr
    check = lines(result)["compile cache"]
    assert check == (f"FAIL  compile cache: will MISS: the cache {tmp_path / 'cache'} is empty — run `compile` with "
                     "this config and node count first (a miss costs about 20 s of Inductor C++ compilation for a "
                     "tiny model on a 2-core CPU)")
    assert failure_line(result).endswith(check[6:])
    assert list((tmp_path / "cache").iterdir()) == []  # probed for writing, nothing compiled or left behind
    only_preflight_written(tmp_path / "runs" / "pf")


def test_cache_compiled_for_another_sequence_length_names_the_field(tmp_path: Path) -> None:
    """A manifest record as `compile` writes it (cache.manifest's own functions) for seq 128: seq 256 misses."""
    from llama3_hyperpod.cache.manifest import make_record, toolchain, update_manifest
    from llama3_hyperpod.config import load_config
    from llama3_hyperpod.graphkey import graph_fields_from_config

    cache = tmp_path / "cache"
    rc = load_config(CONFIG_TINY, ["torch_backend.compile=true", "model.encoder_seq_length=128"])
    threads = str(max(1, (os.cpu_count() or 1)))
    fields = graph_fields_from_config(rc, backend="torch", device="cpu", threads=int(threads), cc_flags=None)
    update_manifest(cache, make_record(fields, toolchain("torch"), cache, created="2026-01-01T00:00:00+00:00",
                                       compile_seconds=21.0, config_path=str(CONFIG_TINY), overrides=[]))
    hit = preflight(tmp_path, "torch_backend.compile=true", "model.encoder_seq_length=128",
                    env={"OMP_NUM_THREADS": threads})
    assert lines(hit)["compile cache"].startswith("PASS  compile cache: hit: matches the compile of 2026-01-01")
    miss = preflight(tmp_path, "torch_backend.compile=true", env={"OMP_NUM_THREADS": threads})
    assert miss.returncode == 2
    assert lines(miss)["compile cache"] == (
        "FAIL  compile cache: will MISS: no compile in the cache matches this plan; closest differs in "
        "model.encoder_seq_length — run `compile` with this config and node count first (a miss costs about 21 s "
        "(measured when this model was compiled into the cache))")


def test_taken_rendezvous_port_names_its_holder(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = preflight(tmp_path, env={"MASTER_PORT": str(port)})
    assert result.returncode == 2
    check = lines(result)["rendezvous"]
    assert check.startswith(f"FAIL  rendezvous: 127.0.0.1:{port} is taken by pid {os.getpid()} (")
    assert check.endswith("— stop the stale job holding it, or set MASTER_PORT to a free port")


def test_other_nodes_check_that_the_master_answers(tmp_path: Path) -> None:
    """NODE_RANK 1 of 2 connects to the master: refused by 127.0.0.1 proves it answers; a name that does not resolve
    fails. Both say so in the rendezvous line; the rest of the checks run as on node 0."""
    two = ["trainer.num_nodes=2", "data.micro_batch_size=4"]
    ok = preflight(tmp_path, *two, env={"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"})
    assert lines(ok)["rendezvous"].startswith("PASS  rendezvous: master 127.0.0.1:")
    assert "reachable from node 1: refused in" in lines(ok)["rendezvous"]
    assert json.loads((tmp_path / "runs" / "pf" / "preflight" / "train-node1.json").read_text())["node_rank"] == 1
    bad = preflight(tmp_path, *two, env={"NODE_RANK": "1", "MASTER_ADDR": "master.invalid"})
    assert bad.returncode == 2 and lines(bad)["rendezvous"].startswith("FAIL  rendezvous: master master.invalid:")


def test_neuron_checks_on_a_machine_without_trainium(tmp_path: Path) -> None:
    """The neuron plan's checks run here for real and fail where they must: no neuron-ls, no driver, no runtime;
    2 nodes add the EFA checks; compile adds the compiler-parallelism check."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text("{}")
    args = ["preflight", str(REPO / "configs" / "tiny_neuron.yaml"), "--backend", "neuron", "--output-dir",
            str(tmp_path / "runs"), f"data.train_dir={data}"]
    env = {"L3HP_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": str(free_port())}
    result = run_cli(*args, "--mode", "compile", env=env)
    assert result.returncode == 2
    found = lines(result)
    assert list(found) == ["neuron devices", "neuroncores free", "neuron driver", "neuron runtime",
                           "compile parallelism", "rendezvous", "data", "run dir", "container disk", "compile cache"]
    assert found["neuron devices"].startswith("FAIL  neuron devices: neuron-ls not found on PATH")
    assert found["neuron driver"].startswith("FAIL  neuron driver: not loaded: /sys/module/neuron/version is missing")
    assert found["data"] == f"PASS  data: {data} (1 entries)"
    assert found["compile cache"].startswith("PASS  compile cache: ") and "will be filled" in found["compile cache"]
    assert failure_line(result).endswith(found["neuron devices"][6:] + " (+3 more failed checks)")
    two = run_cli(*args, "data.micro_batch_size=4", env={**env, "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
                                                          "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"})
    efa = lines(two)
    assert efa["efa devices"].startswith("FAIL  efa devices: no /dev/infiniband/uverbs* here, and the job has 2 nodes")
    assert efa["efa provider"].startswith("FAIL  efa provider: fi_info not found")
    assert "compile parallelism" not in efa and "checkpoint space" in efa


def test_smoke_neuron_dry_run_prints_the_tiny_nxdt_run(tmp_path: Path) -> None:
    result = run_cli("smoke", "--backend", "neuron", "--dry-run", "--output-dir", str(tmp_path / "runs"),
                     env={"L3HP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "TP 2 x PP 1 x DP 1 on 2 NeuronCores of a trn1.32xlarge, 30 steps, seq 256, mixed_precision" in text
    steps = [line.split(":", 1)[0].strip() for line in text.splitlines() if line[:5].strip().rstrip(".").isdigit()]
    assert steps == ["1. preflight", "2. compile", "3. preflight", "4. train"]
    assert "neuron_parallel_compile --parallel_compile_workdir=" in text and "COMPILE=1" in text
    assert "torchrun --nproc_per_node 2 --nnodes 1" in text and "--config-name=tiny_neuron" in text
    assert "reduced_train_loss" in text and "the training step added none" in text
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    bad = run_cli("smoke", "--backend", "torch", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --dry-run:")


def test_smoke_neuron_stops_at_preflight_here(tmp_path: Path) -> None:
    """Without --dry-run on a machine without NeuronCores, the smoke's first step (preflight) fails and nothing else
    runs: exit 2 and the step named."""
    result = run_cli("smoke", "--backend", "neuron", "--output-dir", str(tmp_path / "runs"),
                     f"data.train_dir={tmp_path}", env={"L3HP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "preflight: FAIL on " in result.stderr and "neuron devices: neuron-ls not found" in result.stderr
    assert result.stderr.rstrip().endswith("smoke: FAIL (neuron): step 1 (preflight) exited 2")
    runs = [p for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 1 and sorted(p.name for p in runs[0].iterdir()) == ["preflight"]


def test_memory_limit_of_a_real_cgroup(tmp_path: Path) -> None:
    """A child process in a memory cgroup limited to 256 MiB: the reader finds the limit that neuron_parallel_compile
    (which sizes its pool from the host's MemTotal) would not see. cgroup v2 or v1, whichever this kernel mounts."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("creating a cgroup needs root, and CI runs the suite as root")
        pytest.skip("creating a cgroup needs root")
    root = Path("/sys/fs/cgroup")
    limit = 256 * 2**20
    group = None
    if (root / "cgroup.controllers").is_file():
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        group, knob = root / f"l3hp-preflight-{os.getpid()}", "memory.max"
    elif (root / "memory").is_dir():
        group, knob = root / "memory" / f"l3hp-preflight-{os.getpid()}", "memory.limit_in_bytes"
    else:
        pytest.fail(f"no memory cgroup controller under {root}")
    group.mkdir()
    try:
        (group / knob).write_text(str(limit))
        code = ("import os; open(os.environ['PROCS'], 'w').write(str(os.getpid())); "
                "from llama3_hyperpod.preflight.host import cgroup_memory_limit; print(cgroup_memory_limit())")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PROCS": str(group / "cgroup.procs")}, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == limit
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


@pytest.mark.parametrize(("setup", "master", "figure"), [
    ("", "10.1.2.3", "Network is unreachable"),  # a network namespace with no route at all: EHOSTUNREACH/ENETUNREACH
    ("ip route add 10.8.8.0/24 dev lo", "10.8.8.2", "no answer within 5 s"),  # a route to where nothing answers
])
def test_unreachable_master_fails_the_other_nodes(tmp_path: Path, setup: str, master: str, figure: str) -> None:
    """Node 1 in its own network namespace (root: `unshare --net`), where the master cannot be reached for real."""
    import shlex
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        if os.environ.get("CI"):
            pytest.fail("this test needs root, unshare and ip (CI runs as root on Debian, which has them)")
        pytest.skip("needs root, unshare and ip")
    argv = [sys.executable, str(REPO / "entrypoint.py"), "preflight", str(CONFIG_TINY), "--backend", "torch-cpu",
            "--output-dir", str(tmp_path / "runs"), "trainer.num_nodes=2", "data.micro_batch_size=4"]
    script = f"ip link set lo up && {setup + ' && ' if setup else ''}exec {shlex.join(argv)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"NODE_RANK": "1", "MASTER_ADDR": master, "MASTER_PORT": "41000", "L3HP_CACHE_DIR": str(tmp_path / "c")}
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    check = lines(result)["rendezvous"]
    assert check.startswith(f"FAIL  rendezvous: master {master}:41000 from node 1: {figure} — open TCP to the "
                            "master's port between the nodes"), check
    assert failure_line(result).endswith(check[6:])
