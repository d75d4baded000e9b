"""Activations view: histograms of the selected layer overlaid per site (MLP activation before and
after redistribution by default), and statistics (std, kurtosis, max, near-zero fraction) across
layers at the selected step and across steps for the selected layer, finished from the recorded
moments (merged over ranks).
"""
from __future__ import annotations

import warnings

import numpy as np
import panel as pn
from bokeh.models import BasicTicker, ColumnDataSource, HoverTool, Span
from bokeh.palettes import Dark2_8
from bokeh.plotting import figure

from workbench.trace.stats import finish_moments
from workbench.views.base import TraceView, finite_floats, legend_outside

STATS = {"std": "standard deviation", "kurtosis": "excess kurtosis", "max": "max |value|",
         "near_zero_fraction": "near-zero fraction"}
PRE, POST = "mlp.act.pre", "mlp.act.post"


def histograms(trace, layer: int, step: int, accumulate: bool = False) -> np.ndarray:
    """Counts [site, bin] at ``step`` (or summed over steps 0..step), merged over ranks."""
    ds = trace.activations
    steps = slice(0, step + 1) if accumulate else slice(step, step + 1)
    c = np.asarray(ds["hist_count"][steps, layer].values, dtype=np.float64)  # [step, site, rank, bin]
    c[c < 0] = 0
    return c.sum(axis=(0, 2))


def moment_stats(trace, start: int, stop: int) -> dict[str, np.ndarray]:
    """Finished statistics [step, layer, site] for steps [start, stop), merged over ranks."""
    ds = trace.activations
    sums = {}
    for name in ("value_count", "value_sum", "value_sumsq", "value_sum3", "value_sum4", "near_zero_count"):
        v = np.asarray(ds[name][start:stop].values, dtype=np.float64)  # [step, layer, site, rank]
        v = np.where(v < 0, 0, v) if name in ("value_count", "near_zero_count") else np.nan_to_num(v)
        sums[name] = v.sum(axis=-1)
    fin = finish_moments(sums["value_count"], sums["value_sum"], sums["value_sumsq"], sums["value_sum3"],
                         sums["value_sum4"])
    vmax = np.asarray(ds["value_max"][start:stop].values, dtype=np.float64)
    vmin = np.asarray(ds["value_min"][start:stop].values, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps a live run has not written yet are all-NaN
        fin["max"] = np.fmax(np.nanmax(np.abs(vmax), axis=-1), np.nanmax(np.abs(vmin), axis=-1))
        fin["near_zero_fraction"] = sums["near_zero_count"] / sums["value_count"]
    return fin


def bin_geometry(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drawable left/right of each bin: the two open-ended outer bins get the width of their
    neighbour, so values beyond the finite edges stay visible."""
    lo, hi = np.array(edges[:-1], dtype=np.float64), np.array(edges[1:], dtype=np.float64)
    finite = np.isfinite(edges)
    width = np.diff(edges[finite]).min() if finite.sum() > 1 else 1.0
    if not np.isfinite(lo[0]):
        lo[0] = hi[0] - width
    if not np.isfinite(hi[-1]):
        hi[-1] = lo[-1] + width
    return lo, hi


def per_unit(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Values per bin divided by the drawn bin width: a density whose shape does not depend on how
    wide the bins are. The stored bins are sinh-spaced (~0.003 wide near 0, ~0.4 at 3), so counts
    per bin alone make the tails look heavier than they are."""
    return np.asarray(values, dtype=np.float64) / (hi - lo)


class ActivationsView(TraceView):
    """Overlaid histograms and activation statistics across layers and steps."""

    watch_params = ("trace", "step", "layer", "version")

    def build(self):
        self.sites = pn.widgets.CheckButtonGroup(label="sites", options=[], value=[], color="light")
        self._quiet = False
        self.sites.param.watch(lambda e: None if self._quiet else self._safe_redraw({"sites"}), "value")
        self.accumulate = pn.widgets.Checkbox(label="sum steps 0..selected", value=False)
        self.accumulate.param.watch(lambda e: self._safe_redraw({"accumulate"}), "value")
        self.log_y = pn.widgets.Checkbox(label="log counts", value=True)
        self.log_y.param.watch(lambda e: self._safe_redraw({"log"}), "value")
        self.density = pn.widgets.Checkbox(label="per unit of activation (bins differ in width)", value=True)
        self.density.param.watch(lambda e: self._safe_redraw({"density"}), "value")
        self.stat = pn.widgets.Select(label="statistic", options={v: k for k, v in STATS.items()}, value="kurtosis",
                                      width=220)
        self.stat.param.watch(lambda e: self._safe_redraw({"stat"}), "value")
        self._hist_figs: dict[bool, figure] = {}
        self.hist_pane = pn.pane.Bokeh(sizing_mode="fixed")
        self.hist_sources: list[ColumnDataSource] = []
        self.by_layer = figure(height=260, width=420, tools="pan,wheel_zoom,reset,save", x_axis_label="layer",
                               title="across layers at the selected step", name="activations-by-layer")
        self.by_step = figure(height=260, width=560, tools="pan,wheel_zoom,box_zoom,reset,save",
                              x_axis_label="step", title="across steps for the selected layer", name="activations-by-step")
        self.by_layer.xaxis.ticker = BasicTicker(min_interval=1)  # layers are whole numbers
        for fig, x in ((self.by_layer, "layer"), (self.by_step, "step")):
            fig.add_tools(HoverTool(tooltips=[(x, f"@{x}"), ("value", "@value{0.000}")]))
        self.step_cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        self.by_step.add_layout(self.step_cursor)
        self.layer_cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        self.by_layer.add_layout(self.layer_cursor)
        self._site_names: list[str] = []
        self._stats: dict[str, np.ndarray] | None = None
        self._stats_n = 0
        self._layer_sources: list[ColumnDataSource] = []
        self._step_sources: list[ColumnDataSource] = []
        return pn.Column(
            pn.Row(self.sites, self.accumulate, self.log_y, self.density), self.hist_pane,
            pn.Row(self.stat), pn.Row(pn.pane.Bokeh(self.by_layer), pn.pane.Bokeh(self.by_step)),
            sizing_mode="stretch_width")

    def _hist_figure(self, log: bool):
        fig = self._hist_figs.get(log)
        if fig is None:
            fig = figure(height=300, width=760, y_axis_type="log" if log else "linear",
                         tools="pan,wheel_zoom,box_zoom,reset,save", x_axis_label="activation value",
                         y_axis_label="count", name="activations-hist")
            self._hist_figs[log] = fig
            self._hist_renderers = None
        return fig

    def _setup(self) -> None:
        """Per-trace setup: site list, histogram and statistics line renderers."""
        st = self.state
        ds = st.trace.activations
        names = [str(s) for s in ds["site"].values]
        self._site_names = names
        default = [s for s in (PRE, POST) if s in names] or names[:1]
        self._edges = np.asarray(ds["edge"].values, dtype=np.float64)
        self._quiet = True   # the redraw in progress draws the new sites; no second one from the widget
        try:
            self.sites.param.update(options=names, value=default)
        finally:
            self._quiet = False
        self._stats, self._stats_n = None, 0
        self.hist_sources = [ColumnDataSource(data=dict(left=[], right=[], top=[], bottom=[], count=[], density=[]))
                             for _ in names]
        for log, fig in list(self._hist_figs.items()):
            fig.renderers = []
        self._hist_figs.clear()
        for fig, sources, x in ((self.by_layer, "_layer_sources", "layer"), (self.by_step, "_step_sources", "step")):
            fig.renderers = []
            for legend in fig.legend:
                legend.items = []
            srcs = []
            for i, name in enumerate(names):
                src = ColumnDataSource(data={x: [], "value": []})
                fig.line(x, "value", source=src, color=Dark2_8[i % 8], line_width=2, legend_label=name)
                if x == "layer":
                    fig.scatter(x, "value", source=src, color=Dark2_8[i % 8], size=6)
                srcs.append(src)
            setattr(self, sources, srcs)
            legend_outside(fig)

    def clear(self) -> None:
        self._site_names = []

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        if "trace" in changed or not self._site_names:
            self._setup()
        if st.n_steps == 0:
            return
        self._draw_hist()
        self._draw_stats(changed)

    def _draw_hist(self) -> None:
        st = self.state
        fig = self._hist_figure(self.log_y.value)
        lo, hi = bin_geometry(self._edges)
        if not fig.renderers:
            for i, name in enumerate(self._site_names):
                fig.quad(left="left", right="right", top="top", bottom="bottom", source=self.hist_sources[i],
                         fill_color=Dark2_8[i % 8], fill_alpha=0.35, line_color=Dark2_8[i % 8], legend_label=name)
            legend_outside(fig)
            fig.add_tools(HoverTool(tooltips=[("bin", "[@left{0.000}, @right{0.000})"), ("count", "@count{0,0}"),
                                              ("per unit", "@density{0,0.0}")]))
        density = self.density.value
        # log axis: half a count (in the widest bin, per unit) below the smallest bar
        floor = (0.5 / float((hi - lo).max()) if density else 0.5) if self.log_y.value else 0.0
        all_counts = histograms(st.trace, st.layer, st.step, self.accumulate.value)
        for i, name in enumerate(self._site_names):
            if name not in self.sites.value:
                self.hist_sources[i].data = dict(left=[], right=[], top=[], bottom=[], count=[], density=[])
                continue
            counts = all_counts[i]
            keep = counts > 0
            per = per_unit(counts, lo, hi)[keep]
            self.hist_sources[i].data = dict(left=lo[keep].tolist(), right=hi[keep].tolist(),
                                             top=(per if density else counts[keep]).tolist(),
                                             bottom=[floor] * int(keep.sum()), count=counts[keep].tolist(),
                                             density=per.tolist())
        fig.yaxis.axis_label = "count per unit of activation" if density else "count per bin"
        what = f"steps 0..{st.step}" if self.accumulate.value else f"step {st.step}"
        fig.title.text = f"layer {st.layer} · {what} · histograms on fixed bins (outer bins catch the tails)"
        if self.hist_pane.object is not fig:
            self.hist_pane.object = fig

    def _draw_stats(self, changed: set[str]) -> None:
        st = self.state
        n = st.n_steps
        if self._stats is None or "stat" in changed:
            self._stats, self._stats_n = moment_stats(st.trace, 0, n), n
            for src in self._step_sources:
                src.data = dict(step=[], value=[])
            self._streamed = 0
        elif n > self._stats_n:
            new = moment_stats(st.trace, self._stats_n, n)
            self._stats = {k: np.concatenate([self._stats[k], new[k]]) for k in self._stats}
            self._stats_n = n
        values = self._stats[self.stat.value]               # [step, layer, site]
        step = min(st.step, values.shape[0] - 1)
        for i, src in enumerate(self._layer_sources):
            col = values[step, :, i]
            src.data = dict(layer=list(range(len(col))), value=finite_floats(col))
        if "layer" in changed or "trace" in changed or "stat" in changed or self._streamed == 0:
            for i, src in enumerate(self._step_sources):
                src.data = dict(step=list(range(values.shape[0])), value=finite_floats(values[:, st.layer, i]))
        elif values.shape[0] > self._streamed:
            for i, src in enumerate(self._step_sources):
                src.stream(dict(step=list(range(self._streamed, values.shape[0])),
                                value=finite_floats(values[self._streamed:, st.layer, i])))
        self._streamed = values.shape[0]
        label = STATS[self.stat.value]
        self.by_layer.title.text = f"{label} across layers · step {st.step}"
        self.by_step.title.text = f"{label} across steps · layer {st.layer}"
        self.step_cursor.location = st.step
        self.layer_cursor.location = st.layer

