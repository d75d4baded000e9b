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

``shard_plan`` says which slice of each split tensor a rank owns; ``shard_weights`` cuts a built
model to it, from the model's own weights or from slices already read (the checkpoint loaders read
only these slices from the safetensors files, so no rank ever holds the whole model).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Attention
from workbench.models.perceiver import CrossAttention
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


@dataclass(frozen=True)
class Part:
    """The share of one tensor a rank holds: indices ``[start, stop)`` along ``dim``.

    dim 0: output rows (column-parallel weights and their biases); dim 1: input columns
    (row-parallel weights). ``part.of(x)`` cuts a tensor, or a safetensors slice without reading
    the rest of it.
    """

    dim: int
    start: int
    stop: int

    def of(self, x):
        return x[self.start:self.stop] if self.dim == 0 else x[:, self.start:self.stop]


# Linear children that tensor parallelism splits: attribute -> (dim of the weight cut, what is split).
_SPLIT = {"q_proj": (0, "q"), "k_proj": (0, "kv"), "v_proj": (0, "kv"), "o_proj": (1, "q"),
          "gate_proj": (0, "ff"), "up_proj": (0, "ff"), "down_proj": (1, "ff")}


def _split_linears(model: nn.Module):
    """(parameter-name prefix, attribute, Linear) of every Linear TP splits, each shared Linear once.

    Works for Llama and the Perceivers alike: attention modules own q/k/v/o_proj, MLPs gate/up/down.
    A Linear shared between Perceiver repeats gets the name ``named_parameters`` gives it (the first).
    """
    seen: set[int] = set()
    for prefix, m in model.named_modules():
        for attr, child in m._modules.items():
            if attr in _SPLIT and isinstance(child, nn.Linear) and id(child) not in seen:
                seen.add(id(child))
                yield (f"{prefix}.{attr}" if prefix else attr), attr, child


def shard_plan(model: nn.Module, rank: int, world: int) -> dict[str, Part | None]:
    """What rank ``rank`` of ``world`` holds of each split parameter of a full (unsharded) model.

    Returns:
        parameter name -> its ``Part``, or None for a tensor the rank does not hold at all (the
        bias of a row-parallel Linear lives on rank 0 only). Parameters not named are replicated.
    Raises:
        WorkbenchError: heads, KV heads or d_ff do not divide by ``world``.
    """
    cfg = model.cfg
    check_shardable(cfg, world)
    hd = cfg.head_dim
    owned = {"q": head_range(cfg.n_heads, rank, world), "kv": head_range(cfg.n_kv_heads, rank, world),
             "ff": head_range(cfg.d_ff, rank, world)}
    plan: dict[str, Part | None] = {}
    for name, attr, lin in _split_linears(model):
        dim, what = _SPLIT[attr]
        r, unit = owned[what], (1 if what == "ff" else hd)  # heads are head_dim rows/columns each
        plan[f"{name}.weight"] = Part(dim, r.start * unit, r.stop * unit)
        if lin.bias is not None and (dim == 0 or rank != 0):  # row-parallel: rank 0 adds the whole bias
            plan[f"{name}.bias"] = plan[f"{name}.weight"] if dim == 0 else None
    return plan


def shard_weights(model: nn.Module, rank: int, world: int, loaded: dict[str, torch.Tensor] | None = None) -> None:
    """Cut every split Linear of a full model to rank ``rank``'s part and set the local head counts.

    Args:
        model: a full Llama or Perceiver (its split weights may be uninitialised when ``loaded``
            is given: they are never read then).
        loaded: this rank's parts by parameter name, already read (``checkpoint.load_llama`` with
            ``world > 1`` reads only these slices from the files); None: cut the model's own weights.
    """
    plan = shard_plan(model, rank, world)
    for name, attr, lin in list(_split_linears(model)):
        for pname in ("weight", "bias"):
            key = f"{name}.{pname}"
            if key not in plan:
                continue
            part = plan[key]
            if part is None:
                setattr(lin, pname, None)
                continue
            t = loaded[key] if loaded is not None else part.of(getattr(lin, pname).detach()).clone()
            setattr(lin, pname, nn.Parameter(t, requires_grad=False))
        lin.out_features, lin.in_features = lin.weight.shape
    q, kv = head_range(model.cfg.n_heads, rank, world), head_range(model.cfg.n_kv_heads, rank, world)
    for m in model.modules():  # every attention module, also those whose Linears are shared
        if isinstance(m, (Attention, CrossAttention)):
            m.n_heads, m.n_kv_heads = len(q), len(kv)
    model.info.rank, model.info.world = rank, world


def shard_model(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None,
                algorithm: str = "allreduce") -> nn.Module:
    """Shard a built Llama (or Perceiver) in place for rank ``rank`` of ``world`` and install the collectives.

    Args:
        model: a full (unsharded) model, every rank holding the same weights; or one already
            loaded sharded for this rank (``load_llama(..., rank=, world=)``), which only gets
            the collectives.
        rank, world: this process's rank in ``group`` and the group's size.
        group: the process group to reduce over (None: the default group).
        algorithm: ``"allreduce"`` or ``"reduce_scatter"`` (see the module docstring).
    Returns:
        the same model, now holding only this rank's heads and MLP columns.
    Raises:
        WorkbenchError: heads, KV heads or d_ff do not divide by ``world``; unknown algorithm.
    """
    check_shardable(model.cfg, world)
    check_algorithm(algorithm)
    if (model.info.rank, model.info.world) != (rank, world):
        if model.info.world != 1:
            raise WorkbenchError(f"model is sharded for rank {model.info.rank} of {model.info.world}, "
                                 f"not rank {rank} of {world}")
        shard_weights(model, rank, world)
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
