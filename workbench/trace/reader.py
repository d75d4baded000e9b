"""open_trace: read a trace store, live or finished, as xarray Datasets cut at the commit marker.

Every group is opened lazily with `xarray.open_zarr(path, group=..., consolidated=False)`; the
`Trace` properties return the groups cut to the committed prefix (min over ranks of the
`committed` marker), so a reader never sees a step that is partially written. `refresh()`
re-reads only the marker (plus the few step-bookkeeping values of new steps) to move the cut.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from ..errors import WorkbenchError
from .schema import FORMAT_NAME, FORMAT_VERSION, STATUS_RUNNING, TraceSpec
from .stats import finish_moments
from .writer import aggregate_status


class TraceError(WorkbenchError):
    """The path is not a readable trace (not a trace, newer format, missing arrays).

    A ValueError (via WorkbenchError) whose message is one line naming the problem.
    """


class Trace:
    """A trace store opened for reading. Use `open_trace` to create one.

    Attributes:
        path: store directory.
        spec: sizes of the run (`TraceSpec`).
        attrs: root attributes (format, spec, run, status, ...).
        metadata: run metadata given by the recorder (root attribute `run`).
        format_version: layout version of the store.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.attrs, self.spec = _validate(self.path)
        self.metadata: dict[str, Any] = dict(self.attrs.get("run") or {})
        self.format_version = int(self.attrs["format_version"])
        self._layout = self.spec.layout()
        self.groups: tuple[str, ...] = tuple(g for g in self._layout if g)
        self.status, self.error = STATUS_RUNNING, ""
        self._n_steps = 0
        self._raw: dict[str, xr.Dataset] = {}
        for group in self.groups:
            try:
                # chunks=None: lazy backend arrays (no dask); cache=False: reading a slice never
                # keeps a whole variable in memory, and repeated reads see the store as it is.
                # (the same as xarray.open_zarr(path, group=group, consolidated=False))
                self._raw[group] = xr.open_dataset(self.path, engine="zarr", group=group,
                                                   consolidated=False, chunks=None, cache=False)
            except Exception as exc:  # noqa: BLE001 - any failure means a damaged store
                raise TraceError(f"{self.path}: cannot open group {group!r}: {exc}") from exc
        root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        self._marker = root["committed"]
        self._rank_status = root["rank_status"]
        self._rank_error = root["rank_error"]
        tokens = root["tokens"]
        self._query_stop_arr = tokens["query_stop"]
        self._produced_arr = tokens["produced_step"]
        self._cut: dict[str, xr.Dataset] = {}
        self._n_steps = 0
        self._n_queries = 0
        self._n_positions = 0
        self._query_stop = np.full((self.spec.n_seq, 0), -1, dtype=np.int64)
        self.committed = np.zeros(self.spec.world, dtype=np.int64)
        self.status = STATUS_RUNNING
        self.error = ""
        self.refresh()

    # ------------------------------------------------------------------ live state
    @property
    def n_steps(self) -> int:
        """Committed steps (min over ranks): steps [0, n_steps) are complete everywhere."""
        return self._n_steps

    @property
    def n_queries(self) -> int:
        """Query rows (= keys) processed by committed steps: length of `query`/`key` dims."""
        return self._n_queries

    @property
    def n_positions(self) -> int:
        """Positions holding tokens produced by committed steps: length of tokens `position`."""
        return self._n_positions

    def refresh(self) -> int:
        """Pick up newly committed steps and the current status.

        Reads only the commit marker, per-rank status and the bookkeeping of the new steps.

        Returns:
            Number of newly visible steps (0 if nothing changed).
        """
        committed = np.asarray(self._marker[:], dtype=np.int64)
        statuses = [str(s) for s in self._rank_status[:]]
        errors = [str(e) for e in self._rank_error[:]]
        self.status, self.error = aggregate_status(statuses, errors)
        self.committed = committed
        n = int(min(committed.min(), self.spec.max_steps))
        old = self._n_steps
        if n <= old:
            return 0
        new_stops = np.asarray(self._query_stop_arr[:, old:n], dtype=np.int64)
        self._query_stop = np.concatenate([self._query_stop, new_stops], axis=1)
        if new_stops.size:
            self._n_queries = max(self._n_queries, int(new_stops.max()), 0)
        produced = np.asarray(self._produced_arr[:, self._n_positions:], dtype=np.int64)
        done = (produced >= 0) & (produced < n)
        cols = np.nonzero(done.any(axis=0))[0]
        if cols.size:
            self._n_positions += int(cols.max()) + 1
        self._n_steps = n
        self._cut.clear()
        return n - old

    # ------------------------------------------------------------------ datasets
    def dataset(self, group: str, cut: bool = True) -> xr.Dataset:
        """One group as a lazy xarray Dataset.

        Args:
            group: "tokens", "attention", "kv_cache", "activations", "comm", "timing",
                "cross_attention", "latent_attention" or "user".
            cut: cut every step/position/query/key dim to the committed prefix (default);
                False gives the full preallocated arrays (unwritten cells hold fill values).

        Returns:
            The Dataset (no data is read until values are accessed).
        """
        if group not in self._raw:
            raise KeyError(f"no group {group!r} in this trace (groups: {', '.join(self.groups)})")
        if not cut:
            return self._raw[group]
        ds = self._cut.get(group)
        if ds is None:
            limits = {"step": self._n_steps, "query": self._n_queries, "key": self._n_queries,
                      "position": self._n_positions if group == "tokens" else self._n_queries}
            ds = self._raw[group].isel({d: slice(0, n) for d, n in limits.items()
                                        if d in self._raw[group].dims})
            self._cut[group] = ds
        return ds

    @property
    def tokens(self) -> xr.Dataset:
        """Tokens, text, step bookkeeping and sampler candidates (committed prefix)."""
        return self.dataset("tokens")

    @property
    def attention(self) -> xr.Dataset:
        """Self-attention maps (seq, layer, head, query, key) of the recorded layers/heads."""
        return self.dataset("attention")

    @property
    def kv_cache(self) -> xr.Dataset:
        """KV cache occupancy (step, layer, rank) and attention mass per cached position."""
        return self.dataset("kv_cache")

    @property
    def activations(self) -> xr.Dataset:
        """Histograms (step, layer, site, rank, bin) and moments (step, layer, site, rank)."""
        return self.dataset("activations")

    @property
    def comm(self) -> xr.Dataset:
        """All-reduce start offsets, seconds and bytes (step, layer, site, rank)."""
        return self.dataset("comm")

    @property
    def timing(self) -> xr.Dataset:
        """Compute seconds (step, layer, part, rank) and step seconds (step, rank)."""
        return self.dataset("timing")

    @property
    def cross_attention(self) -> xr.Dataset | None:
        """Perceiver cross-attention (seq, step, repeat, head, latent, input), or None."""
        return self.dataset("cross_attention") if "cross_attention" in self._raw else None

    @property
    def latent_attention(self) -> xr.Dataset | None:
        """Perceiver latent self-attention (seq, step, repeat, self_layer, head, latent,
        latent_key), or None."""
        return self.dataset("latent_attention") if "latent_attention" in self._raw else None

    @property
    def user(self) -> xr.Dataset | None:
        """Values of your own probes (step, {name}_hook, rank, *dims), one variable per probe, or
        None when the run had none."""
        return self.dataset("user") if "user" in self._raw else None

    def cross_attention_map(self, seq: int, repeat: int, head: int,
                            step: int | None = None) -> xr.DataArray:
        """Perceiver AR cross-attention (latent, input) of the window as it stands after `step`.

        A step records only the rows it computed (repeat 0 at a decode step: the new latent);
        this takes each window latent's row from the latest step that wrote it.

        Args:
            seq: sequence index.
            repeat: repeat index.
            head: global cross-attention head.
            step: the step (default: last committed step).

        Returns:
            float32 DataArray (latent, input) with coordinate `latent_position`; rows never
            recorded (or of empty slots) are NaN.
        """
        return self._window_map("cross_attention", seq, step, {"repeat": repeat, "head": head})

    def latent_attention_map(self, seq: int, repeat: int, self_layer: int, head: int,
                             step: int | None = None) -> xr.DataArray:
        """Perceiver AR latent self-attention (latent, latent_key) after `step`; as
        `cross_attention_map`, with the key slots re-aligned to the step's window."""
        return self._window_map("latent_attention", seq, step,
                                {"repeat": repeat, "self_layer": self_layer, "head": head})

    def _window_map(self, group: str, seq: int, step: int | None, sel: dict) -> xr.DataArray:
        step = self._check_step(step)
        if group not in self._raw:
            raise KeyError(f"no group {group!r} in this trace (groups: {', '.join(self.groups)})")
        raw = self._raw[group]
        first = max(0, step - self.spec.perceiver.n_latents)  # a window row is at most N steps old
        w = np.asarray(raw["weights"].isel(seq=seq, step=slice(first, step + 1), **sel).values,
                       dtype=np.float32)                               # [steps, latent, key]
        lat = np.asarray(raw["latent_position"][seq, first:step + 1].values)  # [steps, latent]
        now = lat[-1]
        out = np.full(w.shape[1:], np.nan, dtype=np.float32)
        if (now >= 0).any():
            ws, filled = int(now[now >= 0].min()), np.zeros(len(now), dtype=bool)
            for s in range(w.shape[0] - 1, -1, -1):  # newest first: a recomputed row replaces older ones
                for slot in np.nonzero(~np.isnan(w[s]).all(axis=1))[0]:
                    p = int(lat[s, slot])
                    i = p - ws
                    if p < 0 or not 0 <= i < len(now) or now[i] != p or filled[i]:
                        continue
                    if group == "cross_attention":
                        out[i] = w[s, slot]
                    else:  # key slot k held position lat[s, k]: move it to the current window
                        shift = int(lat[s][lat[s] >= 0].min()) - ws
                        lo, hi = max(0, -shift), min(w.shape[2], w.shape[2] - shift)
                        out[i, lo + shift:hi + shift] = w[s, slot, lo:hi]
                    filled[i] = True
            # Inputs/keys that appeared after a row was written are after its latent: weight 0.
            key_pos = np.arange(out.shape[1]) + (0 if group == "cross_attention" else ws)
            late = (key_pos[None, :] > now[:, None]) & (key_pos[None, :] <= now.max()) & filled[:, None]
            out[late & np.isnan(out)] = 0.0
        dims = ("latent", "input") if group == "cross_attention" else ("latent", "latent_key")
        return xr.DataArray(out, dims=dims, coords={"latent_position": ("latent", now)}, name="weights",
                            attrs={"seq": seq, "step": step, **sel})

    # ------------------------------------------------------------------ helpers
    def _check_step(self, step: int | None) -> int:
        if self._n_steps == 0:
            raise ValueError("no committed step yet")
        if step is None:
            return self._n_steps - 1
        if not 0 <= step < self._n_steps:
            raise ValueError(f"step {step} not committed (0..{self._n_steps - 1})")
        return int(step)

    def queries_upto(self, seq: int, step: int) -> int:
        """One past the last query position of `seq` processed by steps 0..step."""
        stops = self._query_stop[seq, : step + 1]
        return int(max(stops.max(initial=-1), 0))

    def attention_map(self, seq: int, layer: int, head: int,
                      step: int | None = None) -> xr.DataArray:
        """The (query, key) attention map of one recorded layer/head as of `step`.

        Reads only rows/keys processed by steps 0..step of that (layer, head) slice.

        Args:
            seq: sequence index.
            layer: global layer id (one of `spec.attention_layers`).
            head: global head id (one of `spec.attention_heads`).
            step: last step to include (default: last committed step).

        Returns:
            float32 DataArray of shape (n_queries, n_queries); rows the step had not reached
            yet and cells with key > query are NaN.
        """
        step = self._check_step(step)
        if layer not in self.spec.attention_layers:
            raise KeyError(f"layer {layer} not recorded (recorded: {self.spec.attention_layers})")
        if head not in self.spec.attention_heads:
            raise KeyError(f"head {head} not recorded (recorded: {self.spec.attention_heads})")
        stop = self.queries_upto(seq, step)
        n = self._n_queries
        out = np.full((n, n), np.nan, dtype=np.float32)
        if stop:
            li = self.spec.attention_layers.index(layer)
            hi = self.spec.attention_heads.index(head)
            weights = self._raw["attention"]["weights"]
            out[:stop, :stop] = weights[seq, li, hi, :stop, :stop].values
        coords = {"query": np.arange(n), "key": np.arange(n)}
        return xr.DataArray(out, dims=("query", "key"), coords=coords, name="weights",
                            attrs={"seq": seq, "layer": layer, "head": head, "step": step})

    def token_ids(self, seq: int, upto_step: int | None = None) -> np.ndarray:
        """Token ids of `seq` produced by steps 0..upto_step (prompt included), in order."""
        ids, _ = self._tokens_upto(seq, upto_step)
        return ids

    def token_text(self, seq: int, upto_step: int | None = None) -> str:
        """Text of `seq` produced by steps 0..upto_step (prompt included).

        Args:
            seq: sequence index.
            upto_step: last step to include (default: last committed step).

        Returns:
            The concatenated token strings (ids in brackets if no text was recorded).
        """
        ids, text = self._tokens_upto(seq, upto_step)
        if len(text) and not any(text):
            return "".join(f"[{i}]" for i in ids)
        return "".join(text)

    def _tokens_upto(self, seq: int, upto_step: int | None) -> tuple[np.ndarray, list[str]]:
        step = self._check_step(upto_step)
        ds = self.tokens.isel(seq=seq)
        produced = ds["produced_step"].values
        keep = (produced >= 0) & (produced <= step)
        ids = ds["token_id"].values[keep]
        text = [str(t) for t in ds["text"].values[keep]]
        return ids, text

    def activation_moments(self, sum_steps: bool = False) -> xr.Dataset:
        """Finished statistics from the stored moments, merged over ranks (and steps).

        Args:
            sum_steps: also merge over all committed steps.

        Returns:
            Dataset over (step, layer, site) or (layer, site) with count, mean, std, var, skew,
            kurtosis (excess), min, max and near_zero_fraction.
        """
        ds = self.activations
        dims = ["rank"] + (["step"] if sum_steps else [])
        names = ("value_count", "value_sum", "value_sumsq", "value_sum3", "value_sum4",
                 "near_zero_count")
        sums = {k: ds[k].where(ds["value_count"] >= 0).sum(dims) for k in names}
        fin = finish_moments(sums["value_count"].values, sums["value_sum"].values,
                             sums["value_sumsq"].values, sums["value_sum3"].values,
                             sums["value_sum4"].values)
        template = sums["value_count"]
        out = xr.Dataset({k: template.copy(data=v) for k, v in fin.items()})
        out["count"] = template.astype(np.int64)
        out["min"] = ds["value_min"].min(dims)
        out["max"] = ds["value_max"].max(dims)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["near_zero_fraction"] = sums["near_zero_count"] / template
        return out

    def __repr__(self) -> str:
        return (f"<Trace {self.path} status={self.status} steps={self._n_steps}/"
                f"{self.spec.max_steps} seq={self.spec.n_seq} layers={self.spec.n_layers} "
                f"heads={self.spec.n_heads} world={self.spec.world}>")


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a trace store (finished or still being written) for reading.

    Args:
        path: the store directory written by `TraceWriter`.

    Returns:
        A `Trace` cut at the committed prefix; call `refresh()` to follow a live run.

    Raises:
        TraceError: not a trace, written by a newer format version, or arrays missing.
    """
    return Trace(path)


def _validate(path: Path) -> tuple[dict[str, Any], TraceSpec]:
    """Check the store and return its root attributes and spec, or raise TraceError."""
    if not path.exists():
        raise TraceError(f"{path}: no such trace directory")
    if not path.is_dir():
        raise TraceError(f"{path}: not a directory, so not a trace store")
    meta = path / "zarr.json"
    if not meta.exists():
        if (path / ".zgroup").exists():
            raise TraceError(f"{path}: a Zarr v2 store, not a {FORMAT_NAME} (Zarr v3) trace")
        raise TraceError(f"{path}: not a {FORMAT_NAME} store (no zarr.json)")
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: unreadable root metadata: {exc}") from exc
    if attrs.get("format") != FORMAT_NAME:
        raise TraceError(f"{path}: not a {FORMAT_NAME} store (format={attrs.get('format')!r})")
    version = attrs.get("format_version")
    if not isinstance(version, int):
        raise TraceError(f"{path}: missing or invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise TraceError(f"{path}: trace format version {version} is newer than this reader "
                         f"(supports <= {FORMAT_VERSION}); upgrade workbench")
    try:
        spec = TraceSpec.from_dict(attrs["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: invalid or missing spec in root attributes: {exc}") from exc
    for gname, group in spec.layout().items():
        gdir = path / gname if gname else path
        for array in group.arrays:
            name = f"{gname}/{array.name}" if gname else array.name
            ameta = gdir / array.name / "zarr.json"
            if not ameta.exists():
                raise TraceError(f"{path}: missing array {name!r} (incomplete or damaged trace)")
            try:
                shape = tuple(json.loads(ameta.read_text())["shape"])
            except (OSError, ValueError, KeyError) as exc:
                raise TraceError(f"{path}: unreadable metadata of {name!r}: {exc}") from exc
            if shape != array.shape:
                raise TraceError(f"{path}: array {name!r} has shape {shape}, "
                                 f"expected {array.shape} from the spec")
    return attrs, spec


def has_attention_maps(trace: Trace) -> bool:
    """True if the run recorded self-attention maps: a trace always holds the arrays, but a run whose
    probes left out "attention" (``--probes light``) never wrote them."""
    probes = (trace.metadata.get("probes") or {}).get("probes")
    if probes is not None and "attention" not in probes:
        return False
    return bool(trace.spec.attention_layers) and getattr(trace, "attention", None) is not None
