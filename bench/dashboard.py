"""Dashboard responsiveness on a large trace: 2,000 steps x 8 layers x 8 heads.

Writes a synthetic trace through the real TraceWriter (or reuses --path), then times, in this
process and without a browser (the server-side work a click costs):
  page    -- build the page's figures and widgets (once per browser tab, independent of the trace)
  open    -- open the trace and draw the token strip and the visible (attention) tab
  layer   -- switch the selected layer (attention map + head grid + kv/activations/comm redraw)
  head    -- switch the selected head
  step    -- move the replay step
Each switch is timed several times; the median is printed, with the slowest view's share.

    .venv/bin/python bench/dashboard.py [--steps 2000] [--layers 8] [--heads 8] [--path DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--path", help="reuse (or create) the trace here instead of a temporary directory")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from workbench.trace.synthetic import write_synthetic_trace
    from workbench.views.dashboard import Dashboard

    tmp = None
    if args.path:
        path = Path(args.path)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="wb-bench-dashboard-")
        path = Path(tmp.name) / "big"
    if not (path / "zarr.json").exists():
        t0 = time.perf_counter()
        write_synthetic_trace(path, n_steps=args.steps, n_layers=args.layers, n_heads=args.heads, world=2)
        print(f"wrote {args.steps} steps x {args.layers} layers x {args.heads} heads in "
              f"{time.perf_counter() - t0:.1f} s ({_du(path) / 1e6:.0f} MB on disk)")

    # A page is built once per browser tab (figures, widgets), then a trace is opened into it.
    empty = Path(tempfile.mkdtemp(prefix="wb-bench-empty-"))
    t0 = time.perf_counter()
    dash = Dashboard(empty)
    t_page = time.perf_counter() - t0
    st = dash.state
    t0 = time.perf_counter()
    st.open(path)                      # open the trace and draw the token strip + the visible tab
    t_open = time.perf_counter() - t0
    assert st.error == "", st.error
    print(f"trace: {st.n_steps} steps, {st.n_layers} layers, {st.n_heads} heads, status {st.status}")
    first_show = {}
    for i, name in list(enumerate(dash._tab_views))[1:]:   # background tabs draw when first shown
        t0 = time.perf_counter()
        dash.tabs.active = i
        first_show[name] = time.perf_counter() - t0
    dash.tabs.active = 0

    def timed(action) -> tuple[float, str]:
        for v in dash.views.values():
            v.last_redraw_seconds = 0.0
        t = time.perf_counter()
        action()
        total = time.perf_counter() - t
        slowest = max(dash.views.items(), key=lambda kv: kv[1].last_redraw_seconds)
        notes = [f"{k}: {v._note.object}" for k, v in dash.views.items() if v._note.visible and v._note.alert_type == "danger"]
        assert not notes, notes
        return total, f"{slowest[0]} {slowest[1].last_redraw_seconds * 1e3:.0f} ms"

    results = {}
    for name, values in (("layer", lambda i: ("layer", (st.layer + 1) % st.n_layers)),
                         ("head", lambda i: ("head", (st.head + 1) % st.n_heads)),
                         ("step", lambda i: ("step", (st.step + 397) % st.n_steps))):
        times, slow = [], ""
        for i in range(args.repeats):
            attr, v = values(i)
            t, slow = timed((lambda a=attr, v=v: st.select_step(v)) if attr == "step" else
                            (lambda a=attr, v=v: setattr(st, a, v)))
            times.append(t)
        results[name] = (statistics.median(times), max(times), slow)

    print(f"{'action':<8} {'median':>9} {'max':>9}  slowest view in the last repeat")
    print(f"{'page':<8} {t_page * 1e3:8.0f}ms {'':>9}  build figures and widgets (no trace)")
    print(f"{'open':<8} {t_open * 1e3:8.0f}ms {'':>9}  open the trace, draw tokens + attention tab")
    print("first show of a background tab: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in first_show.items()))
    for name, (med, worst, slow) in results.items():
        print(f"{name:<8} {med * 1e3:8.0f}ms {worst * 1e3:8.0f}ms  {slow}")
    print("ratios to a 1 s budget: " + ", ".join(
        f"{n} {v:.2f}" for n, v in [("page", t_page), ("open", t_open)] + [(k, r[0]) for k, r in results.items()]))
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if tmp is not None:
        tmp.cleanup()


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
