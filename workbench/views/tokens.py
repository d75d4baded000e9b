"""Tokens view: prompt and generated text as it grows, click a token to select its step, and the
sampler's top-k candidates at the selected step.

The text is read once and then extended with only the newly committed positions. Candidate token
texts come from the trace itself (every id that appears in the text), since a trace carries no
tokenizer; ids never seen in the text are shown as ``#id``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import panel as pn
from bokeh.models import ColumnDataSource, FactorRange, HoverTool
from bokeh.plotting import figure

from workbench.views.base import TraceView
from workbench.views.token_strip import TokenStrip


@dataclass
class TokenText:
    """The text of one sequence, extended as steps are committed."""

    seq: int
    n_prompt: int = 0            # prompt positions (padded prompt length)
    prompt_len: int = 0          # real prompt tokens
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)  # step that produced each position
    vocab: dict[int, str] = field(default_factory=dict)

    def visible(self, step: int) -> int:
        """Positions that exist once ``step`` is done (prompt plus tokens produced by steps <= step)."""
        produced = np.asarray(self.produced)
        return int(np.count_nonzero((produced >= 0) & (produced <= step)))

    def step_of(self, position: int) -> int:
        """Step to select when ``position`` is clicked: the one that produced it (0 for the prompt)."""
        if position < self.n_prompt or position >= len(self.produced):
            return 0
        return max(int(self.produced[position]), 0)

    def position_of(self, step: int) -> int:
        """Position of the token produced at ``step`` (-1 if none)."""
        for p in range(self.n_prompt, len(self.produced)):
            if self.produced[p] == step:
                return p
        return -1

    def label(self, token_id: int) -> str:
        return self.vocab.get(int(token_id), f"#{int(token_id)}")


def read_token_text(trace, seq: int, known: TokenText | None = None) -> TokenText:
    """Token text of ``seq`` up to the committed step; with ``known``, read only new positions."""
    ds = trace.tokens
    n_steps = int(trace.n_steps)
    if known is None or known.seq != seq:
        known = TokenText(seq=seq)
    if n_steps == 0:
        return known
    if known.n_prompt == 0:  # first read after the prefill was committed
        known.n_prompt = int(ds["query_stop"][seq, 0].values)
        known.prompt_len = int(ds["prompt_len"][seq].values)
    # The reader cuts `position` at the last position produced by a committed step.
    stop = int(ds.sizes["position"])
    start = len(known.texts)
    if stop <= start:
        return known
    produced = np.asarray(ds["produced_step"][seq, start:stop].values)
    ids = np.asarray(ds["token_id"][seq, start:stop].values)
    texts = [str(t) for t in ds["text"][seq, start:stop].values]
    written = int(np.count_nonzero(produced >= 0)) if produced.size else 0
    # Keep a contiguous written prefix (a position is written once, in order).
    n = written if written == len(produced) or produced.size == 0 else int(np.argmin(produced >= 0))
    known.produced.extend(int(p) for p in produced[:n])
    known.ids.extend(int(i) for i in ids[:n])
    known.texts.extend(texts[:n])
    for i, t in zip(ids[:n], texts[:n]):
        known.vocab.setdefault(int(i), t)
    return known


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
        return pn.Column(
            pn.pane.HTML("<b>Text</b> <span style='color:#6b7688'>— click a token to jump to the step "
                         "that produced it; faded tokens come after the selected step</span>",
                         margin=(0, 10)),
            self.strip, self.summary, pn.pane.Bokeh(fig), sizing_mode="stretch_width")

    def clear(self) -> None:
        self.text = None
        self.strip.replace([], 0)
        self.cand_source.data = dict(label=[], prob=[], color=[], rank=[])
        self.summary.object = ""

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        fresh = self.text is None or "trace" in changed or "seq" in changed
        self.text = read_token_text(st.trace, st.seq, None if fresh else self.text)
        t = self.text
        if fresh:
            self.strip.replace(t.texts, t.n_prompt)
        elif len(t.texts) != len(self.strip.tokens):
            self.strip.tokens = list(t.texts)   # same prefix: the browser appends the new spans
        pos = t.position_of(st.step)
        self.strip.param.update(n_visible=t.visible(st.step), selected=pos, n_prompt=t.n_prompt)
        self._show_candidates(pos)

    def _show_candidates(self, pos: int) -> None:
        st, t = self.state, self.text
        if st.n_steps == 0:
            return
        ids, probs, chosen = read_candidates(st.trace, st.seq, st.step)
        labels = [f"{r + 1}. {_visible(t.label(i))}" for r, i in enumerate(ids)]
        colors = ["#e0a100" if int(i) == chosen else "#5b8bd0" for i in ids]
        self.cand_fig.y_range.factors = labels[::-1]
        self.cand_source.data = dict(label=labels, prob=probs.tolist(), color=colors,
                                     rank=list(range(1, len(ids) + 1)))
        self.cand_fig.x_range.end = float(max(probs.max() * 1.1, 0.05)) if probs.size else 1.0
        chosen_text = _visible(t.label(chosen)) if chosen >= 0 else "—"
        p = next((float(pr) for i, pr in zip(ids, probs) if int(i) == chosen), float("nan"))
        generated = max(len(t.texts) - t.n_prompt, 0)
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
    return repr(text)[1:-1] if text.strip() != text or not text.isprintable() else text


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
