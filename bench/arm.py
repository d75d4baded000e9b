"""What ARM costs per decode step, measured in one run.

1. The MLP forward of one layer on a decode-sized input ([batch, 1, d_model], d_ff 1408) with and
   without ARM, and ARM alone on act(gate(x)) [batch, 1, 1408].
2. The whole decode step of a ~20M-parameter Llama (6 layers) with ARM off and on layer 0.
Interleaved repeats, best of each, so the ratios are fair on a shared, noisy machine.
Usage: .venv/bin/python bench/arm.py [--repeats 10] [--iters 50] [--new-tokens 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from workbench.models.arm import ARM, ARMConfig, apply_arm
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime.generate import generate


def per_call(fn, x, iters: int) -> float:
    for _ in range(10):
        fn(x)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t0) / iters


def decode_step_seconds(model, prompts, new_tokens: int) -> float:
    res = generate(model, prompts, new_tokens)
    return statistics.median(res.step_seconds[1:])


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, d_model=512, d_ff=1408, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=1024)
    model = Llama(cfg).eval()
    mlp = model.layers[0].mlp
    arm = ARM(ARMConfig(), layer=0, seed=0, d_ff=cfg.d_ff)
    print(f"d_model {cfg.d_model}, d_ff {cfg.d_ff}, float32, {torch.get_num_threads()} threads, "
          f"best of {args.repeats} x {args.iters} calls, load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5} {'MLP us':>8} {'MLP+ARM us':>11} {'ARM alone us':>13} {'ratio':>6}")
    for batch in (1, 8):
        x = torch.randn(batch, 1, cfg.d_model)
        a = mlp.act_fn(mlp.gate_proj(x))
        best = {"off": float("inf"), "on": float("inf"), "arm": float("inf")}
        for _ in range(args.repeats):
            mlp.redistribute = None
            best["off"] = min(best["off"], per_call(mlp, x, args.iters))
            mlp.redistribute = arm
            best["on"] = min(best["on"], per_call(mlp, x, args.iters))
            best["arm"] = min(best["arm"], per_call(arm, a, args.iters))
        mlp.redistribute = None
        print(f"{batch:>5} {best['off'] * 1e6:>8.1f} {best['on'] * 1e6:>11.1f} {best['arm'] * 1e6:>13.1f} "
              f"{best['on'] / best['off']:>6.2f}")

    print(f"\nwhole decode step ({cfg.n_layers} layers, prompt {args.prompt_len} tokens, "
          f"median of {args.new_tokens - 1} steps, best of {args.repeats}; ARM on layer 0)")
    print(f"{'batch':>5} {'off ms':>8} {'ARM ms':>8} {'ratio':>6}")
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, 256, (batch, args.prompt_len), generator=g).tolist()
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(args.repeats):
            for layer in model.layers:
                layer.mlp.redistribute = None
            best["off"] = min(best["off"], decode_step_seconds(model, prompts, args.new_tokens))
            apply_arm(model, ARMConfig(), seed=0)
            best["on"] = min(best["on"], decode_step_seconds(model, prompts, args.new_tokens))
        print(f"{batch:>5} {best['off'] * 1e3:>8.2f} {best['on'] * 1e3:>8.2f} {best['on'] / best['off']:>6.2f}")


if __name__ == "__main__":
    main()
