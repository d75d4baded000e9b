"""The `zarr.json` documents of a trace store, written without zarr's machinery.

Creating a store through zarr took ~0.3 s: some seventy arrays, each a few milliseconds of
zarr's metadata code and a round trip to its event-loop thread. Every recording pays that before
its first step, and a notebook that records short runs again and again feels it. The documents
are small and fixed by the Zarr v3 specification, so `create_store` writes them itself, byte for
byte as zarr 3 does (`json.dumps(..., indent=2, allow_nan=True)`, the same keys in the same
order); tests/test_trace_store.py holds them to zarr's own for every group of a full spec.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .schema import STRING, ArrayLayout


def group_metadata(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def array_metadata(layout: ArrayLayout, attributes: dict[str, Any], zstd_level: int) -> dict[str, Any]:
    """An array's metadata: regular chunks, default "/" keys, bytes (little-endian) or vlen-utf8
    then zstd, the layout's fill value and dimension names."""
    serializer = ({"name": "vlen-utf8", "configuration": {}} if layout.dtype == STRING
                  else {"name": "bytes", "configuration": {"endian": "little"}})
    return {
        "shape": list(layout.shape),
        "data_type": "string" if layout.dtype == STRING else layout.dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(layout.chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value(layout),
        "codecs": [serializer, {"name": "zstd", "configuration": {"level": zstd_level, "checksum": False}}],
        "attributes": attributes,
        "dimension_names": list(layout.dims),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def fill_value(layout: ArrayLayout) -> Any:
    """The fill value as the specification writes it: NaN and infinities as strings."""
    if layout.dtype == STRING:
        return str(layout.fill)
    if layout.dtype == "bool":
        return bool(layout.fill)
    if layout.dtype.startswith(("int", "uint")):
        return int(layout.fill)
    value = float(layout.fill)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def encode(metadata: dict[str, Any]) -> bytes:
    """A `zarr.json` file's bytes."""
    return json.dumps(metadata, indent=2, allow_nan=True).encode()
