"""The trace writer's worker process: turns queued records into Zarr region writes.

Zarr's write path is Python (codecs, chunk bookkeeping) and holds the GIL for milliseconds per
array; run on a thread of the generating process it stalls every torch op that releases the GIL.
So each rank's `TraceWriter` hands its records to one worker process over a pipe. The worker
reduces raw activation values to histograms and moments, coalesces the records of one array into
one bounding-box write, writes, and only then advances this rank's commit marker.

The worker ignores SIGINT and SIGTERM (Ctrl-C reaches the whole process group; a half-written
chunk would corrupt steps already committed): it finishes the flush in hand and exits when the
pipe closes, which is also what happens when the generating process is killed.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from numcodecs import VLenUTF8, Zstd

from .schema import ArrayLayout, TraceSpec
from .stats import MOMENT_ARRAYS, ActivationStats


@dataclass
class Record:
    """Values for one region of one array, produced by `step` (the last step they belong to)."""

    step: int
    name: str
    region: tuple[slice, ...]
    data: np.ndarray


@dataclass
class ActivationValues:
    """Raw activation values of steps [first_step, step], reduced by the worker.

    Segment i holds the values of (steps[i], layers[i], sites[i]): values[offsets[i]:offsets[i+1]].
    eps[i] is the near-zero threshold; NaN means ARM's MAD rule on the mlp.act.pre segment of the
    same step and layer.
    """

    step: int
    first_step: int
    values: np.ndarray  # [total] float32
    offsets: np.ndarray  # [n + 1] int64
    steps: np.ndarray  # [n] int64
    layers: np.ndarray  # [n] int64
    sites: np.ndarray  # [n] int64
    eps: np.ndarray  # [n] float64
    data: np.ndarray = field(init=False)  # for queue accounting

    def __post_init__(self) -> None:
        self.data = self.values


def mad_eps(x: np.ndarray, c: float = 0.13) -> float:
    """ARM's eps = 1.4826 * MAD(|a|) * c, with lower medians (as `probes.recorder.mad_thresholds`)."""
    mag = np.abs(x.astype(np.float32))
    k = (mag.size - 1) // 2
    med = np.partition(mag, k)[k]
    dev = np.abs(mag - med)
    return float(1.4826 * np.partition(dev, k)[k] * c)


def reduce_activation_values(av: ActivationValues, spec: TraceSpec, rank: int) -> list[Record]:
    """Histogram and moment records of the `activations` group for steps [first_step, step]."""
    n_steps = av.step - av.first_step + 1
    n_sites = len(spec.hist_sites)
    lengths = np.diff(av.offsets)
    eps = av.eps.copy()
    missing = np.flatnonzero(np.isnan(eps))
    if missing.size:
        pre = spec.hist_sites.index("mlp.act.pre")
        where = {(int(s), int(l)): i for i, (s, l, t) in enumerate(zip(av.steps, av.layers, av.sites)) if t == pre}
        cache: dict[int, float] = {}
        for i in missing:
            j = where.get((int(av.steps[i]), int(av.layers[i])))
            if j is None:  # no pre-redistribution values recorded for this layer
                eps[i] = spec.near_zero_eps
                continue
            if j not in cache:
                cache[j] = mad_eps(av.values[av.offsets[j]:av.offsets[j + 1]])
            eps[i] = cache[j]
    edges = np.asarray(spec.bin_edges, dtype=np.float64)
    n_bins = len(edges) - 1
    box = (n_steps, spec.n_layers, n_sites)
    hist = np.zeros((*box, n_bins), dtype=np.int64)
    moments = {f: np.full(box, np.nan) for f in ("sum", "sumsq", "sum3", "sum4", "min", "max")}
    count = np.zeros(box, dtype=np.int64)
    near = np.zeros(box, dtype=np.int64)
    eps_box = np.full(box, np.nan)
    at = (av.steps - av.first_step, av.layers, av.sites)
    for n in np.unique(lengths):  # segments of one length reduce as one matrix
        idx = np.flatnonzero(lengths == n)
        rows = av.offsets[idx][:, None] + np.arange(n)[None, :]
        x = av.values[rows].astype(np.float64)  # [k, n]
        stats = ActivationStats.from_values(x, edges, 0.0, lead_dims=1)
        where = tuple(a[idx] for a in at)
        hist[where] = stats.hist
        count[where] = stats.count
        for f in moments:
            moments[f][where] = getattr(stats, f)
        near[where] = (np.abs(x) < eps[idx][:, None]).sum(1)
    eps_box[at] = eps
    region = (slice(av.first_step, av.step + 1), slice(0, spec.n_layers), slice(0, n_sites), slice(rank, rank + 1))
    out = [Record(av.step, "activations/hist_count", region + (slice(0, n_bins),), hist[:, :, :, None]),
           Record(av.step, "activations/near_zero_eps", region, eps_box[..., None])]
    fields = dict(moments, count=count, near_zero=near)
    for f, array in MOMENT_ARRAYS.items():
        out.append(Record(av.step, f"activations/{array}", region, fields[f][..., None]))
    return out


class ChunkFiles:
    """One array's chunk files, encoded and replaced directly (no zarr call per write).

    Zarr's write path costs milliseconds of Python per call whatever the size; a flush touches a
    few small chunks of each of some thirty arrays. This class keeps the chunks a rank is filling
    in memory (no read-back of what it wrote last time), encodes them exactly as zarr does for
    the codecs the trace layout uses (bytes little-endian or vlen-utf8, then zstd) and replaces
    each file atomically (write beside, rename over), so a reader or a crash never sees half a
    chunk. Ranks own disjoint chunks, so a rank's cache is never stale.
    """

    def __init__(self, array_dir: Path, meta: dict, fill) -> None:
        self.dir = array_dir
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.string = meta["data_type"] == "string"
        self.dtype = np.dtype(object) if self.string else np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = fill
        zstd = meta["codecs"][1].get("configuration", {})
        self.zstd = Zstd(level=zstd.get("level", 0), checksum=zstd.get("checksum", False))
        self.cache: dict[tuple[int, ...], np.ndarray] = {}
        self.dirty: set[tuple[int, ...]] = set()

    @staticmethod
    def supports(meta: dict) -> bool:
        """True for the chunk layouts and codec chains this class encodes exactly like zarr."""
        codecs = meta.get("codecs", [])
        names = [c.get("name") for c in codecs]
        plain = names == ["bytes", "zstd"] and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        strings = names == ["vlen-utf8", "zstd"] and meta.get("data_type") == "string"
        return ((plain or strings) and meta.get("chunk_grid", {}).get("name") == "regular"
                and meta.get("chunk_key_encoding", {}).get("name") == "default"
                and not meta.get("storage_transformers"))

    def assign(self, region: tuple[slice, ...], data: np.ndarray) -> None:
        """Put `data` into `region` of the array (in the cached chunks)."""
        ranges = [range(r.start // c, (r.stop - 1) // c + 1) for r, c in zip(region, self.chunks)]
        for idx in itertools.product(*ranges):
            chunk = self._chunk(idx)
            dst, src = [], []
            for r, c, i in zip(region, self.chunks, idx):
                lo, hi = max(r.start, i * c), min(r.stop, (i + 1) * c)
                dst.append(slice(lo - i * c, hi - i * c))
                src.append(slice(lo - r.start, hi - r.start))
            chunk[tuple(dst)] = data[tuple(src)]
            self.dirty.add(idx)

    def save(self) -> int:
        """Encode and replace every chunk changed since the last save; return raw bytes encoded."""
        total = 0
        for idx in sorted(self.dirty):
            chunk = self.cache[idx]
            raw = VLenUTF8().encode(chunk) if self.string else chunk.ravel().view("B")
            path = self.dir / self.sep.join(("c", *map(str, idx)))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self.zstd.encode(raw))
            os.replace(tmp, path)
            total += chunk.nbytes
        # Keep only what this flush touched: the chunks being filled now.
        self.cache = {idx: self.cache[idx] for idx in self.dirty}
        self.dirty.clear()
        return total

    def _chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        chunk = self.cache.get(idx)
        if chunk is None:
            path = self.dir / self.sep.join(("c", *map(str, idx)))
            if path.exists():  # written before this process (another writer, or evicted)
                raw = self.zstd.decode(path.read_bytes())
                if self.string:
                    chunk = np.asarray(VLenUTF8().decode(raw), dtype=object).reshape(self.chunks)
                else:
                    chunk = np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks).copy()
            else:
                chunk = np.full(self.chunks, self.fill, dtype=self.dtype)
            self.cache[idx] = chunk
        return chunk


class StoreWriter:
    """One rank's region writes into an existing trace store (runs in the worker process)."""

    def __init__(self, path: str, rank: int) -> None:
        from .writer import read_spec
        self.path, self.rank = Path(path), rank
        self.spec, _ = read_spec(path)
        self.arrays: dict[str, ArrayLayout] = dict(self.spec.iter_arrays())
        self._files: dict[str, ChunkFiles | zarr.Array] = {}

    def write(self, records: list, committed: int) -> tuple[int, int]:
        """Write every record, then set this rank's commit marker; return (bytes, arrays written)."""
        flat: list[Record] = []
        for r in records:
            flat.extend(reduce_activation_values(r, self.spec, self.rank) if isinstance(r, ActivationValues) else [r])
        touched: dict[str, ChunkFiles | zarr.Array] = {}
        for r in flat:
            touched[r.name] = self._assign(r)
        written = sum(f.save() for f in touched.values() if isinstance(f, ChunkFiles))
        marker = self._assign(Record(committed, "committed", (slice(self.rank, self.rank + 1),),
                                     np.array([committed])))
        if isinstance(marker, ChunkFiles):
            marker.save()  # only after every chunk above is in place
        return written, len(touched)

    def _assign(self, r: Record) -> ChunkFiles | zarr.Array:
        layout = self.arrays[r.name]
        data = r.data
        if layout.causal:  # cells with key > query stay fill
            q_axis, k_axis = layout.dims.index("query"), layout.dims.index("key")
            q = np.arange(r.region[q_axis].start, r.region[q_axis].stop)
            k = np.arange(r.region[k_axis].start, r.region[k_axis].stop)
            data = np.array(data, dtype=np.dtype(layout.dtype), copy=True)
            data[..., k[None, :] > q[:, None]] = layout.fill
        files = self._array(r.name)
        if isinstance(files, ChunkFiles):
            files.assign(r.region, data)
        else:
            files[r.region] = data
        return files

    def _array(self, name: str) -> ChunkFiles | zarr.Array:
        files = self._files.get(name)
        if files is None:
            meta = json.loads((self.path / name / "zarr.json").read_text())
            if ChunkFiles.supports(meta):
                files = ChunkFiles(self.path / name, meta, self.arrays[name].fill)
            else:  # a layout this writer does not encode itself: zarr does it, slower
                files = zarr.open_array(store=str(self.path), path=name, mode="r+")
            self._files[name] = files
        return files


def serve(conn, path: str, rank: int) -> None:
    """Worker main loop: ("flush", records, committed) -> ("ok", bytes, region writes, seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = StoreWriter(path, rank)
        conn.send(("ready",))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the generating process is gone: what was committed stays committed
            if msg[0] == "stop":
                conn.send(("stopped",))
                return
            t0 = time.perf_counter()
            written, regions = store.write(msg[1], msg[2])
            conn.send(("ok", written, regions, time.perf_counter() - t0))
    except BaseException as exc:  # reported to the generating process, which raises it there
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except (OSError, ValueError):
            pass


if __name__ == "__main__":  # python -m workbench.trace.worker FD PATH RANK (started by TraceWriter)
    import sys
    from multiprocessing.connection import Connection

    # The package's module, not this __main__ copy: unpickled records are its classes.
    from workbench.trace.worker import serve as package_serve
    package_serve(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]))
