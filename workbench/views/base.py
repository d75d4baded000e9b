"""The shape every view shares: a ``Viewer`` over a ``TraceState`` that redraws on changes.

A view builds its Bokeh figures once, then ``redraw`` refills their data sources from the trace
when the selection or the committed steps change. A failure inside one view (a group the trace does
not have, a damaged array) shows as a note in that view; the page and the other views keep working.
"""
from __future__ import annotations

import time

import numpy as np
import panel as pn
import param
from bokeh.models import Legend

from workbench.views.state import TraceState


def finite_floats(a) -> list[float]:
    """Floats for a Bokeh data source; NaN (drawn as a gap) for anything not finite."""
    return [float(x) if np.isfinite(x) else float("nan") for x in np.asarray(a, dtype=np.float64).ravel()]


def legend_outside(fig, side: str = "above", **style) -> None:
    """Move the figure's legend from over the data to beside the plot (``side``: "above", in one
    row, or "right"), where it hides no line or bar; a click on an entry hides its glyphs. Glyphs
    added later with ``legend_label`` join the same legend; ``style``: more Legend properties."""
    for legend in [o for o in fig.center if isinstance(o, Legend)]:
        fig.center = [o for o in fig.center if o is not legend]
        fig.add_layout(legend, side)
    for legend in fig.legend:
        legend.update(orientation="horizontal" if side == "above" else "vertical", location="top_left",
                      label_text_font_size="10px", margin=0 if side == "above" else 10, padding=2, spacing=8,
                      click_policy="hide", **style)


def waits_for_live(state: TraceState, changed: set[str], allowed: set[str], last_at: float, seconds: float) -> bool:
    """True while a view's costly redraw may wait: the user follows a live run, nothing but
    ``allowed`` changed, and the last such redraw (at ``last_at``, time.monotonic) is younger than
    ``seconds``. A step the user picks, or the run's end, is drawn at once."""
    return (state.status == "running" and state.follow and changed <= allowed
            and time.monotonic() - last_at < seconds)


class TraceView(pn.viewable.Viewer):
    """Base class: subclasses set ``watch_params`` and implement ``build`` and ``redraw``."""

    state = param.ClassSelector(class_=TraceState)
    watch_params: tuple[str, ...] = ("trace", "step", "seq", "layer", "head", "version")
    last_redraw_seconds = param.Number(default=0.0, doc="how long the last redraw took (for the benchmark)")
    active = param.Boolean(default=True, doc="shown on the page; a hidden view defers redraws until shown")

    def __init__(self, state: TraceState | None = None, **params) -> None:
        super().__init__(state=state or TraceState(), **params)
        self._note = pn.pane.Alert("", alert_type="light", visible=False, margin=(4, 10),
                                   css_classes=[f"wb-note-{type(self).__name__}"])  # for browser tests
        self._body = self.build()
        self._layout = pn.Column(self._note, self._body, sizing_mode="stretch_width")
        self._pending: set[str] = set()
        self.state.param.watch(self._changed, list(self.watch_params))
        self.param.watch(self._shown, "active")
        self._safe_redraw(None)

    def __panel__(self):
        return self._layout

    def build(self) -> pn.viewable.Viewable:
        raise NotImplementedError

    def redraw(self, changed: set[str]) -> None:
        """Refill figures for the current selection; ``changed`` names the state params that moved."""
        raise NotImplementedError

    def _changed(self, *events) -> None:
        changed = {e.name for e in events}
        if not self.active:  # e.g. a background tab during replay: catch up when it is shown
            self._pending |= changed
            return
        self._safe_redraw(changed)

    def _shown(self, event) -> None:
        if event.new and self._pending:
            pending, self._pending = self._pending, set()
            self._safe_redraw(pending)

    def _safe_redraw(self, changed: set[str] | None) -> None:
        t0 = time.perf_counter()
        try:
            self.note("")  # before drawing, so a note the view sets while drawing stays
            if self.state.trace is None:
                self.clear()
            else:
                self.redraw(changed or set(self.watch_params))
        except Exception as e:  # keep the page alive; say what went wrong where it went wrong
            self.note(f"cannot draw this view: {type(e).__name__}: {e}", "danger")
        self.last_redraw_seconds = time.perf_counter() - t0

    def clear(self) -> None:
        """Called when no trace is open; views may blank themselves."""

    def note(self, text: str, kind: str = "light") -> None:
        self._note.object = text
        self._note.alert_type = kind
        self._note.visible = bool(text)
