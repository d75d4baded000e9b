"""Trace store: the versioned Zarr v3 layout, its writer and its reader (see docs/trace-format.md)."""

from .reader import Trace, TraceError, open_trace
from .schema import FORMAT_NAME, FORMAT_VERSION, PerceiverSpec, TraceSpec, default_bin_edges
from .stats import ActivationStats, finish_moments
from .writer import TraceWriter, TraceWriterError, WriterStats, create_store

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ActivationStats", "PerceiverSpec", "Trace", "TraceError",
    "TraceSpec", "TraceWriter", "TraceWriterError", "WriterStats", "create_store",
    "default_bin_edges", "finish_moments", "open_trace",
]
