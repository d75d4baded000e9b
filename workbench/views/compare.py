"""Compare view: the open trace (a) beside another trace (b), e.g. the same prompt with ARM off and
on, or with and without the paper's meaningless tokens. The selected layer's activation histograms
of both runs overlaid (shares of values per bin, on the traces' shared fixed edges), a statistic of
both runs across layers, a table of per-layer statistics and their differences, where the two
texts part, and how every head's attention scores changed (b - a) where both runs recorded maps.
Totals are over ranks and the chosen steps (`workbench.compare`), extended with newly committed
steps while either run is live.
"""
from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import panel as pn
import param
import xarray as xr
from bokeh.models import (BasicTicker, ColorBar, ColumnDataSource, HoverTool, Legend, LegendItem,
                          LinearColorMapper, Range1d, Span)
from bokeh.plotting import figure

from workbench.compare import (STEP_CHOICES, activation_sums, attention_change, attention_comparable,
                               comparable_sites, finish_sums, merge_sums, step_range)
from workbench.errors import WorkbenchError
from workbench.trace import has_attention_maps
from workbench.views.activations import bin_geometry, per_unit
from workbench.views.attention import GRID_ROWS
from workbench.views.base import TraceView, finite_floats
from workbench.views.heads import HEAD_SCORES, all_head_scores, fit_head_matrix
from workbench.views.tokens import SequenceText

STATS = {"near_zero_fraction": "near-zero fraction", "zero_bin_fraction": "share in the bin holding 0",
         "std": "standard deviation", "kurtosis": "excess kurtosis", "mean": "mean", "max": "max"}
TABLE_STATS = ("near_zero_fraction", "zero_bin_fraction", "std", "kurtosis")
COLORS = {"a": "#3a6fb0", "b": "#e6550d"}
NONE = "(choose a trace)"
LIVE_SECONDS = 2.0  # a live run's new steps are added to its totals at most this often


class RunTotals:
    """Activation totals of one trace over a step selection, extended as its steps commit."""

    def __init__(self, trace, steps: str, sites: list[str]) -> None:
        self.trace, self.steps, self.sites = trace, steps, sites
        self.upto = 0  # totals cover committed steps [start, upto)
        self.sums: xr.Dataset | None = None
        self.summary: xr.Dataset | None = None

    def update(self) -> None:
        """Add the steps committed since the last update."""
        start, stop = step_range(self.steps, int(self.trace.n_steps))
        first = max(start, self.upto)
        if stop <= first:
            return
        new = activation_sums(self.trace, slice(first, stop), self.sites)
        self.sums = new if self.sums is None else merge_sums(self.sums, new)
        self.upto = stop
        self.summary = finish_sums(self.sums, self.trace.spec.bin_edges)

    @property
    def n_summed(self) -> int:
        return self.upto - step_range(self.steps, self.upto)[0] if self.upto else 0


def median_decode_ms(trace) -> float:
    """Median wall time of the committed decode steps in ms, a step lasting as long as its slowest
    rank; NaN if the run recorded no timings."""
    n = int(trace.n_steps)
    if n < 2:
        return float("nan")
    seconds = np.asarray(trace.timing["step_seconds"][1:n].values, dtype=np.float64)  # [step, rank]
    seconds = seconds[np.isfinite(seconds).any(axis=1)]
    return float(np.median(np.nanmax(seconds, axis=1))) * 1e3 if len(seconds) else float("nan")


def text_divergence(a, b) -> str:
    """Where two runs' texts (``TokenText`` of one sequence each) first differ, in a sentence."""
    n = 0
    for x, y in zip(a.ids, b.ids):
        if x != y:
            break
        n += 1
    if n == len(a.ids) == len(b.ids):
        return f"the two texts are the same, {n} tokens"
    if n == min(len(a.ids), len(b.ids)):
        longer, shorter = ("a", "b") if len(a.ids) > len(b.ids) else ("b", "a")
        return (f"the texts agree for all {n} tokens that {shorter} has so far; "
                f"{longer} has {abs(len(a.ids) - len(b.ids))} more")
    if n < a.prompt_len or n < b.prompt_len:
        where = f"the prompts differ from token {n}"
    else:
        where = (f"the texts part at token {n} (a's step {a.produced[n]}, b's step {b.produced[n]}), "
                 f"after {n - max(a.prompt_len, b.prompt_len)} generated tokens in common")
    return f"{where}: a {_token(a, n)}, b {_token(b, n)}"


WEIGHTS_CHANGE = "largest |b - a| of the attention weights"


def _token(text, i: int) -> str:
    p = text.probs[i]
    prob = f" (p = {p:.3f})" if p is not None and np.isfinite(p) else ""
    return f"<code>{html.escape(repr(text.texts[i]))}</code>{prob}"


class CompareView(TraceView):
    """The open trace against another one: histograms, a statistic across layers, a table, the texts."""

    watch_params = ("trace", "layer", "seq", "version")
    candidates = param.Dict(default={}, doc="traces to compare with: name -> path (the dashboard's catalog)")

    def build(self):
        self.other = pn.widgets.Select(label="compare with (b)", options=[NONE], value=NONE, width=260,
                                       css_classes=["wb-compare-other"])
        self.steps = pn.widgets.Select(label="steps", options=list(STEP_CHOICES), value="all", width=110)
        self.site = pn.widgets.Select(label="site", options=[], width=170, css_classes=["wb-compare-site"])
        self.stat = pn.widgets.Select(label="statistic across layers", options={v: k for k, v in STATS.items()},
                                      value="near_zero_fraction", width=220)
        self.density = pn.widgets.Checkbox(label="per unit of activation (bins differ in width)", value=True,
                                           margin=(30, 10, 5, 10))  # level with the selects' boxes
        self._quiet = False
        for w, what in ((self.other, "other"), (self.steps, "steps"), (self.site, "site"), (self.stat, "stat"),
                        (self.density, "density")):
            w.param.watch(lambda e, what=what: None if self._quiet else self._safe_redraw({what}), "value")
        self.param.watch(lambda e: self.list_candidates(), "candidates")
        self.runs = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10), css_classes=["wb-compare-runs"])
        self.hist_sources = {k: ColumnDataSource(data=dict(left=[], right=[], top=[], bottom=[], share=[]))
                             for k in COLORS}
        self.hist = figure(height=300, width=620, y_axis_type="log", tools="pan,wheel_zoom,box_zoom,reset,save",
                           x_axis_label="activation value", y_axis_label="share of values",
                           name="compare-hist")
        self.layer_sources = {k: ColumnDataSource(data=dict(layer=[], value=[])) for k in COLORS}
        self.by_layer = figure(height=300, width=460, tools="pan,wheel_zoom,reset,save", x_axis_label="layer",
                               name="compare-layers")
        self.by_layer.xaxis.ticker = BasicTicker(min_interval=1)
        self.layer_cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        self.by_layer.add_layout(self.layer_cursor)
        items = {"hist": [], "layers": []}
        for k, color in COLORS.items():
            quad = self.hist.quad(left="left", right="right", top="top", bottom="bottom", source=self.hist_sources[k],
                                  fill_color=color, fill_alpha=0.3, line_color=color)
            line = self.by_layer.line("layer", "value", source=self.layer_sources[k], color=color, line_width=2,
                                      line_dash="solid" if k == "a" else "dashed")
            self.by_layer.scatter("layer", "value", source=self.layer_sources[k], color=color, size=6)
            items["hist"].append(LegendItem(label=k, renderers=[quad]))
            items["layers"].append(LegendItem(label=k, renderers=[line]))
        for fig, key in ((self.hist, "hist"), (self.by_layer, "layers")):
            fig.add_layout(Legend(items=items[key], orientation="horizontal", location="top_left",
                                  click_policy="hide", label_text_font_size="10px", margin=0, padding=4), "above")
        self.hist.add_tools(HoverTool(tooltips=[("bin", "[@left{0.000}, @right{0.000})"), ("share", "@share{0.0000}"),
                                                ("per unit", "@top{0.000}")]))
        self.by_layer.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("value", "@value{0.0000}")]))
        self.table = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10), css_classes=["wb-compare-table"])
        self._build_heads()
        self.plots = pn.Column(self.runs, pn.Row(pn.pane.Bokeh(self.hist), pn.pane.Bokeh(self.by_layer)), self.table,
                               pn.Row(self.head_score), pn.pane.Bokeh(self.heads_fig), self.heads_note,
                               sizing_mode="stretch_width", visible=False)
        self._b = None  # the other trace, opened here
        self._b_path: Path | None = None
        self._totals: dict = {}  # "key": what they were summed for, "a" / "b": RunTotals
        self._summed_at = 0.0
        self._texts = {k: SequenceText() for k in COLORS}  # each run's text, read incrementally
        return pn.Column(pn.Row(self.other, self.steps, self.site, self.stat, self.density), self.plots,
                         sizing_mode="stretch_width")

    def _build_heads(self) -> None:
        """A layer x head matrix of b - a for one head score (views/heads.py), diverging colours."""
        options = {v: k for k, v in HEAD_SCORES.items()}
        options[WEIGHTS_CHANGE] = "weights"
        self.head_score = pn.widgets.Select(label="head score, b - a", options=options, value="sink", width=300,
                                            css_classes=["wb-compare-head-score"])
        self.head_score.param.watch(lambda e: self._safe_redraw({"head_score"}), "value")
        self.heads_note = pn.pane.HTML("", margin=(0, 10), css_classes=["wb-compare-heads-note"])
        self.head_source = ColumnDataSource(data=dict(layer=[], head=[], a=[], b=[], delta=[], label=[], ink=[]))
        self.head_mapper = LinearColorMapper(palette="RdBu11", low=-1, high=1, nan_color="#eef0f4")
        fig = figure(height=280, width=520, tools="save", name="compare-heads", title="head scores, b - a",
                     x_axis_label="head", y_axis_label="layer", x_range=Range1d(-0.5, 0.5), y_range=Range1d(0.5, -0.5))
        fig.rect(x="head", y="layer", width=0.95, height=0.95, source=self.head_source,
                 fill_color={"field": "delta", "transform": self.head_mapper}, line_color=None)
        fig.text(x="head", y="layer", text="label", source=self.head_source, text_align="center",
                 text_baseline="middle", text_font_size="10px", text_color="ink")
        fig.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("head", "@head"), ("a", "@a{0.000}"),
                                          ("b", "@b{0.000}"), ("b - a", "@delta{+0.000}")]))
        fig.add_layout(ColorBar(color_mapper=self.head_mapper, width=10), "right")
        fig.grid.visible = False
        self.heads_fig = fig
        self._head_scores: dict = {}

    # ---------------------------------------------------------------- choosing b
    def list_candidates(self) -> None:
        """The other traces, without the open one; keeps the chosen one while it is listed."""
        mine = Path(self.state.path).resolve() if self.state.path else None
        names = [n for n, p in self.candidates.items() if Path(p).resolve() != mine]
        options = [NONE, *names]
        if options != list(self.other.options):
            self._quiet = True
            try:
                value = self.other.value if self.other.value in names else NONE
                self.other.param.update(options=options, value=value)
            finally:
                self._quiet = False
            if value == NONE and self._b is not None:
                self._safe_redraw({"other"})

    @property
    def has_candidates(self) -> bool:
        """True if there is another trace to compare with."""
        return len(self.other.options) > 1

    def compare_with(self, name: str) -> None:
        """Choose trace ``name`` (a key of ``candidates``) as b."""
        if name not in self.candidates:
            known = ", ".join(self.candidates) or "none"
            raise WorkbenchError(f"no trace {name!r} to compare with (traces: {known})")
        self.other.value = name

    def _open_b(self) -> bool:
        """Open (or keep) the chosen trace b; False with a note when there is none to show."""
        from workbench.trace.reader import open_trace
        name = self.other.value
        if name == NONE or name not in self.candidates:
            self._b, self._b_path = None, None
            if self.has_candidates:
                self.note("choose a trace to compare the open one (a) with (b)")
            else:
                self.note("no other trace to compare with: serve a directory of traces (workbench serve runs/)")
            return False
        path = Path(self.candidates[name]).resolve()
        if self._b is None or path != self._b_path:
            self._b, self._b_path = None, path
            try:
                self._b = open_trace(path)
            except Exception as e:  # damaged, foreign, or not written yet: say so, keep the page
                self._b_path = None
                self.note(f"cannot compare with {name}: {e}", "warning")
                return False
        elif self._b.status == "running":
            self._b.refresh()
        return True

    def tick(self) -> None:
        """A clock beat (the dashboard's): a live b's new steps redraw the tab even when a is done."""
        b = self._b
        if not self.active or b is None or b.status != "running":
            return
        n = int(b.n_steps)
        b.refresh()
        if int(b.n_steps) != n or b.status != "running":
            self._safe_redraw({"version"})

    # ---------------------------------------------------------------- drawing
    def clear(self) -> None:
        self.plots.visible = False

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        if "trace" in changed:
            self.list_candidates()
        if not self._open_b() or st.n_steps == 0:
            self.plots.visible = False
            return
        a, b = st.trace, self._b
        if (changed == {"version"} and "a" in self._totals and "running" in (st.status, b.status)
                and time.monotonic() - self._summed_at < LIVE_SECONDS):
            return  # a live run: its new steps join the totals at the next beat after LIVE_SECONDS
        try:
            sites = comparable_sites(a, b)
        except WorkbenchError as e:
            self.note(f"{e}: choose another trace", "warning")
            self.plots.visible = False
            return
        if list(self.site.options) != sites:
            self._quiet = True
            try:
                self.site.param.update(options=sites, value=self.site.value if self.site.value in sites else
                                       ("mlp.act.post" if "mlp.act.post" in sites else sites[0]))
            finally:
                self._quiet = False
        if not self._sum(a, b, sites):
            self.plots.visible = False
            return
        self.plots.visible = True
        if not changed <= {"layer", "density"}:  # these move only the histograms, the cursor and the table's shading
            self._draw_runs(a, b)
            self._draw_heads(a, b)
        self._draw_hist()
        self._draw_layers()
        self._draw_table()

    def _sum(self, a, b, sites: list[str]) -> bool:
        """Bring both runs' totals up to their committed steps; False (with a note) if one has none."""
        key = (id(a), id(b), self.steps.value, tuple(sites))
        if self._totals.get("key") != key:
            self._totals = {"key": key, "a": RunTotals(a, self.steps.value, sites),
                            "b": RunTotals(b, self.steps.value, sites)}
        for k in ("a", "b"):
            self._totals[k].update()
        self._summed_at = time.monotonic()
        missing = [k for k in ("a", "b") if self._totals[k].summary is None]
        if missing:
            self.note(f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no "
                      f"{self.steps.value} steps committed yet")
            return False
        return True

    def _summary(self, k: str) -> xr.Dataset:
        return self._totals[k].summary

    def _draw_runs(self, a, b) -> None:
        st = self.state
        lines = []
        for k, tr in (("a", a), ("b", b)):
            meta = tr.metadata
            prompts = list(meta.get("prompts") or [])
            prompt = repr(prompts[min(st.seq, len(prompts) - 1)]) if prompts else "?"
            if len(prompt) > 70:
                prompt = prompt[:67] + "..."
            arm = meta.get("arm")
            arm_text = f"ARM on layers {list(arm.get('layers', []))}" if arm else "ARM off"
            tp = (f" · TP {tr.spec.world} ({html.escape(str(meta.get('tp_algorithm', 'allreduce')))})"
                  if tr.spec.world > 1 else "")
            name = self._name_of(Path(tr.path)) if k == "a" else self.other.value
            lines.append(f"<span style='color:{COLORS[k]};font-weight:700'>{k}</span> "
                         f"<b>{html.escape(name)}</b> · {html.escape(prompt)} · {arm_text}{tp} · "
                         f"{tr.n_steps} steps, {self._totals[k].n_summed} summed ({self.steps.value})")
        ms = {k: median_decode_ms(tr) for k, tr in (("a", a), ("b", b))}
        if all(np.isfinite(v) for v in ms.values()):
            lines.append(f"<span style='color:#5c677a'>median decode step: a {ms['a']:.3f} ms, b {ms['b']:.3f} ms "
                         f"(b / a = {ms['b'] / ms['a']:.2f})</span>")
        text = text_divergence(self._text("a", a), self._text("b", b))
        seq = f"sequence {st.seq}: " if a.spec.n_seq > 1 or b.spec.n_seq > 1 else ""
        lines.append(f"<span style='color:#5c677a'>{seq}{text}</span>")
        self.runs.object = "<div style='font-size:13px;line-height:1.6'>" + "<br>".join(lines) + "</div>"

    def _text(self, k: str, trace):
        """Run ``k``'s text of the selected sequence (b's last one if it has fewer)."""
        return self._texts[k].read(trace, min(self.state.seq, trace.spec.n_seq - 1))

    def _name_of(self, path: Path) -> str:
        for name, p in self.candidates.items():
            if Path(p).resolve() == path.resolve():
                return name
        return path.name

    def _draw_hist(self) -> None:
        st = self.state
        site = self.site.value
        edges = np.asarray(self.state.trace.spec.bin_edges, dtype=np.float64)
        lo, hi = bin_geometry(edges)
        fracs = {k: np.nan_to_num(self._summary(k)["hist_fraction"].sel(layer=st.layer, site=site).values)
                 for k in COLORS}
        tops = {k: per_unit(f, lo, hi) if self.density.value else f for k, f in fracs.items()}
        positive = np.concatenate([t[t > 0] for t in tops.values()])
        floor = float(positive.min()) / 2 if positive.size else 1e-6
        for k, f in fracs.items():
            keep = f > 0
            self.hist_sources[k].data = dict(left=lo[keep].tolist(), right=hi[keep].tolist(),
                                             top=tops[k][keep].tolist(), bottom=[floor] * int(keep.sum()),
                                             share=f[keep].tolist())
        what = "share of values per unit" if self.density.value else "share of values per bin"
        self.hist.yaxis.axis_label = what + (" of activation" if self.density.value else "")
        self.hist.title.text = f"layer {st.layer} · {site} · {self.steps.value} steps · {what}"

    def _draw_layers(self) -> None:
        st = self.state
        stat, site = self.stat.value, self.site.value
        for k in COLORS:
            values = self._summary(k)[stat].sel(site=site)
            self.layer_sources[k].data = dict(layer=[int(v) for v in values["layer"].values],
                                              value=finite_floats(values.values))
        self.by_layer.title.text = f"{STATS[stat]} across layers · {site}"
        self.layer_cursor.location = st.layer

    def _draw_table(self) -> None:
        st = self.state
        site = self.site.value
        sa, sb = self._summary("a").sel(site=site), self._summary("b").sel(site=site)
        head = "".join(f"<th colspan='3'>{html.escape(STATS[s])}</th>" for s in TABLE_STATS)
        sub = "".join(f"<th style='color:{COLORS['a']}'>a</th><th style='color:{COLORS['b']}'>b</th><th>b - a</th>"
                      for _ in TABLE_STATS)
        rows = []
        for layer in sa["layer"].values:
            cells = []
            for s in TABLE_STATS:
                va, vb = float(sa[s].sel(layer=layer)), float(sb[s].sel(layer=layer))
                cells += [_num(va), _num(vb), _num(vb - va, signed=True)]
            style = " style='background:#fff4d6'" if int(layer) == st.layer else ""
            rows.append(f"<tr{style}><td>{int(layer)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        self.table.object = (
            "<style>.wb-cmp td,.wb-cmp th{padding:1px 8px;text-align:right;font-size:12px}"
            ".wb-cmp th{color:#24415f;font-weight:600}</style>"
            f"<div style='font-size:12px;color:#5c677a'>{html.escape(site)}, per layer (selected layer shaded); "
            "near-zero counts |x| &lt; the eps each run recorded with (ARM's own where it ran), so compare it "
            "across runs only where both used the same eps</div>"
            f"<table class='wb-cmp'><tr><th>layer</th>{head}</tr><tr><th></th>{sub}</tr>{''.join(rows)}</table>")


    def _scores_of(self, k: str, trace) -> tuple | None:
        """The shown head score of every recorded head after the trace's last committed step (cached
        per step and score)."""
        seq = min(self.state.seq, trace.spec.n_seq - 1)
        key = (id(trace), int(trace.n_steps), seq, self.head_score.value)
        cached = self._head_scores.get(k)
        if cached is None or cached[0] != key:
            scores = None
            if has_attention_maps(trace) and trace.n_steps > 0:
                scores = all_head_scores(trace, seq, int(trace.n_steps) - 1, self._text(k, trace),
                                         [self.head_score.value])
            self._head_scores[k] = (key, scores)
        return self._head_scores[k][1]

    def _draw_heads(self, a, b) -> None:
        if self.head_score.value == "weights":
            self._draw_weights_change(a, b)
            return
        sa, sb = self._scores_of("a", a), self._scores_of("b", b)
        shown = sa is not None and sb is not None and sa[1:3] == sb[1:3]
        # the figure's visibility, not its pane's: a Bokeh pane shown again fails to sync in a served page
        self.heads_fig.visible = self.head_score.visible = shown
        if not shown:
            self.heads_note.object = ("<span style='font-size:12px;color:#6b7688'>head scores: "
                                      + ("the runs recorded different layers or heads" if sa and sb else
                                         "attention maps are not recorded in both runs") + "</span>")
            return
        score = self.head_score.value
        va, vb = sa[0][score], sb[0][score]
        layers, heads = sa[1], sa[2]
        delta = vb - va
        grid_l, grid_h = np.meshgrid(np.arange(len(layers)), np.arange(len(heads)), indexing="ij")
        finite = np.abs(delta[np.isfinite(delta)])
        top = float(max(finite.max(), 1e-6)) if finite.size else 1.0
        self.head_mapper.update(low=-top, high=top)
        small = delta.size <= 256
        digits = label_digits(top)
        self.head_source.data = dict(
            layer=[layers[i] for i in grid_l.ravel()], head=[heads[j] for j in grid_h.ravel()],
            a=[float(v) for v in va.ravel()], b=[float(v) for v in vb.ravel()],
            delta=finite_floats(delta),
            label=[f"{v:+.{digits}f}" if small and np.isfinite(v) else "" for v in delta.ravel()],
            ink=["#ffffff" if np.isfinite(v) and abs(v) > 0.6 * top else "#1d1d1d" for v in delta.ravel()])  # dark ends
        fit_head_matrix(self.heads_fig, layers, heads)
        self.heads_fig.title.text = f"{HEAD_SCORES[score]}, b - a, after each run's last step"
        where = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(delta), np.abs(delta), -1))), delta.shape)
        self.heads_note.object = (
            f"<span style='font-size:12px;color:#6b7688'>largest change: layer {layers[where[0]]} head "
            f"{heads[where[1]]}, {va[where]:.3f} → {vb[where]:.3f} ({delta[where]:+.3f}); scores over each run's "
            f"latest 256 query rows (red: higher in b, blue: lower)</span>")

    def _draw_weights_change(self, a, b) -> None:
        """The head matrix of the largest change of each head's attention weights over the tokens
        both runs share."""
        shown = attention_comparable(a, b)
        key = (id(a), int(a.n_steps), id(b), int(b.n_steps), self.state.seq)
        if shown and self._head_scores.get("weights", (None,))[0] != key:
            texts = (self._text("a", a), self._text("b", b))
            self._head_scores["weights"] = (key, attention_change(a, b, self.state.seq, GRID_ROWS, texts))
        result = self._head_scores["weights"][1] if shown else None
        self.heads_fig.visible = shown and result is not None
        if not shown or result is None:
            self.heads_note.object = ("<span style='font-size:12px;color:#6b7688'>attention weights: " + (
                "the runs share no token, so no query row compares" if shown else
                "not recorded in both runs, or for different layers or heads") + "</span>")
            return
        change = result.values
        first, last, n = (result.attrs[k] for k in ("first_query", "last_query", "shared_tokens"))
        layers = [int(v) for v in result["layer"].values]
        heads = [int(v) for v in result["head"].values]
        grid_l, grid_h = np.meshgrid(np.arange(len(layers)), np.arange(len(heads)), indexing="ij")
        finite = change[np.isfinite(change)]
        top = float(max(finite.max(), 1e-9)) if finite.size else 1.0
        self.head_mapper.update(low=-top, high=top)
        small = change.size <= 256
        label = (lambda v: f"{v:.0e}") if top < 1e-3 else (lambda v: f"{v:.{label_digits(top)}f}")
        self.head_source.data = dict(
            layer=[layers[i] for i in grid_l.ravel()], head=[heads[j] for j in grid_h.ravel()],
            a=[float("nan")] * change.size, b=[float("nan")] * change.size, delta=finite_floats(change),
            label=[label(v) if small and np.isfinite(v) else "" for v in change.ravel()],
            ink=["#ffffff" if np.isfinite(v) and v > 0.6 * top else "#1d1d1d" for v in change.ravel()])
        fit_head_matrix(self.heads_fig, layers, heads)
        self.heads_fig.title.text = f"{WEIGHTS_CHANGE}, over the tokens both runs share"
        where = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(change), change, -1))), change.shape)
        self.heads_note.object = (
            f"<span style='font-size:12px;color:#6b7688'>largest: layer {layers[where[0]]} head {heads[where[1]]}, "
            f"|b - a| = {change[where]:.3g}, over query rows {first}–{last} (the latest of the {n} tokens both runs "
            f"share); 0 where a head's inputs did not change</span>")


def label_digits(largest: float) -> int:
    """Decimals that give the largest of some numbers two significant digits (2 to 4): small head
    score changes (a sink moving by 0.006) would all read +0.00 otherwise."""
    if not np.isfinite(largest) or largest <= 0:
        return 2
    return int(np.clip(1 - np.floor(np.log10(largest)), 2, 4))


def _num(x: float, signed: bool = False) -> str:
    if not np.isfinite(x):
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"
