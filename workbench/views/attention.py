"""Attention view: the selected layer and head as a heatmap with token labels, all heads of the layer
as small multiples (sortable by a score computed from the recorded maps; click one to open it). Perceiver
cross-attention has its own view (``cross_attention.py``), shown as a tab when the trace has it.

Only the selected slices are read: one (seq, layer, head) map cut at the selected step for the big
heatmap, the layer's heads for the grid. Large maps are max-pooled to at most 512 x 512 for display.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import BoxAnnotation, ColumnDataSource, LinearColorMapper, Range1d
from bokeh.plotting import figure

from workbench.trace import has_attention_maps
from workbench.views.base import TraceView
from workbench.views.heatmap import NAN_COLOR, PALETTE, Heatmap, color_high, max_pool
from workbench.views.tokens import SequenceText

# Query rows the head grid and its scores look at: the most recent ones up to the selected step.
GRID_ROWS = 256
SCORES = {
    "head": "head index",
    "previous": "previous-token score",
    "induction": "induction score",
    "sink": "first-token (sink) score",
    "self": "self (diagonal) score",
    "entropy": "entropy (bits; low: focused)",
}


def maps_to_draw(view) -> bool:
    """True if ``view``'s trace has attention maps and a committed step; if the run recorded none,
    the view's note says so."""
    st = view.state
    if not has_attention_maps(st.trace):
        view.note("this run recorded no attention maps (its probes left them out)")
        return False
    return st.n_steps > 0


def query_range(trace, seq: int, step: int) -> tuple[int, int]:
    """Query positions [start, stop) processed at ``step``."""
    ds = trace.tokens
    return int(ds["query_start"][seq, step].values), int(ds["query_stop"][seq, step].values)


def recorded_index(coord, value: int, what: str) -> int:
    """Index of global id ``value`` in a coordinate of recorded ids, or a clear error."""
    values = [int(v) for v in np.asarray(coord)]
    if value not in values:
        shown = ", ".join(map(str, values[:16])) + (" ..." if len(values) > 16 else "")
        raise LookupError(f"{what} {value} was not recorded (recorded: {shown})")
    return values.index(value)


def attention_map(trace, seq: int, layer: int, head: int, step: int) -> np.ndarray:
    """Attention weights [query, key] of one head as they stand after ``step`` (rows 0..stop-1)."""
    ds = trace.attention
    li = recorded_index(ds["layer"].values, layer, "layer")
    hi = recorded_index(ds["head"].values, head, "head")
    _, stop = query_range(trace, seq, step)
    w = ds["weights"][seq, li, hi, :stop, :stop].values
    return np.asarray(w, dtype=np.float32)


def map_window(trace, seq: int, step: int, rows: int = GRID_ROWS,
               positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The absolute positions of the last ``rows`` query rows after ``step`` and of their keys, and
    the end of the stored key range. ``positions``: the sequence's own positions
    (``TokenText.positions``); other positions (padding of a shorter prompt, positions past a
    finished sequence) are left out."""
    _, stop = query_range(trace, seq, step)
    keys = np.arange(stop) if positions is None else np.asarray(positions, dtype=np.int64)
    keys = keys[keys < stop]
    queries = keys[-rows:] if rows else keys[:0]
    return queries, keys, stop


def layer_maps(trace, seq: int, layer: int, step: int, rows: int = GRID_ROWS,
               positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last ``rows`` query rows of every recorded head of ``layer`` after ``step`` (``map_window``).

    Returns maps [head, row, key], the absolute positions of the rows and those of the keys.
    """
    ds = trace.attention
    li = recorded_index(ds["layer"].values, layer, "layer")
    queries, keys, stop = map_window(trace, seq, step, rows, positions)
    if not len(queries):
        return np.zeros((len(ds["head"]), 0, len(keys)), np.float32), queries, keys
    first = int(queries[0])
    w = np.asarray(ds["weights"][seq, li, :, first:stop, :stop].values, dtype=np.float32)
    return w[:, queries - first][:, :, keys], queries, keys


def head_scores(maps: np.ndarray, rows: np.ndarray, token_ids: np.ndarray,
                which: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Per-head scores from attention rows: maps [head, row, key] (any float dtype), rows = absolute
    query positions; ``which`` scores (default: all of them).

    previous: mean weight on the previous position; sink: mean weight on position 0; self: on the
    diagonal; induction: mean weight on the token after an earlier occurrence of the current token
    (averaged over rows that have such an occurrence); entropy: mean over rows of -sum w log2 w, in
    bits (0: all weight on one key). NaN (future) cells count as 0.
    """
    want = set(SCORES) - {"head"} if which is None else set(which)
    n_heads, n_rows, n_keys = maps.shape
    out = {}
    r = np.arange(n_rows)

    def mean_at(row_idx, key_idx) -> np.ndarray:  # mean weight of each head at (row, key) pairs
        if not len(row_idx):
            return np.zeros(n_heads)
        return np.nan_to_num(maps[:, row_idx, key_idx].astype(np.float64)).mean(axis=1)

    if "previous" in want:
        has_prev = rows >= 1
        out["previous"] = mean_at(r[has_prev], rows[has_prev] - 1)
    if "sink" in want:
        out["sink"] = mean_at(r, np.zeros(n_rows, dtype=np.int64)) if n_keys else np.zeros(n_heads)
    if "self" in want:
        in_range = rows < n_keys
        out["self"] = mean_at(r[in_range], rows[in_range])
    if "entropy" in want:
        w = np.asarray(maps, dtype=np.float32)
        w = np.where(np.isnan(w), np.float32(0), w)  # (nan_to_num also scans for infinities: slower)
        logs = np.zeros_like(w)
        np.log2(w, out=logs, where=w > 0)  # 0 log 0 = 0
        out["entropy"] = -(w * logs).sum(axis=2).mean(axis=1) if n_rows else np.zeros(n_heads)
    if "induction" in want:
        out["induction"] = np.zeros(n_heads)
        ids = np.asarray(token_ids)[:n_keys]
        if ids.size == n_keys and n_keys > 1 and n_rows:
            cur = ids[np.minimum(rows, n_keys - 1)]
            same = cur[:, None] == ids[None, :]                # [row, key j]: token j equals current token
            target = np.zeros_like(same)
            target[:, 1:] = same[:, :-1]                       # the token right after that occurrence
            target &= np.arange(n_keys)[None, :] < rows[:, None]  # strictly earlier than the query
            valid = target.any(axis=1)
            if valid.any():  # the targets are few: sum their weights per row, not a dense product
                ri, ki = np.nonzero(target)
                weights = np.nan_to_num(maps[:, ri, ki].astype(np.float64))  # [head, targets]
                per_row = np.stack([np.bincount(ri, weights=wh, minlength=n_rows) for wh in weights])
                out["induction"] = per_row[:, valid].mean(axis=1)
    return out


class HeadGrid:
    """All heads of a layer as small multiples in ONE Bokeh figure (one image glyph with a row per
    head), so a layer switch refills one data source instead of building a figure per head. A tap
    on a tile reports its head through ``on_pick``."""

    TILE, GAP, LABEL = 1.0, 0.1, 0.22

    def __init__(self, on_pick, cols: int = 4, tile_px: int = 118) -> None:
        self.cols, self.tile_px, self.on_pick = cols, tile_px, on_pick
        self.heads: list[int] = []
        self.images = ColumnDataSource(name="attention-grid-source",
                                       data=dict(image=[], x=[], y=[], dw=[], dh=[]))
        self.labels = ColumnDataSource(data=dict(x=[], y=[], text=[], color=[]))
        self.frames = ColumnDataSource(data=dict(x=[], y=[], color=[], width=[]))
        self.mapper = LinearColorMapper(palette=PALETTE, low=0, high=1, nan_color=NAN_COLOR)
        self.figure = figure(tools="tap", toolbar_location=None, name="attention-grid", min_border=4,
                             x_range=Range1d(0, 1), y_range=Range1d(1, 0), width=10, height=10)
        self.figure.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.images, color_mapper=self.mapper)
        self.figure.rect(x="x", y="y", width=self.TILE, height=self.TILE, source=self.frames, fill_alpha=0,
                         line_color="color", line_width="width")
        self.figure.text(x="x", y="y", text="text", source=self.labels, text_font_size="11px",
                         text_color="color", text_baseline="bottom")
        self.figure.axis.visible = False
        self.figure.grid.visible = False
        self.figure.outline_line_color = None
        self.figure.on_event(Tap, self._tapped)

    def _origin(self, slot: int) -> tuple[float, float]:
        r, c = divmod(slot, self.cols)
        return c * (self.TILE + self.GAP), r * (self.TILE + self.GAP + self.LABEL) + self.LABEL

    def show(self, maps: list[np.ndarray], heads: list[int], titles: list[str], selected: int) -> None:
        """Draw ``maps`` (one per tile, in display order) for global ``heads``."""
        n = len(maps)
        rows = max(1, -(-n // self.cols))
        cols = min(self.cols, max(n, 1))
        width = cols * (self.TILE + self.GAP)
        height = rows * (self.TILE + self.GAP + self.LABEL)
        images, xs, ys = [], [], []
        for slot, m in enumerate(maps):
            pooled, _, _ = max_pool(m, 96)
            top = color_high(pooled)
            images.append(np.clip(pooled / top, 0, 1).astype(np.float32))  # each tile on its own scale
            x, y = self._origin(slot)
            xs.append(x)
            ys.append(y + self.TILE)  # an image's y is its bottom edge; the y axis points down
        self.heads = list(heads)
        self.images.data = dict(image=images, x=xs, y=[y - self.TILE for y in ys], dw=[self.TILE] * n,
                                dh=[self.TILE] * n)
        self.labels.data = dict(x=xs, y=[y - self.TILE - 0.02 for y in ys], text=titles,
                                color=["#b07d00" if h == selected else "#3d4758" for h in heads])
        self.frames.data = dict(x=[x + self.TILE / 2 for x in xs], y=[y - self.TILE / 2 for y in ys],
                                color=["#e0a100" if h == selected else "#c9d1dd" for h in heads],
                                width=[3 if h == selected else 1 for h in heads])
        self.figure.x_range.update(start=-0.02, end=width)
        self.figure.y_range.update(start=height, end=-0.02)
        self.figure.width = int(cols * self.tile_px * (1 + self.GAP)) + 8
        self.figure.height = int(rows * self.tile_px * (1 + self.GAP + self.LABEL)) + 8

    def highlight(self, selected: int) -> None:
        """Move the selection frame without touching the images."""
        heads = self.heads
        self.frames.patch({"color": [(i, "#e0a100" if h == selected else "#c9d1dd") for i, h in enumerate(heads)],
                           "width": [(i, 3 if h == selected else 1) for i, h in enumerate(heads)]})
        self.labels.patch({"color": [(i, "#b07d00" if h == selected else "#3d4758") for i, h in enumerate(heads)]})

    def head_at(self, x: float, y: float) -> int | None:
        """The head whose tile contains data point (x, y), or None."""
        c = int(x // (self.TILE + self.GAP))
        r = int((y - self.LABEL) // (self.TILE + self.GAP + self.LABEL)) if y >= self.LABEL else -1
        slot = r * self.cols + c
        if r < 0 or not 0 <= c < self.cols or slot >= len(self.heads):
            return None
        return self.heads[slot]

    def _tapped(self, event) -> None:
        head = self.head_at(event.x, event.y)
        if head is not None:
            self.on_pick(head)


class AttentionView(TraceView):
    """Heatmap of the selected head and the grid of the layer's heads."""

    watch_params = ("trace", "step", "seq", "layer", "head")

    def build(self):
        self.main = Heatmap(title="attention", width=560, height=540, name="attention-main")
        self.step_box = BoxAnnotation(fill_color="#35c0ff", fill_alpha=0.10, line_color="#35c0ff",
                                      line_alpha=0.8, line_width=1)
        self.main.figure.add_layout(self.step_box)
        self.sort = pn.widgets.Select(label="sort heads by", options={v: k for k, v in SCORES.items()},
                                      value="head", width=220)
        self.sort.param.watch(lambda e: self._safe_redraw({"sort"}), "value")
        self.grid = HeadGrid(on_pick=self._open_head)
        self.score_note = pn.pane.HTML("", margin=(0, 10))
        self._text = SequenceText()
        self._last_grid: tuple | None = None
        return pn.Column(
            pn.Row(pn.pane.Bokeh(self.main.figure),
                   pn.Column(pn.Row(pn.pane.HTML("<b>All heads of the layer</b><br>"
                                                 "<span style='color:#6b7688'>click a head to open it</span>"),
                                    self.sort),
                             pn.pane.Bokeh(self.grid.figure), self.score_note)),
            sizing_mode="stretch_width")

    # ---------------------------------------------------------------- drawing
    def redraw(self, changed: set[str]) -> None:
        st = self.state
        if not maps_to_draw(self):
            return
        text = self._text.read(st.trace, st.seq)  # the sequence's own positions: padding left out
        m = attention_map(st.trace, st.seq, st.layer, st.head, st.step)
        keep = text.positions_before(m.shape[0])  # the sequence's own rows and keys, no padding
        m = m[np.ix_(keep, keep)]
        labels = text.texts[:len(keep)]
        qs, qe = query_range(st.trace, st.seq, st.step)
        self.shown_positions = keep
        self.main.show(m, labels, labels, title=f"layer {st.layer} · head {st.head} · step {st.step}",
                       x_positions=keep, y_positions=keep)
        self.step_box.update(top=int(np.searchsorted(keep, qs)), bottom=int(np.searchsorted(keep, qe)),
                             left=0, right=m.shape[1])
        grid_key = (id(st.trace), st.n_steps, st.seq, st.layer, st.step, self.sort.value)
        if grid_key != self._last_grid:
            self._draw_grid(text)
            self._last_grid = grid_key
        else:
            self.grid.highlight(st.head)

    def _draw_grid(self, text) -> None:
        st = self.state
        ds = st.trace.attention
        heads = [int(h) for h in ds["head"].values]
        maps, rows, keys = layer_maps(st.trace, st.seq, st.layer, st.step, positions=np.asarray(text.positions))
        # Scores on the sequence's own tokens: "previous" of the first generated token is the last
        # prompt token even when padding sat between them.
        key = self.sort.value
        # The cheap scores always (self.scores), entropy and induction only to sort by them.
        which = {"previous", "sink", "self"} | ({key} if key != "head" else set())
        scores = head_scores(maps, np.searchsorted(keys, rows), np.asarray(text.ids[:len(keys)]), which)
        order = list(range(len(heads)))
        if key != "head":  # highest first; for entropy the most focused (lowest) first
            order.sort(key=lambda i: float(scores[key][i]) * (1 if key == "entropy" else -1))
        titles = [f"head {heads[i]}" + ("" if key == "head" else f" · {scores[key][i]:.2f}") for i in order]
        self.grid.show([maps[i] for i in order], [heads[i] for i in order], titles, st.head)
        self.scores = {k: {heads[i]: float(v[i]) for i in range(len(heads))} for k, v in scores.items()}
        first, last = (int(rows[0]), int(rows[-1])) if len(rows) else (0, -1)
        self.score_note.object = (f"<span style='color:#6b7688;font-size:12px'>thumbnails and scores use query rows "
                                  f"{first}–{last} (the latest {len(rows)}); each tile has its own "
                                  f"colour scale</span>")

    def _open_head(self, head: int) -> None:
        self.state.head = int(head)
