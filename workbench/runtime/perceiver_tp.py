"""Tensor parallelism for the Perceiver models: the same Megatron split as workbench/runtime/tp.py.

Every cross-attention and latent self-attention keeps this rank's query and key/value heads
(q/k/v column-parallel, o_proj row-parallel); every MLP keeps its columns (gate/up column-parallel,
down row-parallel); every ``ResidualNorm`` unit gets tp.py's collective. Repeats that share weights
share ``nn.Linear`` modules, so each module is sliced once while every attention module (one per
repeat, each with its own hook points) learns its local head counts. The cutting itself is tp.py's
``shard_weights`` (one walk over the module tree serves both model families); loading a Perceiver
checkpoint for one rank (perceiver_checkpoint.load_perceiver with ``world > 1``) reads only that
rank's slices. Embeddings, latents, norms and heads stay replicated, so every rank ends with the
same logits.
"""
from __future__ import annotations

import torch.distributed as dist

from workbench.models.llama import ResidualNorm
from workbench.models.perceiver import PerceiverCore
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
    tp.check_algorithm(algorithm)
    tp.shard_weights(model, rank, world)  # a Linear shared between repeats is cut once
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
