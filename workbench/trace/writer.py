"""TraceWriter: records a run into a trace store without making generation wait on disk.

Rank 0 creates the store (`create_store`) with every array at full size; other ranks open it after
a barrier the caller provides (`TraceWriter.open`). Each rank owns one writer whose `write_*`
methods only validate and copy into a bounded in-memory queue. Every `flush_interval` seconds a
background thread hands the records of the steps ended so far to the rank's worker process
(`worker.py`), which coalesces consecutive steps of one array into a single region write, writes
all data, and only then advances this rank's commit marker; the thread waits for it with the GIL
released. Readers never look past min(committed) over ranks.

Typical use on one rank::

    writer = TraceWriter(path, spec, metadata)            # rank 0; TraceWriter.open(path, r) else
    writer.write_prompt(prompt_ids, prompt_text)
    for step in range(spec.max_steps):
        writer.write_queries(step, start, stop)
        writer.write_attention(step, pattern, layer=3, query_start=start)
        writer.write_activations(step, stats, layer=3, site="mlp.act.post")
        ...
        writer.end_step(step)
    writer.close()                                        # or writer.fail("message")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from .schema import (FORMAT_NAME, FORMAT_VERSION, STATUS_COMPLETE, STATUS_FAILED,
                     STATUS_RUNNING, STRING, ArrayLayout, TraceSpec, initial_values)
from .stats import MOMENT_ARRAYS, ActivationStats
from . import worker_pool
from .worker import ActivationValues, ChunkFiles, Record, recv_message, send_message
from .zarr_metadata import array_metadata, encode, group_metadata

Index = int | slice | str
# zstd level 1 compresses attention rows as well as the default level (3) at ~3x the speed.
ZSTD_LEVEL = 1


class TraceWriterError(RuntimeError):
    """The writer was misused, or its background thread failed (the cause is chained)."""


@dataclass
class WriterStats:
    """Counters of one writer, for benchmarks."""

    steps_committed: int = 0
    flushes: int = 0
    region_writes: int = 0  # arrays written, summed over flushes (each may touch many chunks)
    bytes_written: int = 0  # raw (uncompressed) bytes of the chunks the worker encoded
    seconds_writing: float = 0.0  # time the background thread spent in flushes (waiting included)
    worker_seconds: float = 0.0  # time the worker process spent reducing, encoding and writing
    peak_queue_bytes: int = 0
    blocked_seconds: float = 0.0  # time callers waited because the queue was full
    dropped_records: int = 0  # records of steps never ended (discarded at close)


# ---------------------------------------------------------------------- store creation
def _json_safe(value: Any) -> Any:
    """Metadata -> strict JSON values (numpy scalars/arrays, tuples, paths, non-finite floats)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def create_store(path: str | os.PathLike, spec: TraceSpec,
                 metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> None:
    """Create an empty trace store with every array at full size (rank 0, before generation).

    Args:
        path: directory of the new store.
        spec: sizes of the run.
        metadata: run metadata stored in the root attribute `run` (model config, prompts,
            sampler settings and seed, tp size/algorithm, redistribution/ARM settings,
            checkpoint hash, ...); must be JSON-like.
        overwrite: replace an existing trace at `path`.

    Raises:
        FileExistsError: `path` exists and overwrite is False.
        ValueError: overwrite was asked but `path` is a non-empty directory that is not a trace.
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists():
            raise ValueError(f"refusing to overwrite {path}: not a Zarr store")
    run = _json_safe(dict(metadata or {}))
    # Build beside the target and rename into place, so a reader never sees a half-made store.
    final, path = path, path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    root_attrs = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                  "spec": _json_safe(spec.to_dict()), "run": run,
                  "status": STATUS_RUNNING, "error": "", "created": _now()}
    for gname, group in spec.layout().items():
        attrs: dict[str, Any] = {"description": group.description}
        if gname == "activations":
            attrs["near_zero_eps"] = spec.near_zero_eps
        if gname == "comm":
            attrs["algorithm"] = str(run.get("tp_algorithm", "allreduce"))
        if gname == "attention":
            attrs["causal"] = True
        group_dir = path / gname
        group_dir.mkdir(parents=True, exist_ok=True)  # "": the store itself
        (group_dir / "zarr.json").write_bytes(encode(group_metadata({**root_attrs, **attrs} if gname == "" else attrs)))
        for array in group.arrays:
            arr_attrs: dict[str, Any] = {"description": array.description}
            if array.coordinates:
                arr_attrs["coordinates"] = " ".join(array.coordinates)
            array_dir = group_dir / array.name
            array_dir.mkdir(parents=True)
            meta = array_metadata(array, arr_attrs, ZSTD_LEVEL)
            (array_dir / "zarr.json").write_bytes(encode(meta))
            values = initial_values(spec, gname, array)
            if values is not None:  # encoded as the worker encodes every chunk (zarr's format)
                chunks = ChunkFiles(array_dir, meta, array.fill)
                chunks.assign(tuple(slice(0, n) for n in values.shape), values)
                chunks.save()
    if final.exists():
        shutil.rmtree(final)
    os.rename(path, final)


def read_spec(path: str | os.PathLike) -> tuple[TraceSpec, dict[str, Any]]:
    """Spec and root attributes of an existing store (no validation beyond the format name)."""
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} store")
    return TraceSpec.from_dict(attrs["spec"]), attrs


# ---------------------------------------------------------------------- the writer
class TraceWriter:
    """Per-rank recorder with a background flush thread and a bounded queue.

    Args:
        path: store directory.
        spec: sizes of the run (ignored by `open`, which reads it from the store).
        metadata: run metadata (rank 0 only; see `create_store`).
        rank: this process's tensor-parallel rank.
        world: tensor-parallel size; must equal spec.world if given.
        create: create the store (default: rank == 0).
        overwrite: replace an existing store when creating.
        flush_interval: seconds between flushes of the background thread.
        max_queue_bytes: queued bytes above which `write_*` calls wait for a flush.
        max_flush_steps: at most this many steps are coalesced into one region write.
    """

    def __init__(self, path: str | os.PathLike, spec: TraceSpec | None = None,
                 metadata: Mapping[str, Any] | None = None, rank: int = 0,
                 world: int | None = None, *, create: bool | None = None,
                 overwrite: bool = False, flush_interval: float = 0.2,
                 max_queue_bytes: int = 128 << 20, max_flush_steps: int = 128) -> None:
        self.path, self.rank = Path(path), rank
        if create is None:
            create = rank == 0
        if create and spec is None:
            raise TraceWriterError("a spec is needed to create a store")
        self._error: BaseException | None = None
        self._start_worker()  # it imports its modules while the store is created
        try:
            if create:
                create_store(self.path, spec, metadata, overwrite=overwrite)
            stored_spec, _ = read_spec(self.path)
            if spec is not None and spec.to_dict() != stored_spec.to_dict():
                raise TraceWriterError(f"spec differs from the one stored in {self.path}")
            self.spec = stored_spec
            if world is not None and world != self.spec.world:
                raise TraceWriterError(f"world={world} but the store was made for {self.spec.world}")
            if not 0 <= rank < self.spec.world:
                raise TraceWriterError(f"rank {rank} out of range for world {self.spec.world}")
        except BaseException:
            self._stop_worker()
            raise
        self.flush_interval = float(flush_interval)
        self.max_queue_bytes = int(max_queue_bytes)
        self.max_flush_steps = int(max_flush_steps)

        self._arrays: dict[str, ArrayLayout] = dict(self.spec.iter_arrays())
        self._cond = threading.Condition()
        self._records: list[Record | ActivationValues] = []
        self._queued_bytes = 0
        self._ended = 0  # steps [0, _ended) are ended by the caller
        self._committed = 0  # steps [0, _committed) are on disk with their marker
        self._closing = False
        self._flush_requested = False
        self._closed = False
        self._stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name=f"trace-writer-{rank}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str | os.PathLike, rank: int, world: int | None = None,
             **kwargs: Any) -> TraceWriter:
        """Writer for a non-zero rank on a store rank 0 already created (after a barrier).

        Args:
            path: store directory.
            rank: this rank.
            world: tensor-parallel size, checked against the store.
            **kwargs: flush_interval, max_queue_bytes, max_flush_steps.

        Returns:
            A writer that appends to the existing store.
        """
        return cls(path, None, None, rank=rank, world=world, create=False, **kwargs)

    # ------------------------------------------------------------------ generic write
    def write(self, step: int, name: str, data: Any, *, n_steps: int | None = None, **index: Index) -> None:
        """Queue `data` for the region of array `name` ("group/array") at `step`.

        With `n_steps` the data covers steps [step, step + n_steps) and keeps the step dim.
        Unnamed dims default to: `step` -> step, `rank` -> this rank, attention/cross `head`
        -> the slots this rank owns, anything else -> the whole dim. An int index drops that
        dim from `data`; a str index names a site or part. `data` is broadcast to the region
        and copied, so the caller may reuse its buffer at once.

        Args:
            step: step the data belongs to (not yet ended).
            name: "group/array", e.g. "timing/seconds".
            data: values for the region.
            n_steps: number of consecutive steps the data covers (None: just `step`, dim dropped).
            **index: per-dim int, slice or label.
        """
        layout = self._arrays.get(name)
        if layout is None:
            raise TraceWriterError(f"no array {name!r} in this trace layout")
        last = step if n_steps is None else step + n_steps - 1
        self._check_step(step)
        self._check_step(last)
        region: list[slice] = []
        shape: list[int] = []
        for dim, size in zip(layout.dims, layout.shape):
            sel = index.pop(dim, None)
            if sel is None:
                sel = slice(step, last + 1) if dim == "step" and n_steps is not None else \
                    self._default_index(name, dim, step, size)
            if isinstance(sel, str):
                sel = self._label_index(name, dim, sel)
            if isinstance(sel, (int, np.integer)):
                i = int(sel)
                if not 0 <= i < size:
                    raise TraceWriterError(f"{name}: {dim}={i} out of range 0..{size - 1}")
                region.append(slice(i, i + 1))
            else:
                start, stop, stride = sel.indices(size)
                if stride != 1 or (sel.stop is not None and sel.stop > size):
                    raise TraceWriterError(f"{name}: bad {dim} range {sel} for size {size}")
                region.append(slice(start, stop))
                shape.append(stop - start)
        if index:
            raise TraceWriterError(f"{name}: unknown dims {sorted(index)}")
        if layout.dtype == STRING:
            arr = np.asarray(data, dtype=object)
        else:
            arr = np.asarray(data)
            # Same-kind data (e.g. float32 for a float16 array) keeps its dtype: the cast runs on
            # the writer thread, off the generation path. Other kinds are cast here.
            if not np.can_cast(arr.dtype, layout.dtype, casting="same_kind"):
                arr = arr.astype(layout.dtype)
        shape = tuple(shape)
        if arr.shape != shape:
            try:
                arr = np.broadcast_to(arr, shape)
            except ValueError:
                raise TraceWriterError(f"{name}: data of shape {np.shape(data)} does not fit "
                                       f"the region of shape {shape}") from None
        full = np.array(arr, copy=True).reshape([r.stop - r.start for r in region])
        self._put(Record(last, name, tuple(region), full, step))

    def _default_index(self, name: str, dim: str, step: int, size: int) -> Index:
        if dim == "step":
            return step
        if dim == "rank":
            return self.rank
        if dim == "head" and name == "attention/weights":
            return self.spec.attention_head_slots(self.rank)
        if dim == "head" and name in ("cross_attention/weights", "latent_attention/weights"):
            return self.spec.cross_head_slots(self.rank)
        return slice(0, size)

    def _label_index(self, name: str, dim: str, label: str) -> int:
        labels = {("activations", "site"): self.spec.hist_sites,
                  ("comm", "site"): self.spec.comm_sites,
                  ("timing", "part"): self.spec.timing_parts}.get((name.split("/")[0], dim))
        if labels is None or label not in labels:
            raise TraceWriterError(f"{name}: unknown {dim} label {label!r}")
        return labels.index(label)

    # ------------------------------------------------------------------ typed writes
    def write_prompt(self, token_ids: Any, text: Sequence[Sequence[str]] | None = None,
                     prompt_len: Any = None) -> None:
        """Prompt tokens at positions [0, P) of every sequence, produced by step 0.

        Args:
            token_ids: [n_seq, P] padded prompt ids.
            text: optional [n_seq][P] token strings.
            prompt_len: [n_seq] real prompt lengths (default: P for every sequence).
        """
        ids = np.asarray(token_ids)
        self.write_tokens(0, 0, ids, text)
        if self.rank == 0:
            self.write(0, "tokens/prompt_len", ids.shape[1] if prompt_len is None else prompt_len)

    def write_tokens(self, step: int, position: int, token_ids: Any,
                     text: Sequence[Any] | None = None, *, seq: int | slice | None = None) -> None:
        """Tokens at positions [position, position + n) produced by `step` (rank 0 only).

        Args:
            step: producing step (0 for the prompt).
            position: first absolute position.
            token_ids: [n_seq, n] ids ([n] when `seq` is an int).
            text: optional strings of the same shape.
            seq: restrict to one sequence or a range of sequences.
        """
        if self.rank != 0:
            return
        ids = np.asarray(token_ids)
        n = ids.shape[-1]
        index: dict[str, Index] = {"position": slice(position, position + n)}
        if seq is not None:
            index["seq"] = seq
        self.write(step, "tokens/token_id", ids, **index)
        self.write(step, "tokens/produced_step", step, **index)
        if text is not None:
            self.write(step, "tokens/text", np.asarray(text, dtype=object), **index)

    def write_queries(self, step: int, start: Any, stop: Any) -> None:
        """Query positions [start, stop) processed at `step`, per sequence (rank 0 only).

        Readers cut the attention `query`/`key` dims with these, so write them every step.

        Args:
            step: the step.
            start: int or [n_seq] first query position.
            stop: int or [n_seq] one past the last query position.
        """
        if self.rank != 0:
            return
        self.write(step, "tokens/query_start", start)
        self.write(step, "tokens/query_stop", stop)

    def write_sample(self, step: int, chosen: Any, *, chosen_prob: Any = None,
                     candidate_ids: Any = None, candidate_probs: Any = None) -> None:
        """What the sampler did at `step` (rank 0 only).

        Args:
            step: the step.
            chosen: [n_seq] chosen token ids.
            chosen_prob: [n_seq] probability of the chosen token.
            candidate_ids: [n_seq, k<=top_k] candidate ids, most probable first.
            candidate_probs: [n_seq, k<=top_k] their probabilities.
        """
        if self.rank != 0:
            return
        self.write(step, "tokens/chosen", chosen)
        if chosen_prob is not None:
            self.write(step, "tokens/chosen_prob", chosen_prob)
        for name, values in (("candidate_id", candidate_ids), ("candidate_prob", candidate_probs)):
            if values is not None:
                values = np.asarray(values)
                self.write(step, f"tokens/{name}", values, k=slice(0, values.shape[-1]))

    def _select(self, data: np.ndarray, axis: int, n_recorded: int, recorded: Sequence[int],
                available: Sequence[int], what: str) -> np.ndarray:
        """Keep the recorded entries of `axis` if `data` carries all available ones."""
        n = data.shape[axis]
        if n == n_recorded:
            return data
        if n == len(available):
            pos = {v: i for i, v in enumerate(available)}
            return np.take(data, [pos[v] for v in recorded], axis=axis)
        raise TraceWriterError(f"{what}: got {n} entries, expected {n_recorded} recorded "
                               f"or {len(available)} available")

    def write_attention(self, step: int, weights: Any, *, query_start: int,
                        layer: int | None = None, seq: int | slice | None = None) -> bool:
        """Attention rows of this rank's heads for queries [query_start, query_start + n_q).

        Layers or heads that are not recorded are skipped, so probes can call this
        unconditionally. Keys run from 0 to n_k - 1; cells with key > query are stored as NaN.

        Args:
            step: the step that computed these rows.
            weights: [n_seq, heads, n_q, n_k] for one `layer`, or
                [n_seq, layers, heads, n_q, n_k] for all (recorded or all n_layers) layers;
                heads are this rank's owned heads or just its recorded ones. Without a leading
                seq axis when `seq` is an int.
            query_start: absolute position of the first row.
            layer: global layer id, or None for all layers.
            seq: restrict to one sequence or a range.

        Returns:
            True if anything was queued.
        """
        spec = self.spec
        recorded_heads = spec.attention_heads_of_rank(self.rank)
        if not recorded_heads or (layer is not None and layer not in spec.attention_layers):
            return False
        w = np.asarray(weights)
        head_axis = w.ndim - 3
        w = self._select(w, head_axis, len(recorded_heads), recorded_heads,
                         list(spec.heads_of_rank(self.rank)), "write_attention heads")
        index: dict[str, Index] = {}
        if layer is None:
            w = self._select(w, head_axis - 1, len(spec.attention_layers),
                             spec.attention_layers, list(range(spec.n_layers)),
                             "write_attention layers")
        else:
            index["layer"] = spec.attention_layers.index(layer)
        if seq is not None:
            index["seq"] = seq
        n_q, n_k = w.shape[-2:]
        self.write(step, "attention/weights", w, query=slice(query_start, query_start + n_q),
                   key=slice(0, n_k), **index)
        return True

    def write_attention_mass(self, step: int, mass: Any, *, layer: int | None = None,
                             seq: int | slice | None = None) -> None:
        """Attention received by cached positions [0, n) at `step` from this rank's heads.

        Args:
            step: the step.
            mass: [n_seq, n] for one `layer` or [n_seq, n_layers, n] (sum over the rank's heads
                and the step's query rows).
            layer: global layer id, or None for all layers.
            seq: restrict to one sequence or a range.
        """
        m = np.asarray(mass)
        index: dict[str, Index] = {"position": slice(0, m.shape[-1])}
        if layer is not None:
            index["layer"] = layer
        if seq is not None:
            index["seq"] = seq
        self.write(step, "kv_cache/attention_mass", m, **index)

    def write_kv(self, step: int, *, tokens: Any = None, blocks: Any = None,
                 bytes_used: Any = None, bytes_reserved: Any = None,
                 layer: int | None = None) -> None:
        """KV cache occupancy of this rank after `step` ([n_layers] each, or scalars per layer).

        Args:
            step: the step.
            tokens, blocks, bytes_used, bytes_reserved: values per layer (or for `layer`).
            layer: one layer, or None for all.
        """
        index: dict[str, Index] = {} if layer is None else {"layer": layer}
        for name, values in (("tokens", tokens), ("blocks", blocks), ("bytes_used", bytes_used),
                             ("bytes_reserved", bytes_reserved)):
            if values is not None:
                self.write(step, f"kv_cache/{name}", values, **index)

    def write_activations(self, step: int, stats: ActivationStats, *,
                          layer: int | None = None, site: str | int | None = None) -> None:
        """Histogram and moments of this rank's activations at `step`.

        Args:
            step: the step.
            stats: `ActivationStats` whose leading shape is [n_layers, n_sites], [n_sites]
                (layer given), [n_layers] (site given) or [] (both given).
            layer: one layer or None for all.
            site: one hist site (name or index) or None for all.
        """
        index: dict[str, Index] = {}
        if layer is not None:
            index["layer"] = layer
        if site is not None:
            index["site"] = site
        self.write(step, "activations/hist_count", stats.hist, **index)
        for field, array in MOMENT_ARRAYS.items():
            self.write(step, f"activations/{array}", getattr(stats, field), **index)

    def write_activation_values(self, first_step: int, last_step: int, values: np.ndarray,
                                row_steps: np.ndarray, col_offsets: np.ndarray, layers: np.ndarray,
                                sites: np.ndarray, eps: np.ndarray) -> None:
        """Raw activation values of steps [first_step, last_step]; the worker process reduces them.

        Histograms and moments then cost the generating process nothing but this copy.

        Args:
            first_step, last_step: the steps covered (none ended yet).
            values: [rows, width] one row per (step, sequence), rows of one step together, in
                step order (steps without rows are left unrecorded).
            row_steps: [rows] the step of each row.
            col_offsets: [blocks + 1] column block i = values[:, col_offsets[i]:col_offsets[i + 1]].
            layers, sites: [blocks] the layer and site index of each column block.
            eps: [last_step - first_step + 1, blocks] near-zero thresholds; NaN: ARM's MAD rule
                on the layer's mlp.act.pre block of that step.
        """
        self._check_step(first_step)
        self._check_step(last_step)
        values = np.asarray(values, dtype=np.float32)
        row_steps, col_offsets = np.asarray(row_steps, dtype=np.int64), np.asarray(col_offsets, dtype=np.int64)
        n = len(col_offsets) - 1
        if (values.ndim != 2 or len(row_steps) != len(values) or col_offsets[-1] != values.shape[1]
                or len(layers) != n or len(sites) != n or np.shape(eps) != (last_step - first_step + 1, n)):
            raise TraceWriterError("write_activation_values: values, row_steps, col_offsets, layers, sites "
                                   "and eps disagree")
        if col_offsets[0] != 0 or np.any(np.diff(col_offsets) <= 0):
            raise TraceWriterError(f"write_activation_values: col_offsets {col_offsets.tolist()} must start at 0 "
                                   f"and rise: every column block needs a column")
        if len(row_steps) and (row_steps[0] < first_step or row_steps[-1] > last_step
                               or np.any(np.diff(row_steps) < 0)):
            raise TraceWriterError(f"write_activation_values: row steps must run in order within "
                                   f"{first_step}..{last_step}")
        self._put(ActivationValues(last_step, first_step, values, row_steps, col_offsets,
                                   np.asarray(layers, dtype=np.int64), np.asarray(sites, dtype=np.int64),
                                   np.asarray(eps, dtype=np.float64)))

    def write_comm(self, step: int, *, start: Any = None, seconds: Any = None,
                   nbytes: Any = None, layer: int | None = None,
                   site: str | int | None = None) -> None:
        """All-reduce timings of this rank at `step`.

        Args:
            step: the step.
            start: start offset within the step (s).
            seconds: duration (s).
            nbytes: bytes reduced.
            layer: one layer or None for all ([n_layers, n_sites] values).
            site: one comm site or None for all.
        """
        index: dict[str, Index] = {}
        if layer is not None:
            index["layer"] = layer
        if site is not None:
            index["site"] = site
        for name, values in (("start", start), ("seconds", seconds), ("bytes", nbytes)):
            if values is not None:
                self.write(step, f"comm/{name}", values, **index)

    def write_timing(self, step: int, seconds: Any = None, *, layer: int | None = None,
                     part: str | int | None = None, step_seconds: float | None = None,
                     step_start: float | None = None) -> None:
        """Compute timings of this rank at `step`.

        Args:
            step: the step.
            seconds: time per (layer, part): [n_layers, n_parts], or fewer dims with layer/part.
            layer: one layer or None for all.
            part: one timing part or None for all.
            step_seconds: wall time of the whole step.
            step_start: unix time at which the step started.
        """
        if seconds is not None:
            index: dict[str, Index] = {}
            if layer is not None:
                index["layer"] = layer
            if part is not None:
                index["part"] = part
            self.write(step, "timing/seconds", seconds, **index)
        if step_seconds is not None:
            self.write(step, "timing/step_seconds", step_seconds)
        if step_start is not None:
            self.write(step, "timing/step_start", step_start)

    def write_cross_attention(self, step: int, weights: Any, *, repeat: int | None = None,
                              latent_start: int = 0, seq: int | slice | None = None,
                              input_position: Any = None, latent_position: Any = None) -> None:
        """Perceiver cross-attention of this rank's cross heads at `step`.

        Args:
            step: the step.
            weights: [n_seq, repeats, heads, n_lat, n_in] or [n_seq, heads, n_lat, n_in] with
                `repeat`; latents [latent_start, latent_start + n_lat), inputs [0, n_in).
            repeat: one repeat or None for all.
            latent_start: first latent slot written (Perceiver AR decode writes one row).
            seq: restrict to one sequence or a range.
            input_position: [n_seq, n_in] absolute position of each input slot (rank 0 only).
            latent_position: [n_seq, n_latents] absolute position per latent (rank 0 only).
        """
        if self.spec.perceiver is None:
            raise TraceWriterError("this trace has no perceiver section")
        w = np.asarray(weights)
        index: dict[str, Index] = {"latent": slice(latent_start, latent_start + w.shape[-2]),
                                   "input": slice(0, w.shape[-1])}
        if repeat is not None:
            index["repeat"] = repeat
        if seq is not None:
            index["seq"] = seq
        self.write(step, "cross_attention/weights", w, **index)
        if self.rank == 0:
            if input_position is not None:
                p = np.asarray(input_position)
                self.write(step, "cross_attention/input_position", p,
                           input=slice(0, p.shape[-1]))
            if latent_position is not None:
                self.write(step, "cross_attention/latent_position", latent_position)

    def write_latent_attention(self, step: int, weights: Any, *, repeat: int, self_layer: int,
                               latent_start: int = 0, key_start: int = 0,
                               seq: int | slice | None = None, latent_position: Any = None) -> None:
        """Perceiver latent self-attention of this rank's heads at `step`.

        Args:
            step: the step.
            weights: [n_seq, heads, n_lat, n_key]: latents [latent_start, latent_start + n_lat)
                attending to latent keys [key_start, key_start + n_key) (window slots).
            repeat: the repeat.
            self_layer: latent block within the repeat (`repeats.{r}.layers.{i}`).
            latent_start: first latent slot written.
            key_start: first latent_key slot written.
            seq: restrict to one sequence or a range.
            latent_position: [n_seq, n_latents] absolute position per slot (rank 0 only).
        """
        if self.spec.perceiver is None or self.spec.perceiver.n_self_layers == 0:
            raise TraceWriterError("this trace has no latent_attention section")
        w = np.asarray(weights)
        index: dict[str, Index] = {"latent": slice(latent_start, latent_start + w.shape[-2]),
                                   "latent_key": slice(key_start, key_start + w.shape[-1]),
                                   "repeat": repeat, "self_layer": self_layer}
        if seq is not None:
            index["seq"] = seq
        self.write(step, "latent_attention/weights", w, **index)
        if self.rank == 0 and latent_position is not None:
            self.write(step, "latent_attention/latent_position", latent_position,
                       **({} if seq is None else {"seq": seq}))

    # ------------------------------------------------------------------ step protocol
    def end_step(self, step: int, last: int | None = None) -> None:
        """Declare `step` (or steps [step, last]) complete on this rank; the next flush commits them.

        Steps must be ended in order (0, 1, 2, ...). Writes for an ended step are refused. Steps
        written together (`write(..., n_steps=)`) must be ended together, in one call.
        """
        last = step if last is None else last
        with self._cond:
            self._raise_if_failed()
            if step != self._ended or last < step:
                raise TraceWriterError(f"end_step({step}) but the next step to end is "
                                       f"{self._ended}")
            # Wake the thread only when it sleeps with nothing pending; otherwise it is already
            # waiting out the flush interval, and a wake-up per step just churns the GIL.
            was_idle = self._ended <= self._committed
            self._ended = last + 1
            if was_idle:
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every ended step is written and committed.

        Args:
            timeout: give up after this many seconds (TraceWriterError).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            while self._committed < self._ended and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TraceWriterError(f"flush timed out after {timeout} s")
                self._cond.wait(remaining)
            self._raise_if_failed()

    def has_sent(self, step: int) -> bool:
        """True once nothing here reads the records of ``step`` any more (their buffers may be
        reused): the step is committed, or the writer is closed."""
        return step < self._committed or self._closed

    def worker_started(self) -> bool:
        """True once the worker process has finished starting up (its imports)."""
        return worker_pool.has_started(self._worker)

    def writer_stats(self) -> WriterStats:
        """A snapshot of this writer's counters."""
        with self._cond:
            return WriterStats(**vars(self._stats))

    def close(self, status: str = STATUS_COMPLETE) -> None:
        """Drain the queue, commit every ended step and record this rank's final status.

        Records of steps that were never ended are dropped (with a warning). Rank 0 also sets
        the root `status` attribute from all ranks' statuses.

        Args:
            status: "complete" (default) or "failed".
        """
        if self._closed:
            return
        self._stop_thread()
        self._closed = True
        if self._error is not None:
            self._set_status(STATUS_FAILED, f"writer error: {self._error!r}")
            raise TraceWriterError(f"trace writer failed: {self._error!r}") from self._error
        self._set_status(status, "")

    def fail(self, message: str) -> None:
        """Commit what was ended, then mark this rank and the trace as failed.

        Records of the step that failed are dropped silently: the trace says it failed.

        Args:
            message: one-line error description stored in the trace.
        """
        if self._closed:
            return
        self._stop_thread(warn_dropped=False)
        self._closed = True
        self._set_status(STATUS_FAILED, message)

    def abandon(self) -> None:
        """Commit every ended step and stop, leaving the status "running" (as a crash would).

        For tests and synthetic live traces; a real run ends with `close` or `fail`.
        """
        if not self._closed:
            self._stop_thread()
            self._closed = True
            self._raise_if_failed()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail(f"{exc_type.__name__}: {exc}")
        else:
            self.close()

    # ------------------------------------------------------------------ internals
    def _check_step(self, step: int) -> None:
        if self._closed or self._closing:
            raise TraceWriterError("writer is closed")
        if not 0 <= step < self.spec.max_steps:
            raise TraceWriterError(f"step {step} out of range 0..{self.spec.max_steps - 1}")
        if step < self._ended:
            raise TraceWriterError(f"step {step} was already ended")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise TraceWriterError(f"trace writer failed: {self._error!r}") from self._error

    def _put(self, record: Record | ActivationValues) -> None:
        if record.data.size == 0:
            return
        nbytes = record.data.nbytes
        with self._cond:
            self._raise_if_failed()
            if self._queued_bytes + nbytes > self.max_queue_bytes:
                t0 = time.perf_counter()
                # wait only while a flush can free memory (some ended step is still queued)
                while (self._queued_bytes + nbytes > self.max_queue_bytes
                       and self._committed < self._ended and self._error is None):
                    self._flush_requested = True
                    self._cond.notify_all()
                    self._cond.wait(0.5)
                self._stats.blocked_seconds += time.perf_counter() - t0
                self._raise_if_failed()
            self._records.append(record)
            self._queued_bytes += nbytes
            self._stats.peak_queue_bytes = max(self._stats.peak_queue_bytes, self._queued_bytes)

    def _stop_thread(self, warn_dropped: bool = True) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._stop_worker()
        with self._cond:
            dropped = len(self._records)
            if dropped:
                self._stats.dropped_records += dropped
                self._records.clear()
                if warn_dropped:
                    warnings.warn(f"trace writer rank {self.rank}: dropped {dropped} records of "
                                  f"steps never ended (>= {self._ended})", stacklevel=3)

    def _run(self) -> None:
        last_flush = time.monotonic()
        try:
            while True:
                with self._cond:
                    while True:
                        pending = self._ended > self._committed
                        now = time.monotonic()
                        if self._closing or (pending and (
                                self._flush_requested or now >= last_flush + self.flush_interval)):
                            break
                        self._cond.wait(last_flush + self.flush_interval - now if pending
                                        else None)
                    ended, closing = self._ended, self._closing
                    self._flush_requested = False
                    take = [r for r in self._records if r.step < ended]
                    if take:
                        self._records = [r for r in self._records if r.step >= ended]
                last_flush = time.monotonic()
                if ended > self._committed:
                    self._flush(take, ended)
                if closing:
                    return
        except BaseException as exc:  # surfaced to the caller on its next call
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _flush(self, records: list[Record | ActivationValues], ended: int) -> None:
        t0 = time.perf_counter()
        start = self._committed
        b0 = start
        while b0 < ended:
            b1 = min(ended, b0 + self.max_flush_steps)
            # A record of several steps commits with its last step: never cut through one.
            b1 = max([b1] + [r.step + 1 for r in records
                             if (r.step if r.first_step is None else r.first_step) < b1 <= r.step])
            batch = [r for r in records if b0 <= r.step < b1] if (b0, b1) != (start, ended) \
                else records
            written, regions, seconds = self._worker_call(("flush", batch, b1))
            with self._cond:
                self._committed = b1
                self._queued_bytes -= sum(r.data.nbytes for r in batch)
                self._stats.steps_committed = b1
                self._stats.bytes_written += written
                self._stats.region_writes += regions
                self._stats.worker_seconds += seconds
                self._cond.notify_all()
            b0 = b1
        with self._cond:
            self._stats.flushes += 1
            self._stats.seconds_writing += time.perf_counter() - t0

    # ------------------------------------------------------------------ the worker process
    def _start_worker(self) -> None:
        # A worker this process kept from an earlier writer, or a new one that imports its
        # modules while the caller goes on; the first flush waits for it to be ready.
        self._worker = worker_pool.take(str(self.path), self.rank)

    def _worker_call(self, message: tuple) -> tuple[int, int, float]:
        if not self._worker.ready:
            self._worker_reply("ready")
            self._worker.ready = True
        send_message(self._worker.sock, message)
        reply = self._worker_reply("ok")
        return reply[1], reply[2], reply[3]

    def _worker_reply(self, expected: str) -> tuple:
        try:
            reply = recv_message(self._worker.sock)  # the GIL is released while the worker writes
        except (EOFError, OSError):
            try:
                code = self._worker.process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            raise TraceWriterError(f"the trace worker process died (exit code {code})") from None
        if reply[0] == "error":
            raise TraceWriterError(f"worker: {reply[1]}\n{reply[2]}")
        if reply[0] != expected:
            raise TraceWriterError(f"unexpected reply from the trace worker: {reply[0]!r}")
        return reply

    def _stop_worker(self) -> None:
        worker_pool.release(self._worker, reusable=self._error is None)

    def _set_status(self, status: str, message: str) -> None:
        if status not in (STATUS_COMPLETE, STATUS_FAILED, STATUS_RUNNING):
            raise TraceWriterError(f"unknown status {status!r}")
        def array(name: str) -> zarr.Array:
            return zarr.open_array(store=str(self.path), path=name, mode="r+")
        with self._status_lock():
            array("rank_status")[self.rank] = status
            array("rank_error")[self.rank] = message
            statuses = np.asarray(array("rank_status")[:], dtype=object)
            errors = np.asarray(array("rank_error")[:], dtype=object)
            overall, error = aggregate_status(list(statuses), list(errors))
            if overall == STATUS_RUNNING and self.rank != 0:
                return  # the last rank to finish (or any failing rank) sets the root attributes
            root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
            root.attrs.update({"status": overall, "error": error, "updated": _now()})

    @contextlib.contextmanager
    def _status_lock(self):
        """Ranks of one machine set their status one at a time, so the last to finish sees every
        rank's status and its root status is written last. (The lock is on a file no write ever
        replaces; where flock is missing, ranks go unserialized as before.)"""
        try:
            import fcntl
        except ImportError:
            yield
            return
        with open(self.path / "rank_status" / "zarr.json", "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def aggregate_status(statuses: Sequence[str], errors: Sequence[str]) -> tuple[str, str]:
    """Trace status from per-rank statuses: failed if any failed, complete if all complete."""
    for rank, (status, error) in enumerate(zip(statuses, errors)):
        if status == STATUS_FAILED:
            return STATUS_FAILED, f"rank {rank}: {error}" if len(statuses) > 1 else str(error)
    if statuses and all(s == STATUS_COMPLETE for s in statuses):
        return STATUS_COMPLETE, ""
    return STATUS_RUNNING, ""


def dumps_metadata(metadata: Mapping[str, Any]) -> str:
    """The JSON text stored for `metadata` (useful to check it before a run)."""
    return json.dumps(_json_safe(metadata), allow_nan=False)
