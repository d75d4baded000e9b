"""Heads view: every recorded head of every layer at once, coloured by a score computed from the
recorded maps (previous-token, induction, first-token sink, self, entropy), so the heads that do
something recognisable stand out across the whole model. Click a cell to select that layer and head
(the Attention tab then shows it).

Scores are those of the attention view's head grid (``attention.head_scores``), over the latest
``GRID_ROWS`` query rows up to the selected step of the selected sequence; only the score shown
is computed. Reading every layer's maps costs about a layer switch, so the view computes only
while it is shown, and while it follows a live run at most every ``LIVE_SECONDS``.
"""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColorBar, ColumnDataSource, FixedTicker, HoverTool, LinearColorMapper, Range1d
from bokeh.plotting import figure

from workbench.views.attention import GRID_ROWS, SCORES, head_scores, map_window, maps_to_draw
from workbench.views.base import TraceView, finite_floats, waits_for_live
from workbench.views.tokens import SequenceText

HEAD_SCORES = {k: v for k, v in SCORES.items() if k != "head"}
PALETTE = "Viridis256"
LIVE_SECONDS = 2.0


def all_head_scores(trace, seq: int, step: int, text, which: Iterable[str] | None = None
                    ) -> tuple[dict[str, np.ndarray], list[int], list[int], tuple]:
    """Scores [layer, head] of every recorded layer and head (``which`` of ``HEAD_SCORES``; default
    all), the recorded layers and heads, and the (first, last) query rows they use; ``text`` is the
    sequence's TokenText. Every layer's rows are read in one call (a read per layer costs about
    twice as much), then scored a layer at a time in the stored dtype (only entropy needs every
    value as float32)."""
    ds = trace.attention
    layers = [int(v) for v in ds["layer"].values]
    heads = [int(v) for v in ds["head"].values]
    which = list(HEAD_SCORES) if which is None else list(which)
    out = {k: np.full((len(layers), len(heads)), np.nan) for k in which}
    queries, keys, stop = map_window(trace, seq, step, GRID_ROWS, np.asarray(text.positions))
    if not len(queries):
        return out, layers, heads, (0, -1)
    first = int(queries[0])
    block = ds["weights"][seq, :, :, first:stop, :stop].values  # [layer, head, row, key], as stored
    rows, ids = np.searchsorted(keys, queries), np.asarray(text.ids)[:len(keys)]
    # The sequence's own rows and keys; usually all of them (no padding): then no copy.
    whole = len(keys) == stop and len(queries) == stop - first
    for li in range(len(layers)):
        maps = block[li] if whole else block[li][:, queries - first][:, :, keys]
        scores = head_scores(maps, rows, ids, which)
        for k in which:
            out[k][li] = scores[k]
    return out, layers, heads, (int(queries[0]), int(queries[-1]))


def fit_head_matrix(fig, layers: list[int], heads: list[int]) -> None:
    """Size a layer x head matrix figure to its cells, with a tick per recorded layer and head."""
    fig.x_range.update(start=min(heads) - 0.5, end=max(heads) + 0.5)
    fig.y_range.update(start=max(layers) + 0.5, end=min(layers) - 0.5)  # layer 0 at the top
    if getattr(fig.xaxis.ticker, "ticks", None) != heads or getattr(fig.yaxis.ticker, "ticks", None) != layers:
        fig.xaxis.ticker, fig.yaxis.ticker = FixedTicker(ticks=heads), FixedTicker(ticks=layers)
    fig.width = max(360, min(1100, 56 * len(heads) + 160))
    fig.height = max(240, min(900, 44 * len(layers) + 110))


class HeadsView(TraceView):
    """A layer x head matrix of one head score; a click opens that head."""

    watch_params = ("trace", "step", "seq", "layer", "head", "version")

    def build(self):
        self.score = pn.widgets.Select(label="colour heads by", options={v: k for k, v in HEAD_SCORES.items()},
                                       value="previous", width=240, css_classes=["wb-heads-score"])
        self.score.param.watch(lambda e: self._safe_redraw({"score"}), "value")
        self.source = ColumnDataSource(name="heads-source", data=dict(layer=[], head=[], value=[], label=[], ink=[]))
        self.selected = ColumnDataSource(data=dict(layer=[], head=[]))
        self.mapper = LinearColorMapper(palette=PALETTE, low=0, high=1, nan_color="#eef0f4")
        self.figure = figure(height=320, width=560, tools="tap,save", toolbar_location="right", name="heads-matrix",
                             title="head scores", x_axis_label="head", y_axis_label="layer",
                             x_range=Range1d(-0.5, 0.5), y_range=Range1d(0.5, -0.5))
        self.figure.rect(x="head", y="layer", width=0.95, height=0.95, source=self.source,
                         fill_color={"field": "value", "transform": self.mapper}, line_color=None)
        self.figure.text(x="head", y="layer", text="label", source=self.source, text_align="center",
                         text_baseline="middle", text_font_size="10px", text_color="ink")
        self.figure.rect(x="head", y="layer", width=0.95, height=0.95, source=self.selected, fill_alpha=0,
                         line_color="#e0a100", line_width=3)
        self.figure.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("head", "@head"), ("score", "@value{0.000}")]))
        self.figure.add_layout(ColorBar(color_mapper=self.mapper, width=10), "right")
        self.figure.grid.visible = False
        self.figure.xaxis.ticker = FixedTicker(ticks=[])  # whole heads and layers only (set per trace)
        self.figure.yaxis.ticker = FixedTicker(ticks=[])
        self.figure.on_event(Tap, self._tapped)
        self.note_rows = pn.pane.HTML("", margin=(0, 10), css_classes=["wb-heads-note"])
        self._key: tuple | None = None
        self._computed_at = 0.0
        self._scores: dict[str, np.ndarray] = {}
        self._layers: list[int] = []
        self._heads: list[int] = []
        self._text = SequenceText()
        self.on_pick = None  # called after a click selected a head (the dashboard opens the Attention tab)
        return pn.Column(pn.Row(self.score), pn.pane.Bokeh(self.figure), self.note_rows, sizing_mode="stretch_width")

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        if not maps_to_draw(self):
            return
        key = (id(st.trace), st.seq, st.step, st.n_steps, self.score.value)
        if key != self._key:
            if not (self._key is not None and waits_for_live(st, changed, {"step", "version", "layer", "head"},
                                                             self._computed_at, LIVE_SECONDS)):
                text = self._text.read(st.trace, st.seq)
                self._scores, self._layers, self._heads, rows = all_head_scores(st.trace, st.seq, st.step, text,
                                                                                [self.score.value])
                self._key, self._computed_at, self._rows = key, time.monotonic(), rows
                self._shown_step = st.step
        self._draw()

    def _draw(self) -> None:
        st = self.state
        if not self._scores:
            return
        values = self._scores[self.score.value]
        layers, heads = self._layers, self._heads
        grid_l, grid_h = np.meshgrid(np.arange(len(layers)), np.arange(len(heads)), indexing="ij")
        flat = values.ravel()
        small = len(layers) * len(heads) <= 256  # room for the numbers in the cells
        finite = flat[np.isfinite(flat)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(max(finite.max(), low + 1e-6)) if finite.size else 1.0
        self.mapper.update(low=low, high=high)
        self.source.data = dict(layer=[layers[i] for i in grid_l.ravel()], head=[heads[j] for j in grid_h.ravel()],
                                value=finite_floats(flat),
                                label=[f"{v:.2f}" if small and np.isfinite(v) else "" for v in flat],
                                # dark numbers on the bright end of the palette, light ones on the dark end
                                ink=["#1d1d1d" if np.isfinite(v) and (v - low) / (high - low) > 0.6 else "#ffffff"
                                     for v in flat])
        shown = st.layer in layers and st.head in heads
        self.selected.data = dict(layer=[st.layer] if shown else [], head=[st.head] if shown else [])
        fit_head_matrix(self.figure, layers, heads)
        name = HEAD_SCORES[self.score.value]
        self.figure.title.text = f"{name} of every head · step {self._shown_step}"
        first, last = self._rows
        sign = -1 if self.score.value == "entropy" else 1  # for entropy the most focused head stands out
        lowest = "lowest" if sign < 0 else "highest"
        pick = np.unravel_index(int(np.argmax(np.where(np.isfinite(values), sign * values, -np.inf))), values.shape)
        self.note_rows.object = (
            f"<span style='font-size:12px;color:#6b7688'>{lowest}: layer {layers[pick[0]]} head {heads[pick[1]]} "
            f"({values[pick]:.3f}) · scores use query rows {first}–{last} of sequence {st.seq} (the latest "
            f"{last - first + 1}); click a cell to select that head</span>")

    def _tapped(self, event) -> None:
        if not self._layers or event.x is None or event.y is None:
            return
        head, layer = int(round(event.x)), int(round(event.y))
        if layer in self._layers and head in self._heads:
            self.state.param.update(layer=layer, head=head)
            if self.on_pick is not None:
                self.on_pick()
