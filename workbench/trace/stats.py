"""Mergeable activation summaries: fixed-edge histograms plus raw moments.

Counts on fixed edges and raw power sums add across ranks and steps, so any mean, variance,
skewness, kurtosis or near-zero fraction can be finished later by a reader without extra
communication during generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MOMENT_FIELDS: tuple[str, ...] = ("count", "sum", "sumsq", "sum3", "sum4", "min", "max",
                                  "near_zero")
# field of ActivationStats -> array of the `activations` group
MOMENT_ARRAYS: dict[str, str] = {
    "count": "value_count", "sum": "value_sum", "sumsq": "value_sumsq", "sum3": "value_sum3",
    "sum4": "value_sum4", "min": "value_min", "max": "value_max", "near_zero": "near_zero_count",
}


@dataclass
class ActivationStats:
    """Histogram counts and moments of a set of activation values.

    Every field may carry leading dims (e.g. [layer, site]); `hist` has one more trailing dim (bin).
    """

    hist: np.ndarray  # [..., bin] int64
    count: np.ndarray  # [...] int64
    sum: np.ndarray
    sumsq: np.ndarray
    sum3: np.ndarray
    sum4: np.ndarray
    min: np.ndarray
    max: np.ndarray
    near_zero: np.ndarray  # [...] int64

    @classmethod
    def from_values(cls, values: np.ndarray, bin_edges: Sequence[float],
                    near_zero_eps: float, lead_dims: int = 0) -> ActivationStats:
        """Summarise values; the first `lead_dims` axes are kept, the rest reduced.

        Args:
            values: activation values (any float dtype).
            bin_edges: fixed, increasing histogram edges (n_bins + 1).
            near_zero_eps: |a| < eps counts as near zero.
            lead_dims: number of leading axes to keep (e.g. 2 for [layer, site, ...]).

        Returns:
            ActivationStats with fields of shape values.shape[:lead_dims].
        """
        x = np.asarray(values, dtype=np.float64)
        lead = x.shape[:lead_dims]
        x = x.reshape(int(np.prod(lead)) if lead else 1, -1)
        edges = np.asarray(bin_edges, dtype=np.float64)
        n_bins = len(edges) - 1
        idx = np.searchsorted(edges, x, side="right") - 1  # bin i holds [e_i, e_{i+1})
        valid = (idx >= 0) & (idx < n_bins)
        rows = np.broadcast_to(np.arange(x.shape[0])[:, None], x.shape)
        flat = (rows * n_bins + idx)[valid]
        hist = np.bincount(flat, minlength=x.shape[0] * n_bins).reshape(x.shape[0], n_bins)
        x2 = x * x
        empty = x.shape[1] == 0
        out = cls(
            hist=hist.astype(np.int64),
            count=np.full(x.shape[0], x.shape[1], dtype=np.int64),
            sum=x.sum(1), sumsq=x2.sum(1), sum3=(x2 * x).sum(1), sum4=(x2 * x2).sum(1),
            min=np.full(x.shape[0], np.inf) if empty else x.min(1),
            max=np.full(x.shape[0], -np.inf) if empty else x.max(1),
            near_zero=(np.abs(x) < near_zero_eps).sum(1).astype(np.int64),
        )
        return out.reshape(lead)

    @classmethod
    def from_packed(cls, hist: np.ndarray, moments: np.ndarray) -> ActivationStats:
        """From a histogram [..., bin] and moments packed [..., 8] in MOMENT_FIELDS order.

        This is the layout of `workbench.probes.reductions.moments`.
        """
        m = np.asarray(moments, dtype=np.float64)
        if m.shape[-1] != len(MOMENT_FIELDS):
            raise ValueError(f"packed moments need a last dim of {len(MOMENT_FIELDS)}, got {m.shape}")
        fields = {f: m[..., i] for i, f in enumerate(MOMENT_FIELDS)}
        fields["count"] = fields["count"].astype(np.int64)
        fields["near_zero"] = fields["near_zero"].astype(np.int64)
        return cls(hist=np.asarray(hist, dtype=np.int64), **fields)

    def reshape(self, lead: tuple[int, ...]) -> ActivationStats:
        """Same stats with leading dims reshaped to `lead`."""
        return ActivationStats(hist=self.hist.reshape(*lead, -1),
                               **{f: np.asarray(getattr(self, f)).reshape(lead)
                                  for f in MOMENT_FIELDS})

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Combine two summaries of disjoint value sets (e.g. two ranks or two steps)."""
        return ActivationStats(
            hist=self.hist + other.hist, count=self.count + other.count,
            sum=self.sum + other.sum, sumsq=self.sumsq + other.sumsq,
            sum3=self.sum3 + other.sum3, sum4=self.sum4 + other.sum4,
            min=np.minimum(self.min, other.min), max=np.maximum(self.max, other.max),
            near_zero=self.near_zero + other.near_zero)


def finish_moments(count: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray,
                   s4: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, variance, skewness and excess kurtosis from raw power sums.

    Args:
        count, s1, s2, s3, s4: number of values and sums of x, x^2, x^3, x^4 (same shapes).

    Returns:
        dict with mean, var, std, skew, kurtosis (excess); NaN where count == 0.
    """
    n = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / n
        ex2, ex3, ex4 = s2 / n, s3 / n, s4 / n
        var = np.maximum(ex2 - mean**2, 0.0)
        m3 = ex3 - 3 * mean * ex2 + 2 * mean**3
        m4 = ex4 - 4 * mean * ex3 + 6 * mean**2 * ex2 - 3 * mean**4
        skew = m3 / var**1.5
        kurt = m4 / var**2 - 3.0
    return {"mean": mean, "var": var, "std": np.sqrt(var), "skew": skew, "kurtosis": kurt}
