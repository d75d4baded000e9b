"""Decode tokens per second: workbench vs transformers `generate` on the same weights.

A ~20M-parameter Llama config, greedy, batch 1 and batch 8, measured in one run (interleaved
repeats, best of each) so the ratio is fair on a shared, noisy machine.
Usage: .venv/bin/python bench/decode.py [--new-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

from workbench.runtime.checkpoint import load_llama
from workbench.runtime.generate import generate


def hf_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=259, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                    tie_word_embeddings=False, attn_implementation="sdpa")


def time_workbench(model, prompts, new_tokens) -> float:
    res = generate(model, prompts, new_tokens)
    return res.decode_tokens_per_second


def time_hf(model, prompts, new_tokens) -> float:
    # Same prompt length for all rows (no padding effects); decode rate = (new-1) steps after prefill.
    x = torch.tensor(prompts)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return (new_tokens - 1) * len(prompts) / max(total - prefill, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config()).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_llama(d)
    print(f"model: {n_params / 1e6:.1f}M parameters, float32, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'workbench tok/s':>16} {'transformers tok/s':>19} {'ratio':>6}")
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, 256, (batch, args.prompt_len), generator=g).tolist()
        time_workbench(ours, prompts, 4)  # warm-up both
        time_hf(hf, prompts, 4)
        ours_best = hf_best = 0.0
        for _ in range(args.repeats):
            ours_best = max(ours_best, time_workbench(ours, prompts, args.new_tokens))
            hf_best = max(hf_best, time_hf(hf, prompts, args.new_tokens))
        print(f"{batch:>5} {ours_best:>16.1f} {hf_best:>19.1f} {ours_best / hf_best:>6.2f}")


if __name__ == "__main__":
    main()
