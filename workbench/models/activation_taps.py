"""Activation taps: blocks store the tensors of the histogram sites into slots of one list.

A histogram probe only keeps a reference to four tensors per layer and step. Kept by hook-point
listeners, that is four Python calls per layer, 1-1.5 us each inside a forward pass (measured:
about 1% of a decode step of the default model, as much as the rest of the probe). A block given
taps stores each tensor into its slot instead, after the site's hook point has run its listeners,
so the tap holds what flows on; with no taps it pays one None check per site.
"""
from __future__ import annotations

from typing import Sequence

# Per block, in slot order; the names are the trace's activation sites (trace/schema.py).
TAP_SITES = ("mlp.act.pre", "mlp.act.post", "attn.out", "resid.post")


def attach_activation_taps(blocks: Sequence) -> list:
    """Give ``blocks`` (modules with ``taps`` / ``tap_slot``, in the trace's layer order) one list;
    after a forward pass it holds ``len(TAP_SITES)`` tensors per block, block-major."""
    taps: list = [None] * (len(blocks) * len(TAP_SITES))
    for k, block in enumerate(blocks):
        block.attach_taps(taps, k * len(TAP_SITES))
    return taps


def detach_activation_taps(blocks: Sequence) -> None:
    for block in blocks:
        block.attach_taps(None, 0)
