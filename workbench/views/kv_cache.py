"""KV cache view: tokens, blocks and bytes (used vs reserved) against step, per layer and total;
and the attention mass each cached position receives at the selected step (sinks, heavy hitters).

Occupancy is summed over ranks (each rank caches its own heads). New steps are streamed into the
line sources; nothing already drawn is re-sent.
"""
from __future__ import annotations

import numpy as np
import panel as pn
from bokeh.models import (AdaptiveTicker, BasicTicker, BasicTickFormatter, ColumnDataSource, HoverTool,
                          NumeralTickFormatter, Span)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from workbench.views.base import TraceView
from workbench.views.tokens import SequenceText

METRICS = {"bytes": "bytes used / reserved", "tokens": "cached tokens", "blocks": "blocks in use"}
HEAVY_FRACTION = 0.05   # the top 5 % of positions by mass are marked as heavy hitters


def occupancy(trace, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    """KV occupancy summed over ranks for steps [start, stop): arrays [step, layer] per metric."""
    ds = trace.kv_cache
    stop = int(trace.n_steps) if stop is None else stop
    out = {}
    for name in ("tokens", "blocks", "bytes_used", "bytes_reserved"):
        v = np.asarray(ds[name][start:stop].values, dtype=np.float64)  # [step, layer, rank]
        v[v < 0] = np.nan  # unwritten (fill -1)
        out[name] = np.nansum(v, axis=2) if v.size else np.zeros((0, ds.sizes["layer"]))
    return out


def attention_mass(trace, seq: int, layer: int, step: int, accumulate: bool = False) -> np.ndarray:
    """Attention mass received per cached position at ``step`` (summed over ranks), or summed over
    steps 0..step when ``accumulate`` (the heavy-hitter score of H2O-style eviction)."""
    ds = trace.kv_cache
    steps = slice(0, step + 1) if accumulate else slice(step, step + 1)
    m = np.asarray(ds["attention_mass"][seq, steps, layer].values, dtype=np.float64)  # [step, rank, pos]
    return np.nansum(m, axis=(0, 1))


class KVCacheView(TraceView):
    """Cache growth against step and attention mass per cached position."""

    watch_params = ("trace", "step", "seq", "layer", "version")

    def build(self):
        self.metric = pn.widgets.RadioButtonGroup(options={v: k for k, v in METRICS.items()}, value="bytes",
                                                  color="light", width=420)
        self.metric.param.watch(lambda e: self._safe_redraw({"metric"}), "value")
        self.accumulate = pn.widgets.Checkbox(label="sum over steps 0..selected (heavy-hitter score)", value=False)
        self.accumulate.param.watch(lambda e: self._safe_redraw({"accumulate"}), "value")
        self.growth = figure(height=300, width=620, title="KV cache against step", tools="pan,wheel_zoom,box_zoom,reset,save",
                             x_axis_label="step", name="kv-growth")
        self.growth_source = ColumnDataSource(data=self._empty_growth(0))
        self.cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        self.growth.add_layout(self.cursor)
        self._lines_for = -1
        self._n_drawn = 0
        self.mass_source = ColumnDataSource(data=dict(position=[], mass=[], color=[], text=[]))
        self.mass = figure(height=300, width=620, tools="pan,wheel_zoom,box_zoom,reset,save",
                           title="attention mass received per cached position", x_axis_label="position",
                           name="kv-mass")
        self.mass.vbar(x="position", top="mass", width=0.9, color="color", source=self.mass_source)
        self.mass.add_tools(HoverTool(tooltips=[("position", "@position"), ("token", "@text"),
                                                ("mass", "@mass{0.000}")]))
        self.mass.y_range.start = 0
        self.mass_note = pn.pane.HTML("", margin=(0, 10))
        self._text = SequenceText()
        return pn.Column(
            pn.Row(self.metric), pn.pane.Bokeh(self.growth),
            pn.Row(self.accumulate), pn.pane.Bokeh(self.mass), self.mass_note, sizing_mode="stretch_width")

    @staticmethod
    def _empty_growth(n_layers: int) -> dict:
        cols = {"step": [], "total_used": [], "total_reserved": []}
        for i in range(n_layers):
            cols[f"used_{i}"] = []
            cols[f"reserved_{i}"] = []
        return cols

    def _make_lines(self, n_layers: int) -> None:
        fig = self.growth
        fig.renderers = []
        for legend in fig.legend:   # items of removed lines would keep them alive in the legend
            legend.items = []
        fig.tools = [t for t in fig.tools if not isinstance(t, HoverTool)]
        src = self.growth_source
        src.data = self._empty_growth(n_layers)
        for i in range(n_layers):
            color = Category10_10[i % 10]
            fig.line("step", f"used_{i}", source=src, color=color, line_width=1, alpha=0.75,
                     legend_label=f"layer {i}", name=f"layer{i}")
        fig.line("step", "total_reserved", source=src, color="#1d2330", line_width=2, line_dash="dashed",
                 legend_label="total reserved", name="total_reserved")
        fig.line("step", "total_used", source=src, color="#1d2330", line_width=3, legend_label="total",
                 name="total")
        fig.legend.location = "top_left"
        fig.legend.click_policy = "hide"
        fig.legend.label_text_font_size = "10px"
        fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("total", "@total_used{0,0}"),
                                          ("reserved", "@total_reserved{0,0}")], mode="vline",
                                renderers=[r for r in fig.renderers if r.name == "total"]))
        self._lines_for = n_layers
        self._n_drawn = 0

    def clear(self) -> None:
        self._lines_for = -1
        self.growth_source.data = self._empty_growth(0)
        self.mass_source.data = dict(position=[], mass=[], color=[], text=[])

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        n_layers = int(st.trace.kv_cache.sizes["layer"])
        if "trace" in changed or "metric" in changed or self._lines_for != n_layers:
            self._make_lines(n_layers)
        self._stream_growth()
        self.cursor.location = st.step
        self._draw_mass()

    def _stream_growth(self) -> None:
        st = self.state
        n = st.n_steps
        if n <= self._n_drawn:
            return
        occ = occupancy(st.trace, self._n_drawn, n)
        metric = self.metric.value
        used = occ["bytes_used"] if metric == "bytes" else occ[metric]
        reserved = occ["bytes_reserved"] if metric == "bytes" else used
        new = {"step": list(range(self._n_drawn, n)), "total_used": used.sum(axis=1).tolist(),
               "total_reserved": reserved.sum(axis=1).tolist()}
        for i in range(self._lines_for):
            new[f"used_{i}"] = used[:, i].tolist()
            new[f"reserved_{i}"] = reserved[:, i].tolist()
        self.growth_source.stream(new)
        self._n_drawn = n
        if self.growth.yaxis.axis_label != metric:  # once per metric, not a new model every tick
            self.growth.yaxis.axis_label = metric
            if metric == "bytes":  # "32 KiB, 64 KiB", not "1.200e+5" nor "19.5 KiB, 39.1 KiB"
                self.growth.yaxis.ticker = AdaptiveTicker(base=2, mantissas=[1], min_interval=1)
                self.growth.yaxis.formatter = NumeralTickFormatter(format="0.[0] b")
            else:  # whole tokens and blocks
                self.growth.yaxis.ticker = BasicTicker(min_interval=1)
                self.growth.yaxis.formatter = BasicTickFormatter()
        self.growth.title.text = f"KV cache {METRICS[metric]} against step (lines: layers, black: total)"

    def _draw_mass(self) -> None:
        st = self.state
        if st.n_steps == 0:
            return
        mass = attention_mass(st.trace, st.seq, st.layer, st.step, self.accumulate.value)
        # Only this sequence's cached positions: keys up to the step's last query, without the
        # padding of a shorter prompt or the positions after a sequence that stopped.
        text = self._text.read(st.trace, st.seq)
        stop = min(int(st.trace.tokens["query_stop"][st.seq, st.step].values), len(mass))
        positions = text.positions_before(stop)
        mass = mass[positions]
        texts = text.texts[:len(positions)]
        n = len(mass)
        cached = int(np.count_nonzero(mass > 0))
        order = np.argsort(mass)[::-1]
        heavy = set(order[: max(1, int(round(HEAVY_FRACTION * max(cached, 1))))].tolist()) if cached else set()
        colors = ["#d9480f" if positions[i] < 4 and mass[i] >= np.median(mass[:max(cached, 1)]) * 4 else
                  "#e0a100" if i in heavy else "#5b8bd0" for i in range(n)]
        self.mass_source.data = dict(position=positions.tolist(), mass=mass.tolist(), color=colors, text=texts)
        what = "summed over steps 0.." + str(st.step) if self.accumulate.value else f"at step {st.step}"
        self.mass.title.text = f"attention mass received per cached position · layer {st.layer} · {what}"
        top = ", ".join(f"{positions[i]} ({texts[i]!r})" for i in order[:5] if mass[i] > 0)
        self.mass_note.object = (f"<span style='color:#6b7688;font-size:12px'><span style='color:#d9480f'>■</span> "
                                 f"sink (early position with ≥4× median mass) · <span style='color:#e0a100'>■</span> "
                                 f"heavy hitter (top {HEAVY_FRACTION:.0%}) · most attended: {top}</span>")
