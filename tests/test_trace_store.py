"""Trace store: one round-trip helper (write via TraceWriter, read via open_trace and plain xarray),
commit-marker semantics, multi-rank disjoint writes, bad input, writer misuse, the synthetic trace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from workbench.trace import (ActivationStats, PerceiverSpec, TraceError, TraceSpec, TraceWriter,
                             TraceWriterError, finish_moments, open_trace)
from workbench.trace import worker_pool
from workbench.trace.schema import FORMAT_VERSION
from workbench.trace.worker import recv_message, replace_file, send_message
from workbench.trace.synthetic import write_synthetic_trace

DOC = Path(__file__).resolve().parents[1] / "docs" / "trace-format.md"


def small_spec(world: int = 2, **kw) -> TraceSpec:
    base = dict(n_seq=2, n_layers=3, n_heads=4, world=world, top_k=3,
                attention_layers=(0, 2), attention_heads=(1, 2, 3),
                perceiver=PerceiverSpec(n_latents=3, n_inputs=5, n_repeats=2, n_heads=2))
    base.update(kw)
    return TraceSpec.for_generation(5, 6, **base)


def step_rows(spec: TraceSpec, step: int) -> tuple[int, int]:
    """Query rows [q0, q1) processed at `step` (prompt at step 0, then one row per step)."""
    p = spec.max_positions - (spec.max_steps - 1)
    return (0, p) if step == 0 else (p + step - 1, p + step)


def value(step: int, *extra: float) -> float:
    """Deterministic payload so a reader can tell which step wrote a cell."""
    return float(step) + sum(e * 10.0 ** -(i + 1) for i, e in enumerate(extra))


class Recorder:
    """Writes deterministic data for every group through one TraceWriter per rank and keeps the
    expected arrays, so readers can be compared cell by cell (the round-trip helper)."""

    def __init__(self, path: Path, spec: TraceSpec, **writer_kw):
        self.spec = spec
        self.writers = [TraceWriter(path, spec, {"model_config": {"d_model": 8}, "seed": 1,
                                                 "tp_algorithm": "reduce_scatter"},
                                    overwrite=True, **writer_kw)]
        self.writers += [TraceWriter.open(path, r, world=spec.world, **writer_kw)
                         for r in range(1, spec.world)]
        s = spec
        H = len(s.attention_heads)
        self.weights = np.full((s.n_seq, len(s.attention_layers), H, s.max_positions,
                                s.max_positions), np.nan, np.float32)
        self.hist = np.full((s.max_steps, s.n_layers, len(s.hist_sites), s.world, s.n_bins), -1)
        self.timing = np.full((s.max_steps, s.n_layers, len(s.timing_parts), s.world), np.nan)
        self.token_id = np.full((s.n_seq, s.max_positions), -1)
        self.rng = np.random.default_rng(0)

    def prompt(self) -> None:
        p = step_rows(self.spec, 0)[1]
        ids = np.arange(self.spec.n_seq * p).reshape(self.spec.n_seq, p)
        self.writers[0].write_prompt(ids, [[f"t{i}" for i in row] for row in ids])
        self.token_id[:, :p] = ids

    def step(self, step: int, ranks: list[int] | None = None) -> None:
        s = self.spec
        q0, q1 = step_rows(s, step)
        for rank in (range(s.world) if ranks is None else ranks):
            w = self.writers[rank]
            w.write_queries(step, q0, q1)
            # probe style: one call per layer with all heads this rank owns
            owned = list(s.heads_of_rank(rank))
            for li, layer in enumerate(s.attention_layers):
                rows = self.rng.random((s.n_seq, len(owned), q1 - q0, q1)).astype(np.float32)
                rows = np.round(rows, 2)  # exactly representable enough in float16 comparisons
                for qi in range(q1 - q0):
                    rows[..., qi, q0 + qi + 1:] = 0.0  # causal zeros above the diagonal
                assert w.write_attention(step, rows, query_start=q0, layer=layer)
                for hi, h in enumerate(owned):
                    if h in s.attention_heads:
                        self.weights[:, li, s.attention_heads.index(h), q0:q1, :q1] = rows[:, hi]
            if 1 not in s.attention_layers:  # unrecorded layers are skipped
                assert not w.write_attention(step, np.zeros((s.n_seq, len(owned), 1, 1)),
                                             query_start=q0, layer=1)
            w.write_attention_mass(step, np.full((s.n_seq, s.n_layers, q1), value(step)))
            w.write_kv(step, tokens=np.full(s.n_layers, q1), blocks=1, bytes_used=10 * q1,
                       bytes_reserved=16 * q1)
            stats = ActivationStats.from_values(
                self.rng.standard_normal((s.n_layers, len(s.hist_sites), 50)), s.bin_edges,
                s.near_zero_eps, lead_dims=2)
            w.write_activations(step, stats)
            self.hist[step, :, :, rank] = stats.hist
            t = np.full((s.n_layers, len(s.timing_parts)), value(step, rank))
            w.write_timing(step, t, step_seconds=value(step), step_start=1e9 + step)
            self.timing[step, :, :, rank] = t
            w.write_comm(step, start=value(step), seconds=1e-4, nbytes=64, site="mlp_allreduce")
            w.write_comm(step, start=value(step), seconds=2e-4, nbytes=32, site=0)
            w.write_sample(step, [step, step + 1], chosen_prob=[0.5, 0.25],
                           candidate_ids=np.arange(6).reshape(2, 3), candidate_probs=[[.5, .3, .2]] * 2)
            if q1 < s.max_positions:
                w.write_tokens(step, q1, [[100 + step], [200 + step]], [["a"], ["b"]])
                if rank == 0:
                    self.token_id[:, q1] = [100 + step, 200 + step]
            p = s.perceiver
            w.write_cross_attention(step, np.full((s.n_seq, p.n_repeats, p.n_heads // s.world,
                                                   p.n_latents, p.n_inputs), value(step, rank)),
                                    input_position=np.arange(p.n_inputs)[None].repeat(2, 0),
                                    latent_position=np.arange(p.n_latents)[None].repeat(2, 0))
            w.end_step(step)

    def run(self, n_steps: int | None = None) -> None:
        self.prompt()
        for step in range(self.spec.max_steps if n_steps is None else n_steps):
            self.step(step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def check_roundtrip(path: Path, rec: Recorder) -> None:
    """Compare open_trace, plain xarray per group and xarray's datatree against the expectation."""
    s = rec.spec
    tr = open_trace(path)
    n = tr.n_steps
    assert n == s.max_steps and tr.status == "complete"
    assert tr.metadata["model_config"] == {"d_model": 8}
    assert tr.spec.to_dict() == s.to_dict()
    q = tr.n_queries
    assert q == s.max_positions
    np.testing.assert_allclose(tr.attention["weights"].values.astype(np.float32),
                               np.where(np.tril(np.ones((q, q), bool)), rec.weights[..., :q, :q],
                                        np.nan), atol=1e-3)
    np.testing.assert_array_equal(tr.activations["hist_count"].values, rec.hist)
    np.testing.assert_array_equal(tr.timing["seconds"].values, rec.timing)
    np.testing.assert_array_equal(tr.tokens["token_id"].values, rec.token_id[:, :tr.n_positions])
    assert list(tr.attention["layer"].values) == [0, 2]
    assert list(tr.attention["head"].values) == [1, 2, 3]
    assert list(tr.comm["site"].values) == list(s.comm_sites)
    assert tr.comm.attrs["algorithm"] == "reduce_scatter"
    assert tr.comm["bytes"].sel(site="mlp_allreduce").min() == 64
    assert float(tr.comm["seconds"].sel(site="attn_allreduce").max()) == 2e-4
    assert (tr.kv_cache["attention_mass"].sel(rank=s.world - 1, layer=2).values[:, 3, :6] == 3.0).all()
    cross = tr.cross_attention["weights"].values
    assert np.allclose(cross[:, 4, :, :1], 4.0)  # rank 0's cross head
    assert np.allclose(cross[:, 4, :, 1:], 4.0 if s.world == 1 else 4.1, atol=1e-2)
    # the helpers
    m = tr.attention_map(1, layer=2, head=3, step=2)
    stop = step_rows(s, 2)[1]
    expect = rec.weights[1, 1, 2, :q, :q].copy()
    expect[stop:] = np.nan
    expect[~np.tril(np.ones((q, q), bool))] = np.nan
    np.testing.assert_allclose(m.values, expect, atol=1e-3)
    assert tr.token_text(0, upto_step=1) == "".join(f"t{i}" for i in range(5)) + "aa"
    stats = tr.activation_moments(sum_steps=True)
    assert int(stats["count"].sum()) == 50 * s.n_layers * len(s.hist_sites) * s.world * n

    # plain xarray, no workbench code: every group opens and holds the same values
    for group in tr.groups:
        plain = xr.open_zarr(path, group=group, consolidated=False)
        ours = tr.dataset(group)
        for name in ours.variables:
            a, b = plain[name], ours[name]
            sl = {d: slice(0, b.sizes[d]) for d in b.dims}
            xr.testing.assert_identical(a.isel(sl).load(), b.load())
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    assert set(tree.children) == set(tr.groups)
    assert list(tree["committed"].values) == [n] * s.world
    root = xr.open_zarr(path, consolidated=False)
    assert root.attrs["format"] == "workbench-trace" and root.attrs["status"] == "complete"


@pytest.mark.parametrize("world", [1, 2])
def test_roundtrip_writer_to_reader_and_plain_xarray(tmp_path, world):
    spec = small_spec(world=world)
    rec = Recorder(tmp_path / "t.zarr", spec, flush_interval=0.01, max_flush_steps=3)
    rec.run()
    rec.close()
    check_roundtrip(tmp_path / "t.zarr", rec)
    stats = rec.writers[0].writer_stats()
    assert stats.steps_committed == spec.max_steps and stats.bytes_written > 0
    assert stats.flushes >= 1 and stats.dropped_records == 0


def test_reader_never_sees_past_min_committed(tmp_path):
    spec = small_spec()
    path = tmp_path / "t.zarr"
    rec = Recorder(path, spec, flush_interval=0.01)
    rec.prompt()
    for step in range(4):
        rec.step(step, ranks=[0])
    for step in range(2):
        rec.step(step, ranks=[1])
    for w in rec.writers:
        w.flush()
    tr = open_trace(path)
    assert list(tr.committed) == [4, 2] and tr.n_steps == 2 and tr.status == "running"
    stop = step_rows(spec, 1)[1]  # rows processed by steps 0..1
    assert tr.n_queries == stop
    for group in tr.groups:
        ds = tr.dataset(group)
        if "step" in ds.dims:
            assert ds.sizes["step"] == 2, group
        for dim in ("query", "key"):
            if dim in ds.dims:
                assert ds.sizes[dim] == stop
    assert tr.tokens.sizes["position"] == stop + 1  # the token sampled at step 1
    assert tr.timing["seconds"].notnull().all()  # both ranks wrote steps 0..1
    # rank 1 catches up: refresh moves every group's cut together
    for step in range(2, 4):
        rec.step(step, ranks=[1])
    rec.writers[1].flush()
    assert tr.refresh() == 2 and tr.n_steps == 4
    assert tr.timing.sizes["step"] == 4 and tr.attention.sizes["query"] == step_rows(spec, 3)[1]
    assert tr.refresh() == 0
    with pytest.raises(ValueError, match="not committed"):
        tr.attention_map(0, 0, 1, step=4)


def test_two_ranks_disjoint_heads_complete_map(tmp_path):
    spec = small_spec(attention_heads=None, attention_layers=None)
    rec = Recorder(tmp_path / "t.zarr", spec, flush_interval=0.01)
    rec.run()
    rec.close()
    tr = open_trace(tmp_path / "t.zarr")
    w = tr.attention["weights"].values
    lower = np.tril(np.ones(w.shape[-2:], bool))
    assert np.isfinite(w[..., lower]).all()  # rank 0 wrote heads 0-1, rank 1 heads 2-3
    assert np.isnan(w[..., ~lower]).all()  # key > query is never written
    for head in range(spec.n_heads):
        m = tr.attention_map(0, 1, head)
        assert np.isfinite(m.values[lower]).all()


def test_unaligned_token_writes_merge_with_stored_data(tmp_path):
    """Per-sequence writes at different positions across flushes must not clobber each other."""
    spec = TraceSpec(n_seq=2, max_steps=6, max_positions=8, n_layers=1, n_heads=1)
    w = TraceWriter(tmp_path / "t.zarr", spec, flush_interval=0.01)
    for step in range(6):
        w.write_tokens(step, step, [7], seq=0)  # seq 0 one position ahead of seq 1
        if step >= 1:
            w.write_tokens(step, step - 1, [9], seq=1)
        w.end_step(step)
        w.flush()
    w.close()
    tr = open_trace(tmp_path / "t.zarr")
    ids = xr.open_zarr(tmp_path / "t.zarr", group="tokens", consolidated=False)["token_id"].values
    assert list(ids[0, :6]) == [7] * 6 and list(ids[1, :5]) == [9] * 5
    assert tr.n_positions == 6


def test_the_last_rank_to_finish_sets_the_traces_status(tmp_path, monkeypatch):
    """Two ranks finishing at once: rank 0 reads the statuses while rank 1 is still running, and
    rank 1 finishes before rank 0 has written what it saw. The trace must still say complete."""
    import time

    import zarr

    from workbench.trace import writer as writer_module
    path = tmp_path / "t.zarr"
    w0 = TraceWriter(path, small_spec(world=2), {})
    w1 = TraceWriter.open(path, 1)
    real, rank0_has_read = writer_module.aggregate_status, threading.Event()

    def slow_for_rank0(statuses, errors):
        out = real(statuses, errors)
        if threading.current_thread().name == "rank0":
            rank0_has_read.set()
            time.sleep(0.3)  # rank 1 finishes meanwhile
        return out
    monkeypatch.setattr(writer_module, "aggregate_status", slow_for_rank0)
    t0 = threading.Thread(target=w0.close, name="rank0")
    t0.start()
    assert rank0_has_read.wait(10)
    w1.close()
    t0.join()
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["status"] == "complete" and open_trace(path).status == "complete"


def test_status_failed_and_context_manager(tmp_path):
    spec = small_spec(world=1)
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path / "a.zarr", spec) as w:
            w.end_step(0)
            raise RuntimeError("boom")
    tr = open_trace(tmp_path / "a.zarr")
    assert tr.status == "failed" and "boom" in tr.error and tr.n_steps == 1
    w = TraceWriter(tmp_path / "b.zarr", spec)
    w.fail("out of memory")
    tr = open_trace(tmp_path / "b.zarr")
    assert (tr.status, tr.error) == ("failed", "out of memory")
    assert xr.open_zarr(tmp_path / "b.zarr", consolidated=False).attrs["error"] == "out of memory"


def test_writer_misuse_is_refused(tmp_path):
    spec = small_spec(world=1)
    w = TraceWriter(tmp_path / "t.zarr", spec)
    with pytest.raises(TraceWriterError, match="next step to end is 0"):
        w.end_step(1)
    with pytest.raises(TraceWriterError, match="does not fit"):
        w.write_timing(0, np.zeros((2, 2)))
    with pytest.raises(TraceWriterError, match="out of range"):
        w.write_kv(spec.max_steps, tokens=1)
    with pytest.raises(TraceWriterError, match="unknown site"):
        w.write_comm(0, seconds=1.0, site="nope")
    with pytest.raises(TraceWriterError, match="no array"):
        w.write(0, "timing/nope", 1.0)
    w.end_step(0)
    with pytest.raises(TraceWriterError, match="already ended"):
        w.write_timing(0, step_seconds=1.0)
    w.write_timing(1, step_seconds=1.0)  # never ended: dropped at close with a warning
    with pytest.warns(UserWarning, match="dropped 1 records"):
        w.close()
    assert open_trace(tmp_path / "t.zarr").n_steps == 1
    with pytest.raises(TraceWriterError, match="closed"):
        w.write_timing(1, step_seconds=1.0)
    with pytest.raises(FileExistsError):
        TraceWriter(tmp_path / "t.zarr", spec)
    with pytest.raises(TraceWriterError, match="world"):
        TraceWriter.open(tmp_path / "t.zarr", rank=0, world=2)


def test_a_failed_run_drops_its_unended_step_without_a_warning(tmp_path):
    """The failing step's records go quietly (the trace says it failed); a clean close still warns."""
    import warnings
    w = TraceWriter(tmp_path / "f.zarr", small_spec(world=1))
    w.write_timing(0, step_seconds=1.0)
    w.end_step(0)
    w.write_timing(1, step_seconds=1.0)  # the step that failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.fail("RuntimeError: boom")
    assert w.writer_stats().dropped_records == 1
    tr = open_trace(tmp_path / "f.zarr")
    assert (tr.status, tr.error, tr.n_steps) == ("failed", "RuntimeError: boom", 1)


def test_bounded_queue_blocks_instead_of_growing(tmp_path):
    spec = TraceSpec(n_seq=1, max_steps=40, max_positions=40, n_layers=2, n_heads=2)
    w = TraceWriter(tmp_path / "t.zarr", spec, flush_interval=10.0, max_queue_bytes=2_000)
    for step in range(40):
        w.write_attention(step, np.ones((1, 2, 2, 1, step + 1)), query_start=step)
        w.write_timing(step, np.ones((2, 4)))
        w.end_step(step)
    w.close()
    stats = w.writer_stats()
    assert stats.peak_queue_bytes <= 2_000 + 400  # the limit + at most one step in flight
    assert stats.flushes >= 2 and stats.steps_committed == 40


def test_writer_thread_error_surfaces(tmp_path):
    spec = small_spec(world=1)
    w = TraceWriter(tmp_path / "t.zarr", spec, flush_interval=0.01)
    shutil.rmtree(tmp_path / "t.zarr" / "timing" / "step_seconds")  # the disk goes away
    (tmp_path / "t.zarr" / "timing" / "step_seconds").write_text("not a directory")
    w.write_timing(0, step_seconds=1.0)
    w.end_step(0)
    with pytest.raises(TraceWriterError, match="failed"):  # the failure, not the timeout, ends the wait
        w.flush(timeout=300)
    with pytest.raises(TraceWriterError):
        w.close()


def _create_store_through_zarr(path: Path, spec: TraceSpec, run: dict, created: str) -> None:
    """The reference for create_store: the same store made with zarr's own API."""
    import zarr
    from zarr.codecs import ZstdCodec

    from workbench.trace.schema import FORMAT_NAME, STRING, coordinate_values
    from workbench.trace.writer import ZSTD_LEVEL, _json_safe
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "spec": _json_safe(spec.to_dict()),
                       "run": run, "status": "running", "error": "", "created": created})
    for gname, group in spec.layout().items():
        zgroup = root if gname == "" else root.create_group(gname)
        attrs = {"description": group.description}
        attrs.update({"activations": {"near_zero_eps": spec.near_zero_eps}, "comm": {"algorithm": "allreduce"},
                      "attention": {"causal": True}}.get(gname, {}))
        zgroup.attrs.update(attrs)
        for array in group.arrays:
            arr_attrs = {"description": array.description}
            if array.coordinates:
                arr_attrs["coordinates"] = " ".join(array.coordinates)
            z = zgroup.create_array(array.name, shape=array.shape, chunks=array.chunks,
                                    dtype=str if array.dtype == STRING else array.dtype, fill_value=array.fill,
                                    dimension_names=array.dims, attributes=arr_attrs,
                                    compressors=ZstdCodec(level=ZSTD_LEVEL))
            values = coordinate_values(spec, gname, array)
            if values is not None:
                z[...] = values
    zarr.open_array(store=str(path), path="rank_status", mode="r+")[:] = np.array(["running"] * spec.world,
                                                                                  dtype=object)


@pytest.mark.parametrize("world", [1, 2])
def test_create_store_writes_what_zarr_writes(tmp_path, monkeypatch, world):
    """create_store writes the zarr.json documents itself: byte for byte zarr's, for every group of
    a full spec (Perceiver, user probes, two ranks), and every array reads the same through zarr."""
    import zarr

    from workbench.trace import writer
    from workbench.trace.schema import UserArraySpec
    monkeypatch.setattr(writer, "_now", lambda: "2026-01-01T00:00:00")
    spec = small_spec(world=world, user_arrays=(
        UserArraySpec("rms", ("layers.0.x", "layers.1.x"), dims=("seq",), shape=(2,)),
        UserArraySpec("hist", ("layers.0.y",), dims=("ubin",), shape=(4,), dtype="int64")))
    run = {"prompts": ["caf\u00e9 \u2192 \U0001f600"], "seed": 3}
    writer.create_store(tmp_path / "ours.zarr", spec, run)
    _create_store_through_zarr(tmp_path / "zarr.zarr", spec, run, "2026-01-01T00:00:00")
    ours = {p.relative_to(tmp_path / "ours.zarr"): p.read_bytes() for p in (tmp_path / "ours.zarr").rglob("zarr.json")}
    theirs = {p.relative_to(tmp_path / "zarr.zarr"): p.read_bytes() for p in (tmp_path / "zarr.zarr").rglob("zarr.json")}
    assert sorted(ours) == sorted(theirs) and len(ours) > 60
    for name in theirs:
        assert ours[name] == theirs[name], name
    a, b = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r"), zarr.open_group(str(tmp_path / "zarr.zarr"), mode="r")
    for name, array in b.arrays():
        np.testing.assert_array_equal(a[name][...], array[...], err_msg=name)
    for gname, group in b.groups():
        for name, array in group.arrays():
            np.testing.assert_array_equal(a[gname][name][...], array[...], err_msg=f"{gname}/{name}")
    assert open_trace(tmp_path / "ours.zarr").status == "running"


def test_a_closed_writers_worker_serves_the_next_writer_of_the_process(tmp_path):
    """Writers one after another share one worker (no second start-up); a forked child does not
    inherit it; a worker that failed or died is not reused; every trace is still written whole."""
    worker_pool.prestart()
    first = Recorder(tmp_path / "a.zarr", small_spec(world=1), flush_interval=0.01)
    pid = first.writers[0]._worker.process.pid
    first.run()
    first.close()
    assert worker_pool._idle and worker_pool._idle[-1].process.pid == pid
    second = Recorder(tmp_path / "b.zarr", small_spec(world=1), flush_interval=0.01)
    assert second.writers[0]._worker.process.pid == pid  # the same process, now on another store
    second.run()
    second.close()
    check_roundtrip(tmp_path / "a.zarr", first)
    check_roundtrip(tmp_path / "b.zarr", second)

    # a forked child starts with no workers and leaves its parent's alone
    parent_idle = [i.process.pid for i in worker_pool._idle]
    assert parent_idle
    sockets = [i.sock for i in worker_pool._live]
    child = os.fork()
    if child == 0:  # the child: exit code 0 only if it sees no worker and closed its socket copies
        os._exit(0 if not worker_pool._idle and not worker_pool._live
                 and all(sock.fileno() == -1 for sock in sockets) else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert [i.process.pid for i in worker_pool._idle] == parent_idle
    again = Recorder(tmp_path / "e.zarr", small_spec(world=1), flush_interval=0.01)
    assert again.writers[0]._worker.process.pid in parent_idle  # still the parent's to use
    again.run()
    again.close()
    check_roundtrip(tmp_path / "e.zarr", again)

    # a writer whose worker failed stops it: the next writer starts another
    w = TraceWriter(tmp_path / "c.zarr", small_spec(world=1), flush_interval=0.01)
    failed = w._worker.process
    shutil.rmtree(tmp_path / "c.zarr" / "timing" / "step_seconds")
    (tmp_path / "c.zarr" / "timing" / "step_seconds").write_text("not a directory")
    w.write_timing(0, step_seconds=1.0)
    w.end_step(0)
    with pytest.raises(TraceWriterError):
        w.close()
    assert failed.wait(30) is not None and all(i.process is not failed for i in worker_pool._idle)

    # an idle worker that died is passed over
    for idle in list(worker_pool._idle):
        idle.process.kill()
        idle.process.wait()
    third = Recorder(tmp_path / "d.zarr", small_spec(world=1), flush_interval=0.01)
    assert third.writers[0]._worker.process.poll() is None
    third.run()
    third.close()
    check_roundtrip(tmp_path / "d.zarr", third)


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_trace_error(tmp_path):
    with pytest.raises(TraceError, match="no such trace directory"):
        open_trace(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TraceError, match="not a directory"):
        open_trace(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="not a workbench-trace store"):
        open_trace(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"format": "something"}}))
    with pytest.raises(TraceError, match="format='something'"):
        open_trace(tmp_path / "other")
    assert issubclass(TraceError, ValueError)

    spec = small_spec(world=1)
    TraceWriter(tmp_path / "t.zarr", spec).close()
    newer = tmp_path / "newer.zarr"
    shutil.copytree(tmp_path / "t.zarr", newer)
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"]["format_version"] = FORMAT_VERSION + 1
    (newer / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(TraceError, match=f"version {FORMAT_VERSION + 1} is newer"):
        open_trace(newer)
    broken = tmp_path / "broken.zarr"
    shutil.copytree(tmp_path / "t.zarr", broken)
    shutil.rmtree(broken / "attention" / "weights")
    with pytest.raises(TraceError, match="missing array 'attention/weights'") as info:
        open_trace(broken)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- pieces
def test_activation_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 500)) * 2 + 0.5
    edges = (-np.inf, -1.0, 0.0, 1.0, np.inf)
    st = ActivationStats.from_values(x, edges, 0.1, lead_dims=2)
    assert st.hist.shape == (2, 3, 4) and (st.hist.sum(-1) == 500).all()
    np.testing.assert_array_equal(st.hist[1, 2], np.histogram(x[1, 2], [-1e9, -1, 0, 1, 1e9])[0])
    assert st.near_zero[0, 0] == (np.abs(x[0, 0]) < 0.1).sum()
    merged = ActivationStats.from_values(x[:, :, :200], edges, 0.1, 2).merge(
        ActivationStats.from_values(x[:, :, 200:], edges, 0.1, 2))
    fin = finish_moments(merged.count, merged.sum, merged.sumsq, merged.sum3, merged.sum4)
    np.testing.assert_allclose(fin["mean"], x.mean(-1))
    np.testing.assert_allclose(fin["std"], x.std(-1))
    c = x - x.mean(-1, keepdims=True)
    np.testing.assert_allclose(fin["skew"], (c**3).mean(-1) / x.std(-1) ** 3, atol=1e-9)
    np.testing.assert_allclose(fin["kurtosis"], (c**4).mean(-1) / x.var(-1) ** 2 - 3, atol=1e-9)
    packed = np.stack([getattr(st, f) for f in ("count", "sum", "sumsq", "sum3", "sum4", "min",
                                                "max", "near_zero")], -1)
    again = ActivationStats.from_packed(st.hist, packed)
    np.testing.assert_array_equal(again.near_zero, st.near_zero)


def test_spec_roundtrip_and_validation():
    spec = small_spec()
    assert TraceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.max_steps == 7 and spec.max_positions == 11
    assert spec.attention_head_slots(0) == slice(0, 1) and spec.attention_head_slots(1) == slice(1, 3)
    with pytest.raises(ValueError, match="divisible"):
        TraceSpec(n_seq=1, max_steps=2, max_positions=2, n_layers=1, n_heads=3, world=2)
    with pytest.raises(ValueError, match="attention_layers"):
        TraceSpec(n_seq=1, max_steps=2, max_positions=2, n_layers=1, n_heads=1,
                  attention_layers=(3,))


def test_doc_describes_every_array():
    text = DOC.read_text()
    spec = small_spec()
    assert f"version {FORMAT_VERSION}" in text.lower()
    for group, layout in spec.layout().items():
        if group:
            assert f"`{group}`" in text, group
        for array in layout.arrays:
            assert f"`{array.name}`" in text, f"{group}/{array.name}"


def test_synthetic_trace_is_complete_and_plausible(tmp_path):
    path = write_synthetic_trace(tmp_path / "syn.zarr", n_steps=12, n_layers=2, n_heads=4,
                                 world=2, prompt_len=6, attention_heads=(0, 3), perceiver=True)
    tr = open_trace(path)
    assert tr.status == "complete" and tr.n_steps == 12 and tr.n_queries == 17
    w = tr.attention["weights"].values.astype(np.float64)
    np.testing.assert_allclose(np.nansum(w, axis=-1), 1.0, atol=2e-2)  # rows are softmax
    assert (tr.kv_cache["tokens"].values[:, :, 0] == np.arange(6, 18)[:, None]).all()
    assert (tr.activations["hist_count"].sum("bin") == 256).all()
    assert tr.timing["step_seconds"].notnull().all()
    assert tr.tokens["candidate_prob"].notnull().all() and (tr.tokens["chosen"] >= 0).all()
    assert len(tr.token_text(0)) > 0
    assert tr.cross_attention["weights"].notnull().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.open_zarr(path, group="attention", consolidated=False)["weights"][0, 0, 0].load()


def test_chunk_files_are_replaced_atomically(tmp_path):
    """A reader polling a chunk file while the worker keeps replacing it sees the old bytes or the
    new ones, never a missing or partial file, and no temporary file is left behind."""
    path = tmp_path / "c"
    versions = [bytes([i]) * (50_000 + i) for i in range(200)]
    path.write_bytes(versions[0])
    seen, errors, done = set(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(path.read_bytes())
            except OSError as e:
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    for data in versions[1:]:
        tmp = tmp_path / ".c.tmp"
        tmp.write_bytes(data)
        replace_file(tmp, path)
    done.set()
    reader.join()
    assert not errors and seen <= set(versions) and len(seen) > 1
    assert path.read_bytes() == versions[-1] and sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_worker_messages_carry_arrays_whole_and_writable():
    """The writer-worker framing: arrays of any size (larger than the socket's buffer, empty,
    strings) arrive equal and writable; a closed peer is an EOFError."""
    a, b = socket.socketpair()
    big = np.arange(2_000_000, dtype=np.float32).reshape(1000, 2000)  # 8 MB: many partial sends
    message = ("flush", [big, np.zeros((0, 3)), np.array(["a", "bé"], dtype=object), big[:, ::2]], 7)
    got = {}
    reader = threading.Thread(target=lambda: got.update(msg=recv_message(b)))
    reader.start()
    send_message(a, message)
    reader.join()
    kind, arrays, step = got["msg"]
    assert kind == "flush" and step == 7
    for sent, came in zip(message[1], arrays):
        assert came.dtype == sent.dtype and np.array_equal(came, sent)
    arrays[0][0, 0] = -1.0  # writable: the worker may reduce in place
    a.close()
    with pytest.raises(EOFError):
        recv_message(b)
    b.close()
