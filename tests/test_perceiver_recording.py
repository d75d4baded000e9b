"""Recording real Perceiver AR generations: maps equal a full recompute, TP=2 equals TP=1."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from workbench.models.perceiver import PerceiverAR, PerceiverConfig
from workbench.runtime.perceiver_checkpoint import load_perceiver, save_perceiver
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace.reader import open_trace

N, R, L, H = 6, 2, 2, 4  # latents, repeats, latent blocks per repeat, heads
CFG = dict(d_model=32, n_latents=N, n_heads=H, n_kv_heads=2, n_self_layers=L, n_repeats=R, d_ff=64,
           max_seq_len=128, eos_id=None)  # no <eos>: every sequence runs all steps
PROMPTS = ["hello", "ab"]  # 6 and 3 tokens with <bos>: seq 0's window slides from step 1, seq 1's from step 4
STEPS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("perceiver_model")
    save_perceiver(PerceiverAR(PerceiverConfig(**CFG)), path)
    return path


@pytest.fixture(scope="module")
def recorded(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("perceiver_traces") / "tp1.zarr"
    result = run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=STEPS, record=str(path),
                         device="cpu"))
    return path, result


def _sequences(result):
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    return [tok.encode(p) + g for p, g in zip(PROMPTS, result.generated)]


_MODELS = {}


# Hook point -> (trace layer, site) of cross-block sites checked against a full forward.
CROSS_SITE_HOOKS = {"repeats.0.cross_mlp.act.post": (0, "mlp.act.post"), "repeats.0.cross.out": (0, "attn.out"),
                    "repeats.0.cross_mlp_allreduce.residual": (0, "resid.post"),
                    "repeats.1.cross_mlp_allreduce.residual": (1 + L, "resid.post")}


def _full_forward(model_dir, ids):
    """One forward over ``ids`` without a cache (independent of the cached decode path): maps of
    every repeat and latent block, rows = the last min(len, N) positions in order."""
    model = _MODELS.get(model_dir) or _MODELS.setdefault(model_dir, load_perceiver(model_dir))
    model.clear_listeners()
    cross, latent, acts = {}, {}, {}
    model.add_listener("repeats.*.cross.pattern", lambda p, hp: cross.__setitem__(hp.repeat, p[0].clone()))
    model.add_listener("repeats.*.layers.*.attn.pattern",
                       lambda p, hp: latent.__setitem__((hp.repeat, hp.layer), p[0].clone()))
    model.add_listener("repeats.0.cross_mlp.act.pre", lambda a, hp: acts.__setitem__("cross0", a[0].clone()))
    model.add_listener("repeats.0.layers.0.mlp.act.pre", lambda a, hp: acts.__setitem__("lat0", a[0].clone()))
    for name, key in CROSS_SITE_HOOKS.items():  # the cross blocks' sites, which the Repeats tap
        model.add_listener(name, lambda a, hp, key=key: acts.__setitem__(key, a[0].clone()))
    with torch.no_grad():
        model(torch.tensor([ids]))
    return cross, latent, acts


def test_trace_is_complete_with_tokens_and_layer_blocks(recorded):
    path, result = recorded
    tr = open_trace(path)
    assert tr.status == "complete" and tr.n_steps == STEPS
    for j, seq in enumerate(_sequences(result)):
        assert tr.token_ids(j).tolist() == seq
    assert tr.tokens.chosen.values[0].tolist() == result.generated[0]
    p = tr.spec.perceiver
    assert (p.n_latents, p.n_repeats, p.n_self_layers, p.n_heads) == (N, R, L, H)
    assert p.layer_blocks == ("repeats.0.cross", "repeats.0.layers.0", "repeats.0.layers.1",
                              "repeats.1.cross", "repeats.1.layers.0", "repeats.1.layers.1")
    assert tr.spec.n_layers == R * (1 + L) and tr.attention.sizes["layer"] == 0  # no decoder maps


def test_cross_attention_equals_full_recompute(recorded, model_dir):
    path, result = recorded
    tr = open_trace(path)
    for j, seq in enumerate(_sequences(result)):
        prompt_len = len(seq) - STEPS
        for step in (0, 1, 3, 4, STEPS - 1):  # prefill; seq 0 slides from 1; seq 1 grows to 3, slides from 4
            end = prompt_len - 1 + step  # last latent of the step
            cross, _, _ = _full_forward(model_dir, seq[: end + 1])
            for r in range(R):
                for h in range(H):
                    got = tr.cross_attention_map(j, r, h, step=step)
                    ref = cross[r][h].numpy()  # [latents, inputs 0..end]
                    n = ref.shape[0]
                    assert got.latent_position.values[:n].tolist() == list(range(end + 1 - n, end + 1))
                    assert np.allclose(got.values[:n, : end + 1], ref, atol=2e-3), (j, step, r, h)  # float16
                    assert np.isnan(got.values[:n, end + 1:]).all() and np.isnan(got.values[n:]).all()


def test_recorded_rows_are_causal_and_sum_to_one(recorded):
    tr = open_trace(recorded[0])
    ca = tr.cross_attention
    w = ca.weights.values.astype(np.float64)             # [seq, step, repeat, head, latent, input]
    lat = ca.latent_position.values                       # [seq, step, latent]
    written = ~np.isnan(w).all(-1)
    assert written.any(axis=(-1, -2, -3)).all()           # every (seq, step) wrote rows
    pos = np.broadcast_to(lat[:, :, None, None, :], written.shape)
    assert (pos[written] >= 0).all()                     # rows only for real latents
    inputs = np.arange(w.shape[-1])
    future = inputs > pos[..., None]
    assert np.nan_to_num(w)[future & written[..., None]].max() == 0  # causal: nothing after the latent
    assert np.allclose(np.nansum(w, axis=-1)[written], 1.0, atol=5e-3)
    # Repeat 0 computes only the new latent at a decode step; repeat 1 the whole window once it slid.
    assert written[0, 3, 0].sum(-1).tolist() == [1] * H and written[0, 3, 1].sum(-1).tolist() == [N] * H
    la = tr.latent_attention.weights.values.astype(np.float64)
    rows = ~np.isnan(la).all(-1)
    assert np.allclose(np.nansum(la, axis=-1)[rows], 1.0, atol=5e-3)
    assert np.nan_to_num(la)[..., np.triu_indices(N, 1)[0], np.triu_indices(N, 1)[1]].max() == 0


def test_latent_attention_equals_full_recompute(recorded, model_dir):
    path, result = recorded
    tr = open_trace(path)
    for j, seq in enumerate(_sequences(result)):
        prompt_len = len(seq) - STEPS
        for step in (2, STEPS - 1):  # seq 1's window still grows at step 2; both slide at the end
            end = prompt_len - 1 + step
            _, latent, _ = _full_forward(model_dir, seq[: end + 1])
            for r in range(R):
                for i in range(L):
                    for h in range(H):
                        got = tr.latent_attention_map(j, r, i, h, step=step).values
                        ref = latent[(r, i)][h].numpy()  # [latents, latent keys] of the window
                        n = ref.shape[0]
                        assert np.allclose(got[:n, :n], ref, atol=2e-3), (j, step, r, i, h)
                        assert np.isnan(got[n:]).all() and np.isnan(got[:, n:]).all()


def test_kv_totals_activations_and_timing(recorded, model_dir):
    path, result = recorded
    tr = open_trace(path)
    kv = tr.kv_cache
    tokens = kv.tokens.values[:, :, 0]
    assert tokens[:, 0].tolist() == [9 + 2 * s for s in range(STEPS)]  # input cache: 6 + 3 prompt tokens, +2 a step
    assert (tokens[:, 1:] == -1).all()                                   # totals live in layer 0 only
    # stats() totals, not multiplied by layers: inputs (2 cross-attentions) + latent rings + cross outputs.
    cfg, f32 = PerceiverConfig(**CFG), 4
    held = 2 * N                                                         # both windows full at the end
    expect = (2 * R * tokens[-1, 0] * cfg.n_kv_heads * cfg.head_dim * f32
              + held * 2 * R * L * cfg.n_kv_heads * cfg.head_dim * f32 + held * 2 * cfg.d_model * f32)
    assert kv.bytes_used.values[-1, 0, 0] == expect
    # Attention mass of repeat 0's cross block at the last decode step: one row per head.
    seqs = _sequences(result)
    end = len(seqs[0]) - 2
    cross, latent, acts = _full_forward(model_dir, seqs[0][: end + 1])
    mass = kv.attention_mass.values[0, STEPS - 1, 0, 0, : end + 1]
    assert np.allclose(mass, cross[0][:, -1].sum(0).numpy(), atol=1e-5)
    # Repeat 0's first latent block: seq 0's window has slid, so the step recomputed all N rows;
    # the window's keys are the last N positions, and earlier positions received nothing.
    expect = np.zeros(end + 1, dtype=np.float32)
    expect[end + 1 - N:] = latent[(0, 0)].sum(dim=(0, 1)).numpy()
    assert np.allclose(kv.attention_mass.values[0, STEPS - 1, 1, 0, : end + 1], expect, atol=1e-5)

    a = tr.activations
    site = list(a.site.values).index("mlp.act.pre")
    counts = a.value_count.values[:, :, site, 0]                         # [step, layer]
    assert counts[0].tolist() == [9 * 64] * (R * (1 + L))                # prefill: 6 + 3 latents x d_ff
    # Step 1: repeat 0's cross block runs the new latent of each sequence; seq 0's window slid, so
    # the batch's latent stack is rebuilt (seq 0's N latents and seq 1's window of 4), but a step
    # records only the latent of the position it added, in every block.
    assert counts[1].tolist() == [2 * 64] * (R * (1 + L))
    new = [_full_forward(model_dir, s[: len(s) - STEPS + 1])[2]["lat0"][-1].numpy() for s in seqs]
    x1 = np.concatenate(new).astype(np.float64)  # repeat 0, latent block 0, the new position's row
    assert np.isclose(a.value_sum.values[1, 1, site, 0], x1.sum(), rtol=1e-5, atol=1e-5)
    assert np.isclose(a.value_sumsq.values[1, 1, site, 0], (x1 * x1).sum(), rtol=1e-5)
    x0 = np.concatenate([_full_forward(model_dir, s[: len(s) - STEPS])[2]["cross0"].numpy().reshape(-1)
                         for s in seqs]).astype(np.float64)
    assert np.isclose(a.value_sum.values[0, 0, site, 0], x0.sum(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(a.hist_count.values[0, 0, site, 0], np.histogram(x0, bins=np.asarray(tr.spec.bin_edges))[0])
    # The other sites of the cross blocks (kept by activation taps in the Repeats) at the prefill.
    prefill = [_full_forward(model_dir, s[: len(s) - STEPS])[2] for s in seqs]
    for layer, name in CROSS_SITE_HOOKS.values():
        x = np.concatenate([acts[(layer, name)].numpy().reshape(-1) for acts in prefill]).astype(np.float64)
        i = list(a.site.values).index(name)
        assert a.value_count.values[0, layer, i, 0] == x.size
        assert np.isclose(a.value_sum.values[0, layer, i, 0], x.sum(), rtol=1e-5, atol=1e-5)
        assert np.isclose(a.value_sumsq.values[0, layer, i, 0], (x * x).sum(), rtol=1e-5)
    # Every (step, layer, site) keeps the threshold its near-zero values were counted with (no ARM:
    # the trace's fixed one), written with the histograms in one region per array.
    assert np.allclose(a.near_zero_eps.values[..., 0], tr.spec.near_zero_eps)
    assert a.near_zero_count.values[0, 0, site, 0] == np.count_nonzero(np.abs(x0) < tr.spec.near_zero_eps)
    secs = tr.timing.seconds.values[1:, :, :, 0]
    parts = list(tr.timing.part.values)
    assert (secs[..., parts.index("attention")] > 0).all() and (secs[..., parts.index("mlp")] > 0).all()


def test_plain_xarray_opens_the_perceiver_groups(recorded):
    path, _ = recorded
    tr = open_trace(path)
    ca = xr.open_zarr(path, group="cross_attention", consolidated=False)
    assert ca.weights.dims == ("seq", "step", "repeat", "head", "latent", "input")
    la = xr.open_zarr(path, group="latent_attention", consolidated=False)
    assert la.weights.dims == ("seq", "step", "repeat", "self_layer", "head", "latent", "latent_key")
    assert np.array_equal(la.weights.values, tr.latent_attention.weights.values, equal_nan=True)
    assert np.array_equal(ca.latent_position.values, la.latent_position.values)
    assert (ca.input_position.values[0, 0] == np.r_[np.arange(6), -np.ones(ca.sizes["input"] - 6)]).all()


def test_perceiver_view_draws_the_window_maps(recorded):
    from workbench.views.cross_attention import PerceiverAttentionView
    from workbench.views.state import TraceState
    st = TraceState()
    assert st.open(recorded[0])
    view = PerceiverAttentionView(st)
    st.head, st.seq = 2, 1
    view.repeat.value, view.block.value = 1, 1
    tr = st.trace
    for step, n_filled in ((1, 4), (3, N)):  # seq 1 = "<bos>ab": 3 + step positions, its window full at step 3
        st.select_step(step)
        assert not view._note.visible, view._note.object
        cross = tr.cross_attention_map(1, 1, 2, step=step)
        filled = cross.latent_position.values >= 0  # slots not filled yet are left out
        assert filled.sum() == n_filled
        shown = view.cross.source.data["image"][0]
        assert np.array_equal(shown, cross.values[filled], equal_nan=True)
        shown = view.latent.source.data["image"][0]
        latent = tr.latent_attention_map(1, 1, 1, 2, step=step).values
        assert np.array_equal(shown, latent[filled][:, filled], equal_nan=True)
        labels = view.cross.y_labels.data["text"]
        assert labels[:2] == ["0:<bos>", "1:a"] and len(labels) == n_filled  # the window from position 0
        assert not any(t.startswith("slot") for t in labels)


def test_cli_refuses_layer_selection_for_perceiver(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir),
                           "--prompt", "x", "--max-new-tokens", "2", "--record", str(tmp_path / "t.zarr"),
                           "--attention-layers", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not supported for Perceiver AR" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.slow
def test_tp2_trace_equals_tp1(recorded, model_dir, tmp_path):
    path1, result = recorded
    path2 = tmp_path / "tp2.zarr"
    run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=STEPS, record=str(path2), device="cpu", tp=2))
    a, b = open_trace(path1), open_trace(path2)
    assert b.status == "complete" and b.spec.world == 2
    assert np.array_equal(a.tokens.token_id.values, b.tokens.token_id.values)
    for group in ("cross_attention", "latent_attention"):
        wa, wb = a.dataset(group).weights.values, b.dataset(group).weights.values
        assert np.array_equal(np.isnan(wa), np.isnan(wb)), group     # each rank wrote its own heads
        assert np.allclose(np.nan_to_num(wa), np.nan_to_num(wb), atol=2e-3), group
        assert np.array_equal(a.dataset(group).latent_position.values, b.dataset(group).latent_position.values)
    assert (b.comm.seconds.values[1:] > 0).all()  # every block's two All-Reduce RMSNorm units, both ranks
    assert (b.comm.bytes.values[1:] > 0).all()
    tokens = b.kv_cache.tokens.values[:, 0]
    assert (tokens == a.kv_cache.tokens.values[:, 0, :1]).all()      # each rank caches its own heads


@pytest.mark.parametrize("probes", ["light", "all"])
@pytest.mark.parametrize("prompts", [["ab"], PROMPTS])  # one window that slides from step 4; two
def test_batched_decode_steps_equal_steps_recorded_one_at_a_time(model_dir, tmp_path, monkeypatch, prompts, probes):
    """Decode steps are batched: the worker reduces their activations (the row of the position
    each step added, also once a window slid and its latent blocks recompute every row), and maps
    are written as each step ends. Recorded one step at a time, the same run keeps the same
    tokens, KV sizes, histograms, moments, thresholds and maps."""
    from workbench.probes.perceiver_recorder import PerceiverRecorder
    from workbench.probes.recorder import KV_FIELDS
    from workbench.probes.selection import ProbeSelection
    from workbench.trace.writer import TraceWriter

    shipped = []
    real = TraceWriter.write_activation_values
    monkeypatch.setattr(TraceWriter, "write_activation_values",
                        lambda self, first, last, *a, **k: shipped.append((first, last)) or real(self, first, last, *a, **k))
    spec = dict(model=str(model_dir), prompts=prompts, max_new_tokens=STEPS, device="cpu",
                probes=ProbeSelection.parse(probes))
    run(RunSpec(**spec, record=str(tmp_path / "batched.zarr")))
    # The prefill, then every decode step in one batch: once a window slides ("ab": from step 4;
    # PROMPTS: seq 0's from step 1) a step still records one row per block and sequence.
    assert shipped == [(0, 0), (1, STEPS - 1)]
    monkeypatch.setattr(PerceiverRecorder, "batches_decode", False)
    run(RunSpec(**spec, record=str(tmp_path / "steps.zarr")))
    a, b = open_trace(tmp_path / "batched.zarr"), open_trace(tmp_path / "steps.zarr")
    assert a.n_steps == b.n_steps == STEPS
    assert np.array_equal(a.tokens.token_id.values, b.tokens.token_id.values)
    for name in KV_FIELDS:
        assert np.array_equal(a.kv_cache[name].values, b.kv_cache[name].values), name
    assert (a.kv_cache.tokens.values[:, 0] > 0).all() and (a.kv_cache.tokens.values[:, 1:] == -1).all()
    x, y = a.activations, b.activations
    assert (x.value_count.values > 0).all()  # every step, block and site recorded
    for name in ("hist_count", "value_count", "near_zero_count"):
        assert np.array_equal(x[name].values, y[name].values), name
    for name in ("value_sum", "value_sumsq", "value_sum3", "value_sum4", "value_min", "value_max", "near_zero_eps"):
        assert np.allclose(x[name].values, y[name].values, rtol=1e-9, atol=1e-12), name
    assert np.allclose(x.near_zero_eps.values, a.spec.near_zero_eps)
    for group in ("cross_attention", "latent_attention"):  # each step's window, written with its batch
        for name in ("latent_position", "input_position"):
            if name in a.dataset(group):
                assert np.array_equal(a.dataset(group)[name].values, b.dataset(group)[name].values), (group, name)
    assert (a.cross_attention.latent_position.values[:, 1:] >= 0).any(axis=-1).all()
    if probes == "all":
        for group in ("cross_attention", "latent_attention"):
            wa, wb = a.dataset(group).weights.values, b.dataset(group).weights.values
            assert np.isfinite(wa[:, 1:]).any() and np.array_equal(wa, wb, equal_nan=True), group
        assert np.array_equal(a.kv_cache.attention_mass.values, b.kv_cache.attention_mass.values, equal_nan=True)
    assert (a.timing.seconds.values[1:, :, :, 0] > 0).any(axis=-1).all()  # every decode step and block timed
    assert np.array_equal(a.tokens.chosen.values, b.tokens.chosen.values)


def test_steps_the_worker_reduces_equal_steps_reduced_on_the_generating_thread(tmp_path, monkeypatch):
    """While every block computes one row per sequence (the window still growing), decode steps'
    activations go to the writer's worker (numpy); reduced on the generating thread instead
    (torch), the same run records the same histograms, moments and thresholds."""
    from workbench.probes.recorder import Recorder
    from workbench.probes.selection import ProbeSelection
    from workbench.trace.writer import TraceWriter

    torch.manual_seed(1)
    model_dir = tmp_path / "wide"
    save_perceiver(PerceiverAR(PerceiverConfig(**{**CFG, "n_latents": 32})), model_dir)  # 3 + 10 < 32: no slide
    shipped = []
    real = TraceWriter.write_activation_values
    monkeypatch.setattr(TraceWriter, "write_activation_values",
                        lambda self, first, last, *a, **k: shipped.append((first, last)) or real(self, first, last, *a, **k))
    spec = dict(model=str(model_dir), prompts=["ab"], max_new_tokens=STEPS, device="cpu",
                probes=ProbeSelection.parse("activations"))
    run(RunSpec(**spec, record=str(tmp_path / "worker.zarr")))
    assert shipped == [(0, 0), (1, STEPS - 1)]  # the prefill, then the decode steps in one batch
    monkeypatch.setattr(Recorder, "max_shipped_prefill_values", 0)  # nothing fits: reduce every step here
    monkeypatch.setattr(Recorder, "max_shipped_values", 0)
    run(RunSpec(**spec, record=str(tmp_path / "here.zarr")))
    assert shipped == [(0, 0), (1, STEPS - 1)]
    a, b = open_trace(tmp_path / "worker.zarr").activations, open_trace(tmp_path / "here.zarr").activations
    assert (a.value_count.values > 0).all()  # every step, block and site recorded
    for name in ("hist_count", "value_count", "near_zero_count"):
        assert np.array_equal(a[name].values, b[name].values), name
    for name in ("value_sum", "value_sumsq", "value_sum3", "value_sum4", "value_min", "value_max", "near_zero_eps"):
        assert np.allclose(a[name].values, b[name].values, rtol=1e-9, atol=1e-12), name


def test_a_slid_window_runs_on_every_core_while_the_worker_is_mostly_idle(model_dir, tmp_path, monkeypatch):
    """Recording leaves the writer's worker a core, but once a window slid (its latent blocks
    recompute all N rows: a matrix product) a step runs on every core, unless the worker is busy."""
    from workbench.probes.recording import CoreShare
    from workbench.probes.selection import ProbeSelection

    monkeypatch.setattr(CoreShare, "rows_for_every_core", N)  # "ab": N rows a step from step 4 on
    monkeypatch.setattr(CoreShare, "window", 1e9)  # the worker's share is never sampled: it stays 0
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def threads_after_each_step(name):
            seen = []  # torch's threads for the next step, as the recorder left them
            run(RunSpec(model=str(model_dir), prompts=["ab"], max_new_tokens=STEPS, record=str(tmp_path / name),
                        device="cpu", probes=ProbeSelection.parse("light")),
                on_step=lambda e: seen.append(torch.get_num_threads()))
            assert torch.get_num_threads() == 2  # given back after the run
            return seen

        assert threads_after_each_step("idle.zarr") == [1, 1, 1, 1] + [2] * (STEPS - 4)
        monkeypatch.setattr(CoreShare, "worker_share_for_every_core", -1.0)  # as if the worker were busy
        assert threads_after_each_step("busy.zarr") == [1] * STEPS
    finally:
        torch.set_num_threads(before)
