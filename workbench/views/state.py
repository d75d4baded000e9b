"""What the user is looking at: one trace and one selected step, sequence, layer and head.

``TraceState`` is a plain ``param.Parameterized`` with no Panel widgets in it, so it is tested in
pytest without a browser. Every view watches it; the dashboard's periodic callback calls ``tick``,
which picks up newly committed steps of a live run and advances replay.
"""
from __future__ import annotations

from pathlib import Path

import param

from workbench.errors import WorkbenchError


class TraceState(param.Parameterized):
    """Selection shared by all views, plus the open trace and its live/replay progress."""

    path = param.String(default="", doc="trace store being shown")
    trace = param.Parameter(default=None, doc="the open workbench Trace, or None")
    error = param.String(default="", doc="why no trace is shown (missing, corrupt, refused)")
    status = param.String(default="", doc="running / complete / failed")

    n_steps = param.Integer(default=0, bounds=(0, None), doc="committed steps (the readable prefix)")
    step = param.Integer(default=0, bounds=(0, None), doc="selected step")
    seq = param.Integer(default=0, bounds=(0, None), doc="selected sequence of the batch")
    layer = param.Integer(default=0, bounds=(0, None))
    head = param.Integer(default=0, bounds=(0, None))
    n_seqs = param.Integer(default=1)
    n_layers = param.Integer(default=1)
    n_heads = param.Integer(default=1)

    playing = param.Boolean(default=False, doc="replay advances `speed` steps per tick")
    speed = param.Integer(default=1, bounds=(1, 1000), doc="steps per tick while playing")
    follow = param.Boolean(default=True, doc="while live, keep the newest step selected")
    version = param.Integer(default=0, doc="bumped whenever new steps were committed")

    # ----------------------------------------------------------------- opening
    def open(self, path: str | Path) -> bool:
        """Open the trace at ``path``; on failure keep the page alive and set ``error``."""
        from workbench.trace.reader import TraceError, open_trace
        path = Path(path)
        if not path.exists():
            return self._fail(path, f"no trace at {path} yet — waiting for it to appear")
        try:
            trace = open_trace(path)
        except (TraceError, WorkbenchError) as e:
            return self._fail(path, str(e))
        except Exception as e:  # a corrupt store must show an error, never take the page down
            return self._fail(path, f"cannot read trace {path.name}: {type(e).__name__}: {e}")
        self._adopt(path, trace)
        return True

    def _fail(self, path: Path, message: str) -> bool:
        with param.parameterized.batch_call_watchers(self):
            self.path, self.trace, self.error, self.status = str(path), None, message, ""
            self.n_steps, self.step, self.playing = 0, 0, False
        return False

    def replaced(self) -> bool:
        """True if the finished trace on disk was replaced (e.g. re-recorded with --overwrite)."""
        if self.trace is None or self.status == "running":
            return False
        return _stamp(Path(self.path)) != self._stamp

    def _adopt(self, path: Path, trace) -> None:
        self._stamp = _stamp(path)
        sizes = {"seq": trace.spec.n_seq, "layer": trace.spec.n_layers, "head": trace.spec.n_heads}
        n = int(trace.n_steps)
        with param.parameterized.batch_call_watchers(self):
            self.n_seqs, self.n_layers, self.n_heads = sizes["seq"], sizes["layer"], sizes["head"]
            self.seq = min(self.seq, self.n_seqs - 1)
            self.layer = min(self.layer, self.n_layers - 1)
            self.head = min(self.head, self.n_heads - 1)
            self.path, self.error, self.status = str(path), "", str(trace.status)
            self.n_steps = n
            self.follow = self.status == "running"
            self.playing = False
            self.step = max(n - 1, 0) if self.follow or self.status != "running" else 0
            self.trace = trace
            self.version += 1

    # ----------------------------------------------------------------- selection
    def select_step(self, step: int) -> None:
        """Select a step (clamped to the committed range); leaving the newest step stops following."""
        last = max(self.n_steps - 1, 0)
        step = min(max(int(step), 0), last)
        with param.parameterized.batch_call_watchers(self):
            self.follow = self.status == "running" and step == last
            self.step = step

    def choose(self, **indices: int) -> None:
        """Select a ``seq``, ``layer`` and/or ``head``, each clamped into the trace's range."""
        sizes = {"seq": self.n_seqs, "layer": self.n_layers, "head": self.n_heads}
        self.param.update(**{k: min(max(int(v), 0), sizes[k] - 1) for k, v in indices.items()})

    @param.depends("seq", "layer", "head", watch=True)
    def _clamp(self) -> None:
        # Bounds follow the trace's shape; a stale selection from another trace is pulled back in.
        for name, n in (("seq", self.n_seqs), ("layer", self.n_layers), ("head", self.n_heads)):
            v = getattr(self, name)
            if v > n - 1:
                setattr(self, name, max(n - 1, 0))

    # ----------------------------------------------------------------- time
    def tick(self) -> bool:
        """One beat of the dashboard clock: read newly committed steps, advance replay.

        Returns True if the step or the number of steps changed.
        """
        if self.trace is None:
            if self.path and self.error:
                return self.open(self.path)  # a live run's store may have appeared meanwhile
            return False
        changed = False
        if self.status == "running":
            changed = self.refresh()
        if self.playing:
            last = max(self.n_steps - 1, 0)
            if self.step >= last:
                if self.status != "running":
                    self.playing = False
            else:
                self.step = min(self.step + self.speed, last)
                changed = True
        return changed

    def refresh(self) -> bool:
        """Ask the reader for newly committed steps; True if there were any (or the status changed)."""
        trace = self.trace
        try:
            trace.refresh()
        except Exception as e:  # the writer died mid-flush, disk full...: show it, keep serving
            self.error = f"cannot refresh trace: {type(e).__name__}: {e}"
            return False
        n, status = int(trace.n_steps), str(trace.status)
        if status != "running" and self.status == "running":
            # The writer commits its last steps before it marks the run finished; a refresh that
            # caught the status but an older marker must look again, or the tail would never show.
            trace.refresh()
            n = int(trace.n_steps)
        if n == self.n_steps and status == self.status:
            return False
        with param.parameterized.batch_call_watchers(self):
            was_last = self.step >= self.n_steps - 1
            self.n_steps, self.status = n, status
            if self.follow and was_last and not self.playing:
                self.step = max(n - 1, 0)
            if status != "running":
                self.follow = False
            self.version += 1
        return True

    def toggle_play(self) -> None:
        """Play from the current step (from the start if at the end); pause if playing."""
        if self.playing:
            self.playing = False
            return
        with param.parameterized.batch_call_watchers(self):
            if self.step >= self.n_steps - 1 and self.status != "running":
                self.step = 0
            self.follow = False
            self.playing = True


def _stamp(path: Path) -> int:
    """Modification time of a store's root metadata (rewritten when the store is re-created)."""
    try:
        return (path / "zarr.json").stat().st_mtime_ns
    except OSError:
        return -1
