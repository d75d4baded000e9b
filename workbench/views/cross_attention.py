"""Perceiver AR view: cross-attention (latent x input) and latent self-attention (latent x latent)
of the selected head, as the window stands after the selected step (its filled latent slots).

A Perceiver AR step records only the latent rows it computed (repeat 0's cross-attention: one new
row per decode step); the reader's ``cross_attention_map`` / ``latent_attention_map`` rebuild the
window's full map by position, so rows stay right after the window slides. Only the selected
(seq, repeat, block, head) slices of the last ~N steps are read.
"""
from __future__ import annotations

import numpy as np
import panel as pn

from workbench.views.base import TraceView
from workbench.views.heatmap import Heatmap
from workbench.views.tokens import SequenceText


def perceiver_maps(trace, seq: int, step: int, repeat: int, head: int, self_layer: int | None
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Cross map [latent, input], latent map [latent, latent_key] (None without latent blocks) and
    the latent positions [latent] (-1: empty slot) after ``step``."""
    cross = trace.cross_attention_map(seq, repeat, head, step=step)
    latent = None
    if self_layer is not None and trace.latent_attention is not None:
        latent = trace.latent_attention_map(seq, repeat, self_layer, head, step=step).values
    return cross.values, latent, np.asarray(cross.latent_position.values)


class PerceiverAttentionView(TraceView):
    """Cross and latent attention of the selected head; repeat and latent block chosen here."""

    watch_params = ("trace", "step", "seq", "head", "version")

    def build(self):
        self.repeat = pn.widgets.IntSlider(label="repeat", start=0, end=1, value=0, width=200)
        self.block = pn.widgets.IntSlider(label="latent block", start=0, end=1, value=0, width=200)
        for w in (self.repeat, self.block):
            w.param.watch(lambda e: self._safe_redraw({"selection"}), "value")
        self.cross = Heatmap(title="cross-attention", width=560, height=360, x_name="input", y_name="latent",
                             name="perceiver-cross")
        self.latent = Heatmap(title="latent self-attention", width=420, height=360, x_name="latent key",
                              y_name="latent", name="perceiver-latent")
        self._text = SequenceText()
        return pn.Column(pn.Row(self.repeat, self.block),
                         pn.Row(pn.pane.Bokeh(self.cross.figure), pn.pane.Bokeh(self.latent.figure)),
                         sizing_mode="stretch_width")

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        tr = st.trace
        if tr.cross_attention is None:
            self.note("this trace has no Perceiver maps (not a Perceiver AR run)")
            return
        if st.n_steps == 0:
            return
        p = tr.spec.perceiver
        self.repeat.param.update(end=max(p.n_repeats - 1, 1), disabled=p.n_repeats < 2)
        self.block.param.update(end=max(p.n_self_layers - 1, 1), disabled=p.n_self_layers < 2,
                                visible=p.n_self_layers > 0)
        rep = min(self.repeat.value, p.n_repeats - 1)
        block = min(self.block.value, p.n_self_layers - 1) if p.n_self_layers else None
        head = st.head % p.n_heads
        cross, latent, lat_pos = perceiver_maps(tr, st.seq, st.step, rep, head, block)
        text = self._text.read(tr, st.seq)  # look tokens up by absolute position (``text_at``)

        def name(pos: int, fallback: str) -> str:
            token = text.text_at(pos)
            return f"{pos}:{token}" if token is not None else fallback

        # Until the window is full, most latent slots hold nothing yet: show the filled ones only.
        filled = lat_pos >= 0
        if filled.any() and not filled.all():
            cross, lat_pos = cross[filled], lat_pos[filled]
            latent = latent[filled][:, filled] if latent is not None else None
        rows = [name(int(q), f"slot {i}") for i, q in enumerate(lat_pos)]
        inputs = [name(c, str(c)) for c in range(cross.shape[1])]
        self.cross.show(cross, inputs, rows,
                        title=f"cross-attention · repeat {rep} · head {head} · step {st.step}")
        if latent is not None:
            self.latent.show(latent, rows, rows,
                             title=f"latent self-attention · repeat {rep} · block {block} · head {head}")
        self.latent.figure.visible = latent is not None
