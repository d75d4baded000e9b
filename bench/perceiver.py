"""Perceiver AR decode: the cache against recomputing the whole sequence, in one run.

Prints seconds per decode step in the two cache regimes (window still growing: latent keys/values
reused; window sliding: the latent stack rebuilt from cached cross outputs) and for a full
recompute of the same sequence, and the ratios. Usage: .venv/bin/python bench/perceiver.py
"""
from __future__ import annotations

import time

import torch

from workbench.models.perceiver import PerceiverAR, PerceiverConfig


def per_step(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = PerceiverConfig(d_model=256, n_latents=64, n_heads=8, n_self_layers=4, n_repeats=1, d_ff=688,
                          max_seq_len=2048)
    m = PerceiverAR(cfg).eval()
    seq = torch.randint(0, 256, (1, 1100))
    steps = 16
    print(f"model: d_model {cfg.d_model}, {cfg.n_latents} latents, {cfg.n_self_layers} latent layers, "
          f"{cfg.n_repeats} repeat; 1 sequence; {steps} decode steps each; 1 thread")

    def decode_from(prompt_len: int) -> float:
        cache = m.make_cache(batch=1, max_len=prompt_len + steps)
        m(seq[:, :prompt_len], cache)
        return per_step(lambda i: m(seq[:, prompt_len + i:prompt_len + i + 1], cache,
                                    start_pos=torch.tensor([prompt_len + i])), steps)

    def recompute_from(prompt_len: int) -> float:
        return per_step(lambda i: m(seq[:, :prompt_len + i + 1]), steps)

    grow_c, grow_r = decode_from(16), recompute_from(16)
    print(f"window growing (positions 16..31):  cache {grow_c * 1e3:7.2f} ms/step  recompute "
          f"{grow_r * 1e3:7.2f} ms/step  ratio {grow_r / grow_c:5.2f}x")
    for M in (256, 1024):
        c, r = decode_from(M), recompute_from(M)
        print(f"window sliding (inputs ~{M:4d}):     cache {c * 1e3:7.2f} ms/step  recompute "
              f"{r * 1e3:7.2f} ms/step  ratio {r / c:5.2f}x")


if __name__ == "__main__":
    main()
