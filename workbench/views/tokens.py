"""Tokens view: prompt and generated text as it grows, click a token to select its step, the
sampler's top-k candidates at the selected step, and the sampled token's probability at every step
(where the model was unsure; click to select that step).

The text is read once and then extended with only the newly committed positions. Candidate token
texts come from the trace's vocabulary table (``tokens/vocab_text``: a trace carries no tokenizer);
in traces recorded before it existed, from the ids that appear in the text, and other ids show
as ``#id``.
"""
from __future__ import annotations

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d, Span
from bokeh.plotting import figure

from workbench.trace.token_text import SequenceText, TokenText, read_token_text, token_labels  # noqa: F401
from workbench.views.base import TraceView, finite_floats
from workbench.views.token_strip import TokenStrip, as_sent


def read_step_probabilities(trace, seq: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """For steps [start, stop): the probability of the sampled token (NaN: not among the recorded
    candidates, or not recorded) and that of the most likely candidate."""
    ds = trace.tokens
    chosen = np.asarray(ds["chosen_prob"][seq, start:stop].values, dtype=np.float64)
    top = np.asarray(ds["candidate_prob"][seq, start:stop, 0].values, dtype=np.float64)
    return chosen, top


def read_candidates(trace, seq: int, step: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k candidate ids and probabilities at ``step`` (most probable first) and the chosen id."""
    ds = trace.tokens
    ids = np.asarray(ds["candidate_id"][seq, step].values)
    probs = np.asarray(ds["candidate_prob"][seq, step].values, dtype=np.float64)
    chosen = int(ds["chosen"][seq, step].values)
    keep = (ids >= 0) & np.isfinite(probs)
    return ids[keep], probs[keep], chosen


class TokensView(TraceView):
    """Clickable token text plus the top-k candidates of the selected step."""

    watch_params = ("trace", "step", "seq", "version")

    def build(self):
        self.text: TokenText | None = None
        self.strip = TokenStrip(sizing_mode="stretch_width", min_height=60)
        self.strip.param.watch(self._on_click, "clicked")
        self.shade = pn.widgets.Checkbox(label="shade tokens by probability (the warmer, the less likely)",
                                         value=False, margin=(0, 10), css_classes=["wb-shade"])
        self.shade.link(self.strip, value="shade")
        self.summary = pn.pane.HTML("", margin=(0, 10), sizing_mode="stretch_width")
        self.cand_source = ColumnDataSource(data=dict(label=[], prob=[], color=[], rank=[]))
        fig = figure(height=240, width=460, y_range=FactorRange(factors=[]), x_range=(0, 1),
                     tools="", toolbar_location=None, title="sampler candidates at the selected step",
                     name="tokens-candidates")
        fig.hbar(y="label", right="prob", height=0.75, color="color", source=self.cand_source)
        fig.add_tools(HoverTool(tooltips=[("token", "@label"), ("p", "@prob{0.0000}")]))
        fig.xaxis.axis_label = "probability"
        fig.ygrid.visible = False
        fig.y_range.factors = []
        self.cand_fig = fig
        # Where the model was unsure, across the whole run: a click selects that step.
        self.prob_source = ColumnDataSource(data=dict(step=[], chosen=[], top=[]))
        pf = figure(height=240, width=620, tools="tap,xpan,xwheel_zoom,reset", toolbar_location="right",
                    title="probability of the sampled token at each step (click a step to select it)",
                    name="tokens-probs", x_axis_label="step", y_axis_label="probability", y_range=Range1d(0, 1.05),
                    x_range=Range1d(-0.5, 0.5))
        top = pf.line("step", "top", source=self.prob_source, color="#9aa5b1", line_width=1.5,
                      legend_label="most likely candidate")
        pf.scatter("step", "chosen", source=self.prob_source, color="#e6550d", size=4, legend_label="sampled token")
        tips = [("step", "@step"), ("sampled p", "@chosen{0.000}"), ("most likely p", "@top{0.000}")]
        pf.add_tools(HoverTool(renderers=[top], mode="vline", tooltips=tips))
        legend = pf.legend[0]
        legend.update(orientation="horizontal", label_text_font_size="10px", margin=0, padding=4)
        pf.add_layout(legend, "above")  # outside the plot: probabilities fill all of it
        self.prob_cursor = Span(location=0, dimension="height", line_color="#e0a100", line_width=2)
        pf.add_layout(self.prob_cursor)
        pf.on_event(Tap, self._on_tap_step)
        self.prob_fig = pf
        self._probs_key: tuple | None = None
        self._probs_read = 0
        return pn.Column(
            pn.pane.HTML("<b>Text</b> <span style='color:#6b7688'>— click a token to jump to the step "
                         "that produced it; faded tokens come after the selected step</span>",
                         margin=(0, 10)),
            self.shade, self.strip, self.summary, pn.Row(pn.pane.Bokeh(fig), pn.pane.Bokeh(pf)),
            sizing_mode="stretch_width")

    def clear(self) -> None:
        self.text = None
        self.strip.replace([], 0)
        self.cand_source.data = dict(label=[], prob=[], color=[], rank=[])
        self.prob_source.data = dict(step=[], chosen=[], top=[])
        self._probs_key, self._probs_read = None, 0
        self.summary.object = ""

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        fresh = self.text is None or "trace" in changed or "seq" in changed
        self.text = read_token_text(st.trace, st.seq, None if fresh else self.text)
        t = self.text
        if fresh or len(t.texts) != len(self.strip.tokens):
            # A run recorded without the sampler has no probabilities: nothing to shade, nothing to claim.
            sampled = any(p is not None and p == p for p in t.probs)
            probs = t.probs if sampled else [None] * len(t.probs)
            self.shade.disabled = not sampled
            if fresh:
                self.strip.replace(t.texts, t.prompt_len, t.positions, probs)
            else:
                # Same prefix: the browser appends the new spans (positions and probabilities first,
                # the spans read them).
                self.strip.positions = list(t.positions)
                self.strip.probs = as_sent(probs)
                self.strip.tokens = list(t.texts)
        pos = t.position_of(st.step)
        self.strip.param.update(n_visible=t.visible(st.step), selected=pos, n_prompt=t.prompt_len)
        self._show_candidates(pos)
        self._show_probabilities(sampled=not self.shade.disabled)

    def _show_probabilities(self, sampled: bool) -> None:
        """The probabilities of every committed step, streaming only the new ones."""
        st = self.state
        self.prob_fig.visible = sampled
        key = (id(st.trace), st.seq)
        if key != self._probs_key:
            self.prob_source.data = dict(step=[], chosen=[], top=[])
            self._probs_key, self._probs_read = key, 0
        if sampled and st.n_steps > self._probs_read:
            chosen, top = read_step_probabilities(st.trace, st.seq, self._probs_read, st.n_steps)
            self.prob_source.stream(dict(step=list(range(self._probs_read, st.n_steps)), chosen=finite_floats(chosen),
                                         top=finite_floats(top)))
            x = self.prob_fig.x_range
            if self._probs_read == 0 or x.end == self._probs_read - 0.5:  # not zoomed in: show every step
                x.update(start=-0.5, end=st.n_steps - 0.5)
            self._probs_read = st.n_steps
        self.prob_cursor.location = st.step

    def _on_tap_step(self, event) -> None:
        if event.x is not None and self.state.trace is not None:
            self.state.select_step(int(round(event.x)))

    def _show_candidates(self, pos: int) -> None:
        st, t = self.state, self.text
        if st.n_steps == 0:
            return
        ids, probs, chosen = read_candidates(st.trace, st.seq, st.step)
        *texts, chosen_label = token_labels(st.trace, [*ids, chosen], t)
        labels = [f"{r + 1}. {_visible(text)}" for r, text in enumerate(texts)]
        colors = ["#e0a100" if int(i) == chosen else "#5b8bd0" for i in ids]
        self.cand_fig.y_range.factors = labels[::-1]
        self.cand_source.data = dict(label=labels, prob=probs.tolist(), color=colors,
                                     rank=list(range(1, len(ids) + 1)))
        self.cand_fig.x_range.end = float(max(probs.max() * 1.1, 0.05)) if probs.size else 1.0
        chosen_text = _visible(chosen_label) if chosen >= 0 else "—"
        p = next((float(pr) for i, pr in zip(ids, probs) if int(i) == chosen), float("nan"))
        generated = t.n_generated
        self.summary.object = (
            f"<div style='color:#3d4758;font-size:13px'>step <b>{st.step}</b> of {st.n_steps}"
            f"{' (prefill)' if st.step == 0 else ''} · sampled <code>{_html(chosen_text)}</code>"
            f"{'' if p != p else f' with p = {p:.3f}'} "
            f"{f'at position {pos}' if pos >= 0 else '(past the last recorded position)'} · "
            f"prompt {t.prompt_len} tokens, {generated} generated</div>")

    def _on_click(self, event) -> None:
        if self.text is None or event.new < 0:
            return
        self.state.select_step(self.text.step_of(event.new))


def _visible(text: str) -> str:
    """A token's text as a label: as it is if printable and not padded with whitespace; else
    escaped, with ␣ for its spaces (a space alone would be an empty label)."""
    if text.strip() == text and text.isprintable():
        return text
    return repr(text)[1:-1].replace(" ", "\u2423")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
