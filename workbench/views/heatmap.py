"""A Bokeh heatmap updated in place: token-labelled axes, hover values, max-pooled when large.

One figure per heatmap for the life of the page; showing another map replaces the image data and
the axis ranges and labels, never the figure. Maps larger than ``MAX_PIXELS`` per side are
max-pooled for display (a sharp attention peak stays visible), and hover reports the pooled value.
"""
from __future__ import annotations

import numpy as np
from bokeh.models import (ColorBar, ColumnDataSource, CustomJSHover, FixedTicker, HoverTool, LinearColorMapper,
                          Range1d)
from bokeh.plotting import figure

MAX_PIXELS = 512          # longest side sent to the browser
MAX_TICK_LABELS = 40      # token labels per axis before thinning them out
PALETTE = "Magma256"
NAN_COLOR = "#eef0f4"     # masked (future) cells


def max_pool(a: np.ndarray, limit: int = MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Max-pool a 2-D array so neither side exceeds ``limit``; NaN cells count as missing.

    Returns the pooled array and the row and column factors used.
    """
    a = np.asarray(a, dtype=np.float32)
    rows, cols = a.shape
    fr, fc = max(1, -(-rows // limit)), max(1, -(-cols // limit))
    if fr == 1 and fc == 1:
        return a, 1, 1
    pr, pc = -(-rows // fr) * fr, -(-cols // fc) * fc
    padded = np.full((pr, pc), np.nan, dtype=np.float32)
    padded[:rows, :cols] = a
    blocks = padded.reshape(pr // fr, fr, pc // fc, fc)
    with np.errstate(all="ignore"):
        all_nan = np.isnan(blocks).all(axis=(1, 3))
        pooled = np.nanmax(np.where(np.isnan(blocks), -np.inf, blocks), axis=(1, 3))
    pooled[all_nan] = np.nan
    return pooled.astype(np.float32), fr, fc


def color_high(a: np.ndarray) -> float:
    """Top of the color scale: the 99th percentile of the positive cells (so one sink does not
    wash every other cell to black); hover still shows exact values."""
    v = a[np.isfinite(a) & (a > 0)]
    if v.size == 0:
        return 1.0
    return float(max(np.quantile(v, 0.99), 1e-6))


def tick_labels(labels: list[str], n: int, limit: int = MAX_TICK_LABELS) -> tuple[list[float], dict]:
    """Tick positions (cell centres) and their text for ``n`` cells, thinned to at most ``limit``."""
    stride = max(1, -(-n // limit))
    ticks = [i + 0.5 for i in range(0, n, stride)]
    overrides = {}
    for t in ticks:
        i = int(t)
        text = labels[i] if i < len(labels) else str(i)
        overrides[t] = _short(text)
    return ticks, overrides


def _short(text: str, width: int = 8) -> str:
    text = text.replace("\n", "\u21b5").replace("\t", "\u2192").replace(" ", "\u00b7")
    return text if len(text) <= width else text[: width - 1] + "\u2026"


class Heatmap:
    """A heatmap figure with an image glyph that is refilled by ``show``."""

    def __init__(self, title: str = "", width: int = 520, height: int = 520, x_name: str = "key",
                 y_name: str = "query", small: bool = False, palette: str = PALETTE, name: str | None = None,
                 value_name: str = "weight") -> None:
        self.x_name, self.y_name, self.small = x_name, y_name, small
        self.source = ColumnDataSource(name=f"{name}-source" if name else None, data=dict(image=[np.full((1, 1), np.nan, np.float32)], x=[0], y=[0],
                                                 dw=[1], dh=[1]))
        # Labels for hover: the browser looks up the token (and its absolute position) under the cursor.
        self.x_labels = ColumnDataSource(data=dict(text=[], pos=[]))
        self.y_labels = ColumnDataSource(data=dict(text=[], pos=[]))
        self.mapper = LinearColorMapper(palette=palette, low=0, high=1, nan_color=NAN_COLOR)
        tools = "tap" if small else "pan,wheel_zoom,box_zoom,reset,save"
        fig = figure(title=title, width=width, height=height, tools=tools, toolbar_location=None if small else "right",
                     x_range=Range1d(0, 1), y_range=Range1d(1, 0),
                     match_aspect=False, min_border=2 if small else 10, name=name)
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.source, color_mapper=self.mapper)
        fig.grid.visible = False
        if small:
            fig.axis.visible = False
            fig.title.text_font_size = "11px"
            fig.outline_line_color = "#c9d1dd"
        else:
            fig.xaxis.axis_label, fig.yaxis.axis_label = x_name, y_name
            fig.xaxis.major_label_orientation = 1.0
            fig.axis.major_label_text_font_size = "10px"
            fig.xaxis.ticker = FixedTicker(ticks=[])
            fig.yaxis.ticker = FixedTicker(ticks=[])
            hover_code = "const i = Math.floor(value); const t = src.data.text[i]; " \
                         "const p = src.data.pos[i] === undefined ? i : src.data.pos[i]; " \
                         "return t === undefined ? String(p) : p + ' ' + JSON.stringify(t);"
            fig.add_tools(HoverTool(tooltips=[(y_name, "$y{custom}"), (x_name, "$x{custom}"),
                                              (value_name, "@image{0.0000}")],
                                    formatters={"$x": CustomJSHover(args=dict(src=self.x_labels), code=hover_code),
                                                "$y": CustomJSHover(args=dict(src=self.y_labels), code=hover_code)}))
            fig.add_layout(ColorBar(color_mapper=self.mapper, width=10, major_label_text_font_size="9px"), "right")
        self.figure = fig

    def show(self, matrix: np.ndarray, x_labels: list[str] | None = None, y_labels: list[str] | None = None,
             title: str | None = None, x_positions=None, y_positions=None) -> None:
        """Display ``matrix`` (rows = y, columns = x); NaN cells are drawn as masked.

        ``x_positions`` / ``y_positions``: what hover reports for each column / row (e.g. absolute
        token positions when padding was left out); default the cell index.
        """
        m = np.asarray(matrix, dtype=np.float32)
        if m.ndim != 2 or m.size == 0:
            m = np.full((1, 1), np.nan, np.float32)
        rows, cols = m.shape
        pooled, _, _ = max_pool(m, 96 if self.small else MAX_PIXELS)
        self.mapper.high = color_high(pooled)
        self.source.data = dict(image=[pooled], x=[0], y=[0], dw=[cols], dh=[rows])
        fig = self.figure
        # Explicit bounds (not "auto", which BokehJS fixes at the first ranges it sees).
        fig.x_range.update(start=0, end=cols, reset_start=0, reset_end=cols, bounds=(0, cols))
        fig.y_range.update(start=rows, end=0, reset_start=rows, reset_end=0, bounds=(0, rows))
        if title is not None:
            fig.title.text = title
        if not self.small:
            xl, yl = list(x_labels or []), list(y_labels or [])
            xt, xo = tick_labels(xl, cols)
            yt, yo = tick_labels(yl, rows)
            fig.xaxis.ticker.ticks, fig.xaxis.major_label_overrides = xt, xo
            fig.yaxis.ticker.ticks, fig.yaxis.major_label_overrides = yt, yo
            self.x_labels.data = _label_data(xl, x_positions, cols)
            self.y_labels.data = _label_data(yl, y_positions, rows)


def _label_data(labels: list[str], positions, n: int) -> dict:
    """Hover columns for ``n`` cells: the label and the position each cell stands for."""
    text = labels[:n]
    given = [] if positions is None else [int(v) for v in positions]
    return dict(text=text, pos=[given[i] if i < len(given) else i for i in range(len(text))])
