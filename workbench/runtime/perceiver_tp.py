"""Tensor parallelism for the Perceiver models: the same Megatron split as workbench/runtime/tp.py.

Every cross-attention and latent self-attention keeps this rank's query and key/value heads
(q/k/v column-parallel, o_proj row-parallel); every MLP keeps its columns (gate/up column-parallel,
down row-parallel); every ``ResidualNorm`` unit gets tp.py's collective. Repeats that share weights
share ``nn.Linear`` modules, so each module is sliced once while every attention module (one per
repeat, each with its own hook points) learns its local head counts. Embeddings, latents, norms
and heads stay replicated, so every rank ends with the same logits.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from workbench.models.llama import MLP, Attention, ResidualNorm
from workbench.models.perceiver import CrossAttention, PerceiverCore
from workbench.runtime import tp


def shard_perceiver(model: PerceiverCore, rank: int, world: int, group: dist.ProcessGroup | None = None,
                    algorithm: str = "allreduce") -> PerceiverCore:
    """Shard a built Perceiver / Perceiver AR in place for rank ``rank`` of ``world``.

    Args:
        model: a full (unsharded) model; every rank must hold the same weights.
        rank, world: this process's rank in ``group`` and the group's size.
        group: the process group to reduce over (None: the default group).
        algorithm: ``"allreduce"`` or ``"reduce_scatter"`` (see tp.py).
    Returns:
        the same model, holding only this rank's heads and MLP columns.
    Raises:
        WorkbenchError: heads, KV heads or d_ff do not divide by ``world``; unknown algorithm.
    """
    cfg = model.cfg
    tp.check_shardable(cfg, world)
    tp.check_algorithm(algorithm)
    hd = cfg.head_dim
    q, kv, ff = (tp.head_range(n, rank, world) for n in (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff))
    done: set[int] = set()

    def once(lin: nn.Linear, cut, *args) -> None:  # a Linear shared between repeats is cut once
        if id(lin) not in done:
            done.add(id(lin))
            cut(lin, *args)

    for m in model.modules():
        if isinstance(m, (CrossAttention, Attention)):
            once(m.q_proj, tp._keep_rows, q.start * hd, q.stop * hd)
            once(m.k_proj, tp._keep_rows, kv.start * hd, kv.stop * hd)
            once(m.v_proj, tp._keep_rows, kv.start * hd, kv.stop * hd)
            once(m.o_proj, tp._keep_cols, q.start * hd, q.stop * hd, rank)
            m.n_heads, m.n_kv_heads = len(q), len(kv)
        elif isinstance(m, MLP):
            once(m.gate_proj, tp._keep_rows, ff.start, ff.stop)
            once(m.up_proj, tp._keep_rows, ff.start, ff.stop)
            once(m.down_proj, tp._keep_cols, ff.start, ff.stop, rank)
    model.info.rank, model.info.world = rank, world
    install_perceiver_collective(model, algorithm, rank, world, group)
    return model


def install_perceiver_collective(model: PerceiverCore, algorithm: str, rank: int, world: int,
                                 group: dist.ProcessGroup | None = None) -> None:
    """Put the ``algorithm`` collective into every ResidualNorm unit (cross and latent, every repeat)."""
    tp.check_algorithm(algorithm)
    cls = tp.AllReduceNorm if algorithm == "allreduce" else tp.ReduceScatterNorm
    collective = cls(rank, world, group)
    for m in model.modules():
        if isinstance(m, ResidualNorm):
            m.collective = collective
    model.info.extra["tp_algorithm"] = algorithm
