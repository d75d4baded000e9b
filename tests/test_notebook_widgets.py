"""Notebook widgets on real recorded traces: ipywidgets controls <-> TraceState <-> the views' Bokeh data,
the jupyter_bokeh widget sending those changes to the browser, and a live run followed as it grows."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.notebook import TraceWidget, generate_live, show_dashboard
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer

CFG = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=1024,
           bos_id=256, eos_id=None)
STEPS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nbw_model")
    save_llama(Llama(LlamaConfig(**CFG)), path, ByteTokenizer(bos_id=256, eos_id=None))
    return path


@pytest.fixture(scope="module")
def trace_path(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("nbw_traces") / "two.zarr"
    run(RunSpec(model=str(model_dir), prompts=["hello world", "abc def"], max_new_tokens=STEPS,
                record=str(path), device="cpu"))
    return path


def raw_map(path, seq, layer, head, stop):
    """The attention rows straight from the Zarr array (independent of the reader and the views)."""
    w = zarr.open_group(str(path), mode="r")["attention"]["weights"]
    return np.asarray(w[seq, layer, head, :stop, :stop], dtype=np.float32)


def shown(widget) -> np.ndarray:
    return np.asarray(widget.views["attention"].main.source.data["image"][0])


def notes(w) -> dict:
    """Problems the views report (the comm view's TP=1 remark is information, not a problem)."""
    return {k: v._note.object for k, v in w.views.items()
            if v._note.object and "nothing to reduce" not in v._note.object}


def test_controls_move_the_state_and_the_heatmap(trace_path):
    w = TraceWidget(trace_path)
    st, c = w.state, w.controls
    assert st.n_steps == STEPS and c["step"].max == STEPS - 1 and c["step"].value == STEPS - 1
    assert [v for _, v in c["layer"].options] == [0, 1] and [v for _, v in c["head"].options] == [0, 1, 2, 3]
    assert c["seq"].layout.display is None   # two sequences: the control is shown
    stop = int(st.trace.tokens["query_stop"][0, STEPS - 1])
    np.testing.assert_allclose(shown(w), raw_map(trace_path, 0, 0, 0, stop), atol=1e-6)

    for name, value in (("head", 2), ("layer", 1), ("seq", 1)):
        before = shown(w).copy()
        c[name].value = value
        assert getattr(st, name) == value
        after = shown(w)
        assert before.shape != after.shape or not np.allclose(before, after, equal_nan=True), name
    stop = int(st.trace.tokens["query_stop"][1, STEPS - 1])
    np.testing.assert_allclose(shown(w), raw_map(trace_path, 1, 1, 2, stop), atol=1e-6)

    # An earlier step shows only the rows processed by then (prompt plus two decode steps).
    c["step"].value = 2
    assert st.step == 2 and not st.follow
    stop2 = int(st.trace.tokens["query_stop"][1, 2])
    assert stop2 < stop
    np.testing.assert_allclose(shown(w), raw_map(trace_path, 1, 1, 2, stop2), atol=1e-6)
    assert "step 2" in w.views["attention"].main.figure.title.text
    assert not notes(w)   # every view drew


def test_state_moves_the_controls(trace_path):
    w = TraceWidget(trace_path, views=["attention", "kv_cache"])
    st, c = w.state, w.controls
    st.layer, st.head = 1, 3
    assert c["layer"].value == 1 and c["head"].value == 3
    st.select_step(4)
    assert c["step"].value == 4 and c["play"].value == 4
    assert c["follow"].layout.display == "none"   # a finished trace has nothing to follow
    assert "complete" in w.status.value and f"{STEPS} steps" in w.status.value
    assert set(w.views) == {"attention", "kv_cache"}


def test_changes_are_sent_to_the_browser(trace_path):
    """The jupyter_bokeh widget patches the page's document when a control changes the heatmap."""
    w = TraceWidget(trace_path, views=["attention"])
    bokeh = w.bokeh_widget()
    assert bokeh in w.widget.children
    doc_json = json.dumps(bokeh.render_bundle["docs_json"])
    source_id = w.views["attention"].main.source.id
    assert source_id in doc_json   # the heatmap's data source is part of the rendered document
    sent = []
    bokeh.send = lambda content, buffers=None: sent.append((content, buffers))
    w.controls["head"].value = 1
    patches = [c.get("payload", "") for c, _ in sent if c.get("msg") == "patch"]
    assert any(isinstance(p, str) and source_id in p for p in patches), "no patch of the heatmap data was sent"


def test_a_missing_trace_waits_and_bad_input_is_refused(tmp_path, trace_path):
    w = TraceWidget(tmp_path / "not-yet.zarr")
    assert w.state.trace is None and "no trace" in w.state.error
    assert w.error.layout.display is None and "no trace" in w.error.value
    with pytest.raises(WorkbenchError, match="unknown view 'nope'"):
        TraceWidget(trace_path, views=["nope"])
    with pytest.raises(WorkbenchError, match="trace path or an open Trace"):
        TraceWidget(42)
    with pytest.raises(WorkbenchError, match="already exists"):
        generate_live(model=str(tmp_path), record=str(trace_path), display=False)


def test_an_open_trace_and_the_dashboard(trace_path):
    from workbench.trace.reader import open_trace
    w = TraceWidget(open_trace(trace_path), views=["tokens"])
    assert w.state.n_steps == STEPS
    dash = show_dashboard(trace_path)
    assert dash.state.n_steps == STEPS and dash.ipywidget is not None


def test_compare_with_another_run(trace_path, model_dir, tmp_path):
    """TraceWidget(a, compare_with=b) shows the Compare view of a against b, layer by layer."""
    from workbench.compare import compare_traces
    arm = tmp_path / "arm.zarr"
    run(RunSpec(model=str(model_dir), prompts=["hello world", "abc def"], max_new_tokens=STEPS, record=str(arm),
                device="cpu", arm={"layers": [0]}))
    assert "compare" not in TraceWidget(trace_path).views          # nothing to compare with
    w = TraceWidget(trace_path, compare_with=arm)
    view = w.views["compare"]
    assert view.other.value == "arm.zarr" and notes(w) == {}
    ds = compare_traces(trace_path, arm)
    for layer in (0, 1):
        w.controls["layer"].value = layer
        frac = ds["hist_fraction"].sel(run="b", layer=layer, site="mlp.act.post").values
        np.testing.assert_allclose(view.hist_sources["b"].data["share"], frac[frac > 0])
    np.testing.assert_allclose(view.layer_sources["a"].data["value"],
                               ds["near_zero_fraction"].sel(run="a", site="mlp.act.post").values)
    w.controls["seq"].value = 1                                     # the text line follows the sequence
    assert "sequence 1:" in view.runs.object


def test_live_run_is_followed_as_it_grows(model_dir, tmp_path):
    """The widget shows a run part-way through, however fast the machine generates.

    A tiny model can finish before the refresh task's first beat, so the generation is held still at
    one step (its ``on_step`` waits) until the widget shows the run part-way. What it can show then
    is what the recorder has handed to the store by that step: at least the prefill (queued at
    once), at most steps 0..hold_at (decode steps are queued in batches, so maybe fewer).
    """
    n_new = 48
    hold_at = n_new // 2
    seen = []                              # (steps the widget shows, run ended)
    shown_part_way = threading.Event()
    held = []                              # True if the widget showed the run part-way by the end of the hold

    def hold(event):
        if event.step == hold_at:
            held.append(shown_part_way.wait(timeout=120))

    def watch(event):
        seen.append((event.new, live.done))
        if 0 < event.new <= hold_at + 1 and not live.done:
            shown_part_way.set()

    async def main():
        nonlocal live
        live = generate_live(model=str(model_dir), prompts=["live"], max_new_tokens=n_new, device="cpu",
                             record=str(tmp_path / "live.zarr"), views=["tokens", "attention"], display=False,
                             on_step=hold)
        assert live.result is None or live.done
        live.widget.state.param.watch(watch, "n_steps")
        deadline = time.monotonic() + 180
        while not (live.done and live.widget.state.status != "running"):   # the refresh task's last beat
            assert time.monotonic() < deadline, f"still running: {live!r}, widget at {live.widget.state.n_steps}"
            await asyncio.sleep(0.05)
        return live

    live = None
    live = asyncio.run(main())
    result = live.wait()
    assert held == [True], "the widget never showed the run while it was held"
    assert len(result.generated[0]) == n_new
    assert live.widget.state.n_steps == n_new and live.widget.state.status == "complete"
    assert live.progress.value == n_new and live.progress.bar_style == "success"
    assert live.trace.n_steps == n_new and live.trace.status == "complete"
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and counts[-1] == n_new
    # The widget showed the trace while the generation was still running (at the latest, while held).
    assert any(0 < n <= hold_at + 1 and not done for n, done in seen), seen
    labels = live.widget.views["attention"].main.figure.title.text
    assert f"step {n_new - 1}" in labels


def test_perceiver_trace_gets_the_perceiver_view(tmp_path):
    from workbench.models.perceiver import PerceiverAR, PerceiverConfig
    from workbench.runtime.perceiver_checkpoint import save_perceiver
    torch.manual_seed(0)
    save_perceiver(PerceiverAR(PerceiverConfig(d_model=32, n_latents=8, n_heads=4, n_self_layers=1, d_ff=64,
                                               max_seq_len=128)), tmp_path / "model")
    path = tmp_path / "p.zarr"
    run(RunSpec(model=str(tmp_path / "model"), prompts=["import sys\n"], max_new_tokens=12, record=str(path),
                device="cpu"))
    w = TraceWidget(path)
    assert "perceiver" in w.views and "attention" not in w.views   # no self-attention maps in this trace
    cross = w.views["perceiver"].cross.source
    before = np.asarray(cross.data["image"][0]).copy()
    expected = w.state.trace.cross_attention_map(0, 0, 0).values
    np.testing.assert_allclose(before, expected, atol=1e-6, equal_nan=True)
    w.controls["head"].value = 2
    np.testing.assert_allclose(np.asarray(cross.data["image"][0]),
                               w.state.trace.cross_attention_map(0, 0, 2).values, atol=1e-6, equal_nan=True)
    assert not notes(w)
