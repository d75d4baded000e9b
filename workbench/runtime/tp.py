"""Tensor parallelism (Megatron style) as a transform of a built model, like gpt-fast's tp.py.

Rank r of N keeps query heads ``[r*H/N, (r+1)*H/N)``, the matching key/value heads (grouped-query:
the KV heads are split the same way, so each query head stays with its KV head) and MLP columns
``[r*d_ff/N, (r+1)*d_ff/N)``. Q, K, V, gate and up are column-parallel (rows of their weights);
o_proj and down_proj are row-parallel (columns of their weights), so each rank's attention and MLP
output is a partial sum. Each layer's two ``ResidualNorm`` units get a collective that turns the
partial sums into the residual stream and its RMSNorm:

* ``allreduce``: all-reduce the partial sums, add the residual, RMSNorm (every rank, every token).
* ``reduce_scatter``: reduce-scatter over the token dimension, add and RMSNorm on this rank's
  share of the tokens, then one all-gather of residual and normed side by side (TokenWeave-style).
  Gloo in torch 2.13 supports ``reduce_scatter_single`` / ``all_gather_single`` natively, so no
  all_to_all emulation is needed.

Embedding, final norm and LM head stay replicated, so every rank ends with the same logits.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.runtime.sampler import Sampler, SamplerConfig

ALGORITHMS = ("allreduce", "reduce_scatter")

# torch 2.13 renamed the tensor forms (the old names still work but warn).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_shardable(cfg: LlamaConfig, world: int) -> None:
    """Raise WorkbenchError unless heads, KV heads and MLP width split evenly over ``world`` ranks."""
    if world < 1:
        raise WorkbenchError(f"tensor-parallel size must be >= 1, got {world}")
    for what, n in (("attention heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                    ("MLP width (intermediate_size)", cfg.d_ff)):
        if n % world:
            raise WorkbenchError(f"cannot shard over {world} ranks: {what} {n} is not divisible by {world}")


def check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise WorkbenchError(f"unknown tensor-parallel algorithm {algorithm!r} (choose {' or '.join(ALGORITHMS)})")


def head_range(n_heads: int, rank: int, world: int) -> range:
    """The global indices of the heads (or MLP columns) rank ``rank`` owns."""
    per = n_heads // world
    return range(rank * per, (rank + 1) * per)


def _keep_rows(lin: nn.Linear, lo: int, hi: int) -> None:
    """Column-parallel: keep output features [lo, hi) (weight rows, and their bias)."""
    lin.weight = nn.Parameter(lin.weight.detach()[lo:hi].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[lo:hi].clone(), requires_grad=False)
    lin.out_features = hi - lo


def _keep_cols(lin: nn.Linear, lo: int, hi: int, rank: int) -> None:
    """Row-parallel: keep input features [lo, hi); the bias is added once, by rank 0."""
    lin.weight = nn.Parameter(lin.weight.detach()[:, lo:hi].clone(), requires_grad=False)
    if lin.bias is not None and rank != 0:
        lin.bias = None
    lin.in_features = hi - lo


def shard_model(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None,
                algorithm: str = "allreduce") -> nn.Module:
    """Shard a built Llama in place for rank ``rank`` of ``world`` and install the collectives.

    Args:
        model: a full (unsharded) ``Llama``; every rank must hold the same weights.
        rank, world: this process's rank in ``group`` and the group's size.
        group: the process group to reduce over (None: the default group).
        algorithm: ``"allreduce"`` or ``"reduce_scatter"`` (see the module docstring).
    Returns:
        the same model, now holding only this rank's heads and MLP columns.
    Raises:
        WorkbenchError: heads, KV heads or d_ff do not divide by ``world``; unknown algorithm.
    """
    if hasattr(model, "repeats"):  # Perceiver / Perceiver AR: same split, its own module tree
        from workbench.runtime.perceiver_tp import shard_perceiver
        return shard_perceiver(model, rank, world, group, algorithm)
    cfg = model.cfg
    check_shardable(cfg, world)
    check_algorithm(algorithm)
    hd = cfg.head_dim
    q, kv, ff = head_range(cfg.n_heads, rank, world), head_range(cfg.n_kv_heads, rank, world), \
        head_range(cfg.d_ff, rank, world)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        _keep_rows(attn.q_proj, q.start * hd, q.stop * hd)
        _keep_rows(attn.k_proj, kv.start * hd, kv.stop * hd)
        _keep_rows(attn.v_proj, kv.start * hd, kv.stop * hd)
        _keep_cols(attn.o_proj, q.start * hd, q.stop * hd, rank)
        attn.n_heads, attn.n_kv_heads = len(q), len(kv)
        _keep_rows(mlp.gate_proj, ff.start, ff.stop)
        _keep_rows(mlp.up_proj, ff.start, ff.stop)
        _keep_cols(mlp.down_proj, ff.start, ff.stop, rank)
    model.info.rank, model.info.world = rank, world
    install_collective(model, algorithm, rank, world, group)
    return model


def install_collective(model: nn.Module, algorithm: str, rank: int, world: int,
                       group: dist.ProcessGroup | None = None) -> None:
    """Put the ``algorithm`` collective into every ResidualNorm unit (switchable on a sharded model)."""
    check_algorithm(algorithm)
    if hasattr(model, "repeats"):  # Perceiver / Perceiver AR
        from workbench.runtime.perceiver_tp import install_perceiver_collective
        return install_perceiver_collective(model, algorithm, rank, world, group)
    cls = AllReduceNorm if algorithm == "allreduce" else ReduceScatterNorm
    collective = cls(rank, world, group)
    for layer in model.layers:
        layer.attn_allreduce.collective = collective
        layer.mlp_allreduce.collective = collective
    model.info.extra["tp_algorithm"] = algorithm


class _Collective:
    """Shared parts: the group, and timing that costs nothing unless ``hook_timing`` has listeners."""

    algorithm = ""

    def __init__(self, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
        self.rank, self.world, self.group = rank, world, group

    def _timed(self, unit, device: torch.device, nbytes: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not unit.hook_timing.listeners:
            return fn()
        start_ns = time.perf_counter_ns()
        if device.type == "cuda":
            # GPU work is asynchronous: the duration comes from events; start is the host enqueue time.
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn()
            end.record()
            end.synchronize()
            end_ns = start_ns + int(begin.elapsed_time(end) * 1e6)
        else:
            out = fn()  # gloo ops without async_op have completed on return
            end_ns = time.perf_counter_ns()
        unit.hook_timing({"start_ns": start_ns, "end_ns": end_ns, "bytes": nbytes, "algorithm": self.algorithm})
        return out


class AllReduceNorm(_Collective):
    """All-reduce the partial sums, then residual add and RMSNorm on every token."""

    algorithm = "allreduce"

    def __call__(self, unit, partial: torch.Tensor, residual: torch.Tensor, norm: nn.Module
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # all_reduce works in place: copy when a probe may have kept a reference to the partial sum.
        reduced = partial.clone() if unit.hook_partial.listeners or not partial.is_contiguous() else partial
        self._timed(unit, reduced.device, reduced.numel() * reduced.element_size(),
                    lambda: dist.all_reduce(reduced, group=self.group))
        if unit.hook_reduced.listeners:
            reduced = unit.hook_reduced(reduced)  # [b, t, d_model] full sum
        residual = residual + reduced
        return residual, norm(residual)


class ReduceScatterNorm(_Collective):
    """Reduce-scatter over tokens, add and RMSNorm on this rank's tokens, all-gather both results.

    The full reduced sum never exists on any rank, so ``hook_reduced`` does not fire; timing covers
    reduce-scatter, the shard's add and norm, and the all-gather (the span that replaces the
    all-reduce). ``bytes`` counts the reduce-scatter input plus the all-gather input.
    """

    algorithm = "reduce_scatter"

    def __call__(self, unit, partial: torch.Tensor, residual: torch.Tensor, norm: nn.Module
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = partial.shape
        rows = b * t
        per = math.ceil(rows / self.world)  # tokens per rank after padding to a multiple of N
        pad = per * self.world - rows
        flat = partial.reshape(rows, d)
        if pad:
            flat = F.pad(flat, (0, 0, 0, pad))
        flat = flat.contiguous()
        lo = self.rank * per
        res_rows = residual.reshape(rows, d)[lo:lo + per]  # residual is replicated: take my tokens
        if res_rows.shape[0] < per:
            res_rows = F.pad(res_rows, (0, 0, 0, per - res_rows.shape[0]))
        gathered = torch.empty(per * self.world, 2 * d, dtype=partial.dtype, device=partial.device)
        nbytes = flat.numel() * flat.element_size() + per * 2 * d * flat.element_size()

        def exchange() -> torch.Tensor:
            shard = torch.empty(per, d, dtype=partial.dtype, device=partial.device)
            _reduce_scatter(shard, flat, group=self.group)           # [per, d] my tokens' full sum
            res = res_rows + shard
            both = torch.cat([res, norm(res).to(res.dtype)], dim=-1)  # [per, 2d]: one all-gather for both
            _all_gather(gathered, both, group=self.group)             # [per*N, 2d]
            return gathered

        self._timed(unit, partial.device, nbytes, exchange)
        residual = gathered[:rows, :d].reshape(b, t, d)
        normed = gathered[:rows, d:].reshape(b, t, d)
        return residual, normed


class RankZeroSampler(Sampler):
    """Samples on every rank, then takes rank 0's tokens, so ranks never drift apart.

    Logits are replicated (the LM head is), and the same seed gives the same draws; broadcasting
    rank 0's choice (a few bytes per step) also holds across machines whose kernels round differently.
    """

    def __init__(self, cfg: SamplerConfig | None = None, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(cfg)
        self.group = group
        self.src = dist.get_global_rank(group, 0) if group is not None else 0

    def sample(self, logits: torch.Tensor):
        res = super().sample(logits)
        res.tokens = res.tokens.contiguous()
        dist.broadcast(res.tokens, src=self.src, group=self.group)
        return res
