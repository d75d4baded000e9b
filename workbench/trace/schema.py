"""The trace store layout: one declarative description shared by the writer and the reader.

A trace is one Zarr v3 directory per run. `TraceSpec` holds the run's sizes; `TraceSpec.layout()`
turns them into `GroupLayout`/`ArrayLayout` records (name, dims, dtype, fill value, chunks) from
which the writer creates the store and against which the reader validates it. The human-readable
version of the same layout is docs/trace-format.md; bump FORMAT_VERSION on any incompatible change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMAT_NAME = "workbench-trace"
FORMAT_VERSION = 1

DEFAULT_HIST_SITES: tuple[str, ...] = ("mlp.act.pre", "mlp.act.post", "attn.out", "resid.post")
DEFAULT_COMM_SITES: tuple[str, ...] = ("attn_allreduce", "mlp_allreduce")
DEFAULT_TIMING_PARTS: tuple[str, ...] = ("attention", "mlp", "norm", "comm")

# Query rows per attention chunk: a flush of a few decode steps touches one band per (layer, head),
# and one (layer, head) map of 2,000 positions is ~32 small chunks to read.
ATTENTION_ROW_BAND = 64
# Steps and latent rows per chunk of a Perceiver map. A growing window's decode step writes one
# latent row of each head's window map: a chunk per step and head made the worker's file writes
# the cost of recording maps, and chunks of the whole window made it encode ~1 GB/s of fill.
PERCEIVER_MAP_STEPS = 32
PERCEIVER_MAP_LATENTS = 32
# Longest key/position extent kept in one chunk; longer sequences are tiled along that axis.
MAX_POSITION_CHUNK = 4096

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

STRING = "str"  # Zarr v3 variable-length UTF-8 strings


def default_bin_edges(n_bins: int = 64, lo: float = -10.0, hi: float = 10.0) -> tuple[float, ...]:
    """Fixed histogram edges: -inf, n_bins-1 equal-width edges over [lo, hi], +inf.

    Args:
        n_bins: number of bins (>= 3); the outer two catch everything below lo / above hi.
        lo: lowest finite edge.
        hi: highest finite edge.

    Returns:
        n_bins + 1 increasing edges; bin i is [edges[i], edges[i+1]).
    """
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3, got {n_bins}")
    inner = np.linspace(lo, hi, n_bins - 1)
    return tuple(float(x) for x in np.concatenate([[-np.inf], inner, [np.inf]]))


@dataclass(frozen=True)
class PerceiverSpec:
    """Sizes of the Perceiver section: cross-attention (latents attending to inputs) and, when
    n_self_layers > 0, latent self-attention (group `latent_attention`).

    n_heads are query heads (global) of both; under tensor parallelism rank r owns the
    contiguous range [r*n_heads/world, (r+1)*n_heads/world), like self-attention heads.
    layer_blocks names the model block behind each index of the trace-wide `layer` dim (kv_cache,
    activations, comm, timing), e.g. "repeats.0.cross", "repeats.0.layers.1"; empty if unknown.
    """

    n_latents: int
    n_inputs: int
    n_repeats: int = 1
    n_heads: int = 1
    n_self_layers: int = 0
    layer_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_blocks", tuple(self.layer_blocks))  # JSON gives lists

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerceiverSpec:
        """From `dataclasses.asdict` output; unknown keys are ignored (forward compatible)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class UserArraySpec:
    """One user probe's array in group `user` (workbench/probes/user_probe.py): dims
    (step, `{name}_hook`, rank, *dims); `hooks` are the hook point names along `{name}_hook`;
    `fn` is the probe function's qualified name (for the record; it is not stored)."""

    name: str
    hooks: tuple[str, ...]
    dims: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    description: str = ""
    fn: str = ""

    def __post_init__(self) -> None:  # JSON gives lists
        for key in ("hooks", "dims", "shape"):
            object.__setattr__(self, key, tuple(getattr(self, key)))

    @property
    def hook_dim(self) -> str:
        return f"{self.name}_hook"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserArraySpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def user_group_problem(user_arrays: Sequence[UserArraySpec], n_seq: int) -> str | None:
    """Why these user probes' arrays cannot share group `user`, in one line (None: they can).

    The group is one xarray Dataset: a name is either one variable or one dim, and a dim has one
    size; `seq` is the run's sequences.
    """
    names = [u.name for u in user_arrays]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        return f"two user probes are named {dup!r}"
    own = {"step", "rank"} | {u.hook_dim for u in user_arrays}
    dims = {d for u in user_arrays for d in u.dims}
    sizes: dict[str, tuple[int, str]] = {}
    for u in user_arrays:
        if u.name in own | dims:
            return f"user probe {u.name!r}: its name is also a dim of group user"
        for d, n in zip(u.dims, u.shape):
            if d in own:
                return f"user probe {u.name!r}: dim {d!r} is the trace's own"
            if d == "seq" and n != n_seq:
                return f"user probe {u.name!r}: dim 'seq' has size {n}, but the run has {n_seq} sequences"
            if d in sizes and sizes[d][0] != n:
                return (f"user probes {sizes[d][1]!r} and {u.name!r} give dim {d!r} different sizes "
                        f"({sizes[d][0]} and {n})")
            sizes.setdefault(d, (n, u.name))
    return None


@dataclass(frozen=True)
class ArrayLayout:
    """One Zarr array: its path inside its group, named dims, dtype, fill value and chunks."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    fill: Any
    chunks: tuple[int, ...]
    shape: tuple[int, ...]
    description: str = ""
    coordinates: tuple[str, ...] = ()  # non-index coordinates attached to this variable
    causal: bool = False  # cells with key > query are never written (read as fill)


@dataclass(frozen=True)
class GroupLayout:
    """One Zarr group (an xarray Dataset): its arrays, coordinates included."""

    name: str
    arrays: tuple[ArrayLayout, ...]
    description: str = ""

    def __getitem__(self, name: str) -> ArrayLayout:
        for array in self.arrays:
            if array.name == name:
                return array
        raise KeyError(f"{self.name}/{name}")


@dataclass
class TraceSpec:
    """Sizes of one recorded run; everything the store layout depends on.

    Step 0 is the prefill; step s >= 1 is decode step s. Positions and attention query/key indices
    are absolute token positions (prompt padded to a common length, then generated tokens).

    Attributes:
        n_seq: batch size.
        max_steps: 1 prefill step + max_new_tokens decode steps.
        max_positions: padded prompt length + max_new_tokens.
        n_layers: decoder layers.
        n_heads: query heads (global, before tensor parallelism).
        n_kv_heads: key/value heads (global); defaults to n_heads.
        world: tensor-parallel size (number of writer ranks).
        top_k: sampler candidates recorded per step.
        bin_edges: fixed histogram edges (n_bins + 1, increasing); see `default_bin_edges`.
        near_zero_eps: |a| < eps counts as near zero (ARM near-zero fraction).
        hist_sites: activation sites with histograms and moments.
        comm_sites: all-reduce sites timed per layer.
        timing_parts: parts of a layer timed per step.
        attention_layers: layers whose attention maps are recorded (None: all).
        attention_heads: global query heads whose maps are recorded (None: all).
        attention_dtype: "float16" or "float32".
        perceiver: optional Perceiver cross-attention section.
        user_arrays: arrays of user probes (group `user`), in probe order.
        vocab_size: token ids with a display text in `tokens/vocab_text` (0: no such array; traces
            recorded before 25 Nov 2026 have none).
    """

    n_seq: int
    max_steps: int
    max_positions: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    world: int = 1
    top_k: int = 8
    bin_edges: tuple[float, ...] = field(default_factory=default_bin_edges)
    near_zero_eps: float = 1e-3
    hist_sites: tuple[str, ...] = DEFAULT_HIST_SITES
    comm_sites: tuple[str, ...] = DEFAULT_COMM_SITES
    timing_parts: tuple[str, ...] = DEFAULT_TIMING_PARTS
    attention_layers: tuple[int, ...] | None = None
    attention_heads: tuple[int, ...] | None = None
    attention_dtype: str = "float16"
    perceiver: PerceiverSpec | None = None
    user_arrays: tuple[UserArraySpec, ...] = ()
    vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.perceiver, Mapping):
            self.perceiver = PerceiverSpec.from_dict(self.perceiver)
        self.user_arrays = tuple(UserArraySpec.from_dict(u) if isinstance(u, Mapping) else u
                                 for u in self.user_arrays)
        self.bin_edges = tuple(float(e) for e in self.bin_edges)
        self.hist_sites = tuple(self.hist_sites)
        self.comm_sites = tuple(self.comm_sites)
        self.timing_parts = tuple(self.timing_parts)
        layers = range(self.n_layers) if self.attention_layers is None else self.attention_layers
        heads = range(self.n_heads) if self.attention_heads is None else self.attention_heads
        self.attention_layers = tuple(sorted({int(x) for x in layers}))
        self.attention_heads = tuple(sorted({int(x) for x in heads}))
        self._validate()

    def _validate(self) -> None:
        for name in ("n_seq", "max_steps", "max_positions", "n_layers", "n_heads", "world", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"TraceSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ValueError(f"TraceSpec.vocab_size must be >= 0, got {self.vocab_size}")
        if self.n_heads % self.world:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by world={self.world}")
        if self.perceiver is not None and self.perceiver.n_heads % self.world:
            raise ValueError(f"perceiver.n_heads={self.perceiver.n_heads} not divisible by world")
        edges = np.asarray(self.bin_edges)
        if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError("bin_edges must be at least 2 strictly increasing values")
        if self.attention_dtype not in ("float16", "float32"):
            raise ValueError(f"attention_dtype must be float16 or float32, got {self.attention_dtype}")
        if any(not 0 <= x < self.n_layers for x in self.attention_layers):
            raise ValueError(f"attention_layers out of range 0..{self.n_layers - 1}")
        if any(not 0 <= x < self.n_heads for x in self.attention_heads):
            raise ValueError(f"attention_heads out of range 0..{self.n_heads - 1}")
        for name in ("hist_sites", "comm_sites", "timing_parts"):
            values = getattr(self, name)
            if len(set(values)) != len(values) or not values:
                raise ValueError(f"{name} must be non-empty and unique, got {values}")
        for u in self.user_arrays:
            if not u.hooks or len(u.dims) != len(u.shape) or any(n < 1 for n in u.shape):
                raise ValueError(f"user array {u.name!r}: needs hooks and one size >= 1 per dim")
        problem = user_group_problem(self.user_arrays, self.n_seq)
        if problem:
            raise ValueError(problem)

    @classmethod
    def for_generation(cls, prompt_positions: int, max_new_tokens: int, **kwargs: Any) -> TraceSpec:
        """Spec for a prefill over `prompt_positions` padded positions + `max_new_tokens` decodes.

        Args:
            prompt_positions: padded prompt length (same for every sequence).
            max_new_tokens: decode steps.
            **kwargs: the other `TraceSpec` fields.

        Returns:
            A spec with max_steps = 1 + max_new_tokens, max_positions = prompt + max_new_tokens.
        """
        return cls(max_steps=1 + max_new_tokens, max_positions=prompt_positions + max_new_tokens,
                   **kwargs)

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_bins(self) -> int:
        """Number of histogram bins (len(bin_edges) - 1)."""
        return len(self.bin_edges) - 1

    def heads_of_rank(self, rank: int) -> range:
        """Global query heads owned by `rank` (Megatron split)."""
        per = self.n_heads // self.world
        return range(rank * per, (rank + 1) * per)

    def attention_head_slots(self, rank: int) -> slice:
        """Slots of the attention `head` dim holding the recorded heads owned by `rank`."""
        owned = self.heads_of_rank(rank)
        slots = [i for i, h in enumerate(self.attention_heads) if h in owned]
        return slice(slots[0], slots[-1] + 1) if slots else slice(0, 0)

    def attention_heads_of_rank(self, rank: int) -> tuple[int, ...]:
        """Global ids of the recorded heads owned by `rank`, in slot order."""
        return self.attention_heads[self.attention_head_slots(rank)]

    def cross_head_slots(self, rank: int) -> slice:
        """Slots of the cross-attention `head` dim owned by `rank`."""
        if self.perceiver is None:
            return slice(0, 0)
        per = self.perceiver.n_heads // self.world
        return slice(rank * per, (rank + 1) * per)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the root attribute `spec`)."""
        out = dataclasses.asdict(self)
        # strict JSON has no Infinity: infinite edges are stored as the strings "inf"/"-inf"
        out["bin_edges"] = [x if math.isfinite(x) else str(x) for x in self.bin_edges]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TraceSpec:
        """Inverse of `to_dict`; unknown keys are ignored (forward compatible within a version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("bin_edges", "hist_sites", "comm_sites", "timing_parts", "user_arrays"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    # ------------------------------------------------------------------ the layout
    def layout(self) -> dict[str, GroupLayout]:
        """The full store layout: group name ("" for the root) -> GroupLayout."""
        return _build_layout(self)

    def iter_arrays(self) -> Iterator[tuple[str, ArrayLayout]]:
        """Yield ("group/array", layout) for every array of every group."""
        for group in self.layout().values():
            for array in group.arrays:
                yield (f"{group.name}/{array.name}" if group.name else array.name), array


# ---------------------------------------------------------------------- layout construction
_FILL = {"int64": -1, "int32": -1, "float16": float("nan"), "float32": float("nan"),
         "float64": float("nan"), STRING: ""}


def _arr(name: str, dims: Sequence[str], dtype: str, sizes: Mapping[str, int],
         chunks: Mapping[str, int] | None = None, description: str = "", fill: Any = None,
         **kwargs: Any) -> ArrayLayout:
    shape = tuple(sizes[d] for d in dims)
    chunks = chunks or {}
    chunk = tuple(max(1, min(chunks.get(d, sizes[d]), sizes[d])) for d in dims)
    return ArrayLayout(name=name, dims=tuple(dims), dtype=dtype,
                       fill=_FILL[dtype] if fill is None else fill, chunks=chunk, shape=shape,
                       description=description, **kwargs)


def _coord(name: str, sizes: Mapping[str, int], dtype: str = "int64") -> ArrayLayout:
    return _arr(name, (name,), dtype, sizes, description=f"coordinate of dim {name}")


def _build_layout(spec: TraceSpec) -> dict[str, GroupLayout]:
    s = {
        "seq": spec.n_seq, "step": spec.max_steps, "position": spec.max_positions,
        "query": spec.max_positions, "key": spec.max_positions, "layer": spec.n_layers,
        "rank": spec.world, "k": spec.top_k, "bin": spec.n_bins, "edge": spec.n_bins + 1,
        "site": len(spec.hist_sites), "part": len(spec.timing_parts), "vocab": spec.vocab_size,
    }
    P = MAX_POSITION_CHUNK
    groups: dict[str, GroupLayout] = {}

    groups[""] = GroupLayout("", (
        _coord("rank", s),
        _arr("committed", ("rank",), "int64", s, {"rank": 1}, fill=0,
             description="steps committed by each rank; readers use min over ranks"),
        _arr("rank_status", ("rank",), STRING, s, {"rank": 1},
             description="running / complete / failed, per rank"),
        _arr("rank_error", ("rank",), STRING, s, {"rank": 1},
             description="error message of a failed rank"),
    ), "run metadata (attrs), commit marker and per-rank status")

    step_chunk = {"step": 1024, "position": 1024}
    groups["tokens"] = GroupLayout("tokens", (
        _coord("seq", s), _coord("position", s), _coord("step", s), _coord("k", s),
        _arr("token_id", ("seq", "position"), "int64", s, step_chunk,
             "token id at each absolute position"),
        _arr("text", ("seq", "position"), STRING, s, step_chunk,
             "decoded text of each token"),
        _arr("produced_step", ("seq", "position"), "int64", s, step_chunk,
             "step that produced each position: 0 for the prompt, -1 unwritten"),
        _arr("prompt_len", ("seq",), "int64", s, description="real (unpadded) prompt length"),
        _arr("query_start", ("seq", "step"), "int64", s, step_chunk,
             "first query position processed at each step"),
        _arr("query_stop", ("seq", "step"), "int64", s, step_chunk,
             "one past the last query position processed at each step"),
        _arr("chosen", ("seq", "step"), "int64", s, step_chunk,
             "token id the sampler chose at each step"),
        _arr("chosen_prob", ("seq", "step"), "float32", s, step_chunk,
             "probability of the chosen token"),
        _arr("candidate_id", ("seq", "step", "k"), "int64", s, {"step": 256},
             "top-k candidate token ids, most probable first"),
        _arr("candidate_prob", ("seq", "step", "k"), "float32", s, {"step": 256},
             "top-k candidate probabilities"),
        *((_arr("vocab_text", ("vocab",), STRING, s, {"vocab": 4096},
                "display text of every token id (candidates are ids; written with step 0)"),)
          if spec.vocab_size else ()),
    ), "tokens, text, step bookkeeping and sampler candidates (rank 0 writes)")

    sa = dict(s, layer=len(spec.attention_layers), head=len(spec.attention_heads))
    groups["attention"] = GroupLayout("attention", (
        _coord("seq", sa), _coord("layer", sa), _coord("head", sa), _coord("query", sa),
        _coord("key", sa),
        _arr("weights", ("seq", "layer", "head", "query", "key"), spec.attention_dtype, sa,
             {"seq": 1, "layer": 1, "head": 1, "query": ATTENTION_ROW_BAND, "key": P},
             "softmax attention weights; row q = query at absolute position q; key > q is NaN",
             causal=True),
    ), "self-attention maps of the recorded layers/heads")

    groups["kv_cache"] = GroupLayout("kv_cache", (
        _coord("seq", s), _coord("step", s), _coord("layer", s), _coord("rank", s),
        _coord("position", s),
        *(_arr(name, ("step", "layer", "rank"), "int64", s, {"step": 1024, "rank": 1}, desc)
          for name, desc in (("tokens", "cached tokens after the step"),
                             ("blocks", "cache blocks in use"),
                             ("bytes_used", "bytes holding keys/values"),
                             ("bytes_reserved", "bytes allocated (used + free slots)"))),
        _arr("attention_mass", ("seq", "step", "layer", "rank", "position"), "float32", s,
             {"seq": 1, "step": 32, "layer": 1, "rank": 1, "position": P},
             "attention received by each cached position at the step: sum over the rank's "
             "heads and over the step's query rows"),
    ), "KV cache occupancy per rank and attention mass received per cached position")

    sh = dict(s)
    moment_dims = ("step", "layer", "site", "rank")
    mchunk = {"step": 256, "rank": 1}
    groups["activations"] = GroupLayout("activations", (
        _coord("step", sh), _coord("layer", sh), _arr("site", ("site",), STRING, sh),
        _coord("rank", sh), _coord("bin", sh), _arr("edge", ("edge",), "float64", sh),
        _arr("bin_lower", ("bin",), "float64", sh), _arr("bin_upper", ("bin",), "float64", sh),
        _arr("hist_count", ("step", "layer", "site", "rank", "bin"), "int64", sh,
             {"step": 64, "rank": 1}, "values in [bin_lower, bin_upper) on fixed edges",
             coordinates=("bin_lower", "bin_upper")),
        _arr("value_count", moment_dims, "int64", sh, mchunk, "number of values"),
        _arr("value_sum", moment_dims, "float64", sh, mchunk, "sum of values"),
        _arr("value_sumsq", moment_dims, "float64", sh, mchunk, "sum of squares"),
        _arr("value_sum3", moment_dims, "float64", sh, mchunk, "sum of cubes"),
        _arr("value_sum4", moment_dims, "float64", sh, mchunk, "sum of fourth powers"),
        _arr("value_min", moment_dims, "float64", sh, mchunk, "minimum"),
        _arr("value_max", moment_dims, "float64", sh, mchunk, "maximum"),
        _arr("near_zero_count", moment_dims, "int64", sh, mchunk,
             "values with |a| < near_zero_eps"),
        _arr("near_zero_eps", moment_dims, "float64", sh, mchunk,
             "threshold of near_zero_count (MLP sites: ARM's MAD-based eps; else the attr)"),
    ), "activation histograms and moments, mergeable across ranks and steps")

    sc = dict(s, site=len(spec.comm_sites))
    comm_dims = ("step", "layer", "site", "rank")
    groups["comm"] = GroupLayout("comm", (
        _coord("step", sc), _coord("layer", sc), _arr("site", ("site",), STRING, sc),
        _coord("rank", sc),
        _arr("start", comm_dims, "float64", sc, mchunk, "start offset within the step (s)"),
        _arr("seconds", comm_dims, "float64", sc, mchunk, "duration of the all-reduce (s)"),
        _arr("bytes", comm_dims, "int64", sc, mchunk, "bytes reduced"),
    ), "all-reduce timings per layer and site")

    groups["timing"] = GroupLayout("timing", (
        _coord("step", s), _coord("layer", s), _arr("part", ("part",), STRING, s),
        _coord("rank", s),
        _arr("seconds", ("step", "layer", "part", "rank"), "float64", s, mchunk,
             "time spent in each part of each layer (s)"),
        _arr("step_seconds", ("step", "rank"), "float64", s, {"step": 1024, "rank": 1},
             "wall time of the whole step (s)"),
        _arr("step_start", ("step", "rank"), "float64", s, {"step": 1024, "rank": 1},
             "unix time at which the step started"),
    ), "compute timings")

    if spec.perceiver is not None:
        p = spec.perceiver
        sp = dict(s, repeat=p.n_repeats, head=p.n_heads, latent=p.n_latents, input=p.n_inputs)
        groups["cross_attention"] = GroupLayout("cross_attention", (
            _coord("seq", sp), _coord("step", sp), _coord("repeat", sp), _coord("head", sp),
            _coord("latent", sp), _coord("input", sp),
            _arr("weights", ("seq", "step", "repeat", "head", "latent", "input"),
                 spec.attention_dtype, sp,
                 {"seq": 1, "step": PERCEIVER_MAP_STEPS, "repeat": 1, "head": 1, "latent": PERCEIVER_MAP_LATENTS},
                 "cross-attention of latents over inputs at each step"),
            _arr("input_position", ("seq", "step", "input"), "int64", sp, {"step": 64},
                 "absolute position of each input slot at the step (-1: empty)"),
            _arr("latent_position", ("seq", "step", "latent"), "int64", sp, {"step": 64},
                 "absolute position a latent stands for (Perceiver AR), -1 if none"),
        ), "Perceiver cross-attention maps")
        if p.n_self_layers > 0:
            sl = dict(sp, self_layer=p.n_self_layers, latent_key=p.n_latents)
            groups["latent_attention"] = GroupLayout("latent_attention", (
                _coord("seq", sl), _coord("step", sl), _coord("repeat", sl), _coord("self_layer", sl),
                _coord("head", sl), _coord("latent", sl), _coord("latent_key", sl),
                _arr("weights", ("seq", "step", "repeat", "self_layer", "head", "latent", "latent_key"),
                     spec.attention_dtype, sl,
                     {"seq": 1, "step": PERCEIVER_MAP_STEPS, "repeat": 1, "self_layer": 1, "head": 1,
                      "latent": PERCEIVER_MAP_LATENTS},
                     "latent self-attention at each step; latent and latent_key slot i both hold "
                     "position latent_position[i] (= window start + i)"),
                _arr("latent_position", ("seq", "step", "latent"), "int64", sl, {"step": 64},
                     "absolute position of each latent (and latent_key) slot, -1 if none"),
            ), "Perceiver latent self-attention maps")
    if spec.user_arrays:
        su = dict(s)
        for u in spec.user_arrays:
            su.update({u.hook_dim: len(u.hooks)}, **dict(zip(u.dims, u.shape)))
        value_dims = list(dict.fromkeys(d for u in spec.user_arrays for d in u.dims))
        groups["user"] = GroupLayout("user", (
            _coord("step", su), _coord("rank", su),
            *(_arr(u.hook_dim, (u.hook_dim,), STRING, su, description=f"hook points of {u.name}")
              for u in spec.user_arrays),
            *(_coord(d, su) for d in value_dims),
            *(_arr(u.name, ("step", u.hook_dim, "rank", *u.dims), u.dtype, su, {"step": 256, "rank": 1},
                   u.description or f"values of user probe {u.name}") for u in spec.user_arrays),
        ), "values of your own probes (workbench/probes/user_probe.py), per step, hook point and rank")
    return groups


def coordinate_values(spec: TraceSpec, group: str, array: ArrayLayout) -> np.ndarray | None:
    """Values of a coordinate array written at creation (None for data arrays)."""
    name = array.name
    if group == "attention" and name == "layer":
        return np.asarray(spec.attention_layers, dtype="int64")
    if group == "attention" and name == "head":
        return np.asarray(spec.attention_heads, dtype="int64")
    if name == "site" and group == "activations":
        return np.asarray(spec.hist_sites, dtype=object)
    if name == "site" and group == "comm":
        return np.asarray(spec.comm_sites, dtype=object)
    if name == "part":
        return np.asarray(spec.timing_parts, dtype=object)
    if group == "user":
        hooks = {u.hook_dim: u.hooks for u in spec.user_arrays}
        if name in hooks:
            return np.asarray(hooks[name], dtype=object)
    if name == "edge":
        return np.asarray(spec.bin_edges, dtype="float64")
    if name == "bin_lower":
        return np.asarray(spec.bin_edges[:-1], dtype="float64")
    if name == "bin_upper":
        return np.asarray(spec.bin_edges[1:], dtype="float64")
    if array.dims == (name,) and array.dtype == "int64" and name != "prompt_len":
        return np.arange(array.shape[0], dtype="int64")
    return None


def initial_values(spec: TraceSpec, group: str, array: ArrayLayout) -> np.ndarray | None:
    """Values an array holds from creation: the coordinates, and every rank "running"."""
    if group == "" and array.name == "rank_status":
        return np.array([STATUS_RUNNING] * spec.world, dtype=object)
    return coordinate_values(spec, group, array)


def nbytes_estimate(spec: TraceSpec) -> int:
    """Uncompressed size of every array at full size (an upper bound for the store)."""
    total = 0
    for _, array in spec.iter_arrays():
        itemsize = 16 if array.dtype == STRING else np.dtype(array.dtype).itemsize
        total += math.prod(array.shape) * itemsize
    return total
