"""The trace writer's worker process: turns queued records into Zarr region writes.

Zarr's write path is Python (codecs, chunk bookkeeping) and holds the GIL for milliseconds per
array; run on a thread of the generating process it stalls every torch op that releases the GIL.
So each rank's `TraceWriter` hands its records to one worker process over a socket. The worker
reduces raw activation values to histograms and moments, coalesces the records of one array into
one bounding-box write, writes, and only then advances this rank's commit marker.

The worker ignores SIGINT and SIGTERM (Ctrl-C reaches the whole process group; a half-written
chunk would corrupt steps already committed): it finishes the flush in hand and exits when the
socket closes, which is also what happens when the generating process is killed.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import pickle
import signal
import socket
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import VLenUTF8, Zstd

from .schema import ArrayLayout, TraceSpec
from .stats import MOMENT_ARRAYS


@dataclass
class Record:
    """Values for one region of one array, of steps [first_step, step] (first_step None: step)."""

    step: int
    name: str
    region: tuple[slice, ...]
    data: np.ndarray
    first_step: int | None = None


@dataclass
class ActivationValues:
    """Raw activation values of consecutive steps [first_step, step], reduced by the worker.

    `values` holds one row per (step, sequence) the steps computed, rows of one step together and
    in step order; columns [col_offsets[i], col_offsets[i + 1]) hold site `sites[i]` of layer
    `layers[i]`. eps[s, i] is the near-zero threshold of step first_step + s and column block i;
    NaN means ARM's MAD rule on the mlp.act.pre values of the same step and layer.
    """

    step: int
    first_step: int
    values: np.ndarray  # [rows, width] float32
    row_steps: np.ndarray  # [rows] int64, non-decreasing
    col_offsets: np.ndarray  # [blocks + 1] int64
    layers: np.ndarray  # [blocks] int64
    sites: np.ndarray  # [blocks] int64
    eps: np.ndarray  # [steps, blocks] float64
    data: np.ndarray = field(init=False)  # for queue accounting

    def __post_init__(self) -> None:
        self.data = self.values


def mad_eps(x: np.ndarray, c: float = 0.13) -> np.ndarray:
    """ARM's eps = 1.4826 * MAD(|a|) * c per row of x [rows, n], lower medians (as `mad_thresholds`)."""
    mag = np.abs(x.astype(np.float32))
    k = (mag.shape[1] - 1) // 2
    med = np.partition(mag, k, axis=1)[:, k:k + 1]
    dev = np.abs(mag - med)
    return (np.float32(1.4826) * np.partition(dev, k, axis=1)[:, k] * np.float32(c)).astype(np.float64)


# A float32's top 18 bits (sign, exponent, 9 mantissa bits) name a run of 2**14 consecutive
# values; for most runs every value lies in one bin, which a table can say at once.
_KEY_SHIFT = 14
_BIN_TABLES: dict[bytes, np.ndarray] = {}


def exact_bins(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bin i = [edges[i], edges[i+1]) of each value (float64), clipped to the first and last bin."""
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)


def _bin_table(edges: np.ndarray) -> np.ndarray:
    """The bin of each run of float32 values that share their top bits; -1 where a run holds an edge."""
    key = edges.tobytes()
    table = _BIN_TABLES.get(key)
    if table is None:
        first = np.arange(1 << (32 - _KEY_SHIFT), dtype=np.uint32) << _KEY_SHIFT
        last = first | np.uint32((1 << _KEY_SHIFT) - 1)
        with np.errstate(invalid="ignore"):  # NaN runs: clipped to the last bin, as exact_bins does
            lo = exact_bins(edges, first.view(np.float32).astype(np.float64))
            hi = exact_bins(edges, last.view(np.float32).astype(np.float64))
        table = np.where(lo == hi, lo, -1).astype(np.min_scalar_type(1 - len(edges)))  # int8: 128 bins
        _BIN_TABLES[key] = table
    return table


def value_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``exact_bins`` of float32 values (C-contiguous), ~10x faster: a table lookup on their top
    bits, and a binary search only for the ~1% whose run of values holds a bin edge."""
    bins = _bin_table(edges)[values.view(np.uint32) >> _KEY_SHIFT].astype(np.int64)
    flat = bins.reshape(-1)
    odd = np.flatnonzero(flat < 0)
    if len(odd):
        flat[odd] = exact_bins(edges, values.reshape(-1)[odd].astype(np.float64))
    return bins


def _near_zero_thresholds(av: ActivationValues, spec: TraceSpec, blocks: list[tuple[int, int]],
                          present: np.ndarray, starts: np.ndarray, counts_per_step: np.ndarray) -> np.ndarray:
    """av.eps [steps, blocks] with each NaN replaced by ARM's MAD rule on the layer's mlp.act.pre
    values of that step (the spec's fixed threshold where those were not recorded)."""
    eps = av.eps.copy()
    if not np.isnan(eps).any():
        return eps
    same_rows = bool(np.all(counts_per_step == counts_per_step[0]))
    pre_site = spec.hist_sites.index("mlp.act.pre")
    for i, (layer, site) in enumerate(blocks):
        if not np.isnan(eps[:, i]).any():
            continue
        j = blocks.index((layer, pre_site)) if (layer, pre_site) in blocks else None
        if j is None:  # no pre-redistribution values recorded for this layer
            eps[:, i] = np.where(np.isnan(eps[:, i]), spec.near_zero_eps, eps[:, i])
            continue
        x = av.values[:, av.col_offsets[j]:av.col_offsets[j + 1]]
        if same_rows:  # one matrix row per step: all its sequences' values
            mad = mad_eps(x.reshape(len(present), -1))
        else:
            mad = np.array([mad_eps(x[r0:r0 + n].reshape(1, -1))[0] for r0, n in zip(starts, counts_per_step)])
        full = np.full(len(eps), np.nan)
        full[present] = mad
        eps[:, i] = np.where(np.isnan(eps[:, i]), full, eps[:, i])
    return eps


# Values reduced at a time: bounds the float64 temporaries (0.5 MB each) for any batch size.
REDUCE_CHUNK_VALUES = 1 << 16


def reduce_activation_values(av: ActivationValues, spec: TraceSpec, rank: int,
                             layouts: dict[str, ArrayLayout] | None = None) -> list[Record]:
    """Histogram and moment records of the `activations` group for steps [first_step, step].

    Every column block is reduced at once, a chunk of rows at a time: per-(row, block) sums first,
    then per step, so a batch costs a few numpy calls per chunk, not per block.
    """
    if not len(av.row_steps):  # no step left rows: every cell keeps its fill
        return []
    n_steps, n_sites, n_layers = av.step - av.first_step + 1, len(spec.hist_sites), spec.n_layers
    edges = np.asarray(spec.bin_edges, dtype=np.float64)
    n_bins = len(edges) - 1
    local = av.row_steps - av.first_step  # [rows] step index of each row
    present = np.unique(local)
    starts = np.searchsorted(local, present)  # first row of each step that has rows
    counts_per_step = np.diff(np.append(starts, len(local)))
    blocks = list(zip(av.layers.tolist(), av.sites.tolist()))
    eps = _near_zero_thresholds(av, spec, blocks, present, starts, counts_per_step)
    values = np.ascontiguousarray(av.values, dtype=np.float32)
    n_rows, width = values.shape
    widths = np.diff(av.col_offsets)
    col_block = np.repeat(np.arange(len(blocks)), widths)  # [width] block of each column
    col_starts = av.col_offsets[:-1]
    compact = np.searchsorted(present, local)  # [rows] index of each row's step among present
    hist = np.zeros((len(present), len(blocks), n_bins), dtype=np.int64)
    row_sums = np.empty((5, n_rows, len(blocks)))  # sum, sumsq, sum3, sum4, near zero per (row, block)
    row_min, row_max = np.empty((n_rows, len(blocks))), np.empty((n_rows, len(blocks)))
    row_eps = eps[local]  # [rows, blocks]
    chunk = max(1, REDUCE_CHUNK_VALUES // max(width, 1))
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        c0, c1 = compact[r0], compact[r1 - 1] + 1  # the steps of these rows
        cell = ((compact[r0:r1, None] - c0) * len(blocks) + col_block) * n_bins
        hist[c0:c1] += np.bincount((cell + value_bins(values[r0:r1], edges)).reshape(-1),
                                   minlength=(c1 - c0) * len(blocks) * n_bins).reshape(c1 - c0, len(blocks), n_bins)
        x = values[r0:r1].astype(np.float64)
        x2 = x * x
        row_sums[0, r0:r1] = np.add.reduceat(x, col_starts, axis=1)
        row_sums[1, r0:r1] = np.add.reduceat(x2, col_starts, axis=1)
        row_sums[2, r0:r1] = np.add.reduceat(x2 * x, col_starts, axis=1)
        row_sums[3, r0:r1] = np.add.reduceat(x2 * x2, col_starts, axis=1)
        row_sums[4, r0:r1] = np.add.reduceat(np.abs(x) < row_eps[r0:r1][:, col_block], col_starts, axis=1,
                                             dtype=np.float64)
        row_min[r0:r1] = np.minimum.reduceat(x, col_starts, axis=1)
        row_max[r0:r1] = np.maximum.reduceat(x, col_starts, axis=1)
    step_sums = np.add.reduceat(row_sums, starts, axis=1)  # [5, present, blocks]
    per_step = {"sum": step_sums[0], "sumsq": step_sums[1], "sum3": step_sums[2], "sum4": step_sums[3],
                "near_zero": step_sums[4], "min": np.minimum.reduceat(row_min, starts, axis=0),
                "max": np.maximum.reduceat(row_max, starts, axis=0),
                "count": counts_per_step[:, None] * widths[None, :]}
    layouts = layouts or dict(spec.iter_arrays())
    box = (n_steps, n_layers, n_sites)  # cells of steps, layers or sites not recorded keep the fill
    at = (present[:, None], av.layers[None, :], av.sites[None, :])
    box_hist = np.full((*box, n_bins), layouts["activations/hist_count"].fill, dtype=np.int64)
    box_hist[at] = hist
    eps_box = np.full(box, layouts["activations/near_zero_eps"].fill, dtype=np.float64)
    eps_box[at] = eps[present]
    region = (slice(av.first_step, av.step + 1), slice(0, n_layers), slice(0, n_sites), slice(rank, rank + 1))
    out = [Record(av.step, "activations/hist_count", region + (slice(0, n_bins),), box_hist[:, :, :, None]),
           Record(av.step, "activations/near_zero_eps", region, eps_box[..., None])]
    for f, array in MOMENT_ARRAYS.items():
        layout = layouts[f"activations/{array}"]
        box_f = np.full(box, layout.fill, dtype=layout.dtype)
        box_f[at] = per_step[f]
        out.append(Record(av.step, f"activations/{array}", region, box_f[..., None]))
    return out


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def replace_file(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` atomically: a reader sees the old file or the new one, never neither.

    Where it can, it swaps the two names (renameat2 RENAME_EXCHANGE) and deletes the old file:
    ext4 treats a rename over an existing file as a request to write the new data to disk at
    once (auto_da_alloc), ~0.2 ms per chunk here plus disk interrupts that slow generation,
    while a swap leaves the data to normal writeback. Falls back to ``os.replace``.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, bytes(tmp), _AT_FDCWD, bytes(path), _RENAME_EXCHANGE) == 0:
            os.unlink(tmp)
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            raise OSError(err, os.strerror(err), str(path))
    os.replace(tmp, path)  # no file there yet (nothing to swap with), or no swap on this system


_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


def send_message(sock: socket.socket, message: tuple) -> None:
    """Send ``message`` over ``sock`` with its arrays' memory out of band (pickle protocol 5).

    The frame is [sizes][small pickle][each array's memory as it is], handed to the kernel with
    ``sendmsg`` calls that release the GIL. (``Connection.send`` pickled everything into one bytes
    object and copied what remained after each partial write, megabytes under the GIL; and every
    separate write is a GIL hand-off that stalls the generating thread.)
    """
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<QI{len(raws)}Q", len(head), len(raws), *(r.nbytes for r in raws))
    parts = [memoryview(sizes), memoryview(head), *raws]
    while parts:
        sent = sock.sendmsg(parts[:_IOV_MAX])
        while parts and sent >= parts[0].nbytes:
            sent -= parts[0].nbytes
            parts.pop(0)
        if sent:
            parts[0] = parts[0][sent:]


def recv_message(sock: socket.socket) -> tuple:
    """A message sent by `send_message`; its arrays are writable. EOFError if the peer is gone."""
    head_len, n = struct.unpack("<QI", _recv_exactly(sock, 12))
    sizes = struct.unpack(f"<{n}Q", _recv_exactly(sock, 8 * n)) if n else ()
    head = _recv_exactly(sock, head_len)
    return pickle.loads(head, buffers=[_recv_exactly(sock, size) for size in sizes])


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return buf


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
        self._made_dirs: set[Path] = set()

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
            if path.parent not in self._made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made_dirs.add(path.parent)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self.zstd.encode(raw))
            replace_file(tmp, path)
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
        self.path, self.rank = Path(path), rank
        # The spec from the root's zarr.json directly: zarr itself is imported only if needed.
        self.spec = TraceSpec.from_dict(json.loads((self.path / "zarr.json").read_text())["attributes"]["spec"])
        self.arrays: dict[str, ArrayLayout] = dict(self.spec.iter_arrays())
        self._files: dict[str, ChunkFiles | Any] = {}

    def write(self, records: list, committed: int) -> tuple[int, int]:
        """Write every record, then set this rank's commit marker; return (bytes, arrays written)."""
        flat: list[Record] = []
        for r in records:
            flat.extend(reduce_activation_values(r, self.spec, self.rank, self.arrays)
                        if isinstance(r, ActivationValues) else [r])
        touched: dict[str, ChunkFiles | Any] = {}
        for r in flat:
            touched[r.name] = self._assign(r)
        written = sum(f.save() for f in touched.values() if isinstance(f, ChunkFiles))
        marker = self._assign(Record(committed, "committed", (slice(self.rank, self.rank + 1),),
                                     np.array([committed])))
        if isinstance(marker, ChunkFiles):
            marker.save()  # only after every chunk above is in place
        return written, len(touched)

    def _assign(self, r: Record) -> ChunkFiles | Any:
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

    def _array(self, name: str) -> ChunkFiles | Any:
        files = self._files.get(name)
        if files is None:
            meta = json.loads((self.path / name / "zarr.json").read_text())
            if ChunkFiles.supports(meta):
                files = ChunkFiles(self.path / name, meta, self.arrays[name].fill)
            else:  # a layout this writer does not encode itself: zarr does it, slower
                import zarr
                files = zarr.open_array(store=str(self.path), path=name, mode="r+")
            self._files[name] = files
        return files


def serve(sock: socket.socket) -> None:
    """Worker main loop, one store at a time (a worker outlives its writer: writer.py's pool).

    ("open", path, rank): later flushes go to that store. ("flush", records, committed) ->
    ("ok", bytes, region writes, seconds). ("close",) -> ("closed",): the store is let go and the
    worker waits for the next "open". ("stop",) -> ("stopped",), and the worker exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        send_message(sock, ("ready",))  # imports are done
        target: tuple[str, int] | None = None
        store = None
        while True:
            try:
                msg = recv_message(sock)
            except (EOFError, OSError):
                return  # the generating process is gone: what was committed stays committed
            if msg[0] == "open":
                target, store = (msg[1], msg[2]), None
            elif msg[0] == "close":
                target, store = None, None
                send_message(sock, ("closed",))
            elif msg[0] == "stop":
                send_message(sock, ("stopped",))
                return
            else:
                if target is None:
                    raise RuntimeError("a flush before any store was opened")
                t0 = time.perf_counter()
                store = store or StoreWriter(*target)  # the store may have been created after "open"
                written, regions = store.write(msg[1], msg[2])
                send_message(sock, ("ok", written, regions, time.perf_counter() - t0))
    except BaseException as exc:  # reported to the generating process, which raises it there
        try:
            send_message(sock, ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except (OSError, ValueError):
            pass


if __name__ == "__main__":  # python -m workbench.trace.worker FD (started by writer.py's pool)
    import sys

    # The package's module, not this __main__ copy: unpickled records are its classes.
    from workbench.trace.worker import serve as package_serve
    package_serve(socket.socket(fileno=int(sys.argv[1])))
