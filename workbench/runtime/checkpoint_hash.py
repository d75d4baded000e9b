"""The checkpoint's sha256, recorded with every trace so that a replay can tell it runs the same model.

Hashing reads every weight file: ~1.5 GB/s here when the files are in the page cache, far slower
from disk, so 10 s to minutes before each recorded run of a multi-gigabyte checkpoint. The hash is
therefore cached per checkpoint directory, keyed by each file's name, size, inode and change
times; a file rewritten or touched in any way (ctime cannot be set back) is hashed again.
The cache lives in ``$WORKBENCH_CACHE_DIR`` (default ``$XDG_CACHE_HOME/workbench`` or
``~/.cache/workbench``); when it cannot be read or written the hash is simply computed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from workbench.runtime.checkpoint import weight_files

CACHE_FILE = "checkpoint-hashes.json"


def cache_dir() -> Path:
    if os.environ.get("WORKBENCH_CACHE_DIR"):
        return Path(os.environ["WORKBENCH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workbench"


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over config.json and the weight files (names and contents), cached (module doc)."""
    path = Path(path).resolve()
    files = [path / "config.json", *weight_files(path)]
    key = [[f.name, *_identity(f)] for f in files]
    cache = _read_cache()
    hit = cache.get(str(path))
    if isinstance(hit, dict) and hit.get("files") == key and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = hash_files(files)
    cache = {p: v for p, v in cache.items() if Path(p).is_dir()}  # forget checkpoints deleted since
    cache[str(path)] = {"files": key, "sha256": digest}
    _write_cache(cache)
    return digest


def hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _identity(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _read_cache() -> dict:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict) -> None:
    """Replace the cache file whole (a concurrent reader sees the old one or the new one)."""
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=CACHE_FILE, suffix=".tmp")
    except OSError:
        return  # no cache: the next run hashes again
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh)
        os.replace(tmp, d / CACHE_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # e.g. a full disk: leave no half-written file behind
