"""workbench: record and explore what happens inside transformer inference."""


def __getattr__(name: str):
    """Lazy top-level exports, so `import workbench` stays light (no zarr/xarray until used)."""
    if name == "open_trace":
        from workbench.trace.reader import open_trace

        return open_trace
    if name == "UserProbe":
        from workbench.probes.user_probe import UserProbe

        return UserProbe
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
