"""Dashboard state and views without a browser: real trace stores on disk, written by the real writer."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from bokeh.models import ColumnDataSource

from workbench.errors import WorkbenchError
from workbench.trace.reader import open_trace
from workbench.trace.schema import TraceSpec
from workbench.trace.synthetic import write_synthetic_trace
from workbench.trace.writer import TraceWriter
from workbench.views.attention import attention_map, head_scores
from workbench.views.catalog import TraceCatalog
from workbench.views.dashboard import CATALOG_EVERY, Dashboard
from workbench.views.heatmap import max_pool, tick_labels
from workbench.views.server import check_port_free, start_server_process
from workbench.views.state import TraceState
from workbench.views.timing import step_breakdown
from workbench.views import tokens as tokens_view
from workbench.trace.token_text import read_token_text

PROMPT = 6


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "synthetic"
    write_synthetic_trace(path, n_steps=20, n_layers=3, n_heads=4, world=2, perceiver=True, seed=1)
    return path


# --------------------------------------------------------------------------- a live writer
def _start_live(path, n_steps: int, layers: int = 2, heads: int = 2) -> tuple[TraceSpec, TraceWriter]:
    spec = TraceSpec.for_generation(PROMPT, n_steps - 1, n_seq=1, n_layers=layers, n_heads=heads)
    writer = TraceWriter(path, spec, {"prompts": ["p"], "sampler": {"temperature": 0}}, flush_interval=0.02)
    writer.write_prompt(np.arange(PROMPT)[None], [[f"p{i}" for i in range(PROMPT)]])
    return spec, writer


def _write_step(writer: TraceWriter, spec: TraceSpec, step: int) -> None:
    """One step as the runtime writes it: queries, attention rows, sample, new token, KV occupancy."""
    q0, q1 = (0, PROMPT) if step == 0 else (PROMPT + step - 1, PROMPT + step)
    q = np.arange(q0, q1)
    rows = (np.arange(q1)[None, :] <= q[:, None]).astype(np.float32)
    rows /= rows.sum(axis=1, keepdims=True)                          # uniform causal attention
    rows = np.broadcast_to(rows, (1, spec.n_layers, spec.n_heads) + rows.shape)
    writer.write_queries(step, q0, q1)
    writer.write_attention(step, rows, query_start=q0)
    token = 100 + step
    writer.write_sample(step, [token], chosen_prob=[0.6], candidate_ids=[[token, 7]], candidate_probs=[[0.6, 0.3]])
    if q1 < spec.max_positions:
        writer.write_tokens(step, q1, [[token]], [[f" g{step}"]])
    writer.write_kv(step, tokens=np.full(spec.n_layers, q1), blocks=np.full(spec.n_layers, -(-q1 // 4)),
                    bytes_used=np.full(spec.n_layers, q1 * 64), bytes_reserved=np.full(spec.n_layers, -(-q1 // 4) * 256))
    writer.write_timing(step, _part_seconds(spec, step), step_seconds=_part_seconds(spec, step).sum() + 1e-4)
    writer.end_step(step)


def _part_seconds(spec: TraceSpec, step: int) -> np.ndarray:
    """Seconds per (layer, part) of a live test step: distinct per layer, part and step; the prefill
    (step 0) takes 20 times longer."""
    layers, parts = np.arange(spec.n_layers)[:, None], np.arange(len(spec.timing_parts))[None, :]
    return (1 + layers + 10 * parts) * 1e-5 * (1 + step / 50) * (20 if step == 0 else 1)


# --------------------------------------------------------------------------- state
def test_state_opens_a_finished_trace_at_its_last_step(synthetic):
    st = TraceState()
    assert st.open(synthetic)
    assert (st.n_steps, st.status, st.error) == (20, "complete", "")
    assert (st.n_seqs, st.n_layers, st.n_heads) == (1, 3, 4)
    assert st.step == 19 and not st.follow


def test_select_step_clamps_and_replay_plays_to_the_end(synthetic):
    st = TraceState()
    st.open(synthetic)
    st.select_step(500)
    assert st.step == 19
    st.select_step(-3)
    assert st.step == 0
    st.select_step(19)
    st.toggle_play()                      # at the end: replay starts over
    assert st.playing and st.step == 0
    st.speed = 5
    seen = [st.step]
    while st.playing:
        st.tick()
        seen.append(st.step)
    assert seen == [0, 5, 10, 15, 19, 19]
    st.toggle_play()
    st.toggle_play()
    assert not st.playing


def test_selection_is_clamped_to_the_trace(synthetic):
    st = TraceState()
    st.open(synthetic)
    st.layer, st.head = 99, 99
    assert (st.layer, st.head) == (2, 3)


def test_live_state_follows_new_steps_and_keeps_a_chosen_step(tmp_path):
    path = tmp_path / "live"
    spec, writer = _start_live(path, n_steps=12)
    for s in range(4):
        _write_step(writer, spec, s)
    writer.flush()
    st = TraceState()
    assert st.open(path)
    assert (st.n_steps, st.status, st.step, st.follow) == (4, "running", 3, True)
    for s in range(4, 7):
        _write_step(writer, spec, s)
    writer.flush()
    assert st.tick()
    assert (st.n_steps, st.step) == (7, 6)                   # followed the newest step
    st.select_step(2)                                        # the user looks back: stop following
    assert not st.follow
    _write_step(writer, spec, 7)
    writer.flush()
    st.tick()
    assert (st.n_steps, st.step) == (8, 2)
    for s in range(8, 12):
        _write_step(writer, spec, s)
    writer.close()
    st.tick()
    assert (st.n_steps, st.status) == (12, "complete")
    assert not st.tick()                                     # finished: nothing more to read


def test_missing_trace_waits_then_opens_when_it_appears(tmp_path):
    path = tmp_path / "later"
    st = TraceState()
    assert not st.open(path)
    assert "waiting" in st.error and st.trace is None
    assert not st.tick()
    spec, writer = _start_live(path, n_steps=3)
    _write_step(writer, spec, 0)
    writer.flush()
    assert st.tick()
    assert st.error == "" and st.n_steps == 1
    writer.close()


def _wait_for_a_later_mtime(path, timeout: float = 30.0) -> None:
    """Wait until a file written now on ``path``'s file system gets a later mtime than ``path`` has."""
    before = path.stat().st_mtime_ns
    probe = path.parent.parent / f".{path.parent.name}-mtime-probe"
    deadline = time.monotonic() + timeout
    try:
        probe.write_bytes(b"x")
        while probe.stat().st_mtime_ns <= before:
            assert time.monotonic() < deadline, f"the file-system clock did not move in {timeout} s"
            time.sleep(0.001)
            probe.write_bytes(b"x")
    finally:
        probe.unlink(missing_ok=True)


def test_a_replaced_trace_is_reopened(tmp_path):
    path = tmp_path / "again"
    write_synthetic_trace(path, n_steps=3, n_layers=1, n_heads=1, prompt_len=2)
    dash = Dashboard(path)
    assert dash.state.n_steps == 3 and not dash.state.replaced()
    _wait_for_a_later_mtime(path / "zarr.json")   # the stamp is an mtime: coarse on some file systems
    write_synthetic_trace(path, n_steps=5, n_layers=1, n_heads=1, prompt_len=2)   # re-recorded
    assert dash.state.replaced()
    for _ in range(CATALOG_EVERY):
        dash.tick()
    assert dash.state.n_steps == 5 and not dash.state.replaced()


def test_corrupt_and_foreign_stores_show_an_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    st = TraceState()
    assert not st.open(bad) and "unreadable root metadata" in st.error
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    assert not st.open(other) and "not a workbench-trace store" in st.error
    notdir = tmp_path / "file.txt"
    notdir.write_text("x")
    assert not st.open(notdir) and "not a directory" in st.error


# --------------------------------------------------------------------------- catalog (path safety)
def test_catalog_lists_traces_and_refuses_paths_outside(tmp_path, synthetic):
    root = tmp_path / "runs"
    (root / "group").mkdir(parents=True)
    (root / "a").symlink_to(synthetic, target_is_directory=True)
    (root / "group" / "b").symlink_to(synthetic, target_is_directory=True)
    (root / "notes").mkdir()
    cat = TraceCatalog(root)
    assert not cat.single
    assert cat.names() == []           # symlinks leading out of the root are not listed...
    for name in ("a", "group/b"):
        with pytest.raises(WorkbenchError, match="outside"):
            cat.resolve(name)          # ...nor served
    with pytest.raises(WorkbenchError, match="outside"):
        cat.resolve("../runs/../..")
    with pytest.raises(WorkbenchError, match="relative"):
        cat.resolve("/etc")
    assert TraceCatalog(synthetic).single and TraceCatalog(synthetic).names() == ["."]


def test_catalog_lists_real_traces_in_a_directory(tmp_path):
    for name in ("r1", "nested/r2"):
        write_synthetic_trace(tmp_path / name, n_steps=2, n_layers=1, n_heads=1, prompt_len=2)
    (tmp_path / "empty").mkdir()
    cat = TraceCatalog(tmp_path)
    assert cat.names() == ["nested/r2", "r1"]
    assert cat.resolve("nested/r2") == (tmp_path / "nested" / "r2").resolve()
    dash = Dashboard(tmp_path)                                   # opens the most recently written
    assert dash.trace_select.options == ["nested/r2", "r1"] and dash.state.path.endswith("r2")
    dash = Dashboard(tmp_path, trace="nested/r2")
    assert dash.trace_select.value == "nested/r2" and dash.state.path.endswith("r2")
    dash.trace_select.value = "r1"                               # the selector switches traces
    assert dash.state.path.endswith("r1") and dash.state.error == ""


def test_a_directory_dashboard_waits_for_the_trace_it_was_opened_on(tmp_path):
    """generate --serve serves the record's directory opened on the run, before its store exists:
    the page waits for that run, not the newest trace already there, and opens it when it appears."""
    write_synthetic_trace(tmp_path / "earlier", n_steps=2, n_layers=1, n_heads=1, prompt_len=2)
    write_synthetic_trace(tmp_path / "old" / "nested", n_steps=2, n_layers=1, n_heads=1, prompt_len=2)
    dash = Dashboard(tmp_path, trace="live.zarr", depth=1)      # the traces beside it, not below them
    assert dash.state.trace is None and "waiting for it to appear" in dash.state.error
    write_synthetic_trace(tmp_path / "live.zarr", n_steps=3, n_layers=1, n_heads=1, prompt_len=2)
    for _ in range(CATALOG_EVERY):
        dash.tick()
    assert dash.state.path.endswith("live.zarr") and dash.state.error == "" and dash.state.n_steps == 3
    assert dash.trace_select.options == ["earlier", "live.zarr"] and dash.trace_select.value == "live.zarr"
    assert "compare" in dash._tab_views                          # the earlier run is there to compare with


def _reference_shares(path, seq: int, layer: int, positions, n_steps: int | None = None) -> np.ndarray:
    """Each step's attention mass per position, summed over ranks, as shares of the step's total,
    read with plain xarray (no workbench reader) for steps [0, n_steps)."""
    import xarray as xr
    m = xr.open_zarr(path, group="kv_cache", consolidated=False)["attention_mass"][seq, :n_steps, layer].values
    m = m.astype(np.float64)                                       # [step, rank, position]
    total = np.where(np.isnan(m).all(axis=1), np.nan, np.nansum(m, axis=1))
    return (total / np.nansum(total, axis=1, keepdims=True))[:, positions]


def test_kv_tab_maps_each_steps_share_of_attention_per_position(synthetic):
    from bokeh.events import Tap
    dash = Dashboard(synthetic)
    dash.tabs.active = dash._tab_views.index("kv_cache")
    kv, st = dash.views["kv_cache"], dash.state
    assert kv.steps_map.figure.visible
    image = np.asarray(kv.steps_map.source.data["image"][0])
    want = _reference_shares(synthetic, 0, 0, np.arange(image.shape[1]))
    assert image.shape == (20, 16 + 19) and np.allclose(image, want, equal_nan=True)
    assert np.allclose(np.nansum(image, axis=1), 1.0)                # every step's row: shares summing to 1
    assert "layer 0 · steps 0-19" in kv.steps_map.figure.title.text and kv.steps_note.visible
    assert kv.steps_cursor.location == 19.5
    sent = kv.steps_map.source.data["image"][0]
    st.select_step(4)                                               # a step: the cursor moves, nothing is re-sent
    assert kv.steps_cursor.location == 4.5 and kv.steps_map.source.data["image"][0] is sent
    kv._tapped_step(Tap(model=kv.steps_map.figure, x=3.0, y=11.4))   # a click on a row selects its step
    assert st.step == 11
    # the bars above it come from the same rows: the step's mass, or steps 0..step summed
    import xarray as xr
    raw = xr.open_zarr(synthetic, group="kv_cache", consolidated=False)["attention_mass"][0, :, 0].values
    for accumulate in (False, True):
        kv.accumulate.value = accumulate
        pos = kv.mass_source.data["position"]
        want = np.nansum(raw[: 12] if accumulate else raw[11:12], axis=(0, 1))[pos]
        np.testing.assert_allclose(kv.mass_source.data["mass"], want, rtol=1e-6)
        assert len(pos) == 16 + 11 and max(kv.mass_source.data["mass"]) > 0
    kv.accumulate.value = False
    st.layer = 2
    image = np.asarray(kv.steps_map.source.data["image"][0])
    assert np.allclose(image, _reference_shares(synthetic, 0, 2, np.arange(image.shape[1])), equal_nan=True)
    assert _danger(dash) == {}


def test_kv_tab_heatmap_reads_only_new_steps_of_a_live_run(tmp_path, monkeypatch):
    from workbench.views import kv_cache as kv_view
    spec, writer = _start_live(tmp_path / "live", n_steps=10)

    def step(s: int) -> None:  # a step with the attention mass the recorder writes beside the maps
        q0, q1 = (0, PROMPT) if s == 0 else (PROMPT + s - 1, PROMPT + s)
        mass = np.zeros((1, spec.n_layers, q1), np.float32)
        mass[..., 0] = 1.0 + s                                      # a sink that grows
        mass[..., q1 - 1] = q1 - q0                                 # the newest token
        writer.write_attention_mass(s, mass)
        _write_step(writer, spec, s)

    for s in range(3):
        step(s)
    writer.flush()
    reads = []
    real = kv_view.mass_over_steps
    monkeypatch.setattr(kv_view, "mass_over_steps",
                        lambda tr, seq, layer, a, b: reads.append((a, b)) or real(tr, seq, layer, a, b))
    dash = Dashboard(tmp_path / "live")
    dash.tabs.active = dash._tab_views.index("kv_cache")
    kv = dash.views["kv_cache"]
    assert reads == [(0, 3)] and "steps 0-2" in kv.steps_map.figure.title.text
    monkeypatch.setattr(kv_view, "LIVE_SECONDS", 600.0)
    step(3)
    writer.flush()
    dash.tick()
    assert kv._note.object == "" and reads[-1] == (3, 4) and dash.state.step == 3   # only the new step is read...
    assert "steps 0-2" in kv.steps_map.figure.title.text and kv.steps_cursor.location == 3.5  # ...drawn later
    monkeypatch.setattr(kv_view, "LIVE_SECONDS", 0.0)
    step(4)
    writer.close()
    for _ in range(3):
        dash.tick()
    assert "steps 0-4" in kv.steps_map.figure.title.text
    image = np.asarray(kv.steps_map.source.data["image"][0])
    assert np.allclose(image, _reference_shares(tmp_path / "live", 0, 0, np.arange(PROMPT + 4), 5),
                       equal_nan=True)
    assert image[4, 0] == pytest.approx(5 / (5 + 1))               # step 4: sink 5, newest token 1


def test_activation_histograms_are_drawn_per_unit_of_activation(synthetic):
    """Recorded bins differ in width (test_compare has them), so bars are counts divided by their
    bin's width (a density); the per-bin counts stay in the hover, and a checkbox draws counts per
    bin instead."""
    import xarray as xr

    from workbench.views.activations import bin_geometry
    dash = Dashboard(synthetic)
    dash.tabs.active = dash._tab_views.index("activations")
    view, st = dash.views["activations"], dash.state
    st.select_step(7)
    st.layer = 1
    stored = xr.open_zarr(synthetic, group="activations", consolidated=False)
    counts = stored["hist_count"][7, 1].values.astype(np.float64)          # [site, rank, bin], plain xarray
    counts = np.where(counts < 0, 0, counts).sum(axis=1)
    lo, hi = bin_geometry(np.asarray(open_trace(synthetic).spec.bin_edges))
    shown = [i for i, name in enumerate(view._site_names) if name in view.sites.value]
    assert shown
    for i in shown:
        data, keep = view.hist_sources[i].data, counts[i] > 0
        np.testing.assert_allclose(data["count"], counts[i][keep])
        np.testing.assert_allclose(data["top"], counts[i][keep] / (hi - lo)[keep])
        assert min(data["bottom"]) < min(data["top"])                       # the log axis floor sits below every bar
    assert view._hist_figure(True).yaxis.axis_label == "count per unit of activation"
    view.density.value = False
    for i in shown:
        assert view.hist_sources[i].data["top"] == view.hist_sources[i].data["count"]
    assert view._hist_figure(True).yaxis.axis_label == "count per bin"
    assert _danger(dash) == {}


# --------------------------------------------------------------------------- numbers behind the views
def test_max_pool_keeps_peaks_and_masks():
    a = np.zeros((1000, 700), np.float32)
    a[123, 456] = 0.9
    a[:, 600:] = np.nan
    pooled, fr, fc = max_pool(a, 512)
    assert pooled.shape[0] <= 512 and pooled.shape[1] <= 512 and (fr, fc) == (2, 2)
    assert pooled[61, 228] == pytest.approx(0.9) and np.nanmax(pooled) == pytest.approx(0.9)
    assert np.isnan(pooled[:, 300:]).all() and not np.isnan(pooled[:, :300]).any()
    small = np.eye(4, dtype=np.float32)
    assert max_pool(small)[0] is not None and np.array_equal(max_pool(small)[0], small)


def test_tick_labels_thin_out_long_sequences():
    ticks, labels = tick_labels([f"t{i}" for i in range(100)], 100, limit=40)
    assert len(ticks) == 34 and ticks[0] == 0.5 and labels[3.5] == "t3"
    _, labels = tick_labels(["a b\n"], 1)
    assert labels[0.5] == "a\u00b7b\u21b5"


def _reference_scores(maps, rows, ids):
    """Loop-by-loop definition of the scores, as independent check of the vectorised code."""
    n_heads = maps.shape[0]
    prev, induction = np.zeros(n_heads), np.zeros(n_heads)
    for h in range(n_heads):
        p, ind = [], []
        for i, q in enumerate(rows):
            if q >= 1:
                p.append(maps[h, i, q - 1])
            targets = [j + 1 for j in range(q) if ids[j] == ids[q] and j + 1 < q]
            if targets:
                ind.append(sum(maps[h, i, t] for t in targets))
        prev[h], induction[h] = np.mean(p), np.mean(ind)
    return prev, induction


def test_head_scores_find_previous_token_and_induction_heads():
    ids = np.array([5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8])
    n = len(ids)
    rows = np.arange(n)
    prev_head = np.zeros((n, n), np.float32)
    prev_head[0, 0] = 1
    prev_head[rows[1:], rows[1:] - 1] = 1
    ind_head = np.zeros((n, n), np.float32)
    for q in range(n):
        earlier = [j + 1 for j in range(q) if ids[j] == ids[q] and j + 1 < q]
        if earlier:
            ind_head[q, earlier[-1]] = 1       # the most recent occurrence's successor
        else:
            ind_head[q, 0] = 1
    rng = np.random.default_rng(0)
    noise = np.tril(rng.random((n, n))).astype(np.float32)
    noise /= noise.sum(axis=1, keepdims=True)
    maps = np.stack([prev_head, ind_head, noise])
    scores = head_scores(maps, rows, ids)
    assert scores["previous"][0] == pytest.approx(1.0)
    assert scores["induction"][1] == pytest.approx(1.0)
    assert np.argmax(scores["previous"]) == 0 and np.argmax(scores["induction"]) == 1
    assert scores["sink"][1] > 0 and scores["sink"][0] == pytest.approx(2 / n)  # rows 0 and 1 look at position 0
    prev_ref, ind_ref = _reference_scores(maps, rows, ids)
    np.testing.assert_allclose(scores["previous"], prev_ref, rtol=1e-6)
    np.testing.assert_allclose(scores["induction"], ind_ref, rtol=1e-6)


def test_attention_map_is_cut_at_the_selected_step(synthetic):
    tr = open_trace(synthetic)
    m5 = attention_map(tr, 0, 1, 2, 5)
    assert m5.shape == (16 + 5, 16 + 5)                     # prompt 16, then one row per decode step
    np.testing.assert_allclose(np.nansum(m5, axis=1), 1.0, atol=2e-3)
    full = tr.attention_map(0, 1, 2, step=5).values          # the reader's own cut, as reference
    np.testing.assert_array_equal(m5, full[:21, :21])


# --------------------------------------------------------------------------- the composed views
def _danger(dash):
    return {k: v._note.object for k, v in dash.views.items() if v._note.visible and v._note.alert_type == "danger"}


def test_dashboard_views_follow_the_selection(synthetic):
    dash = Dashboard(synthetic)
    st = dash.state
    assert st.error == "" and _danger(dash) == {}
    att = dash.views["attention"]
    before = att.main.source.data["image"][0].copy()
    st.layer = 2
    after_layer = att.main.source.data["image"][0]
    assert not np.array_equal(before, after_layer, equal_nan=True)
    assert att.main.figure.title.text.startswith("layer 2 · head 0")
    st.head = 3
    assert att.main.figure.title.text.startswith("layer 2 · head 3")
    assert not np.array_equal(after_layer, att.main.source.data["image"][0], equal_nan=True)
    assert dash._tab_views == ["attention", "heads", "perceiver", "kv_cache", "activations", "timing", "comm",
                               "run"]
    dash.tabs.active = dash._tab_views.index("perceiver")          # the trace has Perceiver cross-attention
    assert "step 19" in dash.views["perceiver"].cross.figure.title.text
    dash.tabs.active = 0
    assert len(att.grid.images.data["image"]) == 4
    tokens = dash.views["tokens"]
    st.select_step(3)
    assert tokens.strip.n_visible == 16 + 4                       # the prompt + tokens of steps 0..3
    assert tokens.strip.selected == 16 + 3
    assert att.main.source.data["dh"] == [16 + 3]
    kv = dash.views["kv_cache"]
    assert not kv.active and kv._pending and kv.cursor.location != 3   # a hidden tab waits...
    dash.tabs.active = dash._tab_views.index("kv_cache")
    assert kv.active and kv.cursor.location == 3                 # ...and catches up when shown
    assert len(kv.growth_source.data["step"]) == 20
    ticker = kv.growth.yaxis[0].ticker                           # bytes tick at powers of two: 32 KiB, 64 KiB
    assert ticker.base == 2 and list(ticker.mantissas) == [1] and kv.growth.yaxis[0].formatter.format == "0.[0] b"
    kv.metric.value = "tokens"
    assert kv.growth.yaxis[0].ticker.min_interval == 1 and kv.growth.yaxis[0].axis_label == "tokens"
    kv.metric.value = "bytes"
    dash.tabs.active = dash._tab_views.index("activations")
    assert "step 3" in dash.views["activations"].by_layer.title.text
    dash.tabs.active = dash._tab_views.index("timing")
    assert "step 3" in dash.views["timing"].by_layer.title.text
    dash.tabs.active = dash._tab_views.index("comm")
    assert "step 3" in dash.views["comm"].timeline.title.text and dash.views["comm"].plots.visible
    dash.tabs.active = dash._tab_views.index("perceiver")
    assert "step 3" in dash.views["perceiver"].cross.figure.title.text
    assert _danger(dash) == {}


def test_time_view_shows_each_layers_parts_and_what_is_left_outside_the_layers(synthetic, tmp_path):
    dash = Dashboard(synthetic)
    st, view = dash.state, dash.views["timing"]
    dash.tabs.active = dash._tab_views.index("timing")
    st.select_step(7)
    st.layer = 1
    seconds = open_trace(synthetic).timing["seconds"]               # [step, layer, part, rank]
    parts = [str(p) for p in seconds["part"].values]
    for rank in (0, 1):
        view.rank.value = f"rank {rank}"
        bars = view.layer_source.data
        np.testing.assert_allclose(np.array([bars[p] for p in parts]).T, seconds[7, :, :, rank].values * 1e3)
        assert bars["layer"] == [0, 1, 2] and view.by_layer.title.text == f"time per layer and part · step 7 · rank {rank}"
        per_step = np.array([view.step_source.data[p] for p in parts]).T
        np.testing.assert_allclose(per_step, seconds[:, :, :, rank].values.sum(axis=1) * 1e3)
        wall = float(open_trace(synthetic).timing["step_seconds"][7, rank]) * 1e3
        layers = float(seconds[7, :, :, rank].sum()) * 1e3
        b = step_breakdown(seconds[7, :, :, rank].values * 1e3, wall, parts)
        assert b["wall"] == pytest.approx(wall) and b["outside"] == pytest.approx(wall - layers) and b["outside"] > 0
        slowest = int(np.argmax(seconds[7, :, :, rank].sum("part").values))
        assert f"{wall:.3f} ms wall, {layers:.3f} ms in the layers" in view.summary.object
        assert f"slowest layer: <b>{slowest}</b>" in view.summary.object
    assert view.rank.visible and (view.selected_layer.left, view.selected_layer.right) == (0.5, 1.5)
    assert view.cursor.location == 7 and _danger(dash) == {}
    assert [item.label.value for item in view.layer_legend.items] == ["attention", "MLP", "norm", "all-reduce"]
    one_rank = tmp_path / "one-rank"                                # rank 1 was selected: a 1-rank trace shows rank 0
    write_synthetic_trace(one_rank, n_steps=5, n_layers=2, n_heads=2, world=1, seed=2)
    st.open(one_rank)
    assert not view.rank.visible and view.rank.value == "rank 0" and len(view.step_source.data["step"]) == 5
    assert [item.label.value for item in view.layer_legend.items] == ["attention", "MLP", "norm"]   # no all-reduce
    np.testing.assert_allclose(np.array([view.layer_source.data[p] for p in parts]).T,
                               open_trace(one_rank).timing["seconds"][4, :, :, 0].values * 1e3)
    assert _danger(dash) == {}


def test_keyboard_shortcuts_move_the_selection(synthetic):
    dash = Dashboard(synthetic)
    st = dash.state
    assert st.step == 19
    presses = iter(range(1, 100))

    def press(key: str, shift: bool = False) -> None:   # as the page's listener reports a key
        dash.keys.press = f"{'S-' if shift else ''}{key}|{next(presses)}"

    press("ArrowLeft")
    assert st.step == 18
    press("ArrowLeft", shift=True)
    assert st.step == 8
    press("ArrowLeft", shift=True)
    assert st.step == 0                                          # clamped at the first step
    press("ArrowRight")
    assert st.step == 1
    press("End")
    assert st.step == 19
    press("Home")
    assert st.step == 0
    press(" ")
    assert st.playing
    press(" ")
    assert not st.playing
    press("ArrowDown"), press("ArrowDown"), press("ArrowDown")
    assert st.layer == 2                                         # 3 layers: clamped at the last
    press("ArrowUp")
    assert st.layer == 1
    press("]"), press("]")
    assert st.head == 2
    press("[")
    assert st.head == 1
    assert dash.views["attention"].main.figure.title.text.startswith("layer 1 · head 1 · step 0")


def test_a_link_reopens_the_view_it_was_taken_from(synthetic, tmp_path):
    root = tmp_path / "served"
    shutil.copytree(synthetic, root / "s")                       # a directory of traces: links name the trace
    dash = Dashboard(root, "s")
    dash.apply_query({"step": "4", "layer": "2", "head": "3", "tab": "kv cache"})
    st = dash.state
    assert (st.step, st.layer, st.head) == (4, 2, 3) and dash._tab_views[dash.tabs.active] == "kv_cache"
    query = dash.link_query()
    assert query == "?trace=s&tab=kv+cache&step=4&seq=0&layer=2&head=3"
    assert query.replace("&", "&amp;") in dash.link.object
    again = Dashboard(root)                                      # a new page opened with that link
    again.select("s")
    again.apply_query(dict(pair.split("=") for pair in query[1:].replace("+", " ").split("&")))
    assert (again.state.step, again.state.layer, again.state.head) == (4, 2, 3)
    assert again._tab_views[again.tabs.active] == "kv_cache"
    # numbers out of range are clamped, anything else is ignored
    dash.apply_query({"step": "999", "layer": "-4", "head": "x", "tab": "nope"})
    assert (st.step, st.layer, st.head) == (19, 0, 3) and dash._tab_views[dash.tabs.active] == "kv_cache"
    assert Dashboard(synthetic).link_query().startswith("?tab=attention&step=19")   # one trace served: no name


def test_clicking_a_token_selects_the_step_that_produced_it(synthetic):
    dash = Dashboard(synthetic)
    strip = dash.views["tokens"].strip
    strip.clicked = 16 + 7                                       # the token sampled at step 7
    assert dash.state.step == 7
    strip.clicked = 2                                            # a prompt token: the prefill
    assert dash.state.step == 0


def test_head_grid_sorts_and_a_tile_tap_opens_its_head(synthetic):
    dash = Dashboard(synthetic)
    att = dash.views["attention"]
    att.sort.value = "previous"
    titles = att.grid.labels.data["text"]
    scores = [float(t.split("· ")[-1]) for t in titles]
    assert scores == sorted(scores, reverse=True) and len(titles) == 4
    best = max(att.scores["previous"], key=att.scores["previous"].get)
    assert att.grid.heads[0] == best
    # a tap in the middle of the third tile (top row) opens that head
    x, y = att.grid._origin(2)
    att.grid._tapped(type("Tap", (), {"x": x + 0.5, "y": y + 0.5})())
    assert dash.state.head == att.grid.heads[2]
    assert att.grid.frames.data["width"][2] == 3 and att.grid.head_at(x + 0.5, 0.05) is None


def _reference_entropy(trace, layer: int, head: int, step: int) -> float:
    """Mean over query rows of the row's entropy in bits, straight from the recorded map."""
    m = np.nan_to_num(np.asarray(trace.attention_map(0, layer, head, step=step), dtype=np.float64))
    n = trace.queries_upto(0, step)
    return float(np.mean([-sum(w * np.log2(w) for w in row if w > 0) for row in m[:n, :n]]))


@pytest.mark.parametrize("padded", [False, True])
def test_all_head_scores_of_one_score_equal_every_score_of_each_layer(synthetic, padded):
    """The Heads tab reads every layer at once and scores only the score shown, in the stored
    float16; each equals scoring each layer's float32 maps for every score (layer_maps), also
    when padding leaves rows and keys out."""
    from types import SimpleNamespace

    from workbench.views.attention import GRID_ROWS, SCORES, layer_maps
    from workbench.views.heads import all_head_scores
    from workbench.views.tokens import SequenceText
    tr = open_trace(synthetic)
    text = SequenceText().read(tr, 0)
    if padded:  # as a shorter prompt's padding would: positions 3-5 are not the sequence's
        keep = [i for i, p in enumerate(text.positions) if not 3 <= p <= 5]
        text = SimpleNamespace(positions=[text.positions[i] for i in keep], ids=[text.ids[i] for i in keep])
    positions = np.asarray(text.positions)
    for step in (0, 7, 19):
        ref = {k: [] for k in SCORES if k != "head"}
        for layer in range(3):
            maps, rows, keys = layer_maps(tr, 0, layer, step, GRID_ROWS, positions=positions)
            scores = head_scores(maps, np.searchsorted(keys, rows), np.asarray(text.ids)[:len(keys)])
            for k in ref:
                ref[k].append(scores[k])
        for k in ref:
            got, layers, heads, _ = all_head_scores(tr, 0, step, text, [k])
            assert list(got) == [k] and layers == [0, 1, 2] and heads == [0, 1, 2, 3]
            np.testing.assert_allclose(got[k], np.array(ref[k]), rtol=1e-5, atol=1e-7, err_msg=f"{k} step {step}")
    assert ref["induction"] and np.array(ref["induction"]).any()  # the synthetic text repeats: induction is seen


def test_heads_view_scores_every_head_and_a_click_opens_it(synthetic):
    from bokeh.events import Tap

    from workbench.analysis import head_scores_from_trace
    tr = open_trace(synthetic)
    dash = Dashboard(synthetic)
    assert dash._tab_views[:2] == ["attention", "heads"]
    dash.tabs.active = 1
    heads = dash.views["heads"]

    def shown() -> np.ndarray:
        return np.array(heads.source.data["value"]).reshape(3, 4)   # [layer, head]

    # previous-token scores of every layer and head, as the analysis module computes them independently
    np.testing.assert_allclose(shown(), head_scores_from_trace(tr, "previous_token"), rtol=1e-6)
    assert "step 19" in heads.figure.title.text
    dash.state.select_step(5)
    assert "step 5" in heads.figure.title.text
    np.testing.assert_allclose(shown(), head_scores_from_trace(tr, "previous_token", step=5), rtol=1e-6)
    heads.score.value = "entropy"
    np.testing.assert_allclose(shown(), [[_reference_entropy(tr, lay, h, 5) for h in range(4)] for lay in range(3)],
                               rtol=1e-5)
    low = np.unravel_index(np.argmin(shown()), (3, 4))
    assert f"lowest: layer {low[0]} head {low[1]} " in heads.note_rows.object
    # the attention view's grid sorts by entropy with the most focused head first
    dash.views["attention"].sort.value = "entropy"
    order = dash.views["attention"].grid.heads
    assert [shown()[dash.state.layer, h] for h in order] == sorted(shown()[dash.state.layer])
    # a click on a cell selects its layer and head and opens the Attention tab
    heads._tapped(Tap(model=heads.figure, x=2.2, y=1.1))
    assert (dash.state.layer, dash.state.head) == (1, 2) and dash.tabs.active == 0
    assert heads.selected.data == {"layer": [1], "head": [2]}
    assert _danger(dash) == {}


def test_heads_tab_follows_a_live_run_at_most_every_few_seconds(tmp_path, monkeypatch):
    from workbench.views import heads as heads_view
    spec, writer = _start_live(tmp_path / "live", n_steps=10)
    for s in range(3):
        _write_step(writer, spec, s)
    writer.flush()
    dash = Dashboard(tmp_path / "live")
    dash.tabs.active = dash._tab_views.index("heads")
    heads = dash.views["heads"]
    assert "step 2" in heads.figure.title.text
    monkeypatch.setattr(heads_view, "LIVE_SECONDS", 600.0)
    _write_step(writer, spec, 3)
    writer.flush()
    dash.tick()
    assert dash.state.step == 3 and "step 2" in heads.figure.title.text     # following: not yet recomputed
    dash.state.select_step(1)                                               # a step the user picks: at once
    assert "step 1" in heads.figure.title.text
    # uniform causal attention (the live writer's): every row's entropy is log2 of its keys
    heads.score.value = "entropy"
    n = PROMPT + 1                                                          # queries up to step 1
    expected = np.mean([np.log2(q + 1) for q in range(n)])
    np.testing.assert_allclose(heads.source.data["value"], expected, rtol=1e-3)   # maps stored as float16
    writer.close()


def test_live_dashboard_streams_only_new_steps(tmp_path, monkeypatch):
    path = tmp_path / "live"
    spec, writer = _start_live(path, n_steps=10)
    for s in range(3):
        _write_step(writer, spec, s)
    writer.flush()
    dash = Dashboard(path)
    dash.tabs.active = dash._tab_views.index("kv_cache")
    kv = dash.views["kv_cache"]
    growth = kv.growth_source
    assert growth.data["step"] == [0, 1, 2]
    streamed = []
    growth.on_change("data", lambda attr, old, new: streamed.append(len(new["step"])))
    for s in range(3, 6):
        _write_step(writer, spec, s)
    writer.flush()
    dash.tick()
    assert dash.state.step == 5 and growth.data["step"] == list(range(6))
    assert growth.data["total_used"][-1] == (PROMPT + 5) * 64 * spec.n_layers
    assert dash.views["tokens"].strip.tokens[-1] == " g5"       # sampled at step 5, at position P + 5
    assert dash.views["tokens"].strip.probs[PROMPT:] == [0.6] * 6  # each with its sampled probability
    np.testing.assert_allclose(dash.views["tokens"].prob_source.data["chosen"], [0.6] * 6, rtol=1e-6)
    timing = dash.views["timing"]
    dash.tabs.active = dash._tab_views.index("timing")            # time per layer and part
    assert timing.step_source.data["step"] == list(range(6))
    ms = np.array([timing.step_source.data[p] for p in spec.timing_parts]).T    # [step, part], summed over layers
    np.testing.assert_allclose(ms, [_part_seconds(spec, s).sum(axis=0) * 1e3 for s in range(6)])
    streamed, stream = [], ColumnDataSource.stream
    monkeypatch.setattr(ColumnDataSource, "stream", lambda src, new, *a, **k: (streamed.append(list(new["step"])),
                                                                               stream(src, new, *a, **k)))
    _write_step(writer, spec, 6)
    writer.flush()
    dash.tick()
    assert timing.step_source.data["step"] == list(range(7)) and "step 6" in timing.by_layer.title.text
    assert [6] in streamed and all(steps == [6] for steps in streamed)     # only the new step is read and sent
    assert timing.over_steps.y_range.end < _part_seconds(spec, 0).sum() * 1e3     # the prefill is off the scale
    assert "off the scale: prefill" in timing.scale_note.object
    dash.tabs.active = dash._tab_views.index("comm")              # communication, of a 1-rank run
    assert "no all-reduce timings" in dash.views["comm"]._note.object and not dash.views["comm"].plots.visible
    assert _danger(dash) == {}
    writer.close()


def test_a_run_recorded_without_the_sampler_offers_no_shading(tmp_path):
    spec, writer = _start_live(tmp_path / "no-sampler", n_steps=4)
    for step in range(3):                                        # tokens, but no candidates or probabilities
        q0, q1 = (0, PROMPT) if step == 0 else (PROMPT + step - 1, PROMPT + step)
        writer.write_queries(step, q0, q1)
        writer.write_tokens(step, q1, [[100 + step]], [[f" g{step}"]])
        writer.end_step(step)
    writer.flush()
    tokens = Dashboard(tmp_path / "no-sampler").views["tokens"]
    assert tokens.strip.tokens[-3:] == [" g0", " g1", " g2"]
    assert tokens.shade.disabled and tokens.strip.probs == [None] * (PROMPT + 3)
    assert not tokens.prob_fig.visible and tokens.prob_source.data["step"] == []
    writer.close()


def test_the_sampled_probability_of_every_step_and_a_click_on_one(synthetic):
    import zarr
    from bokeh.events import Tap
    dash = Dashboard(synthetic)
    tokens = dash.views["tokens"]
    raw = zarr.open_group(str(synthetic), mode="r")["tokens"]
    data = tokens.prob_source.data
    assert data["step"] == list(range(20)) and tokens.prob_fig.visible
    np.testing.assert_allclose(data["chosen"], raw["chosen_prob"][0, :20], rtol=1e-6)
    np.testing.assert_allclose(data["top"], raw["candidate_prob"][0, :20, 0], rtol=1e-6)
    assert all(c <= t + 1e-6 for c, t in zip(data["chosen"], data["top"]))   # top is the most likely one
    assert tokens.prob_cursor.location == 19
    tokens._on_tap_step(Tap(model=tokens.prob_fig, x=6.3, y=0.5))
    assert dash.state.step == 6 and tokens.prob_cursor.location == 6


def test_dashboard_opened_before_the_prefill_shows_the_prompt_once_it_lands(tmp_path):
    path = tmp_path / "early"
    spec, writer = _start_live(path, n_steps=5)
    dash = Dashboard(path)                                       # the store exists, no step committed
    assert dash.state.n_steps == 0 and dash.views["tokens"].strip.tokens == []
    for s in range(3):
        _write_step(writer, spec, s)
    writer.flush()
    dash.tick()
    strip = dash.views["tokens"].strip
    assert strip.tokens == [f"p{i}" for i in range(PROMPT)] + [" g0", " g1", " g2"]
    assert strip.n_prompt == PROMPT
    writer.close()


def test_dashboard_refuses_traces_outside_its_root(tmp_path, synthetic):
    root = tmp_path / "served"
    root.mkdir()
    dash = Dashboard(root, trace="../" + synthetic.name)
    assert dash.state.trace is None and "outside the served directory" in dash.state.error
    assert dash.error.visible and "refused" in dash.error.object


# --------------------------------------------------------------------------- a port already in use
@pytest.fixture
def busy_port():
    """A port some other program is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _one_line_port_error(out, port: int) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"port {port} is already in use" in out.stderr and "--port" in out.stderr


def test_serve_on_a_port_in_use_is_a_one_line_error(busy_port, synthetic):
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "serve", str(synthetic), "--port", str(busy_port)],
                         capture_output=True, text=True, timeout=120)
    _one_line_port_error(out, busy_port)
    assert out.stdout == ""                                      # no "dashboard: URL" line: nothing started


def test_generate_serve_on_a_port_in_use_fails_before_generating(busy_port, tmp_path):
    record = tmp_path / "run.zarr"
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--prompt", "hi", "--max-new-tokens", "2",
                          "--record", str(record), "--serve", "--port", str(busy_port)],
                         capture_output=True, text=True, timeout=120)
    _one_line_port_error(out, busy_port)
    assert not record.exists() and out.stdout == ""


def test_server_helpers_check_the_port_first(busy_port, tmp_path):
    with pytest.raises(WorkbenchError, match=f"port {busy_port} is already in use"):
        start_server_process(tmp_path, port=busy_port)          # no child process is started
    with pytest.raises(WorkbenchError, match="not a TCP port"):
        check_port_free("127.0.0.1", 70000)
    check_port_free("127.0.0.1", 0)                              # 0: the OS picks a free port


# --------------------------------------------------------------------------- prompts of different lengths
PROMPTS = ["hello world", "abc"]


@pytest.fixture(scope="module")
def recorded_batch(tmp_path_factory):
    """A real 2-prompt recording (12 and 4 prompt tokens with <bos>) of a tiny random model."""
    import torch

    from workbench.models.config import LlamaConfig
    from workbench.models.llama import Llama
    from workbench.runtime.checkpoint import save_llama
    from workbench.runtime.session import RunSpec, run
    from workbench.runtime.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("batch")
    cfg = LlamaConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                      bos_id=256, eos_id=None)
    save_llama(Llama(cfg), root / "model", ByteTokenizer(bos_id=256, eos_id=None))
    result = run(RunSpec(model=str(root / "model"), prompts=PROMPTS, max_new_tokens=6, record=str(root / "t.zarr"),
                         device="cpu"))
    return root / "t.zarr", result


def test_each_sequence_of_a_recorded_batch_shows_its_own_tokens(recorded_batch):
    from workbench.runtime.tokenizer import ByteTokenizer
    path, result = recorded_batch
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    dash = Dashboard(path)
    st, strip = dash.state, dash.views["tokens"].strip
    att, kv = dash.views["attention"], dash.views["kv_cache"]
    for seq, prompt in enumerate(PROMPTS):
        st.seq = seq
        ids = tok.encode(prompt)
        n = len(ids)                                             # 12 and 4
        generated = result.generated[seq]                        # 6, at positions n .. n + 5
        assert len(generated) == 6 and strip.tokens == [tok.token_text(i) for i in ids + generated]
        assert strip.positions == list(range(n + 6)) and strip.n_prompt == n
        # each generated token carries the probability its step's candidates gave it (prompt: None)
        cand = open_trace(path).tokens
        for step, token in enumerate(generated):
            ids_s = cand["candidate_id"][seq, step].values
            probs_s = cand["candidate_prob"][seq, step].values
            expected = float(probs_s[list(ids_s).index(token)]) if token in ids_s else -1.0
            assert strip.probs[n + step] == pytest.approx(expected, abs=1e-4)
        assert strip.probs[:n] == [None] * n and not dash.views["tokens"].shade.disabled
        for step in (0, 3):
            st.select_step(step)
            assert strip.selected == n + step and strip.n_visible == n + step + 1
            assert att.main.source.data["dh"] == [n + step] and att.main.y_labels.data["pos"] == list(range(n + step))
            assert att.step_box.top == (0 if step == 0 else n + step - 1) and att.step_box.bottom == n + step
        dash.tabs.active = dash._tab_views.index("kv_cache")
        assert kv.mass_source.data["position"] == list(range(n + 3))   # the shorter sequence ends at its own end
        dash.tabs.active = 0
        strip.clicked = n + 2                                    # the token sampled at step 2
        assert st.step == 2
        strip.clicked = 1
        assert st.step == 0
    assert _danger(dash) == {}


def test_candidates_are_named_by_the_traces_vocabulary_table(recorded_batch, synthetic):
    from workbench.runtime.tokenizer import ByteTokenizer
    from workbench.trace.token_text import token_labels
    path, _ = recorded_batch
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    trace = open_trace(path)
    assert list(trace.tokens["vocab_text"].values) == [tok.token_text(i) for i in range(259)]
    dash = Dashboard(path)
    view, st = dash.views["tokens"], dash.state
    seen = set(view.text.ids)
    unseen = []  # candidates that never appear in the text: named only by the table
    for step in range(st.n_steps):
        st.select_step(step)
        ids = trace.tokens["candidate_id"][0, step].values
        expected = [f"{r + 1}. {tokens_view._visible(tok.token_text(int(i)))}" for r, i in enumerate(ids)]
        assert view.cand_source.data["label"] == expected
        unseen += [int(i) for i in ids if int(i) not in seen]
    assert unseen
    assert [tokens_view._visible(t) for t in (" ", "\n", " x", "a b", "\x00")] == ["\u2423", "\\n", "\u2423x", "a b",
                                                                                 "\\x00"]
    # A trace recorded before the table existed: ids from its text, then #id.
    old = open_trace(synthetic)
    assert "vocab_text" not in old.tokens.data_vars
    text = read_token_text(old, 0)
    assert token_labels(old, [text.ids[0], 100_000], text) == [text.texts[0], "#100000"]


P, PADDED_LEN, PAD = 6, 3, 0                                     # seq 1: 3 prompt tokens right-padded to 6


def _write_padded_trace(path, n_steps: int = 5) -> TraceSpec:
    """A right-padded batch written the documented way: prompt [0, P) incl. padding (prompt_len says
    how much is real), the prefill samples position P, decode step s processes query P + s - 1.
    The padding's attention rows are written too (a runtime computes them); padded keys get 0."""
    spec = TraceSpec.for_generation(P, n_steps - 1, n_seq=2, n_layers=1, n_heads=2)
    writer = TraceWriter(path, spec, {"prompts": ["full", "short"], "sampler": {"temperature": 0}})
    ids = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, PAD, PAD, PAD]])
    text = [[f"a{i}" for i in range(P)], ["b0", "b1", "b2", "<pad>", "<pad>", "<pad>"]]
    writer.write_prompt(ids, text, prompt_len=[P, PADDED_LEN])
    real = np.ones((2, spec.max_positions), bool)
    real[1, PADDED_LEN:P] = False
    for step in range(n_steps):
        q0, q1 = (0, P) if step == 0 else (P + step - 1, P + step)
        q = np.arange(q0, q1)
        rows = ((np.arange(q1)[None, :] <= q[:, None])[None] & real[:, None, :q1]).astype(np.float32)
        rows[1, :, :] += (np.arange(q1) == 0) * 0.5                # seq 1 leans on its first token
        rows /= rows.sum(axis=2, keepdims=True)                   # [seq, q, k]
        writer.write_queries(step, q0, q1)
        writer.write_attention(step, np.broadcast_to(rows[:, None, None], (2, 1, 2) + rows.shape[1:]), query_start=q0)
        writer.write_attention_mass(step, rows.sum(axis=1)[:, None] * 2, layer=None)
        chosen = [100 + step, 200 + step]
        writer.write_sample(step, chosen, chosen_prob=[0.5, 0.5])
        if q1 < spec.max_positions:
            writer.write_tokens(step, q1, [[chosen[0]], [chosen[1]]], [[f" a-g{step}"], [f" b-g{step}"]])
        writer.end_step(step)
    writer.close()
    return spec


def test_padding_of_a_shorter_prompt_never_appears(tmp_path):
    path = tmp_path / "padded"
    _write_padded_trace(path)
    dash = Dashboard(path)
    st, strip = dash.state, dash.views["tokens"].strip
    att, kv = dash.views["attention"], dash.views["kv_cache"]
    st.seq = 1
    gen = [P + s for s in range(4)]                              # the last step's sample lies past the positions
    assert strip.tokens == ["b0", "b1", "b2"] + [f" b-g{s}" for s in range(4)]
    assert strip.positions == [0, 1, 2] + gen and strip.n_prompt == PADDED_LEN
    assert "prompt 3 tokens, 4 generated" in dash.views["tokens"].summary.object
    st.select_step(2)
    assert strip.selected == P + 2 and strip.n_visible == PADDED_LEN + 3
    strip.clicked = P + 1                                        # absolute position of step 1's token
    assert st.step == 1 and strip.selected == P + 1
    strip.clicked = 2                                            # the last real prompt token
    assert st.step == 0
    st.select_step(3)                                            # queries [0, P + 3): 6 of them are real
    keep = [0, 1, 2, P, P + 1, P + 2]
    full = np.asarray(att.main.source.data["image"][0])
    assert full.shape == (6, 6) and att.main.y_labels.data["pos"] == keep
    assert att.main.x_labels.data["text"] == ["b0", "b1", "b2", " b-g0", " b-g1", " b-g2"]
    want = attention_map(st.trace, 1, 0, 0, 3)[np.ix_(keep, keep)]
    assert np.allclose(full, want, equal_nan=True)
    assert (att.step_box.top, att.step_box.bottom) == (5, 6)     # the row of query P + 2
    prev = att.scores["previous"][0]                             # the first generated token's previous is b2
    assert prev == pytest.approx(np.mean([want[r, r - 1] for r in range(1, 6)]), rel=1e-5)
    dash.tabs.active = dash._tab_views.index("kv_cache")
    assert kv.mass_source.data["position"] == keep and kv.mass_source.data["text"][3] == " b-g0"
    heat = kv.steps_map                                          # nor in the step x position heatmap (every step:
    cached = [0, 1, 2] + list(range(P, P + st.n_steps - 1))      # keys up to the last step's last query)
    assert heat.x_labels.data["pos"] == cached and st.n_steps > 4
    np.testing.assert_allclose(np.asarray(heat.source.data["image"][0]),
                               _reference_shares(path, 1, 0, cached, st.n_steps), equal_nan=True)
    st.seq = 0                                                   # the full-length sequence is untouched
    assert strip.positions == list(range(P + 4)) and strip.tokens[:P] == [f"a{i}" for i in range(P)]
    assert kv.mass_source.data["position"] == list(range(P + 3))
    assert _danger(dash) == {}


def test_run_summary_names_the_run_and_each_user_probe(tmp_path):
    from workbench.views.run_info import run_summary
    path = write_synthetic_trace(tmp_path / "u.zarr", n_steps=5, n_layers=3, n_heads=4, world=1, user_probe=True)
    summary = run_summary(open_trace(path))
    trace = summary["trace"]
    assert trace["steps recorded"] == "5 of 5" and trace["layers"] == 3
    assert trace["user probe resid_rms"] == "synthetic on 3 hook points (seq 1)"
    assert summary["sampler"]["temperature"] == 0.8 and summary["parallelism"]["tensor-parallel size"] == 1
