"""A complete, realistic-looking trace written through the real TraceWriter (no model needed).

Used by dashboard tests, `bench/dashboard.py` and notebooks. Attention rows mix per-head patterns
(attention sinks, previous-token, local window, broad), the KV cache grows by one token per step,
activation histograms come from site-specific distributions, and comm/timing look like a small
tensor-parallel CPU run. With world > 1 one writer per rank runs in this process, each writing
only its heads and its rank index, exactly as the tensor-parallel runtime does.

Step convention (the runtime's): step 0 processes the prompt [0, P) and samples position P; step
s >= 1 processes position P + s - 1 and samples position P + s (if it fits).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .schema import PerceiverSpec, TraceSpec, UserArraySpec
from .stats import ActivationStats
from .writer import TraceWriter

_WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "and", "then", "it", "was", "very",
          "quiet", "in", "house", "of", "old", "tree", "river", "ran", "to", "see", "what",
          "happened", "next", "morning", "light", "came", "through", "window", "she", "he",
          "said", "nothing", "more", "than", "once", "upon", "time", "there", "lived", "small",
          "bird", "who", "sang", "every", "day", "until", "winter", "came", ".", ",", "!", "?")


def _vocab() -> list[str]:
    """Token strings: words with and without a leading space."""
    return [" " + w for w in _WORDS] + list(_WORDS)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)  # a copy: the caller's array is left alone
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


class _AttentionModel:
    """Per-(layer, head) attention recipe: sink + key content, local recency, previous token.

    Rows are built from precomputed tables: exp(content + sink) per key times a recency decay
    exp(-local * (q - k)), then a previous-token boost, a few content spikes and a normalisation,
    so a decode row of 2,000 keys costs a handful of vector passes.
    """

    def __init__(self, rng: np.random.Generator, n_layers: int, n_heads: int, n_pos: int):
        n = n_layers * n_heads
        kind = (np.arange(n) + rng.integers(0, 4)) % 4  # 0 sink, 1 previous, 2 local, 3 broad
        local = np.where(kind == 2, 1.0 / 4, 1.0 / 256) * rng.uniform(0.5, 1.5, n)
        base = rng.standard_normal((n, n_pos)) * rng.uniform(0.3, 1.5, (n, 1))
        base[:, 0] += np.where(kind == 0, 6.0, 2.0) + rng.uniform(0, 1, n)  # attention sink
        self.exp = np.exp(base - base.max(axis=1, keepdims=True)).astype(np.float32)
        distance = np.arange(n_pos - 1, -1, -1)  # decay[:, -n_k:] weights keys 0..n_k-1
        self.decay = np.exp(-local[:, None] * distance[None, :]).astype(np.float32)
        self.prev = np.exp(np.where(kind == 1, 6.0, 0.5) + rng.uniform(0, 1, n)).astype(np.float32)
        self.shape = (n_layers, n_heads)
        self.n_pos = n_pos
        self.rng = rng

    def rows(self, q: np.ndarray) -> np.ndarray:
        """Softmax rows [layers, heads, len(q), q.max() + 1] for query positions q (0 above)."""
        n_k = int(q.max()) + 1
        n = self.exp.shape[0]
        out = np.zeros((n, len(q), n_k), dtype=np.float32)
        for i, qi in enumerate(int(x) for x in q):
            row = out[:, i, : qi + 1]
            np.multiply(self.exp[:, : qi + 1], self.decay[:, self.n_pos - qi - 1:], out=row)
            if qi >= 1:
                row[:, qi - 1] *= self.prev
            spikes = self.rng.integers(0, qi + 1, 3)  # content-dependent keys of this query
            row[:, spikes] *= self.rng.uniform(1.0, 20.0, (n, 3)).astype(np.float32)
            row /= row.sum(axis=-1, keepdims=True)
        return out.reshape(*self.shape, len(q), n_k)


def write_synthetic_trace(path: str | os.PathLike, n_steps: int = 32, *, n_seq: int = 1,
                          n_layers: int = 8, n_heads: int = 8, prompt_len: int = 16,
                          world: int = 1, top_k: int = 8,
                          attention_layers: Sequence[int] | None = None,
                          attention_heads: Sequence[int] | None = None,
                          perceiver: bool = False, seed: int = 0, overwrite: bool = True,
                          finish: bool = True, flush_interval: float = 0.2,
                          attention_dtype: str = "float16", user_probe: bool = False) -> Path:
    """Write a synthetic trace with every group filled, through the real TraceWriter.

    Args:
        path: store directory.
        n_steps: steps including the prefill (max_new_tokens = n_steps - 1).
        n_seq: batch size.
        n_layers: decoder layers.
        n_heads: query heads (global).
        prompt_len: prompt positions.
        world: tensor-parallel ranks to simulate (one writer each).
        top_k: sampler candidates.
        attention_layers: recorded layers (None: all).
        attention_heads: recorded heads (None: all).
        perceiver: add a Perceiver cross-attention section.
        seed: random seed (same seed, same trace).
        overwrite: replace an existing trace at `path`.
        finish: close the writers with status "complete" (False leaves them "running").
        flush_interval: writer flush interval.
        attention_dtype: "float16" or "float32".
        user_probe: add a user probe's array (`resid_rms`: per layer and sequence, group `user`).

    Returns:
        The store path.
    """
    rng = np.random.default_rng(seed)
    vocab = _vocab()
    n_kv_heads = max(1, n_heads // 2) if n_heads % 2 == 0 else n_heads
    spec = TraceSpec.for_generation(
        prompt_len, n_steps - 1, n_seq=n_seq, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads, world=world, top_k=top_k, attention_layers=attention_layers,
        attention_heads=attention_heads, attention_dtype=attention_dtype,
        perceiver=PerceiverSpec(n_latents=16, n_inputs=64, n_repeats=2, n_heads=2 * world)
        if perceiver else None,
        user_arrays=(UserArraySpec("resid_rms", tuple(f"layers.{i}.mlp_allreduce.residual" for i in range(n_layers)),
                                   dims=("seq",), shape=(n_seq,), description="RMS of the residual stream",
                                   fn="synthetic"),) if user_probe else ())
    d_model, head_dim, block = 64 * n_heads, 64, 16
    prompt_ids = rng.integers(0, len(vocab), size=(n_seq, prompt_len))
    metadata = {
        "model_config": {"name": "synthetic", "n_layers": n_layers, "n_heads": n_heads,
                         "n_kv_heads": n_kv_heads, "d_model": d_model, "vocab_size": len(vocab)},
        "prompts": ["".join(vocab[i] for i in row) for row in prompt_ids],
        "sampler": {"temperature": 0.8, "top_k": top_k, "top_p": 1.0}, "seed": seed,
        "tp_size": world, "tp_algorithm": "allreduce", "redistribution": None,
        "checkpoint_sha256": "synthetic", "synthetic": True,
    }
    path = Path(path)
    writers = [TraceWriter(path, spec, metadata, rank=0, overwrite=overwrite,
                           flush_interval=flush_interval)]
    writers += [TraceWriter.open(path, rank=r, flush_interval=flush_interval)
                for r in range(1, world)]
    models = [_AttentionModel(rng, n_layers, n_heads, spec.max_positions) for _ in range(n_seq)]
    heads_per_rank = n_heads // world
    sites = spec.hist_sites
    scale = (1.0 + 0.15 * np.arange(n_layers))[:, None, None]
    writers[0].write_prompt(prompt_ids, [[vocab[i] for i in row] for row in prompt_ids])
    t_wall = time.time()
    for step in range(spec.max_steps):
        q0, q1 = (0, prompt_len) if step == 0 else (prompt_len + step - 1, prompt_len + step)
        q = np.arange(q0, q1)
        # attention for all heads of every sequence: [n_seq, layers, heads, n_q, n_k]
        rows = np.stack([m.rows(q) for m in models])  # float32; the writer thread casts
        # sampler
        probs = np.sort(rng.dirichlet(np.full(top_k, 0.3), size=n_seq), axis=1)[:, ::-1]
        cands = np.stack([rng.choice(len(vocab), top_k, replace=False) for _ in range(n_seq)])
        pick = np.array([rng.choice(top_k, p=p / p.sum()) for p in probs])
        chosen = cands[np.arange(n_seq), pick]
        n_q = q1 - q0
        layer_time = rng.lognormal(np.log(2e-4), 0.3, (world, n_layers, len(spec.timing_parts)))
        for rank, w in enumerate(writers):
            heads = slice(rank * heads_per_rank, (rank + 1) * heads_per_rank)
            mine = rows[:, :, heads]
            w.write_queries(step, q0, q1)
            w.write_attention(step, mine, query_start=q0)
            w.write_attention_mass(step, mine.sum(axis=(2, 3), dtype=np.float32))
            w.write_sample(step, chosen, chosen_prob=probs[np.arange(n_seq), pick],
                           candidate_ids=cands, candidate_probs=probs)
            if q1 < spec.max_positions:
                w.write_tokens(step, q1, chosen[:, None], [[vocab[c]] for c in chosen])
            kv_local = n_kv_heads // world if n_kv_heads % world == 0 else n_kv_heads
            per_token = 2 * kv_local * head_dim * 2 * n_seq
            blocks = -(-q1 // block)
            w.write_kv(step, tokens=np.full(n_layers, q1), blocks=np.full(n_layers, blocks),
                       bytes_used=np.full(n_layers, q1 * per_token),
                       bytes_reserved=np.full(n_layers, blocks * block * per_token))
            values = rng.standard_normal((n_layers, len(sites), 256)) * scale
            for si, site in enumerate(sites):
                if site.endswith("post") and site.startswith("mlp"):
                    values[:, si] = values[:, si] / (1 + np.exp(-1.702 * values[:, si]))
                elif site == "attn.out":
                    values[:, si] = rng.standard_t(3, values[:, si].shape) * 0.3
            w.write_activations(step, ActivationStats.from_values(
                values, spec.bin_edges, spec.near_zero_eps, lead_dims=2))
            t = layer_time[rank]
            comm_s = rng.lognormal(np.log(5e-5), 0.4, (n_layers, len(spec.comm_sites)))
            before = np.cumsum(t.sum(axis=1)) - t.sum(axis=1)  # layer start within the step
            # site i starts after the first i+1 timed parts of its layer
            offsets = before[:, None] + np.cumsum(t, axis=1)[:, : len(spec.comm_sites)]
            w.write_comm(step, start=offsets, seconds=comm_s,
                         nbytes=np.full(comm_s.shape, n_seq * n_q * d_model * 2))
            step_s = float(t.sum() + comm_s.sum() + 2e-4)
            w.write_timing(step, t, step_seconds=step_s, step_start=t_wall)
            if spec.perceiver is not None:
                p = spec.perceiver
                hp = p.n_heads // world
                logits = rng.standard_normal((n_seq, p.n_repeats, hp, p.n_latents, p.n_inputs))
                logits[..., -1] += 2.0  # newest input draws attention
                inputs = np.arange(q1 - p.n_inputs, q1)
                w.write_cross_attention(
                    step, _softmax(logits), input_position=np.where(inputs >= 0, inputs, -1)[None]
                    .repeat(n_seq, 0), latent_position=np.arange(q1 - p.n_latents, q1)[None]
                    .repeat(n_seq, 0).clip(-1))
            if user_probe:  # the residual is the same on every rank; it grows with depth and wobbles
                rms = (1 + np.arange(n_layers)[:, None]) * (1 + 0.1 * np.sin(step / 3 + np.arange(n_seq)))
                w.write(step, "user/resid_rms", rms.astype(np.float32))
            w.end_step(step)
        t_wall += float(layer_time.sum(axis=(1, 2)).max())
    if finish:
        for w in writers:
            w.close()
    else:
        for w in writers:
            w.abandon()
    return path
