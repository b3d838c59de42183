"""The cache manifest: what a compile cache was compiled for (graph-shaping fields, compiler) and what it holds.

`compile` writes `<cache>/manifest.json` after filling the cache; `cache verify` and `train` compare a plan with it
before anything runs. A cache may hold several compiles (other node counts, sequence lengths): each is one record.

Which fields shape graphs (and so the cache key) differs by backend:
- torch (Inductor, per-block torch.compile, eager AdamW): shapes and layout reach the compiled blocks; the optimizer,
  LR schedule, step counts, seeds and cadences do not (tests/integration/test_cache_graph_fields.py measures this
  with Inductor's FX graph cache hit/miss counters). The CPU thread count is part of Inductor's key on CPU.
- neuron (XLA graphs of the whole step, optimizer included): shared/reference/neuron-nxdt.md lists model size,
  batch, sequence length, optimizer and its hyperparameters, precision, DP degree / node count and compiler flags.
  That cannot be measured off Trainium, so the neuron field set follows the reference (false misses over false hits).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama3_hyperpod.sdkinfo import installed_version, load_pins

if TYPE_CHECKING:
    from llama3_hyperpod.config import RunConfig
    from llama3_hyperpod.plan import Plan

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
NEURON_VERSION_PREFIX = "neuronxcc-"
# Names in a cache dir that are bookkeeping, not compiled graphs: never listed, hashed or seeded.
BOOKKEEPING = (MANIFEST_NAME, ".manifest.lock", ".seed.lock")
TEMP_MARK = ".tmp-"
# HF config keys that never reach a graph (token ids, init, provenance): left out of the model hash.
NON_GRAPH_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "use_cache", "torch_dtype", "dtype",
})
# The packages whose versions change the HLO NxDT produces (model code, lowering) beside the compiler itself.
NEURON_STACK = ("torch-neuronx", "neuronx-distributed", "neuronx-distributed-training")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def model_config_hash(hf_config: Mapping[str, Any]) -> str:
    """Hash of the effective HF config without the keys that cannot change a graph."""
    return sha256_json({k: v for k, v in hf_config.items() if k not in NON_GRAPH_HF_KEYS})


def graph_fields_from_config(rc: RunConfig, *, backend: str, device: str, threads: int | None,
                             cc_flags: str | None) -> dict[str, Any]:
    """The fields that select compiled graphs for this config (pure). Flat, dotted keys, JSON values."""
    m, lay, cfg = rc.model, rc.layout, rc.cfg
    fields: dict[str, Any] = {
        "backend": backend,
        "device": device,
        "model.config_sha256": model_config_hash(m.hf_config),
        "model.hidden_size": m.hidden_size,
        "model.intermediate_size": m.intermediate_size,
        "model.num_layers": m.num_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_key_value_heads": m.num_key_value_heads,
        "model.vocab_size": m.vocab_size,
        "model.encoder_seq_length": rc.seq_len,
        "data.micro_batch_size": rc.micro_batch_size,
        "layout.tp": lay.tp,
        "layout.pp": lay.pp,
        "layout.cp": lay.cp,
        # Conservative on torch too: DP degree and node count decide the sharding the blocks see.
        "layout.dp": lay.dp,
        "layout.num_nodes": lay.num_nodes,
        "layout.devices_per_node": lay.devices_per_node,
        "layout.zero1": lay.zero1,
        "layout.sequence_parallel": lay.sequence_parallel,
        "layout.kv_replicator": lay.kv_replicator,
        "precision.type": str(cfg.precision.type),
        "model.activations_checkpoint_granularity": cfg.model.activations_checkpoint_granularity,
    }
    if backend == "neuron":
        optim = cfg.model.optim
        fields |= {
            "compiler_flags": cc_flags or "",
            "model.activations_checkpoint_recompute": list(cfg.model.activations_checkpoint_recompute or []),
            "model.fusions.softmax": bool(cfg.model.fusions.softmax),
            "model.fusions.flash_attention": bool(cfg.model.fusions.flash_attention),
            "model.fuse_qkv": bool(cfg.model.fuse_qkv),
            "model.qkv_linear": bool(cfg.model.qkv_linear),
            "precision.master_weights": bool(cfg.precision.master_weights),
            "precision.fp32_grad_acc": bool(cfg.precision.fp32_grad_acc),
            "model.optim.name": str(optim.name),
            "model.optim.lr": float(optim.lr),
            "model.optim.betas": [float(b) for b in optim.betas],
            "model.optim.eps": float(optim.eps),
            "model.optim.weight_decay": float(optim.weight_decay),
            "trainer.gradient_clip_val": float(cfg.trainer.gradient_clip_val),
            "grad_accum_steps": rc.grad_accum_steps,
        }
    else:
        fields |= {"torch_backend.compile": bool(cfg.torch_backend.compile)}
        if device == "cpu":
            fields["cpu_threads"] = threads
    return fields


def plan_threads(plan: Plan) -> int | None:
    """OMP threads per rank the launch will have (ours or the user's): part of Inductor's CPU cache key."""
    launch = plan.commands.get("train")
    if launch is None:
        return None
    value = launch.env.get("OMP_NUM_THREADS") or launch.env_kept.get("OMP_NUM_THREADS")
    return int(value) if value and value.isdigit() else None


def graph_fields(plan: Plan) -> dict[str, Any]:
    """graph_fields_from_config for a plan. Uses `plan.graph` when the plan carries it; else re-reads its config."""
    carried = getattr(plan, "graph", None)
    if isinstance(carried, dict) and carried:
        return dict(carried)
    from llama3_hyperpod.config import load_config

    rc = load_config(plan.config_path, plan.overrides, num_nodes=plan.layout.num_nodes)
    return graph_fields_from_config(rc, backend=plan.backend, device=plan.device, threads=plan_threads(plan),
                                    cc_flags=plan.effective_neuron_cc_flags)


# ------------------------------------------------------------------------------------------------------ toolchain


def _installed(dist: str) -> str | None:
    return installed_version(dist)


def _pinned_neuron() -> dict[str, Any]:
    """The pip pins of the versions file in effect (the checkout's, or the one baked into the image)."""
    try:
        pins = load_pins().get("pip", {})
    except (OSError, ValueError):
        return {}
    return pins if isinstance(pins, dict) else {}


def toolchain(backend: str) -> dict[str, Any]:
    """The compiler (and, for Neuron, the HLO-producing stack) this machine would compile with.

    `source` says whether a version was read from the installed package or from the pinned versions file (planning
    for Trainium off Trainium); it is informative and not compared.
    """
    if backend == "neuron":
        pins = _pinned_neuron()
        installed = _installed("neuronx-cc")
        out: dict[str, Any] = {
            "compiler": "neuronx-cc",
            "compiler_version": installed or pins.get("neuronx-cc") or "unknown",
            "source": "installed" if installed else ("pinned" if pins.get("neuronx-cc") else "unknown"),
        }
        for dist in NEURON_STACK:
            out[dist] = _installed(dist) if installed else pins.get(dist)
        return out
    torch_version = _installed("torch") or "unknown"
    out = {"compiler": "inductor", "compiler_version": torch_version, "source": "installed"}
    triton = _installed("triton") or _installed("pytorch-triton")
    if triton:
        out["triton"] = triton
    return out


COMPARED_TOOLCHAIN_KEYS = ("compiler", "compiler_version", "triton", *NEURON_STACK)


def version_core(version: str) -> str:
    """'2.16.372.0+4a9b2326' -> '2.16.372.0': the cache dir adds a build hash the pip version lacks."""
    return version.split("+", 1)[0]


# ----------------------------------------------------------------------------------------------------- the listing


def is_bookkeeping(rel: Path) -> bool:
    return rel.name in BOOKKEEPING or rel.suffix == ".lock" or any(TEMP_MARK in part for part in rel.parts)


def iter_cache_files(root: Path) -> Iterator[Path]:
    """Every compiled-graph file under root (relative paths, sorted), bookkeeping and temp files left out."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if TEMP_MARK not in d)
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root)
            if not is_bookkeeping(rel):
                yield rel


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(root: Path, previous: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Path, size and sha256 of every file; hashes of files unchanged since `previous` (size, mtime) are reused."""
    known = {(f["path"], f["size"], f.get("mtime_ns")): f["sha256"] for f in previous or []}
    out = []
    for rel in iter_cache_files(root):
        st = (root / rel).stat()
        key = (rel.as_posix(), st.st_size, st.st_mtime_ns)
        sha = known.get(key) or file_sha256(root / rel)
        out.append({"path": rel.as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    return out


def layout_of(root: Path) -> str:
    """'neuron' (neuronxcc-* dirs), 'inductor' (an inductor/ dir or Inductor's own subdirs), 'empty' or 'unknown'."""
    if not root.is_dir():
        return "empty"
    names = {p.name for p in root.iterdir()}
    if any(n.startswith(NEURON_VERSION_PREFIX) for n in names):
        return "neuron"
    if "inductor" in names or names & {"fxgraph", "aotautograd", "triton"}:
        return "inductor"
    return "empty" if not names - set(BOOKKEEPING) else "unknown"


def neuron_entries(root: Path, compiler_version: str | None = None) -> list[str]:
    """`neuronxcc-<v>/MODULE_*` names, all versions or only the one given."""
    out = []
    for vdir in sorted(root.glob(f"{NEURON_VERSION_PREFIX}*")):
        if compiler_version and version_core(vdir.name[len(NEURON_VERSION_PREFIX):]) != version_core(compiler_version):
            continue
        modules = sorted(m for m in vdir.glob("MODULE_*") if m.is_dir() and TEMP_MARK not in m.name)
        out += [f"{vdir.name}/{m.name}" for m in modules]
    return out


# ---------------------------------------------------------------------------------------------------- read / write


def manifest_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none. A corrupt one raises ValueError naming the file."""
    path = manifest_path(cache_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("compiles"), list):
        raise ValueError(f"{path}: not a cache manifest (no 'compiles' list)")
    return data


@contextlib.contextmanager
def manifest_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise manifest updates (several nodes may finish compiling into one shared cache)."""
    with (cache_dir / ".manifest.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def make_record(fields: Mapping[str, Any], tools: Mapping[str, Any], root: Path, *, created: str,
                compile_seconds: float | None, config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    backend = str(fields.get("backend"))
    entries = neuron_entries(root, str(tools.get("compiler_version"))) if backend == "neuron" else []
    return {
        "key": sha256_json({"graph": fields, "toolchain": {k: tools.get(k) for k in COMPARED_TOOLCHAIN_KEYS}}),
        "backend": backend,
        "created": created,
        "compile_seconds": compile_seconds,
        "config": config_path,
        "overrides": overrides,
        "toolchain": dict(tools),
        "graph": dict(fields),
        "entries": entries,
    }


def update_manifest(root: Path, record: dict[str, Any]) -> Path:
    """Add (or replace, same key) one compile record and re-list the files, atomically and under a lock."""
    root.mkdir(parents=True, exist_ok=True)
    with manifest_lock(root):
        old = read_manifest(root) or {}
        compiles = [c for c in old.get("compiles", []) if c.get("key") != record["key"]] + [record]
        files = listing(root, old.get("files"))
        data = {
            "schema_version": SCHEMA_VERSION,
            "layout": layout_of(root),
            "updated": now_iso(),
            "compiles": compiles,
            "total_bytes": sum(f["size"] for f in files),
            "files": files,
        }
        path = manifest_path(root)
        write_json_atomic(path, data)
    return path


def write_manifest(cache_dir: str | Path, plan: Plan, *, compile_seconds: float | None = None) -> Path:
    """Record that `plan` was compiled into cache_dir (call after `compile` succeeded). Returns the manifest path."""
    if str(cache_dir).startswith("s3://"):
        raise ValueError(f"{cache_dir}: a manifest is written only into a local cache directory")
    root = Path(cache_dir)
    record = make_record(graph_fields(plan), toolchain(plan.backend), root, created=now_iso(),
                         compile_seconds=compile_seconds, config_path=plan.config_path, overrides=list(plan.overrides))
    return update_manifest(root, record)


def merge_manifest(root: Path, other: dict[str, Any]) -> None:
    """Add another manifest's records (the baked one, after seeding) without dropping this cache's own.

    Seeded copies keep size and mtime, so the other manifest's hashes are reused rather than recomputed.
    """
    with manifest_lock(root):
        old = read_manifest(root) or {}
        keys = {c.get("key") for c in old.get("compiles", [])}
        compiles = old.get("compiles", []) + [r for r in other.get("compiles", []) if r.get("key") not in keys]
        files = listing(root, [*other.get("files", []), *old.get("files", [])])
        write_json_atomic(manifest_path(root), {
            "schema_version": SCHEMA_VERSION,
            "layout": layout_of(root),
            "updated": now_iso(),
            "compiles": compiles,
            "total_bytes": sum(f["size"] for f in files),
            "files": files,
        })
