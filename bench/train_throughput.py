"""Training throughput of our model vs transformers' LlamaForCausalLM and torchtitan's Llama3Model, one process.

Same ~58M-parameter Llama 3 shape (hidden 512, 8 layers, GQA 8/4 heads, SwiGLU 1536, vocab 32000), same batches
(micro batch 4 x seq 512), fp32 on CPU, the same loop for all three: forward to the mean cross-entropy, backward,
the trainer's gradient clipping, fused AdamW. Each model brings its own loss path: ours its fused output layer +
cross-entropy (the trainer's), the peers their logits into F.cross_entropy (what their trainers do). `--compile`
compiles each model's transformer blocks one by one (what each of the three trainers does). `--vocab 128256` gives
the model Llama 3's real vocabulary (157M parameters then, 131M of them in the embedding and the output layer).

The machine is shared, so the variants run in interleaved rounds (a rotated order each round): every round measures
this machine's fp32 GEMM peak again, then runs `--steps` steps of each variant. Figures are medians over rounds with
their spread; a speed ratio is per round (the peer's seconds / ours in the same round) and is printed only when the
rounds agree within `--max-spread`; an MFU above 100% is refused; each slice records the CPU used by other processes.
Step times are wall clock; CPU-time figures (this process's user + system seconds per step) are shown beside them,
being less sensitive to other processes taking the cores. OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE
unless set), the same for every variant, so that CPU time is work rather than spinning; and glibc keeps the blocks
a step frees (`--malloc steady`, bench/measure.py steady_heap), so that no variant's large tensors are page-faulted
in again at every step, by an amount that depends on what ran before it in this process.

    bash bench/setup_torchtitan.sh      # once: torchtitan 0.3.0 into .bench/torchtitan (not the project's lock)
    python bench/train_throughput.py [--compile] [--rounds 5] [--steps 2] [--vocab 128256] [--malloc glibc] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    # Before torch loads OpenMP: threads waiting at a barrier sleep instead of spinning. On a shared machine a
    # spinning thread whose partner lost its core burns its own time slice at every parallel region: step times and
    # CPU times then measure the scheduler (measured here: 9.6 vs 5.2 CPU-s per step for the same step).
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TORCHTITAN_DIR = ROOT / ".bench" / "torchtitan"

from bench.measure import Rounds, mfu_text, ratio_text, rotated, steady_heap  # noqa: E402
from bench.measure import measured as measured_load  # noqa: E402
from llama3_hyperpod.torch_backend.data import IGNORE_INDEX  # noqa: E402
from llama3_hyperpod.torch_backend.metrics import flops_per_token, measure_cpu_gemm_flops  # noqa: E402
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs, num_params  # noqa: E402
from llama3_hyperpod.torch_backend.parallel import clip_grad_norm  # noqa: E402

SEQ, MICRO = 512, 4
TARGET = 1.1
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


class LogitsLoss(nn.Module):
    """A peer model as the loop calls it: (tokens, targets) -> mean cross-entropy of its logits in fp32."""

    def __init__(self, model: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._logits = logits

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._logits(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX)


def build_ours(compile_blocks: bool) -> nn.Module:
    model = Llama(LlamaArgs.from_hf(HF))
    model.init_weights(seed=0)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    return model


def build_transformers(compile_blocks: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF))  # transformers 5 defaults to SDPA attention
    if compile_blocks:
        for layer in model.model.layers:
            layer.compile()
    return LogitsLoss(model, lambda t: model(input_ids=t).logits)


def build_torchtitan(compile_blocks: bool) -> nn.Module:
    """torchtitan 0.3.0's Llama3Model (torchtitan/models/llama3/model.py) at our shape: fused QKV (its default for
    every Llama 3 flavor, models/llama3/__init__.py), complex RoPE without scaling, nn.RMSNorm, SwiGLU, untied
    output. Its language-model attention backends are flex and varlen (models/common/config_utils.py
    get_attention_config), which have no CPU backward; its ScaledDotProductAttention module (causal SDPA,
    models/common/attention.py) is what our model and transformers' run too, so it is plugged in directly."""
    if not TORCHTITAN_DIR.is_dir():
        sys.exit(f"torchtitan is not installed for the bench: run `bash bench/setup_torchtitan.sh` "
                 f"(it installs into {TORCHTITAN_DIR})")
    sys.path.insert(0, str(TORCHTITAN_DIR))
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
    from torchtitan.models.llama3 import Llama3Model, Llama3TransformerBlock

    linear_init = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
    norm_init = {"weight": nn.init.ones_}
    dim, heads = HF["hidden_size"], HF["num_attention_heads"]
    rope = ComplexRoPE.Config(dim=dim // heads, max_seq_len=HF["max_position_embeddings"], theta=HF["rope_theta"],
                              scaling="none")

    def norm() -> Any:
        return RMSNorm.Config(normalized_shape=dim, eps=HF["rms_norm_eps"], param_init=norm_init)

    layers = [
        Llama3TransformerBlock.Config(
            attention_norm=norm(),
            ffn_norm=norm(),
            attention=make_gqa_config(dim=dim, n_heads=heads, n_kv_heads=HF["num_key_value_heads"],
                                      wqkv_param_init=linear_init, wo_param_init=linear_init,
                                      inner_attention=ScaledDotProductAttention.Config(), fuse_qkv=True, rope=rope),
            feed_forward=make_ffn_config(dim=dim, hidden_dim=HF["intermediate_size"], w1_param_init=linear_init,
                                         w2w3_param_init=linear_init),
        )
        for _ in range(HF["num_hidden_layers"])
    ]
    config = Llama3Model.Config(
        dim=dim,
        vocab_size=HF["vocab_size"],
        tok_embeddings=Embedding.Config(num_embeddings=HF["vocab_size"], embedding_dim=dim,
                                        param_init={"weight": partial(nn.init.normal_, std=1.0)}),
        norm=norm(),
        lm_head=Linear.Config(in_features=dim, out_features=HF["vocab_size"], param_init=linear_init),
        layers=layers,
    )
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    if compile_blocks:
        for layer in model.layers.values():
            layer.compile()
    return LogitsLoss(model, model)


BUILDERS: dict[str, Callable[[bool], nn.Module]] = {
    "ours": build_ours,
    "torchtitan": build_torchtitan,
    "transformers": build_transformers,
}
LABELS = {"ours": "ours (llama3_hyperpod)", "torchtitan": "torchtitan 0.3.0 Llama3Model",
          "transformers": "transformers LlamaForCausalLM"}


class Variant:
    """A model, its optimizer and the loop's step, timed by wall clock and by this process's CPU time."""

    def __init__(self, name: str, compile_blocks: bool) -> None:
        self.name = name
        self.model = BUILDERS[name](compile_blocks).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                                     fused=True)
        self.cpu_s: list[float] = []

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        loss = self.model(tokens, targets)
        loss.backward()
        clip_grad_norm(self.model, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true", help="torch.compile every model's blocks (adds minutes)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps of each variant per round")
    p.add_argument("--variants", default="ours,torchtitan,transformers")
    p.add_argument("--max-spread", type=float, default=0.10, help="a ratio whose rounds disagree more is refused")
    p.add_argument("--vocab", type=int, default=HF["vocab_size"],
                   help=f"vocabulary size (default {HF['vocab_size']}; Llama 3's tokenizer has 128256)")
    p.add_argument("--malloc", choices=("steady", "glibc"), default="steady",
                   help="steady (default): glibc keeps freed blocks for reuse, for every variant "
                        "(bench/measure.py steady_heap); glibc: its defaults")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    kept = args.malloc == "steady" and steady_heap()  # before any model: the same heap rules for all three
    names = args.variants.split(",")
    HF["vocab_size"] = args.vocab  # read by every builder below

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, HF["vocab_size"], (MICRO, SEQ + 1), generator=gen) for _ in range(4)]
    with torch.device("meta"):
        meta = Llama(LlamaArgs.from_hf(HF))
    fpt = flops_per_token(non_embedding_params=num_params(meta, exclude_embedding=True),
                          num_layers=HF["num_hidden_layers"], hidden_size=HF["hidden_size"], seq_len=SEQ)
    tokens_per_step = SEQ * MICRO
    print(f"model {num_params(meta) / 1e6:.1f}M params, vocab {args.vocab} | seq {SEQ} x micro batch {MICRO} | "
          f"{fpt / 1e6:.0f} MFLOP/token "
          f"| fp32, {torch.get_num_threads()} threads | {'compiled blocks' if args.compile else 'eager'} | "
          f"{args.rounds} rounds x {args.steps} steps of each | malloc: "
          f"{'freed blocks kept' if kept else 'glibc defaults'}", flush=True)

    variants: dict[str, Variant] = {}
    for name in names:  # build + warm-up (and compile) each, outside the rounds
        t0 = time.perf_counter()
        variants[name] = Variant(name, args.compile)
        for i in range(2):
            b = batches[i]
            variants[name].step(b[:, :-1], b[:, 1:])
        print(f"  {name}: built and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)

    rounds = Rounds(names)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    peaks: list[float] = []
    for r in range(args.rounds):
        with measured_load() as peak_load:
            peak = measure_cpu_gemm_flops()
        peaks.append(peak)
        line = [f"round {r + 1}: peak {peak / 1e9:.0f} GFLOP/s ({peak_load.line()})"]
        for name in rotated(names, r):
            v = variants[name]
            with measured_load() as load:
                for i in range(args.steps):
                    b = batches[(r * args.steps + i) % len(batches)]
                    v.step(b[:, :-1], b[:, 1:])
            seconds = load.wall_s / args.steps
            rounds.add(name, seconds, load)
            cpu[name].append(load.own_cpu_s / args.steps)
            line.append(f"{name} {seconds:.2f} s ({load.own_cpu_s / args.steps:.2f} cpu-s, others "
                        f"{load.others_cores:.2f} cores)")
        print(" | ".join(line), flush=True)

    print(f"\nload: {rounds.load_summary()}")
    mfus: dict[str, list[float]] = {}
    for name in names:
        secs = rounds.values[name]
        mfus[name] = [tokens_per_step / s * fpt / pk for s, pk in zip(secs, peaks, strict=True)]
        tps = [tokens_per_step / s for s in secs]
        print(f"{LABELS[name]:<32} {rounds.stat(name).text('{:.2f}', ' s/step')}  "
              f"{statistics_median(tps):6,.0f} tok/s  MFU {mfu_text(mfus[name])}  "
              f"| {statistics_median(cpu[name]):.2f} cpu-s/step")
    claims: dict[str, Any] = {}
    ok = True
    for peer in names:
        if peer == "ours":
            continue
        wall = rounds.ratio(peer, "ours")
        text, claimed = ratio_text(wall, args.max_spread, TARGET)
        cpu_ratio = [a / b for a, b in zip(cpu[peer], cpu["ours"], strict=True)]
        print(f"speed-up of ours over {peer}: {text} | by CPU time {statistics_median(cpu_ratio):.2f}x "
              f"[{min(cpu_ratio):.2f}-{max(cpu_ratio):.2f}]")
        ok = ok and claimed and wall.median >= TARGET
        claims[peer] = {"wall": wall.values, "cpu": cpu_ratio, "claimed": claimed}
    if rounds.disturbed_rounds() > rounds.n_rounds() // 2:
        print(f"WARNING: the machine was too busy to measure well: {rounds.disturbed_rounds()} of "
              f"{rounds.n_rounds()} rounds had another process using more than half a core")
    if args.json:
        print(json.dumps({"compile": args.compile, "malloc": "steady" if kept else "glibc", "rounds": args.rounds,
                          "steps": args.steps, "peaks": peaks,
                          "seconds": rounds.values, "cpu_seconds": cpu, "mfu": mfus, "ratios": claims,
                          "others_cores": {n: [x.others_cores for x in rounds.loads[n]] for n in names},
                          "loadavg": {n: [x.loadavg for x in rounds.loads[n]] for n in names}}))
    return 0 if ok else 1


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else math.nan


if __name__ == "__main__":
    sys.exit(main())
