"""The dashboard: controls for the shared selection, every view, and the clock that follows a live
run (and plays a replay), composed into a page.

``Dashboard(root)`` serves one trace or a directory of traces (a selector lists them; ``?trace=NAME``
in the URL picks one). ``template()`` gives the served page; ``__panel__`` a plain layout for
notebooks. The clock is a periodic callback (every ``TICK_MS``) that asks the reader for newly
committed steps, so views update within a second of each commit without reloading the page.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from urllib.parse import urlencode

import panel as pn
import param
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import MISSING_RENDERERS

from workbench.errors import WorkbenchError
from workbench.trace import has_attention_maps
from workbench.views.activations import ActivationsView
from workbench.views.attention import AttentionView
from workbench.views.catalog import MAX_DEPTH, TraceCatalog
from workbench.views.comm import CommView
from workbench.views.compare import CompareView
from workbench.views.cross_attention import PerceiverAttentionView
from workbench.views.heads import HeadsView
from workbench.views.keys import HELP as KEYS_HELP
from workbench.views.keys import KeyListener
from workbench.views.kv_cache import KVCacheView
from workbench.views.run_info import RunInfoView, status_badge
from workbench.views.state import TraceState
from workbench.views.timing import TimingView
from workbench.views.tokens import TokensView
from workbench.views.user_probes import UserProbesView

# Views build their figures empty and draw when they have data (a background tab when first
# shown, the comm view only under tensor parallelism): not worth a warning in the server log.
silence(MISSING_RENDERERS, True)

TICK_MS = 300          # live refresh and replay clock
CATALOG_EVERY = 10     # ticks between re-listing a directory of traces
TAB_TITLES = {"attention": "Attention", "heads": "Heads", "perceiver": "Perceiver", "kv_cache": "KV cache",
              "activations": "Activations", "timing": "Time", "comm": "Communication", "user": "Your probes",
              "compare": "Compare", "run": "Run"}
LINK_PARAMS = ("step", "seq", "layer", "head")  # with trace and tab: what a link to the page restores
SPEEDS = {"1 step": 1, "2 steps": 2, "5 steps": 5, "10 steps": 10, "25 steps": 25}


class Dashboard(pn.viewable.Viewer):
    """Controls, views and clock over one ``TraceState``.

    Args:
        root: a trace store, or a directory of trace stores (may not exist yet for a live run).
        trace: name of the trace to open first (relative to ``root``); refused if outside it.
        depth: how many directory levels below ``root`` hold traces to list.
    """

    state = param.ClassSelector(class_=TraceState)

    def __init__(self, root: str | Path, trace: str | None = None, depth: int = MAX_DEPTH, **params) -> None:
        super().__init__(state=params.pop("state", None) or TraceState(), **params)
        self.catalog = TraceCatalog(root, depth)
        self._ticks = 0
        self._rest_until = 0.0
        self._callback = None
        self._build_controls()
        self.views = {
            "tokens": TokensView(self.state),
            "attention": AttentionView(self.state),
            "heads": HeadsView(self.state),
            "kv_cache": KVCacheView(self.state),
            "activations": ActivationsView(self.state),
            "timing": TimingView(self.state),
            "comm": CommView(self.state),
            "run": RunInfoView(self.state),
            "perceiver": PerceiverAttentionView(self.state),
            "user": UserProbesView(self.state),
            "compare": CompareView(self.state),
        }
        self.views["heads"].on_pick = lambda: setattr(self.tabs, "active", self._tab_views.index("attention"))
        # (the Heads tab is shown only with the Attention tab)
        self.tabs = pn.Tabs(dynamic=False, sizing_mode="stretch_width")
        self._tab_views: list[str] = []
        self._set_tabs()
        self.tabs.param.watch(self._tab_changed, "active")
        self.state.param.watch(self._set_tabs, "trace")
        self.state.param.watch(self._sync_controls, ["trace", "n_steps", "step", "playing", "status", "error",
                                                     "layer", "head", "seq", "follow"])
        self.state.param.watch(self._update_link, ["path", "step", "seq", "layer", "head"])
        self.tabs.param.watch(self._update_link, "active")
        self.views["compare"].other.param.watch(self._update_link, "value")
        self._requested = trace or ""
        self._refresh_catalog()
        self.select(trace if trace is not None else self._default_name())

    # ---------------------------------------------------------------- traces
    def _default_name(self) -> str:
        names = self.catalog.names()
        if not names:
            return ""

        def modified(name: str) -> float:  # the most recently written trace is the likeliest wanted
            try:
                return (self.catalog.root / name / "zarr.json").stat().st_mtime
            except OSError:
                return 0.0
        return max(names, key=modified)

    def select(self, name: str) -> None:
        """Open trace ``name`` (relative to the root); a refused or broken trace shows an error."""
        if not name and not self.catalog.single:
            self.state._fail(self.catalog.root, f"no traces under {self.catalog.root} yet")
            self._sync_controls()
            return
        try:
            path = self.catalog.resolve(name)
        except WorkbenchError as e:
            self.state._fail(self.catalog.root, str(e))
            self._sync_controls()
            return
        if self.state.trace is not None and Path(self.state.path).resolve() == path:
            return  # already shown (the selector caught up with a trace opened another way)
        self.state.open(path)
        self._show_selected()
        self._sync_controls()

    def _show_selected(self) -> None:
        """Make the selector show the open trace (opened by URL, or listed only after it appeared)."""
        if self.catalog.single or not self.state.path:
            return
        try:
            name = Path(self.state.path).resolve().relative_to(self.catalog.root).as_posix()
        except ValueError:
            return
        if name in self.trace_select.options and self.trace_select.value != name:
            self.trace_select.value = name

    def _refresh_catalog(self) -> None:
        if self.catalog.single:
            self.trace_select.visible = False
            return
        names = self.catalog.names()
        if names != list(self.trace_select.options):
            self.trace_select.options = names
            self._show_selected()
            self.views["compare"].candidates = {n: self.catalog.resolve(n) for n in names}
            self._set_tabs()
        self.trace_select.visible = True

    # ---------------------------------------------------------------- controls
    def _build_controls(self) -> None:
        st = self.state
        self.trace_select = pn.widgets.Select(label="trace", options=[], sizing_mode="stretch_width",
                                              css_classes=["wb-trace"])
        self.trace_select.param.watch(lambda e: self.select(e.new) if e.new else None, "value")
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", margin=(5, 10), css_classes=["wb-status"])
        self.error = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width",
                                   css_classes=["wb-error"])
        self.play = pn.widgets.Button(label="▶ Play", color="primary", width=90, css_classes=["wb-play"])
        self.play.on_click(lambda e: st.toggle_play())
        self.prev_step = pn.widgets.Button(label="◀", width=40)
        self.prev_step.on_click(lambda e: st.select_step(st.step - 1))
        self.next_step = pn.widgets.Button(label="▶", width=40)
        self.next_step.on_click(lambda e: st.select_step(st.step + 1))
        self.step_slider = pn.widgets.IntSlider(label="step", start=0, end=1, value=0, sizing_mode="stretch_width",
                                                css_classes=["wb-step"])
        self.step_slider.param.watch(self._slider_moved, "value_throttled")
        self.speed = pn.widgets.Select(label="replay speed (per tick)", options=SPEEDS, value=1, width=140)
        self.speed.param.watch(lambda e: setattr(st, "speed", int(e.new)), "value")
        self.follow = pn.widgets.Checkbox(label="follow the newest step", value=True)
        self.follow.param.watch(self._follow_toggled, "value")
        self.seq_select = pn.widgets.Select(label="sequence", options={"0": 0}, value=0, sizing_mode="stretch_width")
        self.layer_select = pn.widgets.Select(label="layer", options={"0": 0}, value=0, sizing_mode="stretch_width",
                                              css_classes=["wb-layer"])
        self.head_select = pn.widgets.Select(label="head", options={"0": 0}, value=0, sizing_mode="stretch_width",
                                             css_classes=["wb-head"])
        for w, name in ((self.seq_select, "seq"), (self.layer_select, "layer"), (self.head_select, "head")):
            w.param.watch(lambda e, name=name: setattr(st, name, int(e.new)), "value")
        self.link = pn.pane.HTML("", margin=(0, 10), css_classes=["wb-link"])
        self.keys = KeyListener(width=0, height=0, margin=0)
        self.keys.param.watch(lambda e: self.on_key(*self.keys.key()), "press")
        self.sidebar = pn.Column(
            self.trace_select, self.status, self.error,
            pn.Row(self.play, self.prev_step, self.next_step), self.step_slider,
            pn.Row(self.speed), self.follow,
            pn.layout.Divider(), self.seq_select, self.layer_select, self.head_select,
            pn.pane.HTML("<div style='color:#6b7688;font-size:12px'>Every view follows the selected step, "
                         "sequence, layer and head. Click a token to jump to its step; click a head "
                         f"thumbnail to open it.<br>{KEYS_HELP}.</div>"),
            self.link, self.keys,
            sizing_mode="stretch_width")

    def _set_tabs(self, *events) -> None:
        """The tabs this trace needs: Attention and Heads only for a run that recorded attention maps
        (Attention also while no trace is open), Perceiver maps only for a Perceiver run, user probes
        only for a run that had some, Compare only where another trace is served."""
        names = list(TAB_TITLES)
        tr = self.state.trace
        if tr is None or getattr(tr, "cross_attention", None) is None:
            names.remove("perceiver")
        if tr is not None and not has_attention_maps(tr):  # e.g. --probes light: no empty heatmaps
            names.remove("attention")
        if tr is None or not has_attention_maps(tr):
            names.remove("heads")
        if tr is None or not tr.spec.user_arrays:
            names.remove("user")
        self.views["compare"].list_candidates()  # without the trace just opened
        if tr is None or not self.views["compare"].has_candidates:
            names.remove("compare")
        if names != self._tab_views:
            shown = self._tab_views[self.tabs.active] if self._tab_views else "attention"
            self._tab_views = names
            self.tabs[:] = [(TAB_TITLES[n], self.views[n]) for n in names]
            self.tabs.active = names.index(shown) if shown in names else 0
        self._tab_changed()

    def _tab_changed(self, *events) -> None:
        # Only the tokens strip and the visible tab redraw on every step; hidden tabs catch up when shown.
        for name in TAB_TITLES:
            self.views[name].active = name in self._tab_views and self._tab_views.index(name) == self.tabs.active

    # ---------------------------------------------------------------- links
    def link_query(self) -> str:
        """The query string that reopens this view: trace, tab, step, sequence, layer, head, and the
        Compare tab's other trace once one is chosen."""
        st = self.state
        if st.trace is None:
            return ""
        query = {}
        if not self.catalog.single:
            try:
                query["trace"] = Path(st.path).resolve().relative_to(self.catalog.root).as_posix()
            except ValueError:
                return ""
        if self._tab_views:
            query["tab"] = TAB_TITLES[self._tab_views[self.tabs.active]].lower()
        query.update({k: getattr(st, k) for k in LINK_PARAMS})
        other = self.views["compare"].other.value
        if other in self.views["compare"].candidates:
            query["compare"] = other  # the Compare tab's b
        return "?" + urlencode(query)

    def apply_query(self, args: dict[str, str]) -> None:
        """Select what a link names (``link_query``); values that are not numbers are ignored, numbers
        out of range are clamped. The trace itself is opened first (``select``)."""
        st = self.state
        if st.trace is None:
            return
        nums = {}
        for k in LINK_PARAMS:
            try:
                nums[k] = int(args[k])
            except (KeyError, ValueError):
                pass
        st.choose(**{k: nums[k] for k in ("seq", "layer", "head") if k in nums})
        if "step" in nums:
            st.playing = False
            st.select_step(nums["step"])
        if args.get("compare") in self.views["compare"].candidates:
            self.views["compare"].compare_with(args["compare"])
        titles = {TAB_TITLES[n].lower(): i for i, n in enumerate(self._tab_views)}
        if args.get("tab", "").lower() in titles:
            self.tabs.active = titles[args["tab"].lower()]

    def _update_link(self, *events) -> None:
        query = self.link_query()
        self.link.object = (f"<a href='{html.escape(query)}' style='font-size:12px'>link to this view</a> "
                            "<span style='font-size:12px;color:#6b7688'>(trace, tab, step, layer, head)</span>"
                            if query else "")

    def on_key(self, key: str, shift: bool = False) -> None:
        """A keyboard shortcut (views/keys.py): step, play, layer or head."""
        st = self.state
        if st.trace is None:
            return
        if key in ("ArrowLeft", "ArrowRight", "Home"):
            st.playing = False
            by = (10 if shift else 1) * (1 if key == "ArrowRight" else -1)
            st.select_step(0 if key == "Home" else st.step + by)
        elif key == "End":
            st.playing = False
            st.select_step(st.n_steps - 1)  # while live, this follows the newest step again
        elif key == " ":
            st.toggle_play()
        elif key in ("ArrowUp", "ArrowDown"):
            st.choose(layer=st.layer + (1 if key == "ArrowDown" else -1))
        elif key in ("[", "]"):
            st.choose(head=st.head + (1 if key == "]" else -1))

    def _slider_moved(self, event) -> None:
        if event.new is not None and event.new != self.state.step:
            self.state.playing = False
            self.state.select_step(event.new)

    def _follow_toggled(self, event) -> None:
        st = self.state
        if event.new == st.follow:
            return
        st.follow = bool(event.new)
        if st.follow:
            st.select_step(st.n_steps - 1)

    def _sync_controls(self, *events) -> None:
        st = self.state
        last = max(st.n_steps - 1, 0)
        self.step_slider.param.update(end=max(last, 1), value=min(st.step, max(last, 1)), disabled=st.n_steps <= 1)
        self.play.label = "⏸ Pause" if st.playing else "▶ Play"
        self.follow.param.update(value=st.follow, visible=st.status == "running")
        for w, n, label in ((self.seq_select, st.n_seqs, "sequence"), (self.layer_select, st.n_layers, "layer"),
                            (self.head_select, st.n_heads, "head")):
            opts = {f"{label} {i}": i for i in range(n)}
            if list(w.options.values()) != list(opts.values()):
                w.options = opts
        self.seq_select.visible = st.n_seqs > 1
        self.seq_select.value, self.layer_select.value, self.head_select.value = st.seq, st.layer, st.head
        self.error.object = st.error
        self.error.visible = bool(st.error)
        steps = f"{st.n_steps} steps" if st.trace is not None else ""
        name = html.escape(Path(st.path).name) if st.path else ""
        self.status.object = (f"<div style='font-size:13px'>{status_badge(st.status)} "
                              f"<b style='margin-left:6px'>{name}</b> <span style='color:#6b7688'>{steps}</span></div>")

    # ---------------------------------------------------------------- clock
    def tick(self) -> None:
        """One clock beat: new steps of a live run, replay advance, traces appearing in the directory."""
        self._ticks += 1
        if self._ticks % CATALOG_EVERY == 0:
            self._refresh_catalog()
            self._show_selected()
            if self.state.replaced():
                self.state.open(self.state.path)
            if self.state.trace is None and not self._requested and not self.catalog.single:
                name = self._default_name()   # the first run appeared in a watched directory
                if name:
                    self.select(name)
                    return
        if time.monotonic() < self._rest_until:
            return
        t0 = time.monotonic()
        try:
            self.state.tick()
            self.views["compare"].tick()  # the other run of the Compare tab may be live too
        except Exception as e:  # never let the clock die
            self.state.error = f"{type(e).__name__}: {e}"
        took = time.monotonic() - t0
        if took > TICK_MS / 1000 and self.state.playing:
            # The redraw took longer than a beat: rest as long, so replay cannot outrun the page.
            # (Following a live run never rests: that would only add lag.)
            self._rest_until = time.monotonic() + took

    def start_clock(self) -> None:
        """Start the periodic callback (once per page; needs a running server or notebook kernel)."""
        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self.tick, period=TICK_MS)

    # ---------------------------------------------------------------- layout
    def main_area(self) -> pn.Column:
        return pn.Column(self.views["tokens"], self.tabs, sizing_mode="stretch_width")

    def __panel__(self):
        pn.state.onload(self.start_clock)
        return pn.Row(pn.Column(self.sidebar, width=300), self.main_area(), sizing_mode="stretch_width")

    def template(self) -> pn.template.BaseTemplate:
        """The served page (a Bootstrap template: no resources from the internet)."""
        session = pn.state.session_args if pn.state.curdoc else {}
        args = {k: v[0].decode("utf-8", "replace") for k, v in session.items() if v}
        if args.get("trace"):
            self._requested = args["trace"]
            self.select(self._requested)
        self.apply_query(args)
        pn.state.onload(self.start_clock)
        return pn.template.BootstrapTemplate(
            title="workbench · trace dashboard", header_background="#24415f", sidebar_width=310,
            sidebar=[self.sidebar], main=[self.main_area()])
