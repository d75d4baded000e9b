"""Communication view: all-reduce time per layer, site and rank across steps; a per-rank timeline
of the selected step (compute and collectives, so a straggler shows as the rank the others wait
for); and the share of step time spent in communication.
"""
from __future__ import annotations

import numpy as np
import panel as pn
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Span
from bokeh.palettes import Category10_10, Set2_8
from bokeh.plotting import figure
from bokeh.transform import dodge

from workbench.views.base import TraceView, legend_outside


def comm_seconds(trace, start: int, stop: int) -> np.ndarray:
    """All-reduce seconds [step, layer, site, rank] for steps [start, stop) (NaN: not recorded)."""
    return np.asarray(trace.comm["seconds"][start:stop].values, dtype=np.float64)


def comm_share(trace, start: int, stop: int) -> np.ndarray:
    """Fraction of each step's wall time spent in all-reduces, per rank: [step, rank]."""
    sec = comm_seconds(trace, start, stop)
    total = np.nansum(sec, axis=(1, 2))                                    # [step, rank]
    wall = np.asarray(trace.timing["step_seconds"][start:stop].values, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.where(wall > 0, total / wall, np.nan)


def step_timeline(trace, step: int) -> tuple[list[dict], float]:
    """Bars of one step: per rank, the whole step as compute and each collective at its start.

    Returns a list of {rank, start, end, kind, layer, site} and the longest step wall time.
    """
    ds = trace.comm
    sites = [str(s) for s in ds["site"].values]
    start = np.asarray(ds["start"][step].values, dtype=np.float64)      # [layer, site, rank]
    sec = np.asarray(ds["seconds"][step].values, dtype=np.float64)
    wall = np.asarray(trace.timing["step_seconds"][step].values, dtype=np.float64)  # [rank]
    bars = []
    n_layers, n_sites, n_ranks = sec.shape
    for r in range(n_ranks):
        w = float(wall[r]) if np.isfinite(wall[r]) else float(np.nanmax(start[:, :, r] + sec[:, :, r], initial=0))
        bars.append(dict(rank=r, start=0.0, end=w, kind="compute", layer=-1, site=""))
        for layer in range(n_layers):
            for s in range(n_sites):
                if np.isfinite(start[layer, s, r]) and np.isfinite(sec[layer, s, r]):
                    bars.append(dict(rank=r, start=float(start[layer, s, r]),
                                     end=float(start[layer, s, r] + sec[layer, s, r]),
                                     kind=sites[s], layer=layer, site=sites[s]))
    longest = float(np.nanmax(wall)) if np.isfinite(wall).any() else 0.0
    return bars, longest


class CommView(TraceView):
    """All-reduce timings across steps, one step's per-rank timeline, and communication share."""

    watch_params = ("trace", "step", "layer", "version")

    def build(self):
        self.site = pn.widgets.Select(label="site", options=["all sites"], value="all sites", width=200)
        self.site.param.watch(lambda e: self._safe_redraw({"site"}), "value")
        tools = "pan,wheel_zoom,box_zoom,reset,save"
        self.over_steps = figure(height=260, width=620, tools=tools, x_axis_label="step", y_axis_label="ms",
                                 title="all-reduce time of the selected layer across steps", name="comm-steps")
        self.by_layer_source = ColumnDataSource(data=dict(layer=[]))
        self.by_layer = figure(height=260, width=520, tools="hover,save", x_axis_label="layer", y_axis_label="ms",
                               title="all-reduce time per layer at the selected step", name="comm-layers")
        self.timeline_source = ColumnDataSource(data=dict(rank=[], start=[], end=[], kind=[], color=[], layer=[],
                                                          ms=[]))
        self.timeline = figure(height=220, width=1000, tools="xpan,xwheel_zoom,reset,save", x_axis_label="ms into the step",
                               y_range=FactorRange(factors=[]), title="per-rank timeline of the selected step",
                               name="comm-timeline")
        self.timeline.hbar(y="rank", left="start", right="end", height=0.7, color="color", source=self.timeline_source,
                           line_color=None)
        self.timeline.add_tools(HoverTool(tooltips=[("rank", "@rank"), ("what", "@kind"), ("layer", "@layer"),
                                                    ("ms", "@ms{0.000}")]))
        self.share = figure(height=220, width=620, tools=tools, x_axis_label="step", y_axis_label="share of step time",
                            title="share of step time in communication", name="comm-share")
        self.share.y_range.start = 0
        self.cursors = [Span(location=0, dimension="height", line_color="#e0a100", line_width=2) for _ in range(2)]
        self.over_steps.add_layout(self.cursors[0])
        self.share.add_layout(self.cursors[1])
        self.summary = pn.pane.HTML("", margin=(0, 10))
        self._ready_for = None
        self.plots = pn.Column(self.site, pn.Row(pn.pane.Bokeh(self.over_steps), pn.pane.Bokeh(self.by_layer)),
                               pn.pane.Bokeh(self.timeline), pn.pane.Bokeh(self.share), sizing_mode="stretch_width")
        return pn.Column(self.summary, self.plots, sizing_mode="stretch_width")

    def _setup(self) -> None:
        st = self.state
        ds = st.trace.comm
        self._sites = [str(s) for s in ds["site"].values]
        self._ranks = int(ds.sizes["rank"])
        self.site.options = ["all sites"] + self._sites
        for fig in (self.over_steps, self.share, self.by_layer):
            fig.renderers = []
            for legend in fig.legend:
                legend.items = []
        self.rank_sources = []
        self.share_sources = []
        for r in range(self._ranks):
            color = Category10_10[r % 10]
            src = ColumnDataSource(data=dict(step=[], ms=[]))
            self.over_steps.line("step", "ms", source=src, color=color, legend_label=f"rank {r}", line_width=1.5)
            self.rank_sources.append(src)
            ssrc = ColumnDataSource(data=dict(step=[], share=[]))
            self.share.line("step", "share", source=ssrc, color=color, legend_label=f"rank {r}", line_width=1.5)
            self.share_sources.append(ssrc)
        data = {"layer": []}
        for r in range(self._ranks):
            data[f"r{r}"] = []
        self.by_layer_source.data = data
        width = 0.8 / max(self._ranks, 1)
        for r in range(self._ranks):
            self.by_layer.vbar(x=dodge("layer", (r - (self._ranks - 1) / 2) * width), top=f"r{r}", width=width * 0.95,
                               source=self.by_layer_source, color=Category10_10[r % 10], legend_label=f"rank {r}")
        for fig in (self.over_steps, self.share, self.by_layer):
            legend_outside(fig)
        self.timeline.y_range.factors = [f"rank {r}" for r in range(self._ranks)]
        self._streamed = 0
        self._ready_for = (id(st.trace), self.site.value, st.layer)

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        if "trace" in changed or self._ready_for is None or self._ready_for[0] != id(st.trace):
            self._setup()
        if st.n_steps == 0:
            return
        sec = comm_seconds(st.trace, 0, 1)
        self.plots.visible = bool(np.isfinite(sec).any()) or self._ranks > 1  # empty plots would only puzzle
        if not self.plots.visible:
            self.note("no all-reduce timings in this trace (tensor-parallel size 1: nothing to reduce; "
                      "the Time tab shows where each step's time goes)")
            self.summary.object = ""
            return
        key = (id(st.trace), self.site.value, st.layer)
        if key != self._ready_for:
            self._streamed = 0
            self._ready_for = key
        self._stream_steps()
        self._draw_step()
        for c in self.cursors:
            c.location = st.step

    def _site_slice(self):
        return slice(None) if self.site.value == "all sites" else self._sites.index(self.site.value)

    def _stream_steps(self) -> None:
        st = self.state
        n = st.n_steps
        if n <= self._streamed:
            return
        first = self._streamed
        sec = comm_seconds(st.trace, first, n)[:, st.layer, self._site_slice()]   # [step, (site,) rank]
        if sec.ndim == 3:
            sec = np.nansum(sec, axis=1)
        share = comm_share(st.trace, first, n)
        steps = list(range(first, n))
        for r in range(self._ranks):
            # fresh lists per source: ColumnDataSource.stream extends lists in place
            new = dict(step=list(steps), ms=(sec[:, r] * 1e3).tolist())
            snew = dict(step=list(steps), share=share[:, r].tolist())
            if first == 0:
                self.rank_sources[r].data, self.share_sources[r].data = new, snew
            else:
                self.rank_sources[r].stream(new)
                self.share_sources[r].stream(snew)
        self._streamed = n
        what = "all sites" if self.site.value == "all sites" else self.site.value
        self.over_steps.title.text = f"all-reduce time · layer {st.layer} · {what} · per rank"

    def _draw_step(self) -> None:
        st = self.state
        sec = comm_seconds(st.trace, st.step, st.step + 1)[0]                     # [layer, site, rank]
        sel = sec[:, self._site_slice()]
        if sel.ndim == 3:
            sel = np.nansum(sel, axis=1)
        data = {"layer": list(range(sel.shape[0]))}
        for r in range(self._ranks):
            data[f"r{r}"] = (sel[:, r] * 1e3).tolist()
        self.by_layer_source.data = data
        self.by_layer.title.text = f"all-reduce time per layer · step {st.step}"
        bars, longest = step_timeline(st.trace, st.step)
        colors = {"compute": "#d8dee9"}
        for i, s in enumerate(self._sites):
            colors[s] = Set2_8[i % 8]
        self.timeline_source.data = dict(
            rank=[f"rank {b['rank']}" for b in bars], start=[b["start"] * 1e3 for b in bars],
            end=[b["end"] * 1e3 for b in bars], kind=[b["kind"] for b in bars],
            color=[colors.get(b["kind"], "#888") for b in bars], layer=[b["layer"] for b in bars],
            ms=[(b["end"] - b["start"]) * 1e3 for b in bars])
        self.timeline.title.text = (f"per-rank timeline of step {st.step} (grey: compute; colours: "
                                    + ", ".join(self._sites) + ")")
        total = np.nansum(sec, axis=(0, 1))                                       # [rank]
        wall = np.asarray(st.trace.timing["step_seconds"][st.step].values, dtype=np.float64)
        if np.isfinite(wall).any() and np.nanmax(wall) > 0:
            slow = int(np.nanargmax(wall))
            parts = " · ".join(f"rank {r}: {wall[r] * 1e3:.2f} ms, {total[r] / wall[r]:.0%} in all-reduce"
                               for r in range(len(wall)) if wall[r] > 0)
            self.summary.object = (f"<div style='font-size:13px;color:#3d4758'>step {st.step}: {parts}"
                                   f"{f' · slowest: <b>rank {slow}</b>' if len(wall) > 1 else ''}</div>")
        else:
            self.summary.object = ""
