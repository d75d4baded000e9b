"""Time view: where each step's time goes, per layer and part (attention, MLP, norm, all-reduce),
and how the parts add up across steps against the step's wall time; the rest of a step (embedding,
final norm, LM head, sampler) is the gap between the layers' sum and the wall time.
"""
from __future__ import annotations

import numpy as np
import panel as pn
from bokeh.models import BoxAnnotation, ColumnDataSource, HoverTool, Legend, LegendItem, Range1d, Span
from bokeh.plotting import figure

from workbench.views.base import TraceView

PART_COLORS = {"attention": "#4c72b0", "mlp": "#dd8452", "norm": "#55a868", "comm": "#c44e52"}
PART_LABELS = {"attention": "attention", "mlp": "MLP", "norm": "norm", "comm": "all-reduce"}


def part_ms(trace, start: int, stop: int, rank: int) -> np.ndarray:
    """Milliseconds per part of each layer [step, layer, part] of ``rank`` for steps [start, stop)
    (NaN: not recorded)."""
    return np.asarray(trace.timing["seconds"][start:stop, :, :, rank].values, dtype=np.float64) * 1e3


def wall_ms(trace, start: int, stop: int, rank: int) -> np.ndarray:
    """Wall time of each step [step] of ``rank`` in ms (NaN: not recorded)."""
    return np.asarray(trace.timing["step_seconds"][start:stop, rank].values, dtype=np.float64) * 1e3


def step_breakdown(ms: np.ndarray, wall: float, parts: list[str]) -> dict | None:
    """One step of one rank from its part times ``ms`` [layer, part] and wall time (ms): ms in the
    layers, ms per part (summed over layers), the rest of the step outside the layers, and the
    slowest layer; None if the step has no part timings."""
    if not np.isfinite(ms).any():
        return None
    per_layer = np.nansum(ms, axis=1)
    layers = float(per_layer.sum())
    return {"wall": wall, "layers": layers, "outside": wall - layers if np.isfinite(wall) else np.nan,
            "parts": dict(zip(parts, np.nansum(ms, axis=0).tolist())),
            "slowest": int(np.argmax(per_layer)), "slowest_ms": float(per_layer.max())}


class TimingView(TraceView):
    """Per-layer part times at the selected step, and the parts of every step against its wall time."""

    watch_params = ("trace", "step", "layer", "version")

    def build(self):
        self.rank = pn.widgets.Select(label="rank", options=["rank 0"], value="rank 0", width=120, visible=False)
        # (not while _setup sets the options of a newly opened trace: it draws once it is done)
        self.rank.param.watch(lambda e: self._safe_redraw({"rank"}) if self._ready_for else None, "value")
        self.summary = pn.pane.HTML("", margin=(0, 10), sizing_mode="stretch_width", css_classes=["wb-timing-summary"])
        self.layer_source = ColumnDataSource(data=dict(layer=[]))
        self.by_layer = figure(height=280, width=480, tools="save", x_axis_label="layer", y_axis_label="ms",
                               title="time per layer and part at the selected step", name="timing-layers")
        self.by_layer.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("part", "$name"), ("ms", "@$name{0.000}")]))
        self.selected_layer = BoxAnnotation(fill_color="#e0a100", fill_alpha=0.12, line_color=None)
        self.by_layer.add_layout(self.selected_layer)
        self.step_source = ColumnDataSource(data=dict(step=[], wall=[]))
        self.over_steps = figure(height=280, width=620, tools="xpan,xwheel_zoom,box_zoom,reset,save",
                                 x_axis_label="step", y_axis_label="ms", name="timing-steps", y_range=Range1d(0, 1),
                                 title="time per step: parts summed over layers, and the wall time")
        self.steps_hover = HoverTool(renderers=[], mode="vline")
        self.over_steps.add_tools(self.steps_hover)
        self.scale_note = pn.pane.HTML("", margin=(0, 10), css_classes=["wb-timing-scale"])
        self.cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        self.over_steps.add_layout(self.cursor)
        # Legends above the plots, made once: stacked bars and areas leave no free corner inside.
        self.layer_legend, self.steps_legend = (
            Legend(items=[], orientation="horizontal", location="top_left", click_policy="hide",
                   label_text_font_size="10px", margin=0, padding=4) for _ in range(2))
        self.by_layer.add_layout(self.layer_legend, "above")
        self.over_steps.add_layout(self.steps_legend, "above")
        self._parts: list[str] = []
        self._ready_for = None
        return pn.Column(self.rank, self.summary,
                         pn.Row(pn.pane.Bokeh(self.by_layer), pn.Column(pn.pane.Bokeh(self.over_steps), self.scale_note)),
                         sizing_mode="stretch_width")

    def _setup(self) -> None:
        st = self.state
        self._ready_for = None
        ds = st.trace.timing
        self._parts = [str(p) for p in ds["part"].values]
        n_ranks = int(ds.sizes["rank"])
        self.rank.options = [f"rank {r}" for r in range(n_ranks)]
        if self.rank.value not in self.rank.options:
            self.rank.value = "rank 0"
        self.rank.visible = n_ranks > 1
        colors = [PART_COLORS.get(p, "#888888") for p in self._parts]
        labels = [PART_LABELS.get(p, p) for p in self._parts]
        for fig in (self.by_layer, self.over_steps):
            fig.renderers = []
        self.layer_source.data = {"layer": [], **{p: [] for p in self._parts}}
        bars = self.by_layer.vbar_stack(self._parts, x="layer", width=0.8, color=colors, source=self.layer_source,
                                        line_color=None)
        self.step_source.data = {"step": [], "wall": [], **{p: [] for p in self._parts}}
        areas = self.over_steps.varea_stack(self._parts, x="step", color=colors, source=self.step_source,
                                            fill_alpha=0.85)
        wall = self.over_steps.line("step", "wall", source=self.step_source, color="#222222", line_width=1.5)
        self.steps_hover.renderers = [wall]
        self.steps_hover.tooltips = [("step", "@step"), ("wall ms", "@wall{0.000}"),
                                     *[(PART_LABELS.get(p, p), f"@{p}{{0.000}}") for p in self._parts]]
        listed = [i for i, p in enumerate(self._parts) if not (p == "comm" and n_ranks == 1)]  # 1 rank: always 0
        self.layer_legend.items = [LegendItem(label=labels[i], renderers=[bars[i]]) for i in listed]
        self.steps_legend.items = [*(LegendItem(label=labels[i], renderers=[areas[i]]) for i in listed),
                                   LegendItem(label="step wall time", renderers=[wall])]
        self._streamed = 0
        self._tops: list[float] = []  # per step: the larger of wall time and the parts' sum (ms)
        self._ready_for = (id(st.trace), self.rank.value)

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        if "trace" in changed or self._ready_for is None or self._ready_for[0] != id(st.trace):
            self._setup()
        if (id(st.trace), self.rank.value) != self._ready_for:  # another rank: stream its steps anew
            self._streamed, self._tops = 0, []
            self._ready_for = (id(st.trace), self.rank.value)
        if st.n_steps == 0:
            return
        self._stream_steps()
        self._draw_step()
        self.cursor.location = st.step

    def _rank(self) -> int:
        return int(self.rank.value.split()[1])

    def _stream_steps(self) -> None:
        st = self.state
        n, first = st.n_steps, self._streamed
        if n <= first:
            return
        ms = np.nansum(part_ms(st.trace, first, n, self._rank()), axis=1)          # [step, part]
        wall = wall_ms(st.trace, first, n, self._rank())
        # fresh lists per column: ColumnDataSource.stream extends lists in place
        new = {"step": list(range(first, n)), "wall": wall.tolist(),
               **{p: ms[:, i].tolist() for i, p in enumerate(self._parts)}}
        if first == 0:
            self.step_source.data = new
        else:
            self.step_source.stream(new)
        self._streamed = n
        self._tops.extend(np.fmax(wall, ms.sum(axis=1)).tolist())
        self._scale_to_decode_steps()

    def _scale_to_decode_steps(self) -> None:
        """The y-axis fits the decode steps: the prefill (step 0) takes many times longer, and a rare
        slow step (the machine busy elsewhere) would flatten the rest; a note below says what is cut."""
        tops = np.asarray(self._tops, dtype=np.float64)
        decode = tops[1:] if tops.size > 1 else tops
        if not np.isfinite(decode).any():
            return
        end = 1.2 * float(np.nanquantile(decode, 0.98))
        self.over_steps.y_range.end = end if end > 0 else 1.0
        cut = [f"prefill {tops[0]:.2f} ms"] if tops.size > 1 and tops[0] > end else []
        above = decode[decode > end] if tops.size > 1 else decode[:0]
        if above.size:
            cut.append(f"{above.size} decode step{'s' if above.size > 1 else ''} up to {above.max():.2f} ms")
        self.scale_note.object = (f"<div style='font-size:12px;color:#6b7385'>off the scale: {', '.join(cut)}</div>"
                                  if cut else "")

    def _draw_step(self) -> None:
        st = self.state
        rank = self._rank()
        ms = part_ms(st.trace, st.step, st.step + 1, rank)[0]                      # [layer, part]
        self.layer_source.data = {"layer": list(range(ms.shape[0])),
                                  **{p: np.nan_to_num(ms[:, i]).tolist() for i, p in enumerate(self._parts)}}
        self.selected_layer.left, self.selected_layer.right = st.layer - 0.5, st.layer + 0.5
        where = f"step {st.step}" + (f" · rank {rank}" if self.rank.visible else "")
        self.by_layer.title.text = f"time per layer and part · {where}"
        b = step_breakdown(ms, float(wall_ms(st.trace, st.step, st.step + 1, rank)[0]), self._parts)
        if b is None:
            self.summary.object = ""
            self.note("no per-layer timings at this step (recorded without the timing probe)")
            return
        shares = ", ".join(f"{PART_LABELS.get(p, p)} {v:.3f} ms ({v / b['layers']:.0%})"
                           for p, v in b["parts"].items() if v > 0)
        outside = (f" · outside the layers (embedding, final norm, LM head, sampler) {b['outside']:.3f} ms"
                   if np.isfinite(b["outside"]) else "")
        wall = f"{b['wall']:.3f} ms wall, " if np.isfinite(b["wall"]) else ""
        self.summary.object = (f"<div style='font-size:13px;color:#3d4758'>{where}: {wall}"
                               f"{b['layers']:.3f} ms in the layers ({shares}){outside} · "
                               f"slowest layer: <b>{b['slowest']}</b> ({b['slowest_ms']:.3f} ms)</div>")
