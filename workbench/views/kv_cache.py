"""KV cache view: tokens, blocks and bytes (used vs reserved) against step, per layer and total;
the attention mass each cached position receives at the selected step (sinks, heavy hitters); and
every step's share of attention per cached position, as a step x position heatmap (a sink or a
heavy hitter is a vertical stripe, attention to recent tokens the diagonal).

Occupancy is summed over ranks (each rank caches its own heads). New steps are streamed into the
line sources; nothing already drawn is re-sent. The heatmap reads only new steps, and while it
follows a live run redraws at most every ``LIVE_SECONDS``.
"""
from __future__ import annotations

import time

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import (AdaptiveTicker, BasicTicker, BasicTickFormatter, ColumnDataSource, HoverTool,
                          NumeralTickFormatter, Span, TapTool)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from workbench.trace import has_attention_maps
from workbench.views.base import TraceView, legend_outside, waits_for_live
from workbench.views.heatmap import Heatmap
from workbench.views.tokens import SequenceText

METRICS = {"bytes": "bytes used / reserved", "tokens": "cached tokens", "blocks": "blocks in use"}
HEAVY_FRACTION = 0.05   # the top 5 % of positions by mass are marked as heavy hitters
LIVE_SECONDS = 2.0      # the step x position heatmap of a live run is redrawn at most this often


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


def mass_over_steps(trace, seq: int, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Attention mass received per position at each of steps [start, stop), summed over ranks:
    [step, position]; NaN where nothing was recorded (positions not yet cached, steps or layers
    without attention maps)."""
    stop = int(trace.n_steps) if stop is None else stop
    m = np.asarray(trace.kv_cache["attention_mass"][seq, start:stop, layer].values, dtype=np.float32)  # [s, r, p]
    with np.errstate(invalid="ignore"):
        total = np.nansum(m, axis=1)
    total[np.isnan(m).all(axis=1)] = np.nan
    return total


def _pad_positions(rows: np.ndarray, width: int) -> np.ndarray:
    """``rows`` [step, position] widened to ``width`` positions with NaN (not cached then)."""
    if rows.shape[1] >= width:
        return rows
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=np.nan)


def step_shares(mass: np.ndarray) -> np.ndarray:
    """Each step's row of ``mass_over_steps`` as shares of that step's attention (rows sum to 1):
    the prefill's many query rows and a decode step's one compare on one colour scale."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return mass / np.nansum(mass, axis=1, keepdims=True)


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
        self.steps_map = Heatmap(title="each step's share of attention per position", width=620, height=420,
                                 x_name="position", y_name="step", name="kv-mass-steps", value_name="share")
        self.steps_map.figure.add_tools(TapTool())
        self.steps_map.figure.on_event(Tap, self._tapped_step)
        self.steps_cursor = Span(location=0.5, dimension="width", line_color="#e0a100", line_width=2)
        self.steps_map.figure.add_layout(self.steps_cursor)
        self.steps_map.figure.visible = False  # the figure, not its pane: a Bokeh pane shown again fails to sync
        self.steps_note = pn.pane.HTML(
            "<span style='color:#6b7688;font-size:12px'>a row per step (click one to select that step), the "
            "attention its queries paid each cached position, summed over heads and as shares of the row: a sink "
            "or a heavy hitter is a vertical stripe, attention to the newest tokens the diagonal</span>",
            margin=(0, 10), visible=False)
        self._mass_key: tuple | None = None
        self._mass_rows = np.zeros((0, 0), np.float32)  # mass_over_steps of the key's steps read so far
        self._map_drawn: tuple | None = None
        self._map_at = 0.0
        return pn.Column(
            pn.Row(self.metric), pn.pane.Bokeh(self.growth),
            pn.Row(self.accumulate), pn.pane.Bokeh(self.mass), self.mass_note,
            pn.pane.Bokeh(self.steps_map.figure), self.steps_note,
            sizing_mode="stretch_width")

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
        # beside the plot, a column per 14 layers so that the legend stays the plot's height
        legend_outside(fig, "right", ncols=1 + n_layers // 14)
        fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("total", "@total_used{0,0}"),
                                          ("reserved", "@total_reserved{0,0}")], mode="vline",
                                renderers=[r for r in fig.renderers if r.name == "total"]))
        self._lines_for = n_layers
        self._n_drawn = 0

    def clear(self) -> None:
        self._lines_for = -1
        self.growth_source.data = self._empty_growth(0)
        self.mass_source.data = dict(position=[], mass=[], color=[], text=[])
        self._mass_key = self._map_drawn = None
        self.steps_map.figure.visible = self.steps_note.visible = False

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        n_layers = int(st.trace.kv_cache.sizes["layer"])
        if "trace" in changed or "metric" in changed or self._lines_for != n_layers:
            self._make_lines(n_layers)
        self._stream_growth()
        self.cursor.location = st.step
        if st.n_steps:
            self._read_mass_rows()
            self._draw_mass()
            self._draw_steps_map(changed)

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

    def _read_mass_rows(self) -> None:
        """Bring ``_mass_rows`` (``mass_over_steps`` of the trace, sequence and layer shown) up to the
        committed steps: all of them when the key changes, else only the new ones."""
        st = self.state
        key = (id(st.trace), st.seq, st.layer)
        if key != self._mass_key:
            self._mass_key, self._mass_rows = key, mass_over_steps(st.trace, st.seq, st.layer, 0, st.n_steps)
        elif st.n_steps > len(self._mass_rows):
            new = mass_over_steps(st.trace, st.seq, st.layer, len(self._mass_rows), st.n_steps)
            # the reader cuts positions at the last committed query: later reads are wider
            width = max(self._mass_rows.shape[1], new.shape[1])
            self._mass_rows = np.concatenate([_pad_positions(self._mass_rows, width), _pad_positions(new, width)])

    def _draw_mass(self) -> None:
        """Attention mass received per cached position at the step, or summed over steps 0..step
        (the heavy-hitter score of H2O-style eviction), from the rows already read."""
        st = self.state
        rows = self._mass_rows[:st.step + 1] if self.accumulate.value else self._mass_rows[st.step:st.step + 1]
        mass = np.nansum(rows.astype(np.float64), axis=0)
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

    def _draw_steps_map(self, changed: set[str]) -> None:
        """The step x position heatmap of shares; a live run that is followed is redrawn at most
        every LIVE_SECONDS (its cursor moves at once)."""
        st = self.state
        shown = has_attention_maps(st.trace) and st.n_steps > 0  # a run without attention maps has no mass
        self.steps_map.figure.visible = self.steps_note.visible = shown
        if not shown:
            return
        self.steps_cursor.location = st.step + 0.5
        drawn = (self._mass_key, len(self._mass_rows))
        if drawn == self._map_drawn or (self._map_drawn is not None and self._map_drawn[0] == self._mass_key
                                        and waits_for_live(st, changed, {"step", "version"}, self._map_at,
                                                           LIVE_SECONDS)):
            return
        text = self._text.read(st.trace, st.seq)
        # the sequence's own positions that were ever cached (the last sampled token never was)
        last_stop = int(st.trace.tokens["query_stop"][st.seq, len(self._mass_rows) - 1].values)
        positions = text.positions_before(min(self._mass_rows.shape[1], last_stop))
        shares = step_shares(self._mass_rows)[:, positions]
        n = len(shares)
        self.steps_map.show(shares, x_labels=text.texts[:len(positions)], y_labels=[str(i) for i in range(n)],
                            x_positions=positions,
                            title=f"each step's share of attention per position · layer {st.layer} · steps 0-{n - 1}")
        self._map_drawn, self._map_at = drawn, time.monotonic()

    def _tapped_step(self, event) -> None:
        if event.y is not None and 0 <= event.y < len(self._mass_rows):
            self.state.select_step(int(event.y))
