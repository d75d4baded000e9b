"""The per-rank recorder: listeners on hook points, batched reductions, a TraceWriter.

Listeners, and the blocks' activation taps where the model has them (models/activation_taps.py),
only keep references to the tensors they see (the model never modifies them in place), so the
forward pass pays a Python call per subscribed hook point, or a list store per tapped site. The
prefill (step 0) is queued at once, its activations as raw rows for the writer's worker process
(reduced in place only above ``max_shipped_prefill_values``). Decode steps are only kept (a few
numbers, references, and one copy of the step's activations into the batch's buffer) and handed
to the writer in batches at most ``batch_seconds`` old: one region write per array per batch, and
raw activation values that the writer's worker process turns into histograms and moments on
another core. A decode step on a small model takes about a millisecond; per-step tensor ops and
writes would cost as much again. Nothing here communicates across ranks: each rank reduces its
own heads, columns and timings and writes its own region.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from workbench.models.activation_taps import TAP_SITES, attach_activation_taps, detach_activation_taps
from workbench.models.part_clock import BOUNDARIES, PartClock, attach_part_clock, detach_part_clock
from workbench.probes.batch_buffers import BATCH_BUFFERS
from workbench.probes.selection import ProbeSelection
from workbench.probes.user_probe import UserValues
from workbench.trace.schema import TraceSpec
from workbench.trace.stats import ActivationStats
from workbench.trace.writer import TraceWriter

# Trace site name -> hook point below ``layers.{i}.``
SITE_HOOKS = {"mlp.act.pre": "mlp.act.pre", "mlp.act.post": "mlp.act.post", "attn.out": "attn.out",
              "resid.post": "mlp_allreduce.residual"}
COMM_SITES = ("attn_allreduce", "mlp_allreduce")
KV_FIELDS = ("tokens", "blocks", "bytes_used", "bytes_reserved")  # CacheStats fields, kv_cache arrays


def activation_bin_edges(n_bins: int = 128, span: float = 32.0, finest: float = 0.02) -> tuple[float, ...]:
    """-inf, then sinh-spaced edges over [-span, span] with 0 among them, then +inf.

    Bins are ~0.003 wide near zero (where SiLU's negative lobe and ARM's changes live) and widen
    towards the tails, so one set of fixed edges serves activations and the residual stream.
    """
    u = np.linspace(-1.0, 1.0, n_bins - 1)
    inner = finest * np.sinh(u * np.arcsinh(span / finest))
    inner[(n_bins - 1) // 2] = 0.0
    return (-np.inf, *inner.tolist(), np.inf)


def trace_spec_for(model, selection: ProbeSelection, n_seq: int, prompt_positions: int, max_new_tokens: int,
                   world: int = 1, top_k: int = 5) -> TraceSpec:
    """The store sizes of one generation: one step per forward pass (step 0 = prefill)."""
    cfg = model.cfg
    return TraceSpec(n_seq=n_seq, max_steps=max_new_tokens, max_positions=prompt_positions + max_new_tokens,
                     n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, world=world,
                     top_k=top_k, vocab_size=cfg.vocab_size, attention_layers=selection.attention_layers,
                     attention_heads=selection.attention_heads, bin_edges=activation_bin_edges())


def mad_thresholds(x: torch.Tensor, c: float = 0.13) -> torch.Tensor:
    """ARM's eps = 1.4826 * MAD(|a|) * c for each row of x [rows, n], with lower medians, in one pass."""
    mag = x.float().abs()
    k = (mag.shape[1] + 1) // 2
    med = mag.kthvalue(k, dim=1, keepdim=True).values
    mad = (mag - med).abs().kthvalue(k, dim=1).values
    return 1.4826 * mad * c


# Values reduced at a time by `batched_stats`: bounds its float64 temporaries (32 MB each) however
# long the prompt and wide the model (a long prefill of an 8B model holds ~10^9 values).
STATS_CHUNK_VALUES = 1 << 22


def batched_stats(tensors: Sequence[torch.Tensor], edges: torch.Tensor, eps: torch.Tensor) -> ActivationStats:
    """Histogram on fixed edges (bin i = [edges[i], edges[i+1])) and moments of each tensor.

    Tensors of one size are stacked into a matrix and reduced along its rows, so a step costs a few
    ops per distinct width (MLP and model width), not per (layer, site); big ones a slice of
    columns at a time.
    """
    n, n_bins = len(tensors), edges.numel() - 1
    hist = np.zeros((n, n_bins), dtype=np.int64)
    sums = np.zeros((n, 5), dtype=np.float64)
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.numel(), []).append(i)
    for numel, idxs in groups.items():
        flat = [tensors[i].reshape(-1) for i in idxs]
        k = len(idxs)
        step = max(1, STATS_CHUNK_VALUES // k)
        offset = torch.arange(k, device=flat[0].device)[:, None] * n_bins
        for c0 in range(0, numel, step):
            x = torch.stack([f[c0:c0 + step] for f in flat]).double()  # [k, columns]
            idx = (torch.bucketize(x, edges, right=True) - 1).clamp_(0, n_bins - 1) + offset
            hist[idxs] += torch.bincount(idx.reshape(-1), minlength=k * n_bins).view(k, n_bins).cpu().numpy()
            x2 = x * x
            near = (x.abs() < eps[idxs][:, None]).sum(1, dtype=torch.float64)
            sums[idxs] += torch.stack([x.sum(1), x2.sum(1), (x2 * x).sum(1), (x2 * x2).sum(1), near], 1).cpu().numpy()
            lo[idxs] = np.minimum(lo[idxs], x.amin(1).cpu().numpy())
            hi[idxs] = np.maximum(hi[idxs], x.amax(1).cpu().numpy())
    count = np.array([t.numel() for t in tensors], dtype=np.int64)
    return ActivationStats(hist=hist, count=count, sum=sums[:, 0], sumsq=sums[:, 1], sum3=sums[:, 2],
                           sum4=sums[:, 3], min=lo, max=hi, near_zero=sums[:, 4].astype(np.int64))


@dataclass(slots=True)
class _DecodeStep:
    """What one decode step left for the next batch: references and small numbers only."""

    step: int
    tokens: list[int]
    positions: list[int]
    finished: list[bool]  # sequences that finished before this step: no rows of theirs are recorded
    values: bool  # its activations are in the batch's buffer (in step order); False: none kept
    arm_eps: dict | None  # layer -> ARM's eps at this step
    patterns: dict | None  # layer -> this step's map; None: no maps
    comm: np.ndarray | None  # [3, layers, sites]; None: no collective ran (one rank)
    stamps: list[int] | None  # [layers * BOUNDARIES] perf_counter_ns (models/part_clock.py)
    kv: Any  # what ``Recorder._kv_usage`` kept of the cache at this step; None: not recorded
    seconds: float
    wall: float
    cand_ids: torch.Tensor | None
    cand_probs: torch.Tensor | None
    user: list | None  # per user probe, what its hook points returned (UserValues.take); None: no probes


def part_seconds(stamps_ns: np.ndarray, comm_seconds: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """Seconds per timing part [..., layers, parts] from part-clock stamps [..., layers, BOUNDARIES]
    (ns) and all-reduce seconds [..., layers]; NaN for steps without stamps."""
    ts = stamps_ns.astype(np.float64) / 1e9
    values = {
        "attention": ts[..., 1] - ts[..., 0],
        "mlp": ts[..., 3] - ts[..., 2],
        "comm": comm_seconds,
        "norm": (ts[..., 2] - ts[..., 1]) + (ts[..., 4] - ts[..., 3]) - comm_seconds,
    }
    nan = np.full(ts.shape[:-1], np.nan)
    seconds = np.stack([values.get(p, nan) for p in parts], axis=-1)
    seconds[~stamps_ns.any(axis=(-2, -1))] = np.nan
    return seconds


def chosen_probability(ids: np.ndarray, probs: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Probability of the chosen token among the candidates [..., k]; NaN if it was not among them."""
    match = ids == chosen[..., None]
    return np.where(match.any(-1), (probs * match).sum(-1), np.nan).astype(np.float32)


class Recorder:
    """Records one generation on one rank.

    Args:
        model: the (possibly sharded) model whose hook points to listen to.
        writer: this rank's TraceWriter.
        selection: which probes, layers, heads and steps.
        token_text: id -> display string (rank 0 writes tokens).
        prompts: token ids per sequence (written at step 0).
        user_probes: your own probes (probes/user_probe.py), those of ``writer.spec.user_arrays``.
    """

    def __init__(self, model, writer: TraceWriter, selection: ProbeSelection, token_text,
                 prompts: Sequence[Sequence[int]], user_probes: Sequence = ()) -> None:
        self.model, self.writer, self.sel = model, writer, selection
        self.spec = writer.spec
        self.token_text = token_text
        self.prompts = [list(p) for p in prompts]
        self.n_layers = self.spec.n_layers
        self.rank = writer.rank
        self.lengths = torch.tensor([len(p) for p in self.prompts])
        self.finished = [False] * len(self.prompts)
        self.edges = torch.tensor(self.spec.bin_edges, dtype=torch.float64)
        self._subscriptions: list = []
        self._patterns: dict[int, torch.Tensor] = {}
        self._acts: dict[tuple[int, int], torch.Tensor] = {}  # (layer, site) -> what a listener kept
        self._taps: list | None = None  # the blocks' activation taps, where the model has them
        self._tap_keys: list[tuple[int, int]] = []  # (layer, site) of each tap slot
        self._no_taps: list = []
        self._comm = np.zeros((3, self.n_layers, len(self.spec.comm_sites)))  # start, seconds, bytes
        self._clock: PartClock | None = None  # the blocks' part clock while timing is recorded
        self._pending: list[_DecodeStep] = []
        self._keeps_samples = "sampler" in selection and self.rank == 0
        self._keeps_kv = "kv" in selection
        self._comm_written = False  # set by the comm listeners: with one rank no collective runs
        self._kv_cache = None  # the generation's KV cache while decode steps are kept (for its sizes)
        self._lock = threading.Lock()  # the generating thread and the idle drain share the batch
        self._stopping = threading.Event()
        self._idle_watch: threading.Thread | None = None
        self._idle_error: BaseException | None = None
        self._value_keys: list[tuple[int, int]] = []  # (layer, site) column blocks of shipped values
        self._value_offsets = np.zeros(1, dtype=np.int64)
        self._ship_values = True
        self._values: torch.Tensor | None = None  # [steps, b, 1, width] this batch's activations
        self._value_rows: Sequence[torch.Tensor] = ()  # self._values's rows (no indexing per step)
        self._values_kept = 0  # steps of self._values filled
        self._batch_steps = self.max_batch_steps  # lowered so that self._values stays small
        fns = {p.name: p.fn for p in user_probes}
        missing = [u.name for u in self.spec.user_arrays if u.name not in fns]
        if missing:
            raise ValueError(f"the trace records user probe {missing[0]!r}, but no such probe was given")
        self._user = [UserValues(u, fns[u.name]) for u in self.spec.user_arrays]
        self._arms = [(i, layer.mlp.redistribute) for i, layer in enumerate(getattr(model, "layers", []))
                      if getattr(getattr(layer, "mlp", None), "redistribute", None) is not None]

    # Decode steps wait at most this long before they are queued (it adds to the live lag).
    batch_seconds = 0.25
    max_batch_steps = 256
    # Decode steps with more activation values than this are reduced at once, on their device.
    max_shipped_values = 1 << 20
    # A prefill with at most this many activation values (128 MB) is reduced by the writer's worker
    # too, not on the generating thread (where it took several times the prefill itself).
    max_shipped_prefill_values = 1 << 25
    # A batch holds at most this many bytes of activations (fewer steps for big models or batches).
    max_batch_value_bytes = 16 << 20
    batches_decode = True  # False: every step is reduced and queued as it ends
    # Sets torch's threads for each step while the writer's worker shares the cores (set by
    # probes.recording; None: leave them).
    core_share = None

    # ------------------------------------------------- model-specific parts (subclasses override)
    @classmethod
    def check_selection(cls, model, selection: ProbeSelection) -> None:
        """Refuse a selection this model cannot record (before the store is created)."""
        selection.check_model(model.cfg.n_layers, model.cfg.n_heads)

    @classmethod
    def trace_spec(cls, model, selection: ProbeSelection, n_seq: int, prompt_positions: int,
                   max_new_tokens: int, world: int = 1, top_k: int = 5) -> TraceSpec:
        """The store sizes of one generation of this model."""
        return trace_spec_for(model, selection, n_seq, prompt_positions, max_new_tokens, world, top_k)

    def _layer_hooks(self, suffix: str) -> str | list[str]:
        """Hook points of ``suffix`` (e.g. ``mlp.act.pre``) in every layer of the trace's layer dim."""
        return f"layers.*.{suffix}"

    def _layer_of(self, hp) -> int:
        """Index on the trace's layer dim of a hook point returned by ``_layer_hooks``."""
        return hp.layer

    def _attention_hooks(self) -> list[str]:
        return [f"layers.{i}.attn.pattern" for i in self.spec.attention_layers]

    def _timed_blocks(self) -> list:
        """The modules that stamp each entry of the trace's layer dim (models/part_clock.py)."""
        return list(self.model.layers)

    def _tapped_blocks(self) -> list:
        """The modules with activation taps (models/activation_taps.py) for each entry of the trace's
        layer dim; empty: the sites are kept by hook-point listeners."""
        layers = list(getattr(self.model, "layers", []))
        return layers if layers and all(hasattr(b, "attach_taps") for b in layers) else []

    # ---------------------------------------------------------------- listeners
    def _listen(self, pattern: str | list[str], make) -> None:
        """Subscribe ``make(layer)`` to each hook point matching ``pattern``: the layer is bound once."""
        try:
            hps = self.model.match_hook_points(pattern)
        except KeyError:
            return  # this model has no such hook point (e.g. no TP units fire timing): nothing to record
        for hp in hps:
            fn = make(self._layer_of(hp))
            hp.listeners.append(fn)
            self._subscriptions.append((hp, fn))

    def attach(self) -> "Recorder":
        sel = self.sel
        if "attention" in sel:
            self._listen(self._attention_hooks(), self._pattern_keeper)
        if "activations" in sel:
            tapped = self._tapped_blocks()
            if tapped and sorted(TAP_SITES) == sorted(self.spec.hist_sites):
                self._taps = attach_activation_taps(tapped)
                self._tap_keys = [(layer, self.spec.hist_sites.index(site))
                                  for layer in range(len(tapped)) for site in TAP_SITES]
                self._no_taps = [None] * len(self._taps)
            else:
                for s, site in enumerate(self.spec.hist_sites):
                    self._listen(self._layer_hooks(SITE_HOOKS[site]), self._keeper(s))
        if "comm" in sel or "timing" in sel:
            for c, site in enumerate(self.spec.comm_sites):
                self._listen(self._layer_hooks(f"{site}.timing"), self._comm_keeper(c))
        if "timing" in sel:
            self._clock = attach_part_clock(self._timed_blocks(), next(self.model.parameters()).device)
        hook_points = self.model.hook_points
        for user in self._user:
            for h, name in enumerate(user.spec.hooks):
                fn = user.listener(h)
                hook_points[name].listeners.append(fn)
                self._subscriptions.append((hook_points[name], fn))
        self._write_prompt()
        if self.batches_decode:
            self._idle_watch = threading.Thread(target=self._drain_when_idle, name="recorder-idle-drain",
                                                daemon=True)
            self._idle_watch.start()
        return self

    def detach(self) -> None:
        """Queue the steps still waiting in a batch and stop listening."""
        self._stopping.set()
        if self._idle_watch is not None:
            self._idle_watch.join()
        try:
            with self._lock:
                self._raise_idle_error()
                if self._pending:
                    self._drain()
        finally:
            self._unsubscribe()
            self._kv_cache = None

    def _drain_when_idle(self) -> None:
        """Queue a waiting batch when no step has come for a while (slow step, paused caller)."""
        while not self._stopping.wait(self.batch_seconds):
            with self._lock:
                if self._pending and time.time() - self._pending[-1].wall >= self.batch_seconds:
                    try:
                        self._drain()
                    except BaseException as e:  # raised on the generating thread at its next step
                        self._idle_error = e
                        return

    def _raise_idle_error(self) -> None:
        if self._idle_error is not None:
            raise RuntimeError(f"recording failed: {self._idle_error}") from self._idle_error

    def _unsubscribe(self) -> None:
        for hp, fn in self._subscriptions:
            hp.listeners[:] = [f for f in hp.listeners if f is not fn]
        self._subscriptions.clear()
        if self._clock is not None:
            detach_part_clock(self._timed_blocks())
            self._clock = None
        if self._taps is not None:
            detach_activation_taps(self._tapped_blocks())
            self._taps = None

    # Listeners run dozens of times per decode step: each only keeps a reference or a number.
    def _pattern_keeper(self, layer: int):
        steps, info = self.sel.attention_steps, self.model.info

        def keep(pattern, hp):
            if steps is None or info.step in steps:
                self._patterns[layer] = pattern
        return keep

    def _keeper(self, site: int):
        def make(layer: int):
            key = (layer, site)

            def keep(x, hp):
                self._acts[key] = x
            return keep
        return make

    def _comm_keeper(self, site: int):
        def make(layer: int):
            def keep(t, hp):
                self._comm_written = True
                self._comm[0, layer, site] = (t["start_ns"] - self.model.info.t0_ns) / 1e9
                self._comm[1, layer, site] = (t["end_ns"] - t["start_ns"]) / 1e9
                self._comm[2, layer, site] = t["bytes"]
            return keep
        return make

    # ---------------------------------------------------------------- per step
    def _write_prompt(self) -> None:
        w = self.writer
        for j, ids in enumerate(self.prompts):
            w.write_tokens(0, 0, np.asarray([ids]), [[self.token_text(i) for i in ids]], seq=slice(j, j + 1))
        if self.rank == 0:
            w.write(0, "tokens/prompt_len", self.lengths.numpy())
            if self.spec.vocab_size:  # candidates are ids: readers show them with this table
                w.write(0, "tokens/vocab_text", np.asarray([self.token_text(i) for i in range(self.spec.vocab_size)],
                                                           dtype=object))

    def on_step(self, event) -> None:
        """Keep what the listeners saw during this step; queue the batch when it is due."""
        if self.core_share is not None:  # the next decode step computes as many rows as this one
            self.core_share.before_step(self._step_rows(event) if event.step > 0 else len(event.tokens))
        if event.step == 0 or not self.batches_decode:
            self._record_step(event)
            return
        with self._lock:
            self._raise_idle_error()
            self._keep_decode_step(event)
            pending = self._pending
            if (len(pending) >= self._batch_steps or all(event.finished) or event.step >= self.spec.max_steps - 1
                    or pending[-1].wall - pending[0].wall + pending[0].seconds >= self.batch_seconds):
                self._drain()

    def _step_rows(self, event) -> int:
        """Rows a decode step's blocks computed: one per sequence."""
        return len(event.tokens)

    def _record_step(self, event) -> None:
        """Reduce what the listeners kept during this step, queue it, and end the step."""
        step, w = event.step, self.writer
        active = [not f for f in self.finished]
        if step == 0:
            q_start, q_stop = torch.zeros_like(self.lengths), self.lengths.clone()
        else:
            q_start = self.lengths + step - 1
            q_stop = q_start + 1
        w.write_queries(step, q_start.numpy(), q_stop.numpy())
        if self._patterns:
            self._write_attention(step, q_start, q_stop, active)
        self._acts_from_taps()
        if self._acts:
            self._write_activations(step, q_start, q_stop, active)
        if "kv" in self.sel and hasattr(event.cache, "usage"):
            self._write_kv_totals(step, event.cache.stats_of(*np.array([event.cache.usage()], dtype=np.int64).T))
        if "comm" in self.sel and self._comm[1].any():
            w.write_comm(step, start=self._comm[0], seconds=self._comm[1], nbytes=self._comm[2].astype(np.int64))
        if "timing" in self.sel:
            self._write_timing(step, event)
        if "sampler" in self.sel and self.rank == 0:
            self._write_sample(step, event, active)
        for j, tok in enumerate(event.tokens):  # the chosen token occupies the next position
            if active[j]:
                w.write_tokens(step, int(event.positions[j]), np.asarray([[tok]]), [[self.token_text(tok)]],
                               seq=slice(j, j + 1))
        for user in self._user:
            values = user.take()
            if values is not None:
                w.write(step, f"user/{user.spec.name}", user.to_array([values])[0])
        self.finished = list(event.finished)
        self._patterns.clear()
        self._acts.clear()
        self._comm[:] = 0
        self._comm_written = False
        w.end_step(step)

    def _acts_from_taps(self) -> None:
        """Move what the taps hold into ``self._acts`` (the per-step path reads that dict)."""
        if self._taps is not None and self._taps[0] is not None:
            self._acts.update(zip(self._tap_keys, self._taps))
            self._taps[:] = self._no_taps

    def _write_attention(self, step: int, q_start, q_stop, active) -> None:
        layers = sorted(self._patterns)
        stacked = torch.stack([self._patterns[i] for i in layers], dim=1)  # [b, layers, heads, t, keys]
        for j in range(stacked.shape[0]):
            if not active[j]:
                continue
            a, b = int(q_start[j]), int(q_stop[j])
            rows = stacked[j, :, :, : b - a, :b] if step == 0 else stacked[j, :, :, :1, :b]
            rows_np = rows.to(torch.float16 if self.spec.attention_dtype == "float16" else torch.float32)
            if len(layers) == len(self.spec.attention_layers):
                self.writer.write_attention(step, rows_np.cpu().numpy()[None], query_start=a, seq=slice(j, j + 1))
            else:
                for li, layer in enumerate(layers):
                    self.writer.write_attention(step, rows_np[li].cpu().numpy()[None], query_start=a, layer=layer,
                                                seq=slice(j, j + 1))
            # Attention received per cached position: sum over this rank's heads and the step's rows.
            mass = rows.float().sum(dim=(1, 2)).cpu().numpy()  # [layers, keys]
            if len(layers) == self.n_layers:
                self.writer.write_attention_mass(step, mass[None], seq=slice(j, j + 1))
            else:
                for li, layer in enumerate(layers):
                    self.writer.write_attention_mass(step, mass[li][None], layer=layer, seq=slice(j, j + 1))

    def _write_activations(self, step: int, q_start, q_stop, active) -> None:
        keys = sorted(self._acts)
        rows = [j for j in range(len(active)) if active[j]]
        tensors = []
        for layer, s in keys:
            x = self._acts[(layer, s)]  # [b, t, width]
            if step == 0:
                parts = [x[j, : int(q_stop[j])] for j in rows]
                x = torch.cat(parts) if parts else x[:0]
            else:
                x = x[rows]
            tensors.append(x)
        if not tensors or any(t.numel() == 0 for t in tensors):
            return
        if step == 0 and self._ship_step_values(step, keys, tensors):
            return
        self._write_stats(step, keys, tensors, self._near_zero_eps(keys, tensors))

    def _write_stats(self, step: int, keys: list[tuple[int, int]], tensors: list[torch.Tensor],
                     eps: list[float]) -> None:
        """Reduce ``tensors`` (one per sorted (layer, site) of ``keys``) on their device and queue
        their histograms, moments and near-zero thresholds ``eps``."""
        sites = self.spec.hist_sites
        stats = batched_stats(tensors, self.edges.to(tensors[0].device),
                              torch.tensor(eps, dtype=torch.float64, device=tensors[0].device))
        if len(keys) == self.n_layers * len(sites):  # every (layer, site): one region write per array
            self.writer.write_activations(step, stats.reshape((self.n_layers, len(sites))))
            self.writer.write(step, "activations/near_zero_eps", np.reshape(eps, (self.n_layers, len(sites))))
            return
        for i, (layer, s) in enumerate(keys):
            one = ActivationStats(hist=stats.hist[i], count=stats.count[i], sum=stats.sum[i], sumsq=stats.sumsq[i],
                                  sum3=stats.sum3[i], sum4=stats.sum4[i], min=stats.min[i], max=stats.max[i],
                                  near_zero=stats.near_zero[i])
            self.writer.write_activations(step, one, layer=layer, site=sites[s])
            self.writer.write(step, "activations/near_zero_eps", eps[i], layer=layer, site=sites[s])

    def _ship_step_values(self, step: int, keys: list[tuple[int, int]], tensors: list[torch.Tensor]) -> bool:
        """Hand one step's activations, every row of every (layer, site), to the writer's worker
        to reduce, as decode batches are; False (nothing sent) if they are too many or their rows
        differ."""
        mats = [t.reshape(-1, t.shape[-1]) for t in tensors]  # [rows, width] each
        if (sum(m.numel() for m in mats) > self.max_shipped_prefill_values
                or any(m.shape[0] != mats[0].shape[0] for m in mats)):
            return False
        layers, site_ids, eps = self._column_blocks(keys, step, step, {step: self._arm_eps()} if self._arms else {})
        values = torch.cat(mats, dim=1).float().cpu().numpy()
        offsets = np.concatenate([[0], np.cumsum([m.shape[1] for m in mats])]).astype(np.int64)
        self.writer.write_activation_values(step, step, values, np.full(len(values), step), offsets, layers,
                                            site_ids, eps)
        return True

    def _column_blocks(self, keys: Sequence[tuple[int, int]], first: int, last: int,
                       arm_eps: dict[int, dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer and site of each column block of shipped values, and their near-zero thresholds
        for steps first..last [steps, blocks]: the spec's fixed one; at the MLP activation sites
        ARM's eps of the step (``arm_eps``: step -> layer -> eps) where it ran, else NaN, for
        which the worker applies ARM's MAD rule on mlp.act.pre."""
        sites = self.spec.hist_sites
        layers = np.array([k[0] for k in keys], dtype=np.int64)
        site_ids = np.array([k[1] for k in keys], dtype=np.int64)
        eps = np.full((last - first + 1, len(keys)), float(self.spec.near_zero_eps))
        cols = np.flatnonzero([sites[s].startswith("mlp.act") for s in site_ids])
        eps[:, cols] = np.nan
        for step, by_layer in arm_eps.items():
            eps[step - first, cols] = [by_layer.get(int(layers[c]), np.nan) for c in cols]
        return layers, site_ids, eps

    def _near_zero_eps(self, keys: list[tuple[int, int]], tensors: list[torch.Tensor]) -> list[float]:
        """The threshold of |a| < eps per (layer, site).

        At the MLP activation sites this is ARM's eps, MAD-based on the pre-redistribution
        activation: ARM's own where it runs, the same formula elsewhere, so runs with ARM off and on
        count near-zero values the same way and before/after share one eps. (Under tensor
        parallelism a layer without ARM takes the MAD of the rank's own columns.)
        """
        sites = self.spec.hist_sites
        eps = [float(self.spec.near_zero_eps)] * len(keys)
        pre = [i for i, (_, s) in enumerate(keys) if sites[s] == "mlp.act.pre"]
        if not pre:
            return eps
        if sum(tensors[i].numel() for i in pre) <= STATS_CHUNK_VALUES:  # one op for all layers
            mad = mad_thresholds(torch.stack([tensors[i].reshape(-1) for i in pre])).tolist()
        else:  # a long prefill: a layer at a time, not a copy of every layer's values
            mad = [float(mad_thresholds(tensors[i].reshape(1, -1))[0]) for i in pre]
        by_layer = {keys[i][0]: m for i, m in zip(pre, mad)}
        for layer, m in list(by_layer.items()):
            arm = getattr(getattr(self.model.layers[layer], "mlp", None), "redistribute", None)
            if arm is not None and getattr(arm, "stats", None) is not None:
                by_layer[layer] = float(arm.stats.eps)
        for i, (layer, s) in enumerate(keys):
            if sites[s].startswith("mlp.act") and layer in by_layer:
                eps[i] = by_layer[layer]
        return eps

    def _write_timing(self, step: int, event) -> None:
        stamps = np.array(self._clock.take(), dtype=np.int64).reshape(self.n_layers, BOUNDARIES)
        seconds = part_seconds(stamps, self._comm[1].sum(axis=1), self.spec.timing_parts)
        self.writer.write_timing(step, seconds, step_seconds=float(event.seconds),
                                 step_start=time.time() - float(event.seconds))

    def _write_sample(self, step: int, event, active) -> None:
        ids = event.cand_ids.cpu().numpy()
        probs = event.cand_probs.float().cpu().numpy()
        chosen = np.asarray(event.tokens)
        chosen_prob = chosen_probability(ids, probs, chosen)
        k = min(ids.shape[1], self.spec.top_k)
        self.writer.write_sample(step, chosen, chosen_prob=chosen_prob, candidate_ids=ids[:, :k],
                                 candidate_probs=probs[:, :k])

    # ---------------------------------------------------------------- decode batches
    def _keep_decode_step(self, event) -> None:
        # Runs every step, between forward passes: positional arguments, no comprehensions.
        taps = self._taps
        values = bool(self._acts if taps is None else taps[0] is not None) and self._keep_activations(event.step)
        kv = self._kv_usage(event.cache) if self._keeps_kv else None
        self._pending.append(_DecodeStep(
            event.step, event.tokens, event.positions, self.finished, values,
            self._arm_eps() if values and self._arms else None, self._patterns or None,
            self._comm if self._comm_written else None, self._clock.take() if self._clock is not None else None,
            kv, event.seconds, time.time(), event.cand_ids if self._keeps_samples else None,
            event.cand_probs if self._keeps_samples else None, [u.take() for u in self._user] if self._user else None))
        self.finished = event.finished
        self._acts.clear()  # its values are in the step; reusing the dict spares the garbage collector
        if self._patterns:  # the step keeps this dict (an empty one stays here: the next forward fills it)
            self._patterns = {}
        if self._comm_written:  # the step keeps this array; collectives write into a fresh one
            self._comm, self._comm_written = np.zeros_like(self._comm), False

    def _arm_eps(self) -> dict[int, float]:
        return {i: arm.stats.eps for i, arm in self._arms if arm.stats is not None}

    def _keep_activations(self, step: int) -> bool:
        """Copy this step's activations into the batch's next row, in column-block order; False if
        they were reduced at once instead.

        One copy now, rather than references kept until the batch is drained: a tensor the forward
        pass cannot free makes its allocator hand out cold memory on later steps, and the batch
        needs no concatenation of thousands of small tensors.
        """
        taps = self._taps
        if taps is None:
            keys, acts = list(self._acts), list(self._acts.values())  # forward order, the same every step
        else:
            keys, acts = self._tap_keys, taps
        if keys is not self._value_keys and keys != self._value_keys:
            if self._values_kept:  # the buffer holds another layout: queue its steps first
                self._drain()
            self._value_keys = keys
            self._value_offsets = np.concatenate([[0], np.cumsum([x.shape[-1] for x in acts])]).astype(np.int64)
            self._ship_values = (sum(x.numel() for x in acts) <= self.max_shipped_values
                                 and all(x.shape[-2] == 1 for x in acts))
            self._values, self._value_rows = None, ()
            step_bytes = sum(x.numel() * x.element_size() for x in acts)
            self._batch_steps = max(1, min(self.max_batch_steps, self.max_batch_value_bytes // max(step_bytes, 1)))
        if not self._ship_values or all(self.finished):
            # Too big to ship raw (large model or batch): reduce now, on the tensors' device.
            self._acts_from_taps()
            q_start = self.lengths + step - 1
            self._write_activations(step, q_start, q_start + 1, [not f for f in self.finished])
            return False
        if self._values is None:  # a buffer [steps, b, 1, width] for the batch
            shape = (self._batch_steps, acts[0].shape[0], 1, int(self._value_offsets[-1]))
            self._values, self._value_rows = BATCH_BUFFERS.take(shape, acts[0])
        torch.cat(acts, dim=-1, out=self._value_rows[self._values_kept])
        self._values_kept += 1
        if taps is not None:  # let go of the tensors: the next forward pass reuses their memory
            taps[:] = self._no_taps
        return True

    def _drain(self) -> None:
        """Queue every kept decode step (one write per array), then end them in order."""
        steps, self._pending = self._pending, []
        first, k = steps[0].step, len(steps)
        w = self.writer
        if self.rank == 0:
            q_start = self.lengths.numpy()[:, None] + np.arange(first, first + k)[None, :] - 1
            w.write(first, "tokens/query_start", q_start, n_steps=k)
            w.write(first, "tokens/query_stop", q_start + 1, n_steps=k)
            self._queue_tokens(steps)
            if steps[0].cand_ids is not None:
                self._queue_samples(steps)
        if any(st.patterns for st in steps):
            self._queue_attention(steps)
        self._queue_activation_values(steps)
        if steps[0].kv is not None:
            self._queue_kv(steps)
        comm = None
        if any(st.comm is not None for st in steps):
            no_comm = np.zeros_like(self._comm)
            comm = np.stack([no_comm if st.comm is None else st.comm for st in steps])  # [k, 3, layers, sites]
        if "comm" in self.sel and comm is not None and comm[:, 1].any():
            w.write(first, "comm/start", comm[:, 0], n_steps=k)
            w.write(first, "comm/seconds", comm[:, 1], n_steps=k)
            w.write(first, "comm/bytes", comm[:, 2].astype(np.int64), n_steps=k)
        if "timing" in self.sel:
            self._queue_timing(steps, comm)
        if self._user:
            self._queue_user_values(steps)
        w.end_step(first, steps[-1].step)  # together: a record of several steps commits as one

    def _kv_usage(self, cache):
        """What a decode step keeps of the KV cache for ``_queue_kv``: tokens and blocks."""
        if not hasattr(cache, "usage"):
            return None
        self._kv_cache = cache
        return cache.usage()

    def _queue_kv(self, steps: list[_DecodeStep]) -> None:
        self._write_kv_totals(steps[0].step, self._kv_cache.stats_of(*np.array([st.kv for st in steps],
                                                                                dtype=np.int64).T))

    def _write_kv_totals(self, first: int, kv) -> None:
        """``kv``: CacheStats of arrays over steps first, first + 1, ... (``stats_of`` of what
        ``usage()`` returned at each); a decoder's every layer holds the same."""
        for name in KV_FIELDS:
            data = getattr(kv, name)
            self.writer.write(first, f"kv_cache/{name}", data[:, None], n_steps=len(data))

    def _queue_tokens(self, steps: list[_DecodeStep]) -> None:
        """The chosen tokens of each sequence at their positions (consecutive while it is active)."""
        first = steps[0].step
        for j in range(len(self.prompts)):
            ids = [st.tokens[j] for st in steps if not st.finished[j]]
            if not ids:
                continue
            pos = slice(steps[0].positions[j], steps[0].positions[j] + len(ids))
            last = first + len(steps) - 1
            self.writer.write(last, "tokens/token_id", [ids], seq=slice(j, j + 1), position=pos)
            self.writer.write(last, "tokens/produced_step", [list(range(first, first + len(ids)))],
                              seq=slice(j, j + 1), position=pos)
            self.writer.write(last, "tokens/text", np.asarray([[self.token_text(t) for t in ids]], dtype=object),
                              seq=slice(j, j + 1), position=pos)

    def _queue_samples(self, steps: list[_DecodeStep]) -> None:
        first, k = steps[0].step, len(steps)
        ids = torch.stack([st.cand_ids for st in steps], 1).cpu().numpy()  # [b, steps, k]
        probs = torch.stack([st.cand_probs for st in steps], 1).float().cpu().numpy()
        chosen = np.array([st.tokens for st in steps]).T  # [b, steps]
        chosen_prob = chosen_probability(ids, probs, chosen)
        top = min(ids.shape[-1], self.spec.top_k)
        w = self.writer
        w.write(first, "tokens/chosen", chosen, n_steps=k)
        w.write(first, "tokens/chosen_prob", chosen_prob, n_steps=k)
        w.write(first, "tokens/candidate_id", ids[..., :top], n_steps=k, k=slice(0, top))
        w.write(first, "tokens/candidate_prob", probs[..., :top], n_steps=k, k=slice(0, top))

    def _queue_timing(self, steps: list[_DecodeStep], comm: np.ndarray | None) -> None:
        stamps = np.array([st.stamps for st in steps], dtype=np.int64).reshape(len(steps), self.n_layers, -1)
        comm_seconds = np.zeros(stamps.shape[:2]) if comm is None else comm[:, 1].sum(axis=2)
        seconds = part_seconds(stamps, comm_seconds, self.spec.timing_parts)  # [k, layers, parts]
        step_seconds = np.array([st.seconds for st in steps])
        first, k = steps[0].step, len(steps)
        self.writer.write(first, "timing/seconds", seconds, n_steps=k)
        self.writer.write(first, "timing/step_seconds", step_seconds, n_steps=k)
        self.writer.write(first, "timing/step_start", np.array([st.wall for st in steps]) - step_seconds, n_steps=k)

    def _queue_user_values(self, steps: list[_DecodeStep]) -> None:
        """Each user probe's values of the batch's steps, one write per probe."""
        for i, user in enumerate(self._user):
            values = [st.user[i] for st in steps]
            if any(v is not None for v in values):
                self.writer.write(steps[0].step, f"user/{user.spec.name}", user.to_array(values), n_steps=len(steps))

    def _queue_activation_values(self, steps: list[_DecodeStep]) -> None:
        """Raw values of every (step, layer, site), shipped to the writer's worker to reduce."""
        kept = [st for st in steps if st.values]
        if not kept:
            return
        first, last = steps[0].step, steps[-1].step
        layers, site_ids, eps = self._column_blocks(self._value_keys, first, last,
                                                    {st.step: st.arm_eps for st in kept if st.arm_eps is not None})
        buffer, rows = self._values, self._value_rows
        self._values, self._value_rows, self._values_kept = None, (), 0
        values = buffer[:len(kept)].reshape(len(kept) * buffer.shape[1], -1)  # [steps * b, width]; kept in order
        active = ~np.array([st.finished for st in kept], dtype=bool)  # [steps, b]
        row_steps = np.repeat([st.step for st in kept], active.sum(1))
        if not active.all():  # no rows of sequences that had finished
            values = values[torch.from_numpy(active.reshape(-1)).to(values.device)]
        values = values.float().cpu().numpy()
        self.writer.write_activation_values(first, last, values, row_steps, self._value_offsets, layers, site_ids,
                                            eps)
        BATCH_BUFFERS.give(buffer, rows, self.writer, last)

    def _queue_attention(self, steps: list[_DecodeStep]) -> None:
        """One decode row per step: runs of consecutive recorded steps become one block per sequence."""
        run: list[_DecodeStep] = []
        for st in [*steps, None]:
            if st is not None and st.patterns and (not run or st.step == run[-1].step + 1):
                run.append(st)
                continue
            if run:
                self._queue_attention_run(run)
            run = [st] if st is not None and st.patterns else []

    def _queue_attention_run(self, run: list[_DecodeStep]) -> None:
        layers = sorted(run[0].patterns)
        rows = [torch.stack([st.patterns[i] for i in layers], dim=1)[:, :, :, 0] for st in run]  # [b, L, H, keys]
        n_keys = max(r.shape[-1] for r in rows)
        block = rows[0].new_zeros((*rows[0].shape[:3], len(run), n_keys))  # [b, L, H, steps, keys]
        for i, r in enumerate(rows):
            block[:, :, :, i, : r.shape[-1]] = r
        dtype = torch.float16 if self.spec.attention_dtype == "float16" else torch.float32
        all_layers = len(layers) == len(self.spec.attention_layers)
        first, last = run[0].step, run[-1].step
        for j in range(block.shape[0]):
            k = sum(not st.finished[j] for st in run)
            if k == 0:
                continue
            q0 = int(self.lengths[j]) + first - 1  # query position of the first row
            rows_j = block[j, :, :, :k, : q0 + k]  # [L, H, k, keys]
            weights = rows_j.to(dtype).cpu().numpy()
            # Attention received per cached position: sum over this rank's heads; keys past a
            # row's query were never cached at that step.
            mass = rows_j.float().sum(dim=1).transpose(0, 1).cpu().numpy()  # [k, L, keys]
            uncached = np.arange(q0 + k)[None, :] > (q0 + np.arange(k))[:, None]  # [k, keys]
            mass[np.broadcast_to(uncached[:, None, :], mass.shape)] = np.nan
            seq = slice(j, j + 1)
            if all_layers:
                self.writer.write_attention(last, weights[None], query_start=q0, seq=seq)
            else:
                for li, layer in enumerate(layers):
                    self.writer.write_attention(last, weights[li][None], query_start=q0, layer=layer, seq=seq)
            if len(layers) == self.n_layers:
                self.writer.write(first, "kv_cache/attention_mass", mass[None], n_steps=k, seq=seq,
                                  position=slice(0, q0 + k))
            else:
                for li, layer in enumerate(layers):
                    self.writer.write(first, "kv_cache/attention_mass", mass[None, :, li], n_steps=k, seq=seq,
                                      layer=layer, position=slice(0, q0 + k))

