"""Trace store: the versioned Zarr v3 layout, its writer and its reader (see docs/trace-format.md).

Exports are lazy so that the writer's worker process starts without importing xarray.
"""

import importlib

_EXPORTS = {
    "Trace": "reader", "TraceError": "reader", "open_trace": "reader", "has_attention_maps": "reader",
    "FORMAT_NAME": "schema", "FORMAT_VERSION": "schema", "PerceiverSpec": "schema", "TraceSpec": "schema",
    "default_bin_edges": "schema", "ActivationStats": "stats", "finish_moments": "stats",
    "TraceWriter": "writer", "TraceWriterError": "writer", "WriterStats": "writer", "create_store": "writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
