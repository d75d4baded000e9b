"""ARM, the Activation Redistribution Module (Shi et al., "Meaningless Tokens, Meaningful Gains",
arXiv 2510.01032), inside the gated MLP on a = act(gate(x)) before it multiplies up(x).

Per forward call, over the whole tensor ``a`` (every batch row and position together):

    med  = lower_median(|a|)                  MAD = lower_median(| |a| - med |)
    eps  = 1.4826 * MAD * c                   S   = mean(|a| < eps)
    frac = clip(k * S, clip_lo, clip_hi)      n   = round(frac * numel)   (round half to even)

The n entries of smallest |a| (ties broken by flat index, lowest first) are replaced, keeping
their sign (zero counts as positive): a positive one by ``U(0,1) * percentile(a, p)``, a negative
one by ``-U(0,1) * |min(a)|``. Each call draws one uniform per element of the whole tensor
(u[j] is used if entry j is replaced) from a generator the module owns, seeded with run seed +
layer index, so a seed fixes the output.

Conventions, exactly: ``lower_median`` of n values is the ((n+1)//2)-th smallest, as torch.median
returns (numpy's median would average the two middle values for even n). ``percentile`` is the
linear interpolation of numpy.percentile / torch.quantile (method "linear"), computed with
kthvalue, so it has no size limit (torch.quantile refuses inputs above 16M elements). Statistics are
computed in float32 whatever the activation dtype.

Under tensor parallelism each rank holds the columns ``[r*d_ff/N, (r+1)*d_ff/N)`` of ``a``; the
module all-gathers the slices, computes the TP=1 result on the full tensor (identical on every
rank: same values, same generator) and keeps its own columns.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from workbench.errors import WorkbenchError

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class ARMConfig:
    """Redistribution settings. ``seed`` None: use the run's seed (the sampler seed)."""

    layers: tuple[int, ...] = (0,)
    c: float = 0.13
    k: float = 1.0
    clip_lo: float = 0.2
    clip_hi: float = 0.25
    percentile: float = 99.5
    seed: int | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if not self.layers:
            raise WorkbenchError("ARM needs at least one layer")
        if any(i < 0 for i in self.layers):
            raise WorkbenchError(f"ARM layers must be >= 0, got {list(self.layers)}")
        if not self.c > 0:
            raise WorkbenchError(f"ARM c must be > 0, got {self.c}")
        if not self.k >= 0:
            raise WorkbenchError(f"ARM k must be >= 0, got {self.k}")
        if not 0.0 <= self.clip_lo <= self.clip_hi <= 1.0:
            raise WorkbenchError(f"ARM clip range must satisfy 0 <= lo <= hi <= 1, got [{self.clip_lo}, {self.clip_hi}]")
        if not 0.0 <= self.percentile <= 100.0:
            raise WorkbenchError(f"ARM percentile must be in [0, 100], got {self.percentile}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ARMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WorkbenchError(f"unknown ARM setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**d)


@dataclass
class ARMStats:
    """What the last call saw, over the whole (unsharded) tensor."""

    numel: int
    median: float          # lower median of |a|
    mad: float             # lower median of ||a| - median|
    eps: float             # near-zero threshold 1.4826 * MAD * c
    near_zero_before: float  # S = mean(|a| < eps) on the input
    near_zero_after: float   # mean(|a| < eps) on the output (same eps)
    frac: float            # clip(k * S, clip_lo, clip_hi)
    n_replaced: int        # round(frac * numel)
    n_negative: int        # replaced entries that were negative
    pos_scale: float       # percentile(a, p): positive draws are U(0,1) times this
    neg_scale: float       # |min(a)| (0 when no value is negative)

    def to_dict(self) -> dict:
        return asdict(self)


# --- exact order statistics -------------------------------------------------------------------
def lower_median(x: torch.Tensor) -> torch.Tensor:
    """The ((n+1)//2)-th smallest of all elements (torch.median's convention), a 0-d tensor."""
    flat = x.reshape(-1)
    return flat.kthvalue((flat.numel() + 1) // 2).values


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """numpy.percentile(x, q) with linear interpolation, any size (0-d tensor, x's dtype)."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = q / 100.0 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    if n - lo <= max(2, n // 16):
        # A high percentile (ARM's 99.5): one partial sort of the top few beats two selections.
        top = flat.topk(n - lo).values  # descending; top[-1] is the (lo+1)-th smallest
        v_lo, v_hi = top[-1], top[-2] if hi > lo else top[-1]
    else:
        v_lo = flat.kthvalue(lo + 1).values
        v_hi = flat.kthvalue(hi + 1).values if hi > lo else v_lo
    if pos == lo:
        return v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def mad_threshold(a: torch.Tensor, c: float = 0.13) -> float:
    """eps = 1.4826 * MAD(|a|) * c, the near-zero threshold ARM uses (MAD with lower medians)."""
    mag = a.detach().reshape(-1).float().abs()
    med = lower_median(mag)
    return float(MAD_TO_SIGMA * lower_median((mag - med).abs()) * c)


def near_zero_count(a: torch.Tensor, eps: float) -> int:
    """Number of elements with |a| < eps (adds across ranks and steps, unlike a fraction)."""
    return int((a.detach().abs() < eps).sum())


def near_zero_fraction(a: torch.Tensor, eps: float) -> float:
    """mean(|a| < eps) over all elements (strict: an entry equal to eps is not near zero)."""
    return near_zero_count(a, eps) / a.numel() if a.numel() else 0.0


def smallest_magnitude_mask(mag: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the n entries of smallest ``mag`` (1-d); ties at the cut go to lower indices."""
    mask = torch.zeros_like(mag, dtype=torch.bool)
    if n <= 0:
        return mask
    if n >= mag.numel():
        return ~mask
    cut = mag.kthvalue(n).values
    mask = mag < cut
    at_cut = mag == cut
    need = n - mask.sum()  # a tensor: no host sync
    # The first `need` entries equal to the cut value, by index: deterministic, unlike topk.
    mask |= at_cut & (torch.cumsum(at_cut, 0) <= need)
    return mask


class ARM(nn.Module):
    """The redistribution of one layer's MLP activation; install with ``apply_arm``.

    Tensor parallelism: set ``shard = (rank, world)`` and optionally ``group`` (default: the
    default process group); without ``shard`` it reads rank/world from its model's ``info``
    (ForwardInfo) at call time, so it works whether installed before or after sharding.
    ``d_ff`` is the full (unsharded) width.
    """

    def __init__(self, cfg: ARMConfig, layer: int, seed: int, d_ff: int) -> None:
        super().__init__()
        self.cfg, self.layer, self.d_ff = cfg, layer, d_ff
        self.seed = int(seed) + int(layer)
        self.group = None                         # torch.distributed group for TP (None: default)
        self.shard: tuple[int, int] | None = None  # (rank, world); None: read model.info or TP=1
        self.owner = None                         # weakref to the model (for model.info)
        self.stats: ARMStats | None = None
        self.gathered_bytes = 0                   # bytes received by the last call's all-gather
        self._gen: torch.Generator | None = None

    def reset(self) -> None:
        """Reseed: the next call draws what the first call after construction drew."""
        self._gen = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
        return self._gen

    def _rank_world(self) -> tuple[int, int]:
        if self.shard is not None:
            return self.shard
        model = self.owner() if self.owner is not None else None
        info = getattr(model, "info", None)
        if info is not None:
            return int(info.rank), int(info.world)
        return 0, 1

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        rank, world = self._rank_world()
        local = a.shape[-1]
        if local * world != self.d_ff:
            raise RuntimeError(f"ARM at layer {self.layer} sees width {local} with {world} rank(s), "
                               f"expected {self.d_ff} in total: set its shard/group for tensor parallelism")
        full = self._gather(a) if world > 1 else a  # [..., d_ff]
        out = self.redistribute(full)
        if world > 1:
            out = out[..., rank * local:(rank + 1) * local].contiguous()
        return out

    def _gather(self, a: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        a = a.contiguous()
        parts = [torch.empty_like(a) for _ in range(self._rank_world()[1])]
        dist.all_gather(parts, a, group=self.group)
        self.gathered_bytes = sum(p.numel() * p.element_size() for p in parts)
        return torch.cat(parts, dim=-1)

    def redistribute(self, a: torch.Tensor) -> torch.Tensor:
        """ARM on a full tensor (no sharding); records ``self.stats``."""
        cfg = self.cfg
        flat = a.reshape(-1).float()
        n_all = flat.numel()
        if n_all == 0:
            return a
        mag = flat.abs()
        med = lower_median(mag)
        mad = lower_median((mag - med).abs())
        eps_t = MAD_TO_SIGMA * mad * cfg.c
        # The one host sync the algorithm needs: n (a count) decides the selection.
        eps, n_near = torch.stack([eps_t.double(), (mag < eps_t).sum().double()]).tolist()
        s_before = n_near / n_all
        frac = min(max(cfg.k * s_before, cfg.clip_lo), cfg.clip_hi)
        n = int(round(frac * n_all))
        chosen = smallest_magnitude_mask(mag, n)
        neg = flat < 0
        pos_scale = percentile(flat, cfg.percentile)
        neg_scale = (-flat.min()).clamp(min=0)  # no negative values: nothing negative is drawn
        # One uniform per element (full size, so every TP rank draws the same), used where chosen.
        u = torch.rand(n_all, generator=self._generator(a.device), device=a.device)
        out = torch.where(chosen, torch.where(neg, -u * neg_scale, u * pos_scale), flat)
        med_f, mad_f, near_after, n_neg, pos_f, neg_f = torch.stack([
            med.double(), mad.double(), (out.abs() < eps_t).sum().double(), (chosen & neg).sum().double(),
            pos_scale.double(), neg_scale.double()]).tolist()
        self.stats = ARMStats(
            numel=n_all, median=med_f, mad=mad_f, eps=eps, near_zero_before=s_before,
            near_zero_after=near_after / n_all, frac=frac, n_replaced=n, n_negative=int(n_neg),
            pos_scale=pos_f, neg_scale=neg_f)
        return out.to(a.dtype).view(a.shape)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layer={self.layer}, c={c.c}, k={c.k}, clip=[{c.clip_lo}, {c.clip_hi}], "
                f"percentile={c.percentile}, seed={self.seed}")


def apply_arm(model: nn.Module, cfg: "ARMConfig | dict | None", seed: int = 0, group=None) -> list[ARM]:
    """Install ARM into ``model.layers[i].mlp.redistribute`` for each configured layer.

    Args:
        model: a built Llama (sharded or not; ARM reads rank/world from ``model.info`` at call time).
        cfg: ARMConfig, its dict form (RunSpec.arm), or None (ARM off: removes nothing, returns []).
        seed: the run seed; layer i's generator is seeded with ``(cfg.seed or seed) + i``.
        group: the tensor-parallel process group (None: the default group; unused with one rank).
    Returns:
        The installed modules, in layer order.
    """
    if cfg is None:
        return []
    if isinstance(cfg, dict):
        cfg = ARMConfig.from_dict(cfg)
    n_layers = len(model.layers)
    bad = [i for i in cfg.layers if i >= n_layers]
    if bad:
        raise WorkbenchError(f"ARM layer {bad[0]} does not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    base = cfg.seed if cfg.seed is not None else seed
    installed = []
    for i in sorted(set(cfg.layers)):
        mlp = model.layers[i].mlp
        arm = ARM(cfg, i, base, d_ff=model.cfg.d_ff)
        arm.owner = weakref.ref(model)
        arm.group = group
        mlp.redistribute = arm
        installed.append(arm)
    return installed
