"""Part clocks: timestamps a block takes itself at the boundaries of its parts.

A timing probe needs when each part of a block (attention, the first residual-norm unit, the MLP,
the second unit) starts and ends. Taken by hook-point listeners, every stamp would cost a Python
call: 1-2 us inside a forward pass (measured), about as long as a part of a small model takes, so
the probe would inflate what it measures. A block given a clock stores ``now()`` into its slots of
one list instead; with no clock it pays one None check per boundary.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

# Per block, in forward order: start, after attention, after the first unit, after the MLP, after
# the second unit. A block's parts are the differences between consecutive stamps.
BOUNDARIES = 5


class PartClock:
    """The stamps of one forward pass, ``ns[block * BOUNDARIES + i]`` (perf_counter_ns; 0: not reached)."""

    def __init__(self, n_blocks: int, device: torch.device) -> None:
        self.ns = [0] * (n_blocks * BOUNDARIES)
        if device.type == "cuda":  # host time of a kernel launch means nothing: wait for the device
            def now() -> int:
                torch.cuda.synchronize(device)
                return time.perf_counter_ns()
            self.now = now
        else:
            self.now = time.perf_counter_ns

    def take(self) -> list[int]:
        """The stamps taken since the last take; the next forward pass writes a fresh list."""
        ns, self.ns = self.ns, [0] * len(self.ns)
        return ns


def attach_part_clock(blocks: Sequence, device: torch.device) -> PartClock:
    """Give ``blocks`` (modules with ``part_clock`` / ``part_clock_slot``) one clock, in this order."""
    clock = PartClock(len(blocks), device)
    for k, block in enumerate(blocks):
        block.part_clock, block.part_clock_slot = clock, k * BOUNDARIES
    return clock


def detach_part_clock(blocks: Sequence) -> None:
    for block in blocks:
        block.part_clock = None
