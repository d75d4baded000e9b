"""Head scores: which attention heads look at the previous token, which do induction.

- previous-token score of a head: mean attention weight from each query to the position just
  before it (on a fixed snippet of Python code);
- induction score: on a random byte sequence repeated twice, mean attention from each query in the
  second copy to the position just after the earlier occurrence of its byte (Olsson et al. 2022).

Both come from attention maps [site, head, query, key]; ``head_scores`` records them by running the
model with a listener on every ``*.pattern`` hook point, and the ``*_from_maps`` functions score maps
from anywhere (a recorded trace's attention weights included). A "site" is one attention module in
model order: ``layers.i.attn`` for Llama, the cross- and latent self-attentions for Perceiver AR.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

SCORE_KINDS = ("previous_token", "induction")
PATTERN_GLOB = "*pattern"

# A fixed piece of Python (not from any corpus file) for the previous-token score.
PYTHON_SNIPPET = '''import os

def read_lines(path, strip=True):
    """Return the lines of a text file."""
    with open(path) as fh:
        lines = fh.readlines()
    if strip:
        lines = [line.rstrip("\\n") for line in lines]
    return lines


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
'''


def attention_sites(model) -> list[str]:
    """Names of the model's attention-pattern hook points, in model order (rows of the score arrays)."""
    return [hp.name for hp in model.match_hook_points(PATTERN_GLOB)]


@torch.no_grad()
def attention_maps(model, tokens: torch.Tensor) -> tuple[np.ndarray, list[str]]:
    """Attention weights of one forward pass over ``tokens`` [b, t], on the absolute position grid.

    Returns (maps, site names) with maps [b, site, head, t, t] (query, key positions); entries a
    site does not compute (Perceiver AR: queries before its latents) are NaN.
    """
    captured: dict[str, torch.Tensor] = {}

    def grab(x, hp):
        captured[hp.name] = x.detach().float().cpu()

    sites = attention_sites(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with model.listening(sites, grab):
        model(tokens.to(device))
    model.train(was_training)
    b, t = tokens.shape
    n_heads = max(p.shape[1] for p in captured.values())
    maps = np.full((b, len(sites), n_heads, t, t), np.nan, dtype=np.float32)
    for s, name in enumerate(sites):
        p = captured[name].numpy()  # [b, h, tq, tk]: the last tq queries and last tk keys of the sequence
        tq, tk = p.shape[-2:]
        maps[:, s, :p.shape[1], t - tq:, t - tk:] = p
    return maps, sites


def previous_token_scores_from_maps(maps: np.ndarray) -> np.ndarray:
    """Mean attention from query q to key q-1, per (site, head); maps [..., site, head, query, key].

    Leading axes (sequences) are averaged too; NaN entries (queries not computed) are skipped.
    """
    maps = np.asarray(maps, dtype=np.float64)
    t = maps.shape[-1]
    q = np.arange(1, t)
    prev = maps[..., q, q - 1]                      # [..., site, head, t-1]
    prev = np.moveaxis(prev, (-3, -2), (0, 1)).reshape(maps.shape[-4], maps.shape[-3], -1)
    return _nanmean_rows(prev)


def induction_targets(tokens: np.ndarray) -> np.ndarray:
    """[query, key] mask of induction targets: key j+1 where tokens[j] == tokens[q] for some j < q.

    tokens [t] of one sequence; keys beyond the query are excluded.
    """
    tokens = np.asarray(tokens)
    t = tokens.size
    same = tokens[:, None] == tokens[None, :]          # [query, earlier position j]
    earlier = np.tril(same, k=-1)                      # j < q
    targets = np.zeros((t, t), dtype=bool)
    targets[:, 1:] = earlier[:, :-1]                   # key j + 1
    return targets & np.tril(np.ones((t, t), dtype=bool))


def induction_scores_from_maps(maps: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Attention mass on induction targets, averaged over queries that have one, per (site, head).

    maps [batch, site, head, query, key] (or without the batch axis); tokens [batch, t] (or [t]).
    Works on any text: queries with no earlier occurrence of their token are skipped.
    """
    maps = np.asarray(maps, dtype=np.float64)
    tokens = np.asarray(tokens)
    if maps.ndim == 4:
        maps, tokens = maps[None], tokens[None]
    per_query = []
    for b in range(maps.shape[0]):
        tgt = induction_targets(tokens[b])             # [q, k]
        rows = tgt.any(axis=1)
        mass = np.nansum(maps[b] * tgt, axis=-1)       # [site, head, q]; keys a site lacks are NaN
        absent = np.isnan(maps[b]).all(axis=-1)
        mass[absent] = np.nan
        per_query.append(mass[..., rows])
    return _nanmean_rows(np.concatenate(per_query, axis=-1))


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    counts = (~np.isnan(x)).sum(axis=-1)
    sums = np.nansum(x, axis=-1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def repeated_random_bytes(batch: int = 8, length: int = 48, seed: int = 0, bos_id: int | None = 256
                          ) -> torch.Tensor:
    """[batch, 1 + 2 * length]: bos, then ``length`` distinct printable ASCII bytes, twice."""
    gen = torch.Generator().manual_seed(seed)
    printable = torch.arange(33, 127)  # no space: keeps every byte distinct and code-like
    if length > printable.numel():
        raise ValueError(f"length {length} exceeds the {printable.numel()} distinct printable bytes")
    rows = [printable[torch.randperm(printable.numel(), generator=gen)[:length]] for _ in range(batch)]
    seq = torch.stack(rows)
    out = torch.cat([seq, seq], dim=1)
    if bos_id is not None:
        out = torch.cat([torch.full((batch, 1), bos_id), out], dim=1)
    return out


def _bos(model) -> int | None:
    return getattr(model.cfg, "bos_id", None)


def head_scores(model, kind: str) -> np.ndarray:
    """Scores [site, head] of ``kind`` ("previous_token" or "induction") for a byte-level model."""
    if kind == "previous_token":
        bos = _bos(model)
        ids = (([bos] if bos is not None else []) + list(PYTHON_SNIPPET.encode()))[:model.cfg.max_seq_len]
        maps, _ = attention_maps(model, torch.tensor([ids]))
        return previous_token_scores_from_maps(maps)
    if kind == "induction":
        tokens = repeated_random_bytes(bos_id=_bos(model))
        maps, _ = attention_maps(model, tokens)
        return induction_scores_from_maps(maps, tokens.numpy())
    raise ValueError(f"unknown head score {kind!r} (known: {', '.join(SCORE_KINDS)})")


def head_scores_from_trace(trace, kind: str, seq: int = 0, step: int | None = None) -> np.ndarray:
    """Scores [layer, head] from a recorded trace's attention maps of sequence ``seq`` (NaN: not recorded).

    trace: an ``open_trace`` reader. The induction score here uses the generated text itself (queries
    whose byte occurred earlier), so it is high only where the text repeats.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown head score {kind!r} (known: {', '.join(SCORE_KINDS)})")
    spec = trace.spec
    n = trace.queries_upto(seq, trace.n_steps - 1 if step is None else step)
    maps = np.full((spec.n_layers, spec.n_heads, n, n), np.nan, dtype=np.float32)
    for layer in spec.attention_layers:
        for head in spec.attention_heads:
            maps[layer, head] = np.asarray(trace.attention_map(seq, layer, head, step))[:n, :n]
    if kind == "previous_token":
        return previous_token_scores_from_maps(maps)
    return induction_scores_from_maps(maps, trace.token_ids(seq, step)[:n])


def best_head(scores: np.ndarray) -> dict:
    """The (layer, head) with the highest score; "layer" is the row (attention site) index."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    layer, head = np.unravel_index(int(np.argmax(s)), s.shape)
    return {"layer": int(layer), "head": int(head), "score": round(float(scores[layer, head]), 4)}


def best_heads_summary(scores: dict[str, np.ndarray]) -> dict[str, dict]:
    return {kind: best_head(s) for kind, s in scores.items()}


def format_head_scores(scores: np.ndarray, kind: str, sites: list[str] | None = None) -> str:
    """A table of scores, one row per site, one column per head, best head marked with *."""
    best = best_head(scores)
    labels = sites or [f"layer {i}" for i in range(scores.shape[0])]
    width = max(len(x) for x in labels)
    lines = [f"{kind.replace('_', '-')} scores (best: row {best['layer']} head {best['head']} = {best['score']:.3f})",
             " " * width + "".join(f"{h:>7}" for h in range(scores.shape[1]))]
    for i, label in enumerate(labels):
        cells = []
        for h in range(scores.shape[1]):
            v = scores[i, h]
            mark = "*" if (i, h) == (best["layer"], best["head"]) else " "
            cells.append(f"{'—' if np.isnan(v) else f'{v:.3f}':>6}{mark}")
        lines.append(f"{label:>{width}}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m workbench.analysis [MODEL_DIR]``: print both score tables of a checkpoint."""
    from workbench.runtime.session import DEFAULT_MODEL, load_model
    argv = sys.argv[1:] if argv is None else argv
    model, _ = load_model(Path(argv[0]) if argv else DEFAULT_MODEL, torch.device("cpu"))
    sites = attention_sites(model)
    for kind in SCORE_KINDS:
        print(format_head_scores(head_scores(model, kind), kind, sites))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
