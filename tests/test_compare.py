"""compare_traces / `workbench compare` on real recorded runs (the paper's experiment in miniature)."""
import numpy as np
import xarray as xr
import pytest
import torch

from workbench.cli import main
from workbench.compare import compare_traces, format_comparison
from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.probes.selection import ProbeSelection
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace import open_trace
from workbench.trace.schema import TraceSpec
from workbench.trace.stats import ActivationStats
from workbench.trace.synthetic import write_synthetic_trace
from workbench.trace.writer import TraceWriter
from workbench.views import compare as compare_view
from workbench.analysis import head_scores_from_trace
from workbench.compare import activation_sums
from workbench.views.activations import bin_geometry
from workbench.views.dashboard import Dashboard

PROMPT = "def add(a, b):\n    return"
SLASHES = PROMPT + "/" * 55  # the paper's meaningless tokens


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("compare")
    model = root / "model"
    save_llama(Llama(LlamaConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                 max_seq_len=256, bos_id=256, eos_id=None)).eval(),
               model, ByteTokenizer(bos_id=256, eos_id=None))
    out = {}
    for name, prompt, arm in (("base", PROMPT, None), ("slashes", SLASHES, None),
                              ("arm", PROMPT, {"layers": [0]})):
        out[name] = root / f"{name}.zarr"
        run(RunSpec(model=str(model), prompts=[prompt], max_new_tokens=6, device="cpu", arm=arm,
                    record=str(out[name]), probes=ProbeSelection.parse("activations")))
    return out


def test_compare_arm_off_and_on(traces):
    ds = compare_traces(traces["base"], traces["arm"], steps="prefill", labels=("off", "on"))
    assert list(ds["run"].values) == ["off", "on"]
    assert set(ds["site"].values) >= {"mlp.act.pre", "mlp.act.post"}
    # Histograms are shares per (run, layer, site) on the trace's edges.
    np.testing.assert_allclose(ds["hist_fraction"].sum("bin"), 1.0, rtol=1e-12)
    assert ds["bin_lower"].size == ds["bin"].size
    # Deltas are b - a.
    for name in ("near_zero_fraction", "std", "hist_fraction"):
        np.testing.assert_array_equal(ds[f"delta_{name}"], ds[name].sel(run="on") - ds[name].sel(run="off"))
    l0 = ds.sel(layer=0)
    # Same prompt, ARM sits after act.pre: layer 0's act.pre is the same in both runs (prefill).
    assert float(abs(l0["delta_hist_fraction"].sel(site="mlp.act.pre")).max()) == 0.0
    assert int(l0["delta_count"].sel(site="mlp.act.pre")) == 0
    # (near_zero_fraction is not compared across these runs: each counts with its own recorded eps,
    # ARM's MAD-based one when ARM is on, the trace's fixed one when it is off.)
    # ARM on: the near-zero share after redistribution falls; with it off, pre and post agree.
    on, off = l0.sel(run="on"), l0.sel(run="off")
    assert float(on["near_zero_fraction"].sel(site="mlp.act.post")) < float(on["near_zero_fraction"].sel(site="mlp.act.pre"))
    assert float(off["near_zero_fraction"].sel(site="mlp.act.post")) == float(off["near_zero_fraction"].sel(site="mlp.act.pre"))
    assert float(l0["delta_std"].sel(site="mlp.act.post")) > 0  # mass moved outwards


def test_compare_matches_the_raw_trace(traces):
    ds = compare_traces(traces["base"], traces["slashes"])
    for label, key in (("a", "base"), ("b", "slashes")):
        act = open_trace(traces[key]).activations
        counts = act["hist_count"].sum(["step", "rank"]).values  # every step committed and written
        frac = counts / counts.sum(-1, keepdims=True)
        np.testing.assert_allclose(ds["hist_fraction"].sel(run=label).transpose("layer", "site", "bin"), frac)
        n = act["value_count"].sum(["step", "rank"]).values
        mean = act["value_sum"].sum(["step", "rank"]).values / n
        np.testing.assert_allclose(ds["mean"].sel(run=label).transpose("layer", "site"), mean, rtol=1e-12)
    # The prompt with 55 extra tokens has 55 more positions of d_ff values per layer and site in the prefill.
    pre = compare_traces(traces["base"], traces["slashes"], steps="prefill")
    assert int(pre["delta_count"].sel(layer=0, site="mlp.act.pre")) == 55 * 128


def test_table_and_cli(traces, capsys):
    ds = compare_traces(traces["base"], traces["arm"], steps="prefill")
    table = format_comparison(ds)
    assert "ARM off" in table and "ARM layers [0]" in table and "steps: prefill" in table
    rows = [line for line in table.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2 * ds.sizes["site"]
    assert main(["compare", str(traces["base"]), str(traces["arm"]), "--steps", "prefill",
                 "--sites", "mlp.act.pre,mlp.act.post"]) == 0
    out = capsys.readouterr().out
    assert "mlp.act.post" in out and "attn.out" not in out
    for argv, msg in ((["--sites", "nope"], "site 'nope' is not recorded in both traces"),):
        assert main(["compare", str(traces["base"]), str(traces["arm"]), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    assert main(["compare", str(traces["base"]), str(traces["base"].parent / "missing.zarr")]) == 2
    assert "no such trace directory" in capsys.readouterr().err


def test_bad_steps_is_an_error(traces):
    with pytest.raises(WorkbenchError, match="unknown step selection"):
        compare_traces(traces["base"], traces["arm"], steps="first")


# --------------------------------------------------------------------------- the dashboard's Compare tab
def _compare_tab(root, name: str):
    dash = Dashboard(root, name)
    assert "compare" in dash._tab_views
    dash.tabs.active = dash._tab_views.index("compare")
    return dash, dash.views["compare"]


def test_compare_tab_shows_both_runs_with_the_numbers_of_compare_traces(traces):
    root = traces["base"].parent
    dash, view = _compare_tab(root, "base.zarr")
    assert "base.zarr" not in view.other.options and {"arm.zarr", "slashes.zarr"} <= set(view.other.options)
    assert "choose a trace" in view._note.object and not view.plots.visible
    view.compare_with("arm.zarr")
    assert view.plots.visible and view._note.object == ""
    lo, hi = bin_geometry(np.asarray(open_trace(traces["base"]).spec.bin_edges))
    assert (hi - lo).max() > 50 * (hi - lo).min()                  # recorded bins: fine near 0, wide in the tails
    for steps, site, stat in (("all", "mlp.act.post", "near_zero_fraction"), ("prefill", "mlp.act.pre", "kurtosis"),
                              ("decode", "mlp.act.post", "std")):
        view.steps.value, view.site.value, view.stat.value = steps, site, stat
        ds = compare_traces(traces["base"], traces["arm"], steps=steps)
        for layer in (0, 1):
            dash.state.layer = layer
            for run_label, k in (("a", "a"), ("b", "b")):
                frac = ds["hist_fraction"].sel(run=run_label, layer=layer, site=site).values
                keep = frac > 0
                np.testing.assert_allclose(view.hist_sources[k].data["share"], frac[keep])
                # drawn per unit of activation: the bins are sinh-spaced, ~100x wider at 3 than near 0
                np.testing.assert_allclose(view.hist_sources[k].data["top"], frac[keep] / (hi - lo)[keep])
                np.testing.assert_array_equal(view.hist_sources[k].data["left"], lo[keep])
                np.testing.assert_array_equal(view.hist_sources[k].data["right"], hi[keep])
                np.testing.assert_allclose(view.layer_sources[k].data["value"],
                                           ds[stat].sel(run=run_label, site=site).values)
            assert f"layer {layer} · {site} · {steps} steps · share of values per unit" in view.hist.title.text
        delta = float(ds["delta_near_zero_fraction"].sel(layer=1, site=site))
        assert f"<td>{delta:+.4f}</td>" in view.table.object        # the table's b - a, per layer
    view.density.value = False                                     # shares per bin, as stored
    assert view.hist_sources["b"].data["top"] == view.hist_sources["b"].data["share"]
    assert view.hist.title.text.endswith("share of values per bin") and view.hist.yaxis.axis_label == "share of values per bin"
    view.density.value = True
    # ARM on layer 0 thins out the values near zero after redistribution; layer 1 has no ARM.
    view.steps.value, view.site.value, view.stat.value = "prefill", "mlp.act.post", "near_zero_fraction"
    a, b = view.layer_sources["a"].data["value"], view.layer_sources["b"].data["value"]
    assert b[0] < a[0]
    assert "ARM off" in view.runs.object and "ARM on layers [0]" in view.runs.object
    # Where the texts part: the prompt with the slashes differs from the base prompt's end on.
    view.compare_with("slashes.zarr")
    ids_a, ids_b = (open_trace(traces[k]).token_ids(0) for k in ("base", "slashes"))
    first = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert f"the prompts differ from token {first}:" in view.runs.object
    assert "/" in view.runs.object.split("b <code>")[1][:8]                  # b's token there is a slash
    # A trace whose histograms do not compare is named as such and draws nothing.
    write_synthetic_trace(root / "other-model", n_steps=4, n_layers=3, n_heads=2, seed=0)
    dash._refresh_catalog()
    view.compare_with("other-model")
    assert "histograms do not compare" in view._note.object and not view.plots.visible
    assert dash.views["compare"]._note.alert_type == "warning"


def test_a_link_to_the_compare_tab_names_the_other_run(traces):
    from urllib.parse import parse_qsl
    root = traces["base"].parent
    dash, view = _compare_tab(root, "base.zarr")
    assert "compare=" not in dash.link_query()                    # nothing chosen yet
    view.compare_with("arm.zarr")
    query = dash.link_query()
    assert "trace=base.zarr" in query and "tab=compare" in query and "compare=arm.zarr" in query
    assert query.replace("&", "&amp;") in dash.link.object
    again = Dashboard(root, "base.zarr")                          # a new page opened with that link
    again.apply_query(dict(parse_qsl(query[1:])))
    assert again._tab_views[again.tabs.active] == "compare" and again.views["compare"].other.value == "arm.zarr"
    assert again.views["compare"].plots.visible


def test_a_single_trace_has_no_compare_tab(traces, tmp_path):
    dash = Dashboard(traces["base"])
    assert "compare" not in dash._tab_views
    # recorded without the attention probe: no empty Attention or Heads tab (the arrays exist, unwritten)
    assert dash._tab_views[:2] == ["kv_cache", "activations"] and dash.tabs.active == 0
    kv = dash.views["kv_cache"]                                    # nor an empty step x position heatmap
    assert kv.growth_source.data["step"] and not kv.steps_map.figure.visible and not kv.steps_note.visible
    from workbench.notebook import TraceWidget
    assert "attention" not in TraceWidget(traces["base"]).views and "heads" not in TraceWidget(traces["base"]).views
    write_synthetic_trace(tmp_path / "only", n_steps=3, n_layers=2, n_heads=2)   # alone in its directory
    dash = Dashboard(tmp_path)
    assert dash.state.trace is not None and "compare" not in dash._tab_views
    write_synthetic_trace(tmp_path / "second", n_steps=3, n_layers=2, n_heads=2)  # another one appears
    dash._refresh_catalog()
    assert "compare" in dash._tab_views and list(dash.views["compare"].other.options)[1:] == ["second"]


def _activation_step(writer: TraceWriter, spec: TraceSpec, step: int, rng) -> np.ndarray:
    """One step of random activations [layer, site, values] written as the runtime does."""
    values = rng.standard_normal((spec.n_layers, len(spec.hist_sites), 50)) * (1 + step)
    writer.write_queries(step, 0 if step == 0 else 3 + step, 4 if step == 0 else 4 + step)
    writer.write_activations(step, ActivationStats.from_values(values, spec.bin_edges, spec.near_zero_eps, lead_dims=2))
    writer.end_step(step)
    return values


def _finished_and_live(root, rng, live_steps: int) -> tuple[TraceSpec, TraceWriter, list[np.ndarray]]:
    """A finished trace "done" (10 steps) and a live one, "live", with its first ``live_steps``
    steps committed: its writer and the values it wrote."""
    spec = TraceSpec.for_generation(4, 9, n_seq=1, n_layers=2, n_heads=2)
    done = TraceWriter(root / "done", spec, {"prompts": ["done"]})
    for s in range(10):
        _activation_step(done, spec, s, rng)
    done.close()
    live = TraceWriter(root / "live", spec, {"prompts": ["live"]}, flush_interval=0.02)
    written = [_activation_step(live, spec, s, rng) for s in range(live_steps)]
    live.flush()
    return spec, live, written


def test_compare_tab_adds_a_live_runs_new_steps(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    spec, live, written = _finished_and_live(tmp_path, rng, 3)
    monkeypatch.setattr(compare_view, "LIVE_SECONDS", 0.0)
    read = []
    monkeypatch.setattr(compare_view, "activation_sums",
                        lambda trace, steps, sites: (read.append((trace.path.name, steps.start, steps.stop)),
                                                     activation_sums(trace, steps, sites))[1])
    dash, view = _compare_tab(tmp_path, "live")
    view.compare_with("done")
    edges = np.asarray(spec.bin_edges)
    site = view.site.value
    s = spec.hist_sites.index(site)

    def reference(values: list[np.ndarray], layer: int) -> np.ndarray:
        x = np.concatenate([v[layer, s] for v in values])
        counts = np.bincount(np.searchsorted(edges, x, side="right") - 1, minlength=len(edges) - 1)
        return counts / x.size

    frac = reference(written, dash.state.layer)
    np.testing.assert_allclose(view.hist_sources["a"].data["share"], frac[frac > 0])
    assert "3 steps, 3 summed (all)" in view.runs.object
    for before, n in ((3, 6), (6, 8)):
        for step in range(before, n):
            written.append(_activation_step(live, spec, step, rng))
        live.flush()
        read.clear()
        dash.tick()
        frac = reference(written, dash.state.layer)
        np.testing.assert_allclose(view.hist_sources["a"].data["share"], frac[frac > 0])
        assert f"{n} steps, {n} summed (all)" in view.runs.object
        assert read == [("live", before, n)]                    # only the new steps are read
    # While the run is live, new steps join the totals at most every LIVE_SECONDS; its end always does.
    monkeypatch.setattr(compare_view, "LIVE_SECONDS", 600.0)
    written.append(_activation_step(live, spec, 8, rng))
    live.flush()
    read.clear()
    dash.tick()
    assert dash.state.n_steps == 9 and read == [] and "8 summed" in view.runs.object
    live.close()
    dash.tick()
    assert dash.state.status == "complete" and read == [("live", 8, 9)] and "9 steps, 9 summed" in view.runs.object
    frac = reference(written, dash.state.layer)
    np.testing.assert_allclose(view.hist_sources["a"].data["share"], frac[frac > 0])


def test_a_live_run_chosen_as_b_is_followed_while_a_is_finished(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    spec, live, _ = _finished_and_live(tmp_path, rng, 2)
    monkeypatch.setattr(compare_view, "LIVE_SECONDS", 0.0)
    dash, view = _compare_tab(tmp_path, "done")                   # a is finished; b is the live run
    view.compare_with("live")
    assert "b</span> <b>live</b>" in view.runs.object and "2 steps, 2 summed" in view.runs.object
    for s in range(2, 5):
        _activation_step(live, spec, s, rng)
    live.flush()
    dash.tick()                                                  # a has nothing new: b's steps still show
    assert "5 steps, 5 summed" in view.runs.object
    live.close()
    dash.tick()
    assert view._b.status == "complete" and "5 steps, 5 summed" in view.runs.object


def test_compare_tab_quotes_step_times_and_head_score_changes(tmp_path, traces):
    write_synthetic_trace(tmp_path / "tp2", n_steps=12, n_layers=3, n_heads=4, world=2, seed=1)
    write_synthetic_trace(tmp_path / "tp1", n_steps=9, n_layers=3, n_heads=4, world=1, seed=2)
    dash, view = _compare_tab(tmp_path, "tp2")
    view.compare_with("tp1")

    def reference(name: str) -> float:   # the slowest rank of each decode step, median over steps
        seconds = xr.open_zarr(tmp_path / name, group="timing", consolidated=False)["step_seconds"].values
        return float(np.median(seconds[1:].max(axis=1))) * 1e3

    a, b = reference("tp2"), reference("tp1")
    assert f"median decode step: a {a:.3f} ms, b {b:.3f} ms (b / a = {b / a:.2f})" in view.runs.object
    assert "TP 2 (" in view.runs.object.split("<br>")[0] and "TP" not in view.runs.object.split("<br>")[1]
    # every head's previous-token score, b - a, as the analysis module computes it from each trace
    view.head_score.value = "previous"
    delta = head_scores_from_trace(open_trace(tmp_path / "tp1"), "previous_token") - \
        head_scores_from_trace(open_trace(tmp_path / "tp2"), "previous_token")
    np.testing.assert_allclose(np.reshape(view.head_source.data["delta"], (3, 4)), delta, rtol=1e-5, atol=1e-7)
    digits = compare_view.label_digits(float(np.abs(delta).max()))  # the largest change: 2 significant digits
    assert view.head_source.data["label"] == [f"{v:+.{digits}f}" for v in delta.ravel()]
    assert [compare_view.label_digits(x) for x in (0.3, 0.05, 0.006, 1e-7, 0.0, 5.0)] == [2, 3, 4, 4, 2, 2]
    worst = np.unravel_index(np.argmax(np.abs(delta)), delta.shape)
    assert f"largest change: layer {worst[0]} head {worst[1]}," in view.heads_note.object
    assert view.heads_fig.visible
    # runs recorded without the timing probe quote no times
    dash, view = _compare_tab(traces["base"].parent, "base.zarr")
    view.compare_with("arm.zarr")
    assert "median decode step" not in view.runs.object
    assert "attention maps are not recorded in both runs" in view.heads_note.object and not view.heads_fig.visible


def test_head_weights_change_is_zero_where_a_heads_inputs_did_not_change(traces, tmp_path, capsys):
    """Compare's "largest |b - a| of the attention weights" over the tokens both runs share: 0 for
    an identical copy; with ARM on layer 0, still 0 in layer 0 (its attention comes before its MLP)
    and not 0 in layer 1; every cell equals a loop over the recorded maps."""
    import shutil
    model = traces["base"].parent / "model"
    for name, arm in (("plain", None), ("arm", {"layers": [0]})):
        run(RunSpec(model=str(model), prompts=[PROMPT], max_new_tokens=6, device="cpu", arm=arm,
                    record=str(tmp_path / f"{name}.zarr")))
    shutil.copytree(tmp_path / "plain.zarr", tmp_path / "copy.zarr")
    dash, view = _compare_tab(tmp_path, "plain.zarr")
    view.head_score.value = "weights"
    view.compare_with("copy.zarr")
    assert view.heads_fig.visible and view.head_source.data["delta"] == [0.0] * 8
    assert "largest: layer 0 head 0, |b - a| = 0," in view.heads_note.object
    view.compare_with("arm.zarr")
    got = np.reshape(view.head_source.data["delta"], (2, 4))
    ta, tb = open_trace(tmp_path / "plain.zarr"), open_trace(tmp_path / "arm.zarr")
    ids_a, ids_b = ta.token_ids(0), tb.token_ids(0)
    n = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    rows = min(n, ta.queries_upto(0, ta.n_steps - 1), tb.queries_upto(0, tb.n_steps - 1))
    want = np.zeros((2, 4))
    for layer in range(2):
        for head in range(4):
            ma = np.asarray(ta.attention_map(0, layer, head), dtype=np.float64)[:rows, :rows]
            mb = np.asarray(tb.attention_map(0, layer, head), dtype=np.float64)[:rows, :rows]
            want[layer, head] = np.nanmax(np.abs(mb - ma))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0].max() == 0 and got[1].max() > 1e-4
    assert f"over query rows {max(0, rows - 256)}–{rows - 1}" in view.heads_note.object
    # the same numbers from Python and the command line
    from workbench.compare import attention_change
    change = attention_change(tmp_path / "plain.zarr", tmp_path / "arm.zarr")
    np.testing.assert_allclose(change.values, got)
    assert change.dims == ("layer", "head") and change.attrs["shared_tokens"] == n
    assert main(["compare", str(tmp_path / "plain.zarr"), str(tmp_path / "arm.zarr")]) == 0
    out = capsys.readouterr().out
    assert f"largest |b - a| over query rows {max(0, rows - 256)}-{rows - 1} ({n} tokens both runs share)" in out
    worst = int(np.argmax(got[1]))
    assert "  layer 0: 0 (head 0)" in out and f"  layer 1: {got[1].max():.3g} (head {worst})" in out
