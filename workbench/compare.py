"""Two traces side by side: per-layer activation distributions and statistics, and their difference;
and how much each attention head's weights changed over the tokens both runs share.

Made for the experiment of "Meaningless Tokens, Meaningful Gains" (docs/arm.md): the same prompt
with and without inserted meaningless tokens, ARM off and on. Histograms are on the traces' fixed
bin edges (they must match), summed over ranks and the chosen steps and normalised per
(layer, site), so runs with different prompt lengths compare directly.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import xarray as xr

from workbench.errors import WorkbenchError
from workbench.trace import Trace, finish_moments, has_attention_maps, open_trace
from workbench.trace.token_text import TokenText, read_token_text

STEP_CHOICES = ("all", "prefill", "decode")
# Statistics per (run, layer, site); each also gets a delta_<name> = b - a.
STAT_NAMES = ("count", "mean", "std", "kurtosis", "min", "max", "near_zero_fraction", "zero_bin_fraction")


def _open(run: "str | os.PathLike | Trace") -> Trace:
    return run if isinstance(run, Trace) else open_trace(run)


def step_range(steps: str, n_steps: int) -> tuple[int, int]:
    """Committed steps [start, stop) that ``steps`` ("all", "prefill", "decode") selects (empty
    when none is committed yet)."""
    if steps == "prefill":
        return 0, min(n_steps, 1)
    if steps == "decode":
        return 1, max(n_steps, 1)
    return 0, n_steps


def _step_slice(trace: Trace, steps: str) -> slice:
    n = trace.n_steps
    if n == 0:
        raise WorkbenchError(f"{trace.path}: no committed step to compare")
    if steps not in STEP_CHOICES:
        raise WorkbenchError(f"unknown step selection {steps!r} (choose {', '.join(STEP_CHOICES)})")
    if steps == "decode" and n < 2:
        raise WorkbenchError(f"{trace.path}: no decode step committed (only the prefill)")
    return slice(*step_range(steps, n))


SUM_NAMES = ("value_count", "value_sum", "value_sumsq", "value_sum3", "value_sum4", "near_zero_count", "hist_count")


def activation_sums(trace: Trace, steps: slice, sites: Sequence[str]) -> xr.Dataset:
    """Additive totals over ``steps`` and ranks per (layer, site[, bin]): the counts and power sums
    (``SUM_NAMES``), ``value_min`` and ``value_max``. Totals of adjacent step ranges merge with
    `merge_sums`, so a live view adds only the newly committed steps."""
    ds = trace.activations.isel(step=steps).sel(site=list(sites))
    valid = ds["value_count"] > 0  # unwritten cells hold fill values (-1 / NaN)
    dims = ["step", "rank"]
    out = xr.Dataset({k: ds[k].where(valid).sum(dims) for k in SUM_NAMES})
    out["value_min"] = ds["value_min"].where(valid).min(dims)
    out["value_max"] = ds["value_max"].where(valid).max(dims)
    return out.drop_vars([c for c in out.coords if c not in ("layer", "site", "bin")])


def merge_sums(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """The totals of two disjoint step ranges (`activation_sums`) as one."""
    out = xr.Dataset({k: a[k] + b[k] for k in SUM_NAMES})
    out["value_min"] = np.fmin(a["value_min"], b["value_min"])
    out["value_max"] = np.fmax(a["value_max"], b["value_max"])
    return out


def finish_sums(sums: xr.Dataset, edges: Sequence[float]) -> xr.Dataset:
    """Histogram fractions and finished statistics over (layer, site) from `activation_sums`."""
    count = sums["value_count"]
    fin = finish_moments(count.values, sums["value_sum"].values, sums["value_sumsq"].values,
                         sums["value_sum3"].values, sums["value_sum4"].values)
    out = xr.Dataset({k: count.copy(data=fin[k]) for k in ("mean", "std", "kurtosis")})
    out["count"] = count.astype(np.int64)
    out["min"] = sums["value_min"]
    out["max"] = sums["value_max"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["near_zero_fraction"] = sums["near_zero_count"] / count
        out["hist_fraction"] = sums["hist_count"] / count
    zero_bin = int(np.searchsorted(np.asarray(edges), 0.0, side="right") - 1)  # the bin [e_i, e_i+1) holding 0
    out["zero_bin_fraction"] = out["hist_fraction"].isel(bin=zero_bin, drop=True)
    return out


def _summary(trace: Trace, steps: str, sites: Sequence[str]) -> xr.Dataset:
    """Histogram fractions and finished statistics over (layer, site) for one trace."""
    return finish_sums(activation_sums(trace, _step_slice(trace, steps), sites), trace.spec.bin_edges)


def comparable_sites(ta: Trace, tb: Trace) -> list[str]:
    """The activation sites both traces recorded; refuses traces whose histograms do not compare."""
    if tuple(ta.spec.bin_edges) != tuple(tb.spec.bin_edges):
        raise WorkbenchError("the traces use different histogram bin edges, so their histograms do not compare")
    if ta.spec.n_layers != tb.spec.n_layers:
        raise WorkbenchError(f"the traces have different layer counts ({ta.spec.n_layers} and {tb.spec.n_layers})")
    common = [s for s in ta.spec.hist_sites if s in tb.spec.hist_sites]
    if not common:
        raise WorkbenchError("the traces recorded no activation site in common")
    return common


def compare_traces(a: "str | os.PathLike | Trace", b: "str | os.PathLike | Trace", *, steps: str = "all",
                   sites: Sequence[str] | None = None, labels: tuple[str, str] = ("a", "b")) -> xr.Dataset:
    """Per-layer activation distributions of two traces, and b minus a.

    Args:
        a, b: trace store paths or opened ``Trace`` objects (live traces are cut at their commit).
        steps: "all" committed steps, "prefill" (step 0: the prompt) or "decode" (steps >= 1).
        sites: activation sites to compare (default: every site both traces recorded).
        labels: names of the two runs on the ``run`` dimension.
    Returns:
        Dataset over (run, layer, site[, bin]): ``hist_fraction`` (share of values per bin, on the
        shared edges; coordinates ``bin_lower``/``bin_upper``), ``count``, ``mean``, ``std``,
        ``kurtosis`` (excess), ``min``, ``max``, ``near_zero_fraction`` (|a| < eps with the eps
        each trace recorded with: ARM's own at its layers' MLP sites, the trace's fixed
        ``near_zero_eps`` elsewhere, so compare it within a run, or across runs only where both
        used the same eps) and ``zero_bin_fraction`` (share in the bin [e_i, e_i+1) holding 0);
        plus ``delta_<name>`` = b - a for each, without the ``run`` dim. Attributes name the runs,
        their prompts and ARM settings.
    Raises:
        WorkbenchError: not traces, different bin edges or layer counts, unknown sites or steps.
    """
    ta, tb = _open(a), _open(b)
    common = comparable_sites(ta, tb)
    if sites is None:
        sites = common
    missing = [s for s in sites if s not in common]
    if missing:
        raise WorkbenchError(f"site {missing[0]!r} is not recorded in both traces (both have: {', '.join(common)})")
    if steps not in STEP_CHOICES:
        raise WorkbenchError(f"unknown step selection {steps!r} (choose {', '.join(STEP_CHOICES)})")
    sa, sb = _summary(ta, steps, sites), _summary(tb, steps, sites)
    run = xr.DataArray(list(labels), dims="run", name="run")
    out = xr.concat([sa, sb], dim=run)
    for name in (*STAT_NAMES, "hist_fraction"):
        out[f"delta_{name}"] = sb[name] - sa[name]
    edges = np.asarray(ta.spec.bin_edges)
    out = out.assign_coords(bin_lower=("bin", edges[:-1]), bin_upper=("bin", edges[1:]))
    for label, t in zip(labels, (ta, tb)):
        out.attrs[f"{label}_path"] = str(t.path)
        out.attrs[f"{label}_prompts"] = list(t.metadata.get("prompts") or [])
        out.attrs[f"{label}_arm"] = t.metadata.get("arm")
        out.attrs[f"{label}_steps"] = int(t.n_steps)
    out.attrs["labels"] = list(labels)
    out.attrs["steps"] = steps
    return out


def attention_comparable(a: Trace, b: Trace) -> bool:
    """True if both runs committed a step and recorded attention maps of the same layers and heads."""
    return all(has_attention_maps(t) and t.n_steps > 0 for t in (a, b)) and all(
        list(a.attention[dim].values) == list(b.attention[dim].values) for dim in ("layer", "head"))


def attention_change(a: "str | os.PathLike | Trace", b: "str | os.PathLike | Trace", seq: int = 0,
                     rows: int = 256, texts: tuple[TokenText, TokenText] | None = None) -> xr.DataArray | None:
    """The largest |b - a| of each head's attention weights, over the latest ``rows`` query rows of
    the tokens both runs' sequence ``seq`` share (up to where their texts part).

    A layer whose own inputs did not change keeps its weights: exactly for ARM's layer against the
    same layer without ARM (its attention precedes its MLP), to rounding for TP=2 against TP=1.

    Args:
        a, b: trace store paths or opened ``Trace`` objects.
        seq: the sequence to compare (b's last one if it has fewer).
        rows: query rows at most, the latest ones.
        texts: the two sequences' ``TokenText`` if the caller already reads them (the dashboard).
    Returns:
        DataArray (layer, head), attributes ``first_query``/``last_query`` (positions used) and
        ``shared_tokens``; None if the runs share no token.
    Raises:
        WorkbenchError: not ``attention_comparable``.
    """
    ta, tb = _open(a), _open(b)
    if not attention_comparable(ta, tb):
        raise WorkbenchError("the runs did not both record attention maps of the same layers and heads")
    layers, heads = list(ta.attention["layer"].values), list(ta.attention["head"].values)
    seqs = (min(seq, ta.spec.n_seq - 1), min(seq, tb.spec.n_seq - 1))
    text_a, text_b = texts or (read_token_text(ta, seqs[0]), read_token_text(tb, seqs[1]))
    n = 0
    for x, y, px, py in zip(text_a.ids, text_b.ids, text_a.positions, text_b.positions):
        if x != y or px != py:
            break
        n += 1
    stop = min(int(t.tokens["query_stop"][s, int(t.n_steps) - 1].values) for t, s in ((ta, seqs[0]), (tb, seqs[1])))
    keys = np.asarray(text_a.positions[:n], dtype=np.int64)
    keys = keys[keys < stop]
    queries = keys[-rows:]
    if not len(queries):
        return None
    first, last = int(queries[0]), int(queries[-1])
    cols = keys[keys <= last]
    change = np.full((len(layers), len(heads)), np.nan)
    for li in range(len(layers)):  # a layer at a time: a long trace's rows of one layer are tens of MB
        w = [np.asarray(t.attention["weights"][s, li, :, first:last + 1, :last + 1].values,
                        dtype=np.float32)[:, queries - first][:, :, cols]  # [head, row, key]
             for t, s in ((ta, seqs[0]), (tb, seqs[1]))]
        diff = np.abs(w[1] - w[0])  # NaN: keys after a row's query
        seen = ~np.isnan(diff).all(axis=(1, 2))
        change[li, seen] = np.nanmax(diff[seen], axis=(1, 2))
    return xr.DataArray(change, dims=("layer", "head"), coords={"layer": layers, "head": heads},
                        name="attention_change",
                        attrs={"first_query": first, "last_query": last, "shared_tokens": n})


def format_attention_change(change: xr.DataArray | None) -> str:
    """Printable lines: per layer, the largest change of any head's weights, and which head."""
    if change is None:
        return "attention weights: the runs share no token, so no query row compares"
    lines = [f"attention weights, largest |b - a| over query rows {change.attrs['first_query']}-"
             f"{change.attrs['last_query']} ({change.attrs['shared_tokens']} tokens both runs share):"]
    for layer in change["layer"].values:
        row = change.sel(layer=layer)
        if np.isnan(row.values).all():
            lines.append(f"  layer {int(layer)}: not compared")
            continue
        head = int(row["head"].values[int(np.nanargmax(row.values))])
        lines.append(f"  layer {int(layer)}: {float(row.max()):.3g} (head {head})")
    return "\n".join(lines)


def _arm_text(arm: dict | None) -> str:
    if not arm:
        return "off"
    from workbench.models.arm import ARMConfig  # fills in the defaults a partial setting left out
    try:
        c = ARMConfig.from_dict(arm)
    except WorkbenchError:
        return f"{arm}"
    return f"layers {list(c.layers)}, c={c.c}, k={c.k}, clip=[{c.clip_lo}, {c.clip_hi}], p={c.percentile}"


def _fmt(x: float, width: int = 8) -> str:
    return f"{x:>{width}.4f}" if np.isfinite(x) else f"{'-':>{width}}"


def format_comparison(ds: xr.Dataset, stats: Sequence[str] = ("near_zero_fraction", "zero_bin_fraction", "std",
                                                               "kurtosis")) -> str:
    """A printable table: one row per (layer, site), each statistic for a, b and b - a."""
    la, lb = ds.attrs.get("labels", ["a", "b"])
    lines = []
    for label in (la, lb):
        prompts = ds.attrs.get(f"{label}_prompts") or []
        prompt = repr(prompts[0]) if prompts else "?"
        if len(prompt) > 60:
            prompt = prompt[:57] + "..."
        arm_text = _arm_text(ds.attrs.get(f"{label}_arm"))
        lines.append(f"{label}: {ds.attrs.get(f'{label}_path')}  prompt {prompt}  ARM {arm_text}")
    lines.append(f"steps: {ds.attrs.get('steps')}")
    short = {"near_zero_fraction": "near0", "zero_bin_fraction": "zerobin", "std": "std", "kurtosis": "kurt",
             "mean": "mean", "min": "min", "max": "max", "count": "count"}
    header = f"{'layer':>5} {'site':<14}" + "".join(
        f" {short.get(s, s)[:7] + ' ' + la:>8} {short.get(s, s)[:7] + ' ' + lb:>8} {'delta':>8}" for s in stats)
    lines += [header, "-" * len(header)]
    for layer in ds["layer"].values:
        for site in ds["site"].values:
            row = f"{int(layer):>5} {str(site):<14}"
            for s in stats:
                v = ds[s].sel(layer=layer, site=site)
                row += " " + _fmt(float(v.sel(run=la))) + " " + _fmt(float(v.sel(run=lb))) + " " + _fmt(
                    float(ds[f"delta_{s}"].sel(layer=layer, site=site)))
            lines.append(row)
    return "\n".join(lines)
