"""Your probes view: a user probe's values against step, one line per hook point, and what each
hook point gave at the selected step (shown only for traces recorded with user probes).

Probes with a ``seq`` dim show the selected sequence. Ranks are combined by the chosen rule: under
tensor parallelism each rank sees its own shard, so sums over columns add up across ranks while
values of replicated tensors (the residual stream) are the same on every rank and average. Other
dims are averaged for the lines and shown whole at the selected step. New steps are streamed into
the lines; nothing already drawn is re-sent.
"""
from __future__ import annotations

import math

import numpy as np
import panel as pn
from bokeh.models import BasicTicker, ColumnDataSource, HoverTool, Span
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from workbench.views.base import TraceView, legend_outside

COMBINE = {"mean over ranks": "mean", "sum over ranks": "sum"}


def probe_values(trace, name: str, seq: int, start: int, stop: int, combine: str = "mean") -> np.ndarray:
    """Values of probe ``name`` for steps [start, stop), ranks combined: [step, hook, n] with n the
    product of its other dims (1 for a scalar); NaN where nothing was recorded."""
    da = trace.user[name][start:stop]  # (step, hook, rank, *dims)
    if "seq" in da.dims:
        da = da.isel(seq=seq)
    v = np.asarray(da.values, dtype=np.float64)
    if da.dtype.kind == "i":
        v[v == -1] = np.nan  # the fill of int64 probes
    v = v.reshape(v.shape[0], v.shape[1], v.shape[2], -1)  # [step, hook, rank, n]
    seen = ~np.isnan(v).all(axis=2)
    with np.errstate(invalid="ignore"):
        out = np.nansum(v, axis=2) if combine == "sum" else np.nanmean(v, axis=2)
    out[~seen] = np.nan
    return out


def _series(values: np.ndarray) -> np.ndarray:
    """[step, hook, n] -> [step, hook]: the mean over the other dims (NaN where none was recorded)."""
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(values)).sum(axis=2)
        return np.where(counts > 0, np.nansum(values, axis=2) / np.maximum(counts, 1), np.nan)


def short_hook_names(hooks) -> list[str]:
    """What tells hook point names apart: ``layers.0.mlp.act.pre``, ``layers.1.mlp.act.pre`` -> 0, 1."""
    parts = [h.split(".") for h in hooks]
    if len(parts) < 2:
        return list(hooks)
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    return [".".join(p[head:len(p) - tail]) for p in parts]


def _json(a: np.ndarray) -> list:
    return [None if not math.isfinite(x) else float(x) for x in a.tolist()]


class UserProbesView(TraceView):
    """The values of one of the run's user probes."""

    watch_params = ("trace", "step", "seq", "version")

    def build(self):
        self.probe = pn.widgets.Select(label="probe", options=[], width=260, css_classes=["wb-user-probe"])
        self.probe.param.watch(lambda e: self._safe_redraw({"probe"}), "value")
        self.combine = pn.widgets.RadioButtonGroup(options=COMBINE, value="mean", color="light", width=300)
        self.combine.param.watch(lambda e: self._safe_redraw({"combine"}), "value")
        self.about = pn.pane.HTML("", margin=(0, 10))
        self.lines = figure(height=300, width=620, tools="pan,wheel_zoom,box_zoom,reset,save", x_axis_label="step",
                            name="user-lines")
        self.line_source = ColumnDataSource(data={"step": []})
        self.cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        self.lines.add_layout(self.cursor)
        self.at_step = figure(height=280, width=620, tools="pan,wheel_zoom,box_zoom,reset,save", name="user-step")
        self.step_source = ColumnDataSource(data={"index": []})
        self._drawn_for: tuple | None = None
        self._n_drawn = 0
        return pn.Column(pn.Row(self.probe, self.combine), self.about, pn.pane.Bokeh(self.lines),
                         pn.pane.Bokeh(self.at_step), sizing_mode="stretch_width")

    def clear(self) -> None:
        self._drawn_for = None
        self.line_source.data = {"step": []}
        self.step_source.data = {"index": []}

    def _spec(self):
        return next(u for u in self.state.trace.spec.user_arrays if u.name == self.probe.value)

    def redraw(self, changed: set[str]) -> None:
        tr = self.state.trace
        names = [u.name for u in tr.spec.user_arrays]
        if not names:
            self.note("this run had no user probes (workbench.UserProbe)")
            self.clear()
            return
        if list(self.probe.options) != names:
            self.probe.options = names
        if self.probe.value not in names:
            self.probe.value = names[0]  # its watcher redraws
            return
        u = self._spec()
        key = (id(tr), u.name, self.combine.value, self.state.seq)
        if self._drawn_for != key:
            self._make_figures(u)
            self._drawn_for = key
        self._stream_lines(u)
        self.cursor.location = self.state.step
        self._draw_step(u)

    def _make_figures(self, u) -> None:
        for fig in (self.lines, self.at_step):
            fig.renderers = []
            for legend in fig.legend:  # items of removed glyphs would keep them alive in the legend
                legend.items = []
            fig.tools = [t for t in fig.tools if not isinstance(t, HoverTool)]
        cols = {"step": [], **{f"h{i}": [] for i in range(len(u.hooks))}}
        self.line_source.data = cols
        for i, hook in enumerate(u.hooks):
            self.lines.line("step", f"h{i}", source=self.line_source, color=Category10_10[i % 10], line_width=2,
                            legend_label=hook, name=f"hook{i}")
        legend_outside(self.lines)
        self.lines.add_tools(HoverTool(tooltips=[("step", "@step"), *((h, f"@h{i}{{0.0000}}")
                                                                     for i, h in enumerate(u.hooks))], mode="vline",
                                       renderers=self.lines.renderers[:1]))
        other = [d for d in u.dims if d != "seq"]
        mean = f" (mean over {', '.join(other)})" if other else ""
        self.lines.title.text = f"{u.name} against step{mean} · {self.combine.value} over ranks"
        single = math.prod(n for d, n in zip(u.dims, u.shape) if d != "seq") == 1
        if single:  # one bar per hook point, labelled by what tells the hook points apart
            self.step_source.data = {"index": [], "value": [], "color": [], "hook": []}
            self.at_step.vbar(x="index", top="value", width=0.8, color="color", source=self.step_source)
            self.at_step.add_tools(HoverTool(tooltips=[("hook point", "@hook"), ("value", "@value{0.0000}")]))
            self.at_step.xaxis.ticker = list(range(len(u.hooks)))
            self.at_step.xaxis.major_label_overrides = dict(enumerate(short_hook_names(u.hooks)))
        else:
            self.step_source.data = {"index": [], **{f"h{i}": [] for i in range(len(u.hooks))}}
            for i, hook in enumerate(u.hooks):
                self.at_step.line("index", f"h{i}", source=self.step_source, color=Category10_10[i % 10],
                                  line_width=2, legend_label=hook)
            self.at_step.legend.click_policy = "hide"
            self.at_step.legend.label_text_font_size = "10px"
            self.at_step.xaxis.ticker = BasicTicker()
            self.at_step.xaxis.major_label_overrides = {}
        self.at_step.xaxis.axis_label = "hook point" if single else " × ".join(other)
        seq = f"sequence {self.state.seq} · " if "seq" in u.dims else ""
        dims = ", ".join(f"{d}: {n}" for d, n in zip(u.dims, u.shape)) or "one number"
        self.about.object = (f"<span style='color:#6b7688;font-size:12px'>{seq}{u.description or u.name} · "
                             f"<code>{u.fn}</code> on {len(u.hooks)} hook points · values: {dims} ({u.dtype})"
                             f"</span>")
        self._n_drawn = 0

    def _stream_lines(self, u) -> None:
        st = self.state
        if st.n_steps <= self._n_drawn:
            return
        values = _series(probe_values(st.trace, u.name, st.seq, self._n_drawn, st.n_steps, self.combine.value))
        new = {"step": list(range(self._n_drawn, st.n_steps))}
        for i in range(len(u.hooks)):
            new[f"h{i}"] = _json(values[:, i])
        self.line_source.stream(new)
        self._n_drawn = st.n_steps

    def _draw_step(self, u) -> None:
        st = self.state
        if st.n_steps == 0:
            return
        v = probe_values(st.trace, u.name, st.seq, st.step, st.step + 1, self.combine.value)[0]  # [hook, n]
        if v.shape[1] == 1:
            data = {"index": list(range(len(u.hooks))), "value": _json(v[:, 0]),
                    "color": [Category10_10[i % 10] for i in range(len(u.hooks))], "hook": list(u.hooks)}
        else:
            data = {"index": list(range(v.shape[1])), **{f"h{i}": _json(v[i]) for i in range(len(u.hooks))}}
        self.step_source.data = data
        self.at_step.title.text = f"{u.name} at step {st.step} · {self.combine.value} over ranks"
