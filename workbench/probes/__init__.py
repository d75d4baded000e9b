"""Probes: subscribe to hook points, reduce on the rank that owns the data, feed the trace writer."""
from workbench.probes.selection import ProbeSelection

__all__ = ["ProbeSelection"]
