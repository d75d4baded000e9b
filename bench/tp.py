"""Tensor parallelism on this machine: decode latency at TP=1 and TP=2, and the collectives' share.

A ~24M-parameter Llama (d_model 512, 8 layers, 8 heads, 4 KV heads, d_ff 1408), random weights,
float32, greedy. TP=1 runs in this process with every core and with one thread; TP=2 runs on two gloo ranks
(one core each). Per algorithm it measures, in one run:
  * decode latency per token without listeners (the plain path);
  * the share of step time inside the All-Reduce RMSNorm collectives, from ``hook_timing``
    (a second run with a timing listener on every unit), for decode and for the prefill;
  * the ratio reduce_scatter / allreduce of both.
Usage: .venv/bin/python bench/tp.py [--new-tokens 32] [--prompt-len 64] [--repeats 2]
"""
from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.distributed as dist

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime import launch, tp
from workbench.runtime.generate import generate

CFG = dict(vocab_size=260, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1408, max_seq_len=1024)


def build() -> Llama:
    torch.manual_seed(0)  # every rank builds the same weights
    return Llama(LlamaConfig(**CFG)).eval()


def prompts(prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, prompt_len), generator=g).tolist()


def decode_latency(model, prompt, new_tokens, repeats, sampler_factory) -> float:
    """Best (over repeats) median decode step seconds."""
    best = float("inf")
    for _ in range(repeats):
        res = generate(model, prompt, new_tokens, sampler=sampler_factory())
        best = min(best, statistics.median(res.step_seconds[1:]))
    return best


def comm_share(model, prompt, new_tokens, sampler_factory) -> tuple[float, float, float]:
    """(prefill share, decode share, decode comm seconds per step) of step time in the collectives."""
    per_step: dict[int, int] = {}

    def on_timing(t, hp):
        per_step[model.info.step] = per_step.get(model.info.step, 0) + t["end_ns"] - t["start_ns"]

    with model.listening("layers.*_allreduce.timing", on_timing):
        res = generate(model, prompt, new_tokens, sampler=sampler_factory())
    steps = res.step_seconds
    decode_comm = sum(per_step[s] for s in range(1, len(steps))) / 1e9
    return per_step[0] / 1e9 / steps[0], decode_comm / sum(steps[1:]), decode_comm / (len(steps) - 1)


def rank_body(args, ctx: launch.RankContext) -> dict:
    model = build()
    tp.shard_model(model, ctx.rank, ctx.world)
    prompt = prompts(args["prompt_len"])
    factory = tp.RankZeroSampler
    out = {}
    for algorithm in tp.ALGORITHMS:
        tp.install_collective(model, algorithm, ctx.rank, ctx.world)
        generate(model, prompt, 4, sampler=factory())  # warm-up
        latency = decode_latency(model, prompt, args["new_tokens"], args["repeats"], factory)
        shares = comm_share(model, prompt, args["new_tokens"], factory)
        every = [None] * ctx.world
        dist.all_gather_object(every, (latency, *shares))
        out[algorithm] = every
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    prompt = prompts(args.prompt_len)
    print(f"model: {n_params / 1e6:.1f}M parameters, float32, batch 1, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; TP=2 one thread per rank")
    generate(model, prompt, 4)
    threads = torch.get_num_threads()
    tp1 = decode_latency(model, prompt, args.new_tokens, args.repeats, lambda: None)
    torch.set_num_threads(1)
    tp1_one = decode_latency(model, prompt, args.new_tokens, args.repeats, lambda: None)
    torch.set_num_threads(threads)
    del model
    tp2 = launch.launch(2, functools.partial(rank_body, dict(vars(args))))

    best = min(tp1, tp1_one)  # on a busy 2-core machine one thread is often the faster TP=1
    print(f"{'run':<26} {'decode ms/token':>15} {'vs best TP=1':>12} {'comm share decode':>18} "
          f"{'comm ms/step':>13} {'comm share prefill':>19}")
    print(f"{f'TP=1 ({threads} threads)':<26} {tp1 * 1e3:>15.2f} {tp1 / best:>12.2f} {'-':>18} {'-':>13} {'-':>19}")
    print(f"{'TP=1 (1 thread)':<26} {tp1_one * 1e3:>15.2f} {tp1_one / best:>12.2f} {'-':>18} {'-':>13} {'-':>19}")
    for algorithm in tp.ALGORITHMS:
        ranks = tp2[algorithm]
        lat = ranks[0][0]  # rank 0's latency; ranks step in lockstep
        share_d = max(r[2] for r in ranks)
        comm_ms = max(r[3] for r in ranks) * 1e3
        share_p = max(r[1] for r in ranks)
        print(f"{'TP=2 ' + algorithm:<26} {lat * 1e3:>15.2f} {lat / best:>12.2f} {share_d:>17.1%} "
              f"{comm_ms:>13.2f} {share_p:>18.1%}")
    ar, rs = ([max(r[i] for r in tp2[a]) for i in range(4)] for a in ("allreduce", "reduce_scatter"))
    print(f"reduce_scatter / allreduce: decode latency {rs[0] / ar[0]:.2f}x, decode comm time "
          f"{rs[3] / ar[3]:.2f}x, prefill comm share {rs[1] / ar[1]:.2f}x "
          f"(comm figures: max over ranks; shares from runs with a timing listener)")


if __name__ == "__main__":
    main()
