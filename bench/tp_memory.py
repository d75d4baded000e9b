"""Host memory of one tensor-parallel rank's loading: whole checkpoint then shard, vs. its slices only.

A random Llama of a few hundred MB (one safetensors file, float32 or ``--checkpoint-dtype
bfloat16``; loaded as float32, the loader's default) is saved to a temporary directory. Each way then loads rank 0 of ``--world`` in a fresh process (so each peak is its own):
  * old: ``tp.shard_model(load_llama(path), 0, world)``: every tensor read whole, then sliced;
  * new: ``load_llama(path, rank=0, world=world)``: only rank 0's rows / columns of the split
    weights are read (safetensors ``get_slice``), replicated tensors whole.
Peak RSS is the process's VmHWM from /proc/self/status; "loading" is the peak minus the RSS just
before loading (imports, torch). VmHWM counts the checkpoint's pages mapped from the page cache
as well as private memory. Loading needs no process group, so none is started.
Usage: .venv/bin/python bench/tp_memory.py [--world 2] [--layers 6] [--checkpoint-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CFG = dict(vocab_size=8192, d_model=1024, n_heads=16, n_kv_heads=4, d_ff=4096, max_seq_len=512)


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(way: str, path: str, world: int) -> None:
    """Load rank 0 the given way in this (fresh) process; print one JSON line of figures."""
    import torch
    from workbench.runtime import tp
    from workbench.runtime.checkpoint import load_llama
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if way == "old":
        model = tp.shard_model(load_llama(path), 0, world)
    else:
        model = load_llama(path, rank=0, world=world)
        tp.install_collective(model, "allreduce", 0, world)
    seconds = time.perf_counter() - t0
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.layers[0].attn.n_heads == CFG["n_heads"] // world
    print(json.dumps(dict(before_kb=before, peak_kb=_status_kb("VmHWM"), after_kb=_status_kb("VmRSS"),
                          held_bytes=held, seconds=seconds, threads=torch.get_num_threads())))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--checkpoint-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--child", nargs=3, metavar=("WAY", "PATH", "WORLD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))

    import torch
    from workbench.models.config import LlamaConfig
    from workbench.models.llama import Llama
    from workbench.runtime.checkpoint import save_llama
    with tempfile.TemporaryDirectory(prefix="tp_memory_") as tmp:
        torch.manual_seed(0)
        model = Llama(LlamaConfig(n_layers=args.layers, **CFG)).to(getattr(torch, args.checkpoint_dtype))
        n_params = sum(p.numel() for p in model.parameters())
        save_llama(model, tmp)
        del model
        file_mb = (Path(tmp) / "model.safetensors").stat().st_size / 2**20
        rows = {}
        for way in ("old", "new"):
            out = subprocess.run([sys.executable, __file__, "--child", way, tmp, str(args.world)],
                                 capture_output=True, text=True, check=True)
            rows[way] = json.loads(out.stdout.strip().splitlines()[-1])

    mb = 1024.0
    print(f"model: {n_params / 1e6:.1f}M parameters, {args.checkpoint_dtype} on disk, loaded as float32, "
          f"{args.layers} layers, d_model {CFG['d_model']}, "
          f"d_ff {CFG['d_ff']}, vocab {CFG['vocab_size']}; checkpoint {file_mb:.0f} MB (one file); "
          f"rank 0 of {args.world}")
    print(f"{'way':<36} {'peak RSS MB':>11} {'loading MB':>10} {'RSS after MB':>12} {'weights held MB':>15} "
          f"{'load s':>7}")
    names = {"old": "old: whole checkpoint, then shard", "new": "new: this rank's slices only"}
    for way, r in rows.items():
        print(f"{names[way]:<36} {r['peak_kb'] / mb:>11.0f} {(r['peak_kb'] - r['before_kb']) / mb:>10.0f} "
              f"{r['after_kb'] / mb:>12.0f} {r['held_bytes'] / 2**20:>15.0f} {r['seconds']:>7.2f}")
    old, new = rows["old"], rows["new"]
    print(f"old / new: peak RSS {old['peak_kb'] / new['peak_kb']:.2f}x, loading (peak minus RSS before) "
          f"{(old['peak_kb'] - old['before_kb']) / (new['peak_kb'] - new['before_kb']):.2f}x, "
          f"load time {old['seconds'] / new['seconds']:.2f}x")


if __name__ == "__main__":
    main()
