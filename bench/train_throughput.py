"""Training throughput of the torch backend vs a plain eager baseline (transformers + torch AdamW), one process.

Same ~58M-parameter Llama 3 shape (hidden 512, 8 layers, GQA 8/4 heads, vocab 32000), same batches
(micro batch 4 x seq 512), fp32 on CPU. Prints tokens/s and MFU of both against this machine's fp32 GEMM peak
(measured once with torch.mm), and their ratio. Best step after the first (warm-up / compile), because
the CPU may be shared with other work and the minimum is the least disturbed measurement.

    python bench/train_throughput.py [--steps 6] [--compile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama3_hyperpod.config import load_config
from llama3_hyperpod.torch_backend.data import Batches, load_train_dataset, write_token_dataset
from llama3_hyperpod.torch_backend.metrics import flops_per_token, measure_cpu_gemm_flops
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs, num_params
from llama3_hyperpod.torch_backend.train import train

ROOT = Path(__file__).resolve().parents[1]
SEQ, MICRO = 512, 4
HF: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def baseline(dataset: Any, steps: int, lr: float) -> list[float]:
    """Plain eager loop: transformers LlamaForCausalLM (SDPA attention) + torch AdamW; returns step times."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF)).train()  # transformers 5 defaults to SDPA attention
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    batches = Batches(dataset, SEQ, MICRO, dp=1, dp_rank=0, grad_accum_steps=1)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens, _ = batches.get(step, 0)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="torch.compile our trainer (cold compile adds ~1-2 min)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "model.json").write_text(json.dumps(HF))
        rng = np.random.default_rng(0)
        write_token_dataset(work / "data", rng.integers(0, HF["vocab_size"], SEQ * MICRO * (args.steps + 1)), SEQ)

        peak = measure_cpu_gemm_flops()
        with torch.device("meta"):
            meta = Llama(LlamaArgs.from_hf(HF))
        fpt = flops_per_token(
            non_embedding_params=num_params(meta, exclude_embedding=True),
            num_layers=HF["num_hidden_layers"],
            hidden_size=HF["hidden_size"],
            seq_len=SEQ,
        )
        tokens_per_step = SEQ * MICRO
        print(
            f"model {num_params(meta) / 1e6:.1f}M params | seq {SEQ} x micro batch {MICRO} | "
            f"{fpt / 1e6:.0f} MFLOP/token | peak {peak / 1e12:.3f} TFLOP/s (fp32 torch.mm, "
            f"{torch.get_num_threads()} threads)"
        )

        rc = load_config(
            ROOT / "configs" / "tiny_cpu.yaml",
            [
                f"model.model_config={work / 'model.json'}",
                f"model.encoder_seq_length={SEQ}",
                f"data.micro_batch_size={MICRO}",
                f"data.global_batch_size={MICRO}",
                f"data.train_dir={work / 'data'}",
                f"trainer.max_steps={args.steps}",
                f"torch_backend.compile={str(args.compile).lower()}",
                f"torch_backend.peak_tflops={peak / 1e12}",
            ],
        )
        ours = train(rc, work / "run", echo=False)
        ours_s = min(m.step_time_s for m in ours.history[1:])
        base_s = min(baseline(load_train_dataset(str(work / "data"), SEQ), args.steps, 1e-3)[1:])
        # The peak is re-measured after the runs and the best kept: a shared CPU can understate it at any moment.
        peak = max(peak, measure_cpu_gemm_flops())

    rows = [("torch backend" + (" (compiled)" if args.compile else " (eager)"), ours_s), ("HF eager baseline", base_s)]
    for name, seconds in rows:
        tps = tokens_per_step / seconds
        print(f"{name:<26} {seconds:7.3f} s/step  {tps:9,.0f} tok/s  MFU {100 * tps * fpt / peak:5.1f}%")
    print(f"speed ratio (ours / baseline): {base_s / ours_s:.2f}x | peak used {peak / 1e12:.3f} TFLOP/s (best of 2)")


if __name__ == "__main__":
    main()
