"""Jupyter front end: the dashboard's views in a cell, ipywidgets controls, and live generation.

    from workbench.notebook import TraceWidget, generate_live, show_dashboard
    TraceWidget("runs/t.zarr")                       # explore a trace (controls + the dashboard's views)
    live = generate_live(prompts=["def f(x):\\n"])    # generate with recording, watch it grow
    live.wait(); live.trace                          # the GenerationResult and the open Trace

Nothing is drawn here: ``TraceWidget`` composes the Viewer classes of ``workbench.views`` over one
``TraceState`` (the same ones the served dashboard uses) and wraps them with ``pn.ipywidget`` (the
jupyter_bokeh widget), so the whole cell is one ipywidgets tree that renders in JupyterLab and the
classic notebook alike and keeps working after the kernel restarts its comms. The controls are
ipywidgets linked both ways with the state's parameters.

Live updates run as an asyncio task on the kernel's own event loop (the generation itself runs in a
background thread), so every Bokeh and ipywidgets change happens on the kernel's main thread between
cell executions. Outside a running event loop (a plain script) nothing refreshes by itself: call
``refresh()``, or ``LiveRun.wait()`` which refreshes once at the end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import html
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import ipywidgets as ipw
import panel as pn
from workbench.errors import WorkbenchError
from workbench.trace import has_attention_maps
from workbench.views.activations import ActivationsView
from workbench.views.attention import AttentionView
from workbench.views.comm import CommView
from workbench.views.compare import CompareView
from workbench.views.cross_attention import PerceiverAttentionView
from workbench.views.heads import HeadsView
from workbench.views.kv_cache import KVCacheView
from workbench.views.run_info import RunInfoView, status_badge
from workbench.views.state import TraceState
from workbench.views.timing import TimingView
from workbench.views.tokens import TokensView
from workbench.views.user_probes import UserProbesView

# The dashboard's views by name, with their tab titles ("tokens" sits above the tabs).
VIEWS: dict[str, tuple[type, str]] = {
    "tokens": (TokensView, "Tokens"),
    "attention": (AttentionView, "Attention"),
    "heads": (HeadsView, "Heads"),
    "kv_cache": (KVCacheView, "KV cache"),
    "activations": (ActivationsView, "Activations"),
    "timing": (TimingView, "Time"),
    "comm": (CommView, "Communication"),
    "user": (UserProbesView, "Your probes"),
    "compare": (CompareView, "Compare"),
    "run": (RunInfoView, "Run"),
    "perceiver": (PerceiverAttentionView, "Perceiver AR"),
}
REFRESH_SECONDS = 0.3   # live refresh period, as the dashboard's clock

_extension_loaded = False


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where displaying a widget means something)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def load_extension() -> None:
    """Load Panel's and Bokeh's JavaScript into the notebook once (inline: no internet needed)."""
    global _extension_loaded
    if not _extension_loaded and in_notebook():
        pn.extension(inline=True)
        _extension_loaded = True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _pause(busy: float, interval: float = REFRESH_SECONDS) -> float:
    """Seconds to sleep after a refresh that took ``busy``: redrawing every view shares the GIL with
    a generation running in this process, so refreshing never takes more than a third of the time."""
    return max(interval, 2.0 * busy)


def as_ipywidget(obj) -> ipw.Widget:
    """A Panel object as one jupyter_bokeh ipywidget, with Panel's stylesheets inlined.

    ``pn.ipywidget`` links Panel's CSS from its CDN; Panel's own notebook output inlines it, and so
    do we, so that a notebook without internet access looks the same.
    """
    from bokeh.models import UIElement
    from panel.io.notebook import patch_inline_stylesheets
    widget = pn.ipywidget(obj)
    for model in widget._model.select({"type": UIElement}):
        patch_inline_stylesheets(model)
    widget.update_from_model(widget._model)   # re-render the bundle the page receives
    return widget


def _display(obj) -> None:
    if in_notebook():
        from IPython.display import display
        display(obj)


class TraceWidget:
    """Explore one trace in a notebook: ipywidgets controls over the dashboard's views.

    Args:
        trace: a trace store path, or an open ``workbench.trace.reader.Trace``. The path may not
            exist yet (a live run): the widget waits for it while following.
        views: which views to show, from ``VIEWS`` (default: all, tokens above tabs of the others;
            "perceiver" only when the trace has Perceiver cross-attention, "attention" only when it
            has self-attention maps, "user" only when it has user probes, "compare" only with
            ``compare_with``).
        state: share a ``TraceState`` with other widgets (default: a new one).
        compare_with: other trace paths for the "compare" view, keyed by their file names; the
            first is compared at once (e.g. the same prompt with ARM on).

    Attributes:
        state: the ``TraceState`` every view watches (set ``state.layer = 2`` and the controls follow).
        views: the view objects by name (e.g. ``views["attention"].main.source`` is the heatmap's data).
        controls: the ipywidgets by name: ``step``, ``play``, ``seq``, ``layer``, ``head``, ``follow``.
        widget: the ipywidgets ``VBox`` shown in the cell.
    """

    def __init__(self, trace: Any, views: Iterable[str] | None = None, state: TraceState | None = None,
                 compare_with: str | Path | Iterable[str | Path] | None = None) -> None:
        names = list(views) if views is not None else list(VIEWS)
        unknown = [v for v in names if v not in VIEWS]
        if unknown or not names:
            raise WorkbenchError(f"unknown view {unknown[0] if unknown else '(none)'!r} "
                                 f"(views: {', '.join(VIEWS)})")
        self.state = state or TraceState()
        path = getattr(trace, "path", trace)
        if not isinstance(path, (str, Path)):
            raise WorkbenchError(f"TraceWidget needs a trace path or an open Trace, got {type(trace).__name__}")
        self.path = Path(path)
        self.state.open(self.path)
        trace_now = self.state.trace
        if views is None and trace_now is not None:   # by default, only the views this trace has data for
            if trace_now.cross_attention is None:
                names.remove("perceiver")
            if not has_attention_maps(trace_now):
                names.remove("attention")
                names.remove("heads")
            if not trace_now.spec.user_arrays:
                names.remove("user")
            if compare_with is None:
                names.remove("compare")
        self.views = {name: VIEWS[name][0](self.state) for name in names}
        if compare_with is not None and "compare" in self.views:
            others = [compare_with] if isinstance(compare_with, (str, Path)) else list(compare_with)
            self.views["compare"].candidates = {Path(p).name: Path(p) for p in others}
            if others:
                self.views["compare"].compare_with(Path(others[0]).name)
        self._syncing = False
        self._task: asyncio.Task | None = None
        self._bokeh: ipw.Widget | None = None
        self._build_controls()
        self.state.param.watch(self._sync_controls, ["trace", "n_steps", "step", "status", "error", "follow",
                                                      "seq", "layer", "head", "n_seqs", "n_layers", "n_heads"])
        self._sync_controls()
        self.widget = ipw.VBox([self._control_row, self.status, self.error],
                               layout=ipw.Layout(width="100%"))

    # ---------------------------------------------------------------- layout
    def panel(self) -> pn.viewable.Viewable:
        """The views as a Panel layout (tokens on top, the rest as tabs), without the controls."""
        top = [self.views[n] for n in self.views if n == "tokens"]
        rest = [(VIEWS[n][1], self.views[n]) for n in self.views if n != "tokens"]
        if len(rest) > 1:
            body = [pn.Tabs(*rest, dynamic=False, sizing_mode="stretch_width")]
        else:
            body = [v for _, v in rest]
        return pn.Column(*top, *body, sizing_mode="stretch_width")

    def bokeh_widget(self) -> ipw.Widget:
        """The views as one jupyter_bokeh ipywidget (built once, on first display)."""
        if self._bokeh is None:
            self._bokeh = as_ipywidget(self.panel())
            self.widget.children = (*self.widget.children, self._bokeh)
        return self._bokeh

    def _ipython_display_(self) -> None:
        load_extension()
        self.bokeh_widget()
        from IPython.display import display
        display(self.widget)
        if self.state.trace is None or self.state.status == "running":
            self.follow()

    def __repr__(self) -> str:
        return f"<TraceWidget {self.path} steps={self.state.n_steps} status={self.state.status or '-'}>"

    # ---------------------------------------------------------------- controls
    def _build_controls(self) -> None:
        c = {
            "play": ipw.Play(value=0, min=0, max=0, step=1, interval=400, description="play",
                             layout=ipw.Layout(width="auto")),
            "step": ipw.IntSlider(value=0, min=0, max=0, description="step", continuous_update=False,
                                  layout=ipw.Layout(width="340px")),
            "seq": ipw.Dropdown(options=[("sequence 0", 0)], value=0, description="sequence",
                                layout=ipw.Layout(width="190px")),
            "layer": ipw.Dropdown(options=[("layer 0", 0)], value=0, description="layer",
                                  layout=ipw.Layout(width="170px")),
            "head": ipw.Dropdown(options=[("head 0", 0)], value=0, description="head",
                                 layout=ipw.Layout(width="170px")),
            "follow": ipw.Checkbox(value=True, description="follow the newest step", indent=False,
                                   layout=ipw.Layout(width="200px")),
        }
        for w in ("seq", "layer", "head"):
            c[w].style.description_width = "60px"
        c["step"].style.description_width = "40px"
        # Play ticks in the browser (no kernel clock needed for replay) and moves the slider.
        ipw.jslink((c["play"], "value"), (c["step"], "value"))
        c["step"].observe(self._step_moved, "value")
        for name in ("seq", "layer", "head"):
            c[name].observe(lambda ch, name=name: self._choice_moved(name, ch), "value")
        c["follow"].observe(self._follow_toggled, "value")
        self.controls = c
        self._control_row = ipw.HBox([c["play"], c["step"], c["seq"], c["layer"], c["head"], c["follow"]],
                                     layout=ipw.Layout(flex_flow="row wrap", align_items="center"))
        self.status = ipw.HTML("")
        self.error = ipw.HTML("", layout=ipw.Layout(display="none"))

    def _step_moved(self, change) -> None:
        if not self._syncing and change["new"] != self.state.step:
            self.state.select_step(int(change["new"]))

    def _choice_moved(self, name: str, change) -> None:
        if not self._syncing and change["new"] is not None and change["new"] != getattr(self.state, name):
            setattr(self.state, name, int(change["new"]))

    def _follow_toggled(self, change) -> None:
        st = self.state
        if self._syncing or change["new"] == st.follow:
            return
        st.follow = bool(change["new"])
        if st.follow:
            st.select_step(st.n_steps - 1)

    def _sync_controls(self, *events) -> None:
        """State -> controls (guarded, so the controls' own observers do not echo back)."""
        st, c = self.state, self.controls
        self._syncing = True
        try:
            last = max(st.n_steps - 1, 0)
            with c["step"].hold_trait_notifications():
                c["step"].max = last
                c["step"].value = min(st.step, last)
            c["play"].max = last
            c["play"].value = min(st.step, last)
            for name, n, label in (("seq", st.n_seqs, "sequence"), ("layer", st.n_layers, "layer"),
                                   ("head", st.n_heads, "head")):
                options = [(f"{label} {i}", i) for i in range(max(n, 1))]
                if list(c[name].options) != options:
                    c[name].options = options
                c[name].value = min(getattr(st, name), max(n, 1) - 1)
            c["seq"].layout.display = None if st.n_seqs > 1 else "none"
            c["follow"].value = st.follow
            c["follow"].layout.display = None if st.status == "running" else "none"
            steps = f"{st.n_steps} steps" if st.trace is not None else ""
            name = html.escape(Path(st.path).name) if st.path else ""
            self.status.value = (f"<div style='font-size:13px'>{status_badge(st.status)} <b>{name}</b> "
                                 f"<span style='color:#6b7688'>{steps}</span></div>")
            self.error.value = f"<div style='color:#a61b1b'>{html.escape(st.error)}</div>" if st.error else ""
            self.error.layout.display = None if st.error else "none"
        finally:
            self._syncing = False

    # ---------------------------------------------------------------- live
    def refresh(self) -> bool:
        """Read newly committed steps (or open the trace once it appears); True if anything changed."""
        changed = self.state.tick()
        self._sync_controls()
        return bool(changed)

    def follow(self, interval: float = REFRESH_SECONDS) -> asyncio.Task | None:
        """Refresh every ``interval`` seconds on the running event loop until the run ends.

        Returns the asyncio task, or None outside a running loop (call ``refresh()`` yourself there).
        """
        loop = _running_loop()
        if loop is None:
            return None
        if self._task is not None and not self._task.done():
            return self._task

        async def beat() -> None:
            while True:
                t0 = time.perf_counter()
                self.refresh()
                if self.state.trace is not None and self.state.status != "running":
                    return
                await asyncio.sleep(_pause(time.perf_counter() - t0, interval))

        self._task = loop.create_task(beat())
        return self._task

    def stop_following(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def show_dashboard(path: str | Path, trace: str | None = None):
    """Show the whole dashboard (sidebar controls, every view, the live clock) inline in a cell.

    Args:
        path: a trace store or a directory of trace stores.
        trace: name of the trace to open first when ``path`` is a directory.

    Returns:
        The ``workbench.views.dashboard.Dashboard`` (its ``state`` is the shared ``TraceState``).
    """
    from workbench.views.dashboard import Dashboard
    load_extension()
    dashboard = Dashboard(path, trace=trace)
    widget = as_ipywidget(dashboard)
    if _running_loop() is not None:
        dashboard.start_clock()  # a tornado periodic callback on the kernel's loop
    _display(widget)
    dashboard.ipywidget = widget
    return dashboard


# ==================================================================== live generation
def _run_spec(spec=None, **overrides):
    from workbench.runtime.sampler import SamplerConfig
    from workbench.runtime.session import RunSpec
    if isinstance(overrides.get("sampler"), dict):
        overrides["sampler"] = SamplerConfig(**overrides["sampler"])
    if spec is None:
        spec = RunSpec(**overrides)
    elif isinstance(spec, dict):
        spec = RunSpec(**{**spec, **overrides})
    elif isinstance(spec, RunSpec):
        spec = dataclasses.replace(spec, **overrides)
    else:
        raise WorkbenchError(f"generate_live needs a RunSpec, a dict or keyword arguments, got {type(spec).__name__}")
    if spec.record is None:
        spec = dataclasses.replace(spec, record=str(Path(tempfile.mkdtemp(prefix="workbench-")) / "trace.zarr"))
    return spec


class RunCancelled(WorkbenchError):
    """The run was cancelled from the notebook (``LiveRun.cancel()``)."""


class LiveRun:
    """A generation running in a background thread while a cell shows its trace growing.

    Use ``generate_live`` to start one. ``wait()`` blocks until it ends and returns the
    ``GenerationResult``; ``result`` is that result (None while running); ``trace`` opens the trace.

    Attributes:
        spec: the ``RunSpec`` being run (``spec.record`` is the trace path).
        path: the trace store.
        steps_done: generation steps finished so far (step 0 is the prefill).
        done: the run has ended (complete or failed).
        error: the exception it failed with, or None.
        widget: the ``TraceWidget`` following the trace.
        progress: the ipywidgets ``IntProgress`` (steps done of ``max_new_tokens``).
    """

    def __init__(self, spec, views: Iterable[str] | None = None, on_step: Callable | None = None) -> None:
        self.spec = spec
        self._user_on_step = on_step
        self.steps_done = 0
        self.done = False
        self.path = Path(spec.record)
        self.error: BaseException | None = None
        self._result = None
        self._cancel = threading.Event()
        self._started = time.perf_counter()
        self.seconds = 0.0
        self.widget = TraceWidget(self.path, views=views)
        total = spec.max_new_tokens
        self.progress = ipw.IntProgress(value=0, min=0, max=total, description="tokens",
                                        layout=ipw.Layout(width="420px"))
        self.progress_text = ipw.HTML(f"0 / {total}")
        self.box = ipw.VBox([ipw.HBox([self.progress, self.progress_text]), self.widget.widget])
        self._thread = threading.Thread(target=self._work, name="workbench-live-run", daemon=True)
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------- the run
    def _on_step(self, event) -> None:
        if self._cancel.is_set():
            raise RunCancelled("generation cancelled from the notebook")
        if self._user_on_step is not None:
            self._user_on_step(event)
        self.steps_done = int(event.step) + 1

    def _work(self) -> None:
        from workbench.runtime.session import run
        try:
            self._result = run(self.spec, on_step=self._on_step)
        except BaseException as e:  # reported by wait()/result, shown in the cell
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self._started
            self.done = True

    def start(self) -> "LiveRun":
        self._thread.start()
        loop = _running_loop()
        if loop is not None:
            self._task = loop.create_task(self._beat())
        return self

    async def _beat(self) -> None:
        while not self.done:
            t0 = time.perf_counter()
            self.update()
            await asyncio.sleep(_pause(time.perf_counter() - t0))
        self.update()

    def update(self) -> None:
        """Refresh the progress bar and the trace widget once (the live task calls this)."""
        n = self.steps_done
        self.progress.value = min(n, self.progress.max)
        elapsed = (self.seconds if self.done else time.perf_counter() - self._started)
        if self.done and self.error is not None:
            self.progress.bar_style = "danger"
            text = f"failed: {html.escape(str(self.error))}"
        else:
            if self.done:
                self.progress.bar_style = "success"
            text = f"{n} / {self.progress.max} steps · {elapsed:.1f} s"
        self.progress_text.value = text
        self.widget.refresh()

    # ---------------------------------------------------------------- the handle
    def wait(self, timeout: float | None = None):
        """Block until the generation ends; returns its ``GenerationResult``.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            The run's own error (e.g. ``WorkbenchError``) if it failed.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"generation still running after {timeout} s")
        if self._task is not None:
            self._task.cancel()
        self.update()
        if self.error is not None:
            raise self.error
        return self._result

    @property
    def result(self):
        """The ``GenerationResult`` once finished (None while running); raises the run's error."""
        if not self.done:
            return None
        if self.error is not None:
            raise self.error
        return self._result

    @property
    def trace(self):
        """The run's trace, opened now (cut at the committed prefix; ``refresh()`` it to follow)."""
        from workbench.trace.reader import open_trace
        return open_trace(self.path)

    def cancel(self) -> None:
        """Stop the generation at its next step (the trace is marked failed)."""
        self._cancel.set()

    def show(self) -> None:
        """Display the progress bar and the trace widget (again) in the current cell."""
        load_extension()
        self.widget.bokeh_widget()
        _display(self.box)

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "complete" if self.done else "running"
        return f"<LiveRun {state} {self.steps_done}/{self.spec.max_new_tokens} steps, trace {self.path}>"


def generate_live(spec=None, *, views: Iterable[str] | None = None, display: bool = True,
                  on_step: Callable | None = None, **overrides) -> LiveRun:
    """Start a recorded generation in the background and show it growing in the cell.

    Args:
        spec: a ``RunSpec`` or a dict of its fields (None: the defaults); ``overrides`` replace fields
            (``prompts=[...]``, ``max_new_tokens=32``, ``tp=2``, ``arm={...}``, ``sampler={...}``).
            Without ``record`` the trace goes to a new temporary directory.
        views: which views the widget shows (default: all).
        display: show the progress bar and widget in the current cell (inside a notebook).
        on_step: also called with every ``StepEvent`` (rank 0's), in the generation thread.

    Returns:
        A ``LiveRun``: ``wait()`` for the ``GenerationResult``, ``result``, ``trace``, ``path``.

    Raises:
        WorkbenchError: a bad spec (checked before anything starts where the runtime can).
    """
    from workbench.probes.recording import check_record_path
    spec = _run_spec(spec, **overrides)
    check_record_path(spec.record, spec.overwrite)
    live = LiveRun(spec, views=views, on_step=on_step)
    if display:
        live.show()
    return live.start()
