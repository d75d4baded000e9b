"""Decode steps recorded in batches: the worker's reduction, sequences that stop mid-batch, stalls.

The recorder queues decode steps in batches and ships raw activation values that the writer's
worker process reduces with numpy; these tests hold that path to the in-process torch reduction
and to a full recomputation of the model.
"""
import threading
import time

import numpy as np
import pytest
import torch

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.probes.batch_buffers import BATCH_BUFFERS
from workbench.probes.recorder import Recorder, activation_bin_edges, batched_stats, mad_thresholds, trace_spec_for
from workbench.probes.selection import ProbeSelection
from workbench.runtime.generate import generate
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace.reader import open_trace
from workbench.trace.schema import TraceSpec
from workbench.trace import worker
from workbench.trace.worker import ActivationValues, exact_bins, reduce_activation_values, value_bins
from workbench.trace.writer import TraceWriter, TraceWriterError

CFG = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256,
           bos_id=256, eos_id=None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return Llama(LlamaConfig(**CFG)).eval()


@pytest.mark.parametrize("chunk_values", [1 << 16, 1, 336], ids=["one-chunk", "row-by-row", "3-rows-across-steps"])
def test_worker_reduction_equals_the_torch_reduction(monkeypatch, chunk_values):
    # The worker reduces a chunk of rows at a time; chunks that cut through a step must add up.
    monkeypatch.setattr(worker, "REDUCE_CHUNK_VALUES", chunk_values)
    spec = TraceSpec(n_seq=2, max_steps=8, max_positions=20, n_layers=3, n_heads=2, bin_edges=activation_bin_edges())
    sites = spec.hist_sites
    rng = np.random.default_rng(0)
    blocks = [(0, sites.index("mlp.act.pre")), (0, sites.index("mlp.act.post")), (2, sites.index("attn.out"))]
    widths = [48, 48, 16]
    rows_per_step = {3: 2, 4: 2, 6: 1}  # step 5 has no rows (nothing recorded), step 6 one sequence left
    values = (rng.standard_normal((5, sum(widths))) * rng.choice([0.01, 1.0, 40.0], (5, sum(widths)))).astype(np.float32)
    row_steps = np.repeat(list(rows_per_step), list(rows_per_step.values()))
    offsets = np.concatenate([[0], np.cumsum(widths)])
    eps = np.full((4, 3), np.nan)   # MLP sites: the MAD rule
    eps[:, 2] = 0.05                # the attention output: a fixed threshold
    eps[1, 1] = 0.3                 # as if ARM ran at step 4 and reported its own eps
    av = ActivationValues(6, 3, values, row_steps, offsets, np.array([b[0] for b in blocks]),
                          np.array([b[1] for b in blocks]), eps)
    got = {r.name.split("/")[1]: r.data[..., 0, :] if r.name.endswith("hist_count") else r.data[..., 0]
           for r in reduce_activation_values(av, spec, rank=0)}
    edges = torch.tensor(spec.bin_edges, dtype=torch.float64)
    for step, start in ((3, 0), (4, 2), (6, 4)):
        rows = slice(start, start + rows_per_step[step])
        pre = torch.from_numpy(values[rows, :48]).reshape(1, -1)
        for i, (layer, site) in enumerate(blocks):
            x = torch.from_numpy(values[rows, offsets[i]:offsets[i + 1]])
            e = eps[step - 3, i]
            if np.isnan(e):
                e = float(mad_thresholds(pre)[0])
            ref = batched_stats([x], edges, torch.tensor([e], dtype=torch.float64))
            at = (step - 3, layer, site)
            assert np.array_equal(got["hist_count"][at], ref.hist[0])
            assert got["value_count"][at] == ref.count[0] == x.numel()
            for ours, theirs in (("value_sum", ref.sum), ("value_sumsq", ref.sumsq), ("value_sum3", ref.sum3),
                                 ("value_sum4", ref.sum4), ("value_min", ref.min), ("value_max", ref.max)):
                assert np.isclose(got[ours][at], theirs[0], rtol=1e-9, atol=1e-12), ours
            assert np.isclose(got["near_zero_eps"][at], e, rtol=1e-6)
            assert got["near_zero_count"][at] == ref.near_zero[0]
    # Unrecorded steps, layers and sites keep the fill value.
    assert (got["hist_count"][2] == -1).all() and (got["value_count"][:, 1] == -1).all()
    assert np.isnan(got["value_sum"][2]).all()


def test_activation_values_with_bad_column_blocks_are_refused_and_no_rows_write_nothing(tmp_path):
    spec = TraceSpec(n_seq=1, max_steps=4, max_positions=8, n_layers=1, n_heads=2, bin_edges=activation_bin_edges())
    eps = np.full((1, 2), 0.01)
    values = np.ones((1, 8), dtype=np.float32)
    with TraceWriter(tmp_path / "t.zarr", spec, {}) as w:
        for offsets in ([0, 0, 8], [1, 4, 8]):  # an empty block; blocks that do not start at column 0
            with pytest.raises(TraceWriterError, match="column block"):
                w.write_activation_values(1, 1, values, [1], np.array(offsets), [0, 0], [0, 1], eps)
    av = ActivationValues(2, 1, np.zeros((0, 8), dtype=np.float32), np.zeros(0, dtype=np.int64),
                          np.array([0, 4, 8]), np.array([0, 0]), np.array([0, 1]), np.full((2, 2), 0.01))
    assert reduce_activation_values(av, spec, rank=0) == []  # every cell keeps its fill


def test_the_bin_lookup_equals_a_binary_search_at_every_edge():
    """value_bins looks most bins up by the top bits of a float32; at and around every edge, at
    zero, tiny, huge, infinite and NaN values it must agree with a binary search over the edges."""
    edges = np.asarray(activation_bin_edges(), dtype=np.float64)
    inner = edges[1:-1].astype(np.float32)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 3e38, -3e38, np.inf, -np.inf, np.nan, -np.nan],
                       dtype=np.float32)
    near = [inner, np.nextafter(inner, np.float32(np.inf)), np.nextafter(inner, np.float32(-np.inf))]
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal(200_001) * 10.0 ** rng.uniform(-4, 3, 200_001)).astype(np.float32)
    values = np.concatenate([special, *near, spread]).reshape(2, -1)
    with np.errstate(invalid="ignore"):
        expected = exact_bins(edges, values.astype(np.float64))
    got = value_bins(values, edges)
    assert got.shape == values.shape and np.array_equal(got, expected)
    assert got[0, :2].tolist() == [edges.tolist().index(0.0)] * 2  # 0 and -0: in the bin that starts at 0
    assert set(np.unique(got)) == set(range(len(edges) - 1))  # every bin is reached


def _full_forward(model, ids):
    maps, acts = {}, {}
    with model.listening("layers.*.attn.pattern", lambda p, hp: maps.__setitem__(hp.layer, p[0].clone())), \
            model.listening("layers.*.mlp.act.pre", lambda a, hp: acts.__setitem__(hp.layer, a[0].clone())), \
            torch.inference_mode():
        model(torch.tensor([ids]))
    return maps, acts


def test_a_sequence_that_stops_inside_a_batch(model, tmp_path):
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    prompts = [tok.encode("stop early"), tok.encode("go on")]
    free = generate(model, prompts, 30).generated
    # An end token that sequence 0 samples at step 6 and sequence 1 never does.
    stop = next(t for t in free[0][5:] if t not in free[1] and t not in free[0][:5])
    stop_step = free[0].index(stop)
    sel = ProbeSelection.parse(None)
    spec = trace_spec_for(model, sel, 2, max(map(len, prompts)), 30)
    writer = TraceWriter(tmp_path / "t.zarr", spec, {})
    rec = Recorder(model, writer, sel, tok.token_text, prompts).attach()
    rec.batch_seconds = 60.0  # one batch for all decode steps, whatever the machine's speed
    result = generate(model, prompts, 30, stop_ids=[stop], on_step=rec.on_step)
    rec.detach()
    writer.close()
    assert result.generated[0] == free[0][: stop_step + 1] and result.generated[1] == free[1]

    tr = open_trace(tmp_path / "t.zarr")
    assert tr.n_steps == 30 and tr.status == "complete"
    for j in (0, 1):
        ids = tr.tokens.token_id.values[j]
        n = len(prompts[j]) + len(result.generated[j])
        assert ids[:n].tolist() == prompts[j] + result.generated[j] and (ids[n:] == -1).all()
        produced = tr.tokens.produced_step.values[j]
        assert produced[len(prompts[j]):n].tolist() == list(range(len(result.generated[j])))
    # Sequence 1 goes on alone: its attention rows and activations match a full recomputation.
    seq = prompts[1] + result.generated[1]
    maps, acts = _full_forward(model, seq[:-1])
    n = len(seq) - 1
    for layer in range(2):
        got = np.asarray(tr.attention_map(1, layer, 3, step=29))[:n, :n]
        assert np.allclose(np.nan_to_num(got), maps[layer][3].numpy(), atol=2e-3)
    site = list(tr.activations.site.values).index("mlp.act.pre")
    for step in (stop_step + 1, 20):  # sequence 0 has stopped: one row per step
        x = acts[1][len(prompts[1]) + step - 1].numpy().astype(np.float64)
        assert tr.activations.value_count.values[step, 1, site, 0] == x.size
        assert np.isclose(tr.activations.value_sum.values[step, 1, site, 0], x.sum(), rtol=1e-5, atol=1e-6)
        assert np.array_equal(tr.activations.hist_count.values[step, 1, site, 0],
                              np.histogram(x, bins=np.asarray(tr.spec.bin_edges))[0])
    step = 2  # both sequences still running: two rows
    x = np.concatenate([_full_forward(model, (prompts[0] + result.generated[0])[:-1])[1][1]
                        [len(prompts[0]) + step - 1].numpy(), acts[1][len(prompts[1]) + step - 1].numpy()])
    assert tr.activations.value_count.values[step, 1, site, 0] == x.size
    mass = tr.kv_cache.attention_mass.values[1, 29, 0, 0]
    assert np.allclose(mass[:n], maps[0][:, n - 1, :].sum(0).numpy(), atol=1e-4) and np.isnan(mass[n:]).all()


def test_a_stalled_generation_is_committed_while_it_waits(model, tmp_path):
    """Steps kept for a batch reach the store even if the next step never comes."""
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    prompts = [tok.encode("wait here")]
    sel = ProbeSelection.parse("light")
    writer = TraceWriter(tmp_path / "t.zarr", trace_spec_for(model, sel, 1, len(prompts[0]), 40), {})
    rec = Recorder(model, writer, sel, tok.token_text, prompts).attach()
    rec.batch_seconds = 0.5
    release = threading.Event()

    def on_step(event):
        rec.on_step(event)
        if event.step == 12:
            release.wait(120)   # the caller stalls (a slow notebook cell, a debugger...)

    worker = threading.Thread(target=generate, args=(model, prompts, 40), kwargs={"on_step": on_step})
    worker.start()
    try:
        deadline = time.monotonic() + 60
        tr = None
        while time.monotonic() < deadline:
            if (tmp_path / "t.zarr" / "zarr.json").exists():
                tr = tr or open_trace(tmp_path / "t.zarr")
                tr.refresh()
                if tr.n_steps == 13:
                    break
            time.sleep(0.05)
        assert tr is not None and tr.n_steps == 13, "the steps before the stall were never committed"
        assert tr.status == "running"
    finally:
        release.set()
        worker.join()
    rec.detach()
    writer.close()
    tr = open_trace(tmp_path / "t.zarr")
    assert tr.n_steps == 40 and (tr.kv_cache.tokens.values[:, 0, 0] == len(prompts[0]) + np.arange(40)).all()


def _record(model, path, prompts, tok, on_step=None, flush_interval=0.2, **recorder_attrs):
    sel = ProbeSelection.parse("light")
    spec = trace_spec_for(model, sel, len(prompts), max(map(len, prompts)), 12)
    writer = TraceWriter(path, spec, {}, flush_interval=flush_interval)
    rec = Recorder(model, writer, sel, tok.token_text, prompts)
    for name, value in recorder_attrs.items():
        setattr(rec, name, value)
    rec.attach()
    tapped = rec._taps is not None
    generate(model, prompts, 12, on_step=rec.on_step if on_step is None else lambda event: on_step(rec, event))
    rec.detach()
    writer.close()
    return open_trace(path).activations, tapped


def test_every_recording_path_gives_the_same_activations(model, tmp_path):
    """Batches reduced by the worker (one batch, batches of two, batches in buffers reused once
    sent), steps reduced one by one, and steps too big to ship (reduced at once by torch) agree;
    so do taps and hook-point listeners as the source of the values."""
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    prompts = [tok.encode("same"), tok.encode("values here")]
    batched, tapped = _record(model, tmp_path / "batched.zarr", prompts, tok, batch_seconds=60.0)
    assert tapped and batched.hist_count.values[1:].min() >= 0  # every decode step and site was recorded
    buffers = []

    def flush_every_step(rec, event):  # batches of two steps, each sent on before the next begins
        rec.on_step(event)
        rec.writer.flush()
        buffers.append(rec._values.data_ptr() if rec._values is not None else None)

    others = {"per step": _record(model, tmp_path / "steps.zarr", prompts, tok, batches_decode=False),
              "batches of two": _record(model, tmp_path / "two.zarr", prompts, tok, max_batch_steps=2),
              "buffers reused": _record(model, tmp_path / "reused.zarr", prompts, tok, on_step=flush_every_step,
                                        max_batch_steps=2),
              "reduced at once": _record(model, tmp_path / "now.zarr", prompts, tok, max_shipped_values=0),
              "listeners": _record(model, tmp_path / "listen.zarr", prompts, tok, _tapped_blocks=lambda: [])}
    assert [tapped for _, tapped in others.values()] == [True, True, True, True, False]
    # the batches (two steps each) took turns in at most two buffers: a sent one came back
    filled = [b for b in buffers if b is not None]
    assert len(filled) >= 5 and len(set(filled)) <= 2, buffers
    for how, (other, _) in others.items():
        assert np.array_equal(other.hist_count.values, batched.hist_count.values), how
        assert np.array_equal(other.value_count.values, batched.value_count.values), how
        assert np.array_equal(other.near_zero_count.values, batched.near_zero_count.values), how
        for name in ("value_sum", "value_sumsq", "value_min", "value_max", "near_zero_eps"):
            assert np.allclose(other[name].values, batched[name].values, rtol=1e-5, atol=1e-6, equal_nan=True), \
                (how, name)


def test_a_batch_buffer_is_reused_only_once_sent_and_then_by_the_next_recording(model, tmp_path, monkeypatch):
    """While its writer has not sent a batch, its buffer is not handed out again: with a writer that
    never flushes during generation, each batch of two steps fills a buffer of its own. Once the
    writer is closed, the next recording in the process takes the last two back (no fresh memory
    to fault in) and records the same values."""
    BATCH_BUFFERS.clear()
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    prompts = [tok.encode("same"), tok.encode("values here")]
    taken: list[int] = []
    take = BATCH_BUFFERS.take

    def noting_take(shape, like):
        buffer, rows = take(shape, like)
        taken.append(buffer.data_ptr())
        return buffer, rows
    monkeypatch.setattr(BATCH_BUFFERS, "take", noting_take)

    first, _ = _record(model, tmp_path / "first.zarr", prompts, tok, flush_interval=3600.0, max_batch_steps=2)
    by_first, taken[:] = list(taken), []
    second, _ = _record(model, tmp_path / "second.zarr", prompts, tok, flush_interval=3600.0, max_batch_steps=2)
    assert len(by_first) == len(set(by_first)) == 6  # 11 decode steps in batches of two, none sent before the end
    assert taken[:2] == by_first[-2:]  # the two the first recording left waiting
    assert len(taken) == 6
    for name in ("hist_count", "value_count", "value_sum", "value_sumsq", "value_min", "value_max"):
        assert np.array_equal(first[name].values, second[name].values), name


def test_batched_stats_in_column_slices_equals_numpy(monkeypatch):
    """A long prefill is reduced a slice of columns at a time; slices change no count and no moment."""
    from workbench.probes import recorder as rec_module
    torch.manual_seed(0)
    tensors = [torch.randn(3, 50) * 2, torch.randn(3, 50), torch.randn(7, 11), torch.randn(150)]
    edges = torch.tensor(activation_bin_edges(), dtype=torch.float64)
    eps = torch.tensor([0.01, 0.02, 0.03, 0.04], dtype=torch.float64)
    whole = batched_stats(tensors, edges, eps)
    monkeypatch.setattr(rec_module, "STATS_CHUNK_VALUES", 7)  # two same-size tensors: 3 columns a slice
    sliced = batched_stats(tensors, edges, eps)
    for i, t in enumerate(tensors):
        x = t.double().numpy().reshape(-1)
        ref = np.histogram(x, bins=edges.numpy())[0]
        assert np.array_equal(whole.hist[i], ref) and np.array_equal(sliced.hist[i], ref)
        for got in (whole, sliced):
            assert got.count[i] == x.size and got.near_zero[i] == (np.abs(x) < float(eps[i])).sum()
            assert got.min[i] == x.min() and got.max[i] == x.max()
            np.testing.assert_allclose([got.sum[i], got.sumsq[i], got.sum3[i], got.sum4[i]],
                                       [x.sum(), (x ** 2).sum(), (x ** 3).sum(), (x ** 4).sum()], rtol=1e-12)
