"""A real writer process records steps while this process opens and refreshes the trace.

Every cell a step writes holds a value derived from that step, so a reader can check that each
committed step is complete in every group (no partially written step), that every group is cut
at the same step, and that a writer killed with SIGKILL leaves a trace that still opens.

Nothing depends on the machine's speed: the writer waits on its stdin after the steps the test
names (so it cannot run ahead of the checks), and the kill happens while the writer and its worker
processes are held still (SIGSTOP to their process group).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from workbench.trace import open_trace

from process_group import end_group, kill_leader_while_held

pytestmark = pytest.mark.slow

PROMPT = 4

# The writer process: every array of every group gets values derived from the step. After ending
# each step in `holds` it prints "ended N" and waits for a line on stdin.
WRITER = r"""
import sys, time
import numpy as np
from workbench.trace import ActivationStats, PerceiverSpec, TraceSpec, TraceWriter

path, n_steps, delay, finish = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
holds = {int(h) for h in sys.argv[5].split(",") if h}
P = %(prompt)d
spec = TraceSpec.for_generation(P, n_steps - 1, n_seq=2, n_layers=2, n_heads=4, world=2,
                                top_k=2, perceiver=PerceiverSpec(2, 3, 1, 2))
writers = [TraceWriter(path, spec, {"writer": "test"}, rank=0, flush_interval=0.03)]
writers.append(TraceWriter.open(path, 1, world=2, flush_interval=0.05))
writers[0].write_prompt(np.zeros((2, P), dtype=int), [["p"] * P] * 2)
for step in range(n_steps):
    q0, q1 = (0, P) if step == 0 else (P + step - 1, P + step)
    v = float(step + 1)
    for w in writers:
        w.write_queries(step, q0, q1)
        rows = np.full((2, 2, 2, q1 - q0, q1), v)
        w.write_attention(step, rows, query_start=q0)
        w.write_attention_mass(step, np.full((2, 2, q1), v))
        w.write_kv(step, tokens=q1, blocks=step, bytes_used=step, bytes_reserved=step)
        n = np.full((2, 4), step)
        w.write_activations(step, ActivationStats(
            hist=np.full((2, 4, spec.n_bins), step), count=n, sum=n, sumsq=n, sum3=n, sum4=n,
            min=n, max=n, near_zero=n))
        w.write_comm(step, start=v, seconds=v, nbytes=step)
        w.write_timing(step, np.full((2, 4), v), step_seconds=v, step_start=v)
        w.write_sample(step, [step, step], chosen_prob=[v, v], candidate_ids=[[step] * 2] * 2,
                       candidate_probs=[[v] * 2] * 2)
        if q1 < spec.max_positions:
            w.write_tokens(step, q1, [[step], [step]], [["x"], ["y"]])
        w.write_cross_attention(step, np.full((2, 1, 1, 2, 3), v),
                                input_position=[[step] * 3] * 2, latent_position=[[step] * 2] * 2)
        w.end_step(step)
    if step + 1 in holds:
        print(f"ended {step + 1}", flush=True)
        sys.stdin.readline()
    time.sleep(delay)
if finish == "1":
    for w in writers:
        w.close()
else:
    time.sleep(600)
""" % {"prompt": PROMPT}


def start_writer(path: Path, n_steps: int, delay: float, finish: bool,
                 holds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, queue.Queue]:
    """The writer (leading a process group of its own and its workers) and a queue of its lines."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n_steps), str(delay),
                             "1" if finish else "0", ",".join(map(str, holds))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return proc, lines


def row_step(q: np.ndarray) -> np.ndarray:
    """The step that wrote attention row q."""
    return np.where(q < PROMPT, 0, q - PROMPT + 1)


def check_prefix(tr) -> int:
    """Assert every committed step is complete and every group is cut at the same step."""
    n = tr.n_steps
    steps = np.arange(n)
    for group in tr.groups:
        ds = tr.dataset(group)
        if "step" in ds.dims:
            assert ds.sizes["step"] == n, (group, ds.sizes, n)
    t = tr.tokens.load()
    q_stop = PROMPT + max(n - 1, 0) if n else 0
    assert tr.n_queries == q_stop
    assert (t["chosen"].values == steps).all() and (t["candidate_id"].values == steps[:, None]).all()
    assert (t["query_stop"].values >= 0).all()
    assert (t["produced_step"].values >= 0).all()  # no unwritten position inside the cut
    a = tr.attention["weights"].values.astype(np.float64)
    q = np.arange(q_stop)
    expected = np.where(q[None, :] <= q[:, None], row_step(q)[:, None] + 1.0, np.nan)
    np.testing.assert_array_equal(a, np.broadcast_to(expected, a.shape))
    kv = tr.kv_cache.load()
    assert (kv["blocks"].values == steps[:, None, None]).all()
    mass = kv["attention_mass"].values
    assert np.isfinite(mass[:, :, :, :, :PROMPT]).all()
    act = tr.activations.load()
    assert (act["hist_count"].values == steps[:, None, None, None, None]).all()
    assert (act["near_zero_count"].values == steps[:, None, None, None]).all()
    assert (tr.comm["bytes"].values == steps[:, None, None, None]).all()
    assert (tr.timing["step_seconds"].values == steps[:, None] + 1).all()
    assert (tr.timing["seconds"].values == steps[:, None, None, None] + 1).all()
    cross = tr.cross_attention["weights"].values.astype(np.float64)
    assert (cross == (steps + 1.0)[None, :, None, None, None, None]).all()
    return n


def wait_for_store(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path / "zarr.json").exists():
        assert proc.poll() is None, "writer process died before creating the store"
        assert time.monotonic() < deadline, "store never appeared"
        time.sleep(0.02)


def test_live_reader_sees_only_complete_steps(tmp_path):
    path = tmp_path / "live.zarr"
    holds = (20, 40, 60)
    proc, lines = start_writer(path, n_steps=80, delay=0.02, finish=True, holds=holds)
    try:
        wait_for_store(path, proc)
        tr = open_trace(path)
        seen, held = set(), []
        deadline = time.monotonic() + 120
        while True:
            done = proc.poll() is not None
            tr.refresh()
            seen.add(check_prefix(tr))  # while the writer writes: whatever is committed is complete
            if len(seen) % 5 == 0:  # a fresh open must agree too
                seen.add(check_prefix(open_trace(path)))
            try:
                line = lines.get_nowait()
            except queue.Empty:
                line = None
            if line:  # "ended N": the writer waits, so the commit reaches exactly N and stops there
                n = int(line.split()[1])
                while check_prefix(tr) < n:
                    assert time.monotonic() < deadline, f"steps 0..{n - 1} ended, only {tr.n_steps} committed"
                    time.sleep(0.01)
                    tr.refresh()
                assert check_prefix(tr) == n and check_prefix(open_trace(path)) == n
                seen.add(n)
                held.append(n)
                proc.stdin.write("go\n")
                proc.stdin.flush()
            if done:
                break
            assert time.monotonic() < deadline, "writer did not finish"
        assert proc.returncode == 0
        tr.refresh()
        assert tr.status == "complete" and check_prefix(tr) == 80
        assert held == list(holds), held
        assert len(seen) >= 3, f"reader saw too few distinct prefixes: {sorted(seen)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigkill_leaves_an_openable_running_trace(tmp_path):
    path = tmp_path / "killed.zarr"
    # Held before its last step: however fast the machine, the writer cannot commit all 400 steps.
    proc, _ = start_writer(path, n_steps=400, delay=0.02, finish=False, holds=(399,))
    try:
        wait_for_store(path, proc)
        deadline = time.monotonic() + 120
        while open_trace(path).n_steps < 12:
            assert proc.poll() is None, "writer process died"
            assert time.monotonic() < deadline, f"the writer committed only {open_trace(path).n_steps} steps in 120 s"
            time.sleep(0.01)
        at_kill = kill_leader_while_held(proc, lambda: open_trace(path).n_steps)
    finally:
        end_group(proc)
    tr = open_trace(path)
    assert tr.status == "running" and tr.status != "complete"
    assert 12 <= at_kill <= tr.n_steps < 400, (at_kill, tr.n_steps)  # what was committed stays committed
    check_prefix(tr)
    for group in tr.groups:  # plain xarray still opens every group
        xr.open_zarr(path, group=group, consolidated=False).load()
