"""Peak memory of `checkpoint import` (torch backend) for the 58M bench shape, as a multiple of its fp32 size.

The shape is bench/train_throughput.py's (hidden 512, 8 layers, GQA 8/4, vocab 32000): a random-init
LlamaForCausalLM saved by transformers as fp32 safetensors in several shards. Each command runs in a fresh process
started by its own small parent, whose RUSAGE_CHILDREN ru_maxrss is then that command's peak RSS alone:
- `checkpoint import ... --dry-run`: everything but the writing (Python, torch and its DCP, Hydra, every header and
  tensor shape checked): the base a process pays whatever the model's size (torch and DCP alone are ~266 MiB);
- `checkpoint import ...`: the real import (step-0 checkpoint, digests, manifest);
- for contrast, the obvious way: safetensors' load_file of every shard, cast to fp32, one dcp.save (its base: the
  same imports without the work).
The import's own memory is its peak minus the dry run's; that is what grows with the model (8B: 32 GB in fp32), and
the target is <= 1.5x the model's fp32 size.

    python bench/import_memory.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from train_throughput import HF, SEQ  # noqa: E402  (the bench shape, one definition)

MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, code, file=sys.stderr)")
NAIVE = """
import sys, torch, torch.distributed.checkpoint as dcp
from pathlib import Path
from safetensors.torch import load_file
from llama3_hyperpod.torch_backend.model import from_hf_state_dict
state = {}
for p in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    state.update(load_file(p))
model = {k: v.float() for k, v in from_hf_state_dict(state).items()}
dcp.save({"model": model}, checkpoint_id=sys.argv[2], no_dist=True)
"""


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes of the process running argv, wall seconds); fails loudly when it fails."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    rss, code = done.stderr.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise SystemExit(f"{argv[:4]} failed ({code}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return int(rss), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = p.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = args.keep or Path(tempfile.mkdtemp(prefix="import-memory-"))
    hf = work / "hf-58m"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF))
    params = sum(t.numel() for t in model.state_dict().values())
    model.save_pretrained(hf, max_shard_size="100MB")
    del model
    fp32 = params * 4
    shards = len(list(hf.glob("*.safetensors")))
    cli = [sys.executable, str(ROOT / "entrypoint.py"), "checkpoint", "import", str(hf),
           str(ROOT / "configs" / "tiny_cpu.yaml"), f"model.model_config={hf}", f"model.encoder_seq_length={SEQ}",
           "--backend", "torch-cpu", "--output-dir", str(work / "runs"), "--run-name", "bench"]
    base, base_s = peak_rss([*cli, "--dry-run"])
    peak, import_s = peak_rss(cli)
    naive, naive_s = peak_rss([sys.executable, "-c", NAIVE, str(hf), str(work / "naive")])
    naive_base, _ = peak_rss([sys.executable, "-c", NAIVE.split("state = {}", maxsplit=1)[0]])  # its imports alone
    result = {
        "parameters": params, "fp32_bytes": fp32, "safetensors_files": shards,
        "dry_run_peak_rss": base, "import_peak_rss": peak, "import_s": round(import_s, 2),
        "import_own_rss": peak - base, "import_own_x_fp32": round((peak - base) / fp32, 3),
        "import_peak_x_fp32": round(peak / fp32, 3),
        "naive_peak_rss": naive, "naive_base_rss": naive_base,
        "naive_own_x_fp32": round((naive - naive_base) / fp32, 3), "naive_s": round(naive_s, 2),
    }
    mib = 2**20
    print(f"58M bench shape: {params / 1e6:.1f}M parameters, fp32 {fp32 / mib:.0f} MiB, {shards} safetensors files")
    print(f"  dry run (base: python, torch, hydra, checks): peak RSS {base / mib:.0f} MiB ({base_s:.1f} s)")
    print(f"  import: peak RSS {peak / mib:.0f} MiB ({import_s:.1f} s) = base + {(peak - base) / mib:.0f} MiB = "
          f"base + {result['import_own_x_fp32']:.2f}x fp32 (target <= 1.5x); {result['import_peak_x_fp32']:.2f}x "
          "fp32 with the base")
    print(f"  load_file + fp32 + dcp.save: peak RSS {naive / mib:.0f} MiB ({naive_s:.1f} s) = its imports "
          f"({naive_base / mib:.0f} MiB) + {result['naive_own_x_fp32']:.2f}x fp32")
    print(json.dumps(result))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
