"""Which traces the dashboard may show: the one it was given, or those under a directory.

The served page can ask for a trace by name (the selector, or ``?trace=NAME`` in the URL). Names are
resolved under the root the server was started with, and anything that lands outside it (``..``,
absolute paths, symlinks pointing elsewhere) is refused, so a dashboard never becomes a file browser.
"""
from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError

# How deep below a directory root to look for trace stores (runs/<name>/ or runs/<group>/<name>/).
MAX_DEPTH = 3


def is_trace_store(path: Path) -> bool:
    """True if ``path`` looks like a Zarr v3 group (a directory with zarr.json) holding a trace."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return True  # a damaged store is still a trace the user will want to see the error of
    if doc.get("node_type") != "group":
        return False
    attrs = doc.get("attributes") or {}
    # Sub-groups (tokens/, attention/ ...) carry no format name; only the root store does.
    return any("format" in k for k in attrs) or (path / "tokens").is_dir()


class TraceCatalog:
    """The traces one dashboard serves: ``root`` itself if it is a trace, else stores below it.

    Args:
        root: a trace store directory, or a directory containing trace stores (it may not exist yet:
            a live run creates its store a moment after the server starts).
        depth: how many directory levels below the root to look (1: the root's own entries).
    """

    def __init__(self, root: str | Path, depth: int = MAX_DEPTH) -> None:
        self.root = Path(root).expanduser().resolve()
        self.depth = depth

    @property
    def single(self) -> bool:
        """True when the root is (or will become) one trace rather than a directory of traces."""
        return is_trace_store(self.root) or not self.root.exists()

    def names(self) -> list[str]:
        """Trace names relative to the root, sorted; ``"."`` when the root is itself a trace."""
        if self.single:
            return ["."]
        found: list[str] = []

        def walk(d: Path, depth: int) -> None:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                return
            for c in children:
                if c.resolve() != self.root and self.root not in c.resolve().parents:
                    continue  # a symlink out of the root: never listed (and resolve() refuses it)
                if is_trace_store(c):
                    found.append(c.relative_to(self.root).as_posix())
                elif depth < self.depth:
                    walk(c, depth + 1)

        walk(self.root, 1)
        return found

    def resolve(self, name: str) -> Path:
        """The path of trace ``name`` under the root; refuses names that point outside it."""
        if name in ("", "."):
            return self.root
        candidate = Path(name)
        if candidate.is_absolute():
            raise WorkbenchError(f"trace {name!r} refused: give a name relative to the served directory")
        path = (self.root / candidate).resolve()
        if path != self.root and self.root not in path.parents:
            raise WorkbenchError(f"trace {name!r} refused: it is outside the served directory")
        return path
