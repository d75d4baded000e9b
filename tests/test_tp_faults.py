"""Tensor-parallel failures with real processes: a rank that raises, Ctrl-C, a launcher that is killed.

Each test runs the real CLI (``python -m workbench.cli generate --tp 2``), watches which processes
it starts (via /proc) and checks that every one of them is gone afterwards.

No assertion depends on the machine's speed: the collective timeout is pinned far beyond the tests'
deadlines (so a launcher that left a rank waiting on a dead peer fails the deadline instead of
finishing late), and "stopped before the end" is read from the trace's committed steps, not from a
stopwatch. The launcher's own output pipes are inherited by everything it starts, so ``finish()``
returns only once every one of its processes has exited.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace.reader import open_trace

pytestmark = pytest.mark.slow

# A rank left waiting on a dead peer would wait an hour, far past every deadline below.
NO_COLLECTIVE_TIMEOUT = {"WORKBENCH_TP_TIMEOUT": "3600"}
N_TOKENS = 4000   # far more than a run gets through before it is stopped


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=4096,
                      bos_id=256, eos_id=None)
    path = tmp_path_factory.mktemp("tp_fault_llama")
    save_llama(Llama(cfg), path, tokenizer=ByteTokenizer(260, 256, None))
    return path


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _is_rank(pid: int) -> bool:
    """A process started by multiprocessing's spawn (a rank), not its resource tracker."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Watched:
    """The CLI as a subprocess, with the processes it started (and which of them are ranks) recorded."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "generate", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **NO_COLLECTIVE_TIMEOUT, **(env or {})},
                                     start_new_session=True)
        self.started = time.monotonic()
        self.seen: set[int] = set()
        self.ranks: set[int] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop and self.proc.poll() is None:
            children = _children(self.proc.pid)
            # classified on every scan: between fork and exec a child still shows the launcher's command line
            self.ranks |= {p for p in children - self.ranks if _is_rank(p)}
            self.seen |= children
            time.sleep(0.05)

    def wait_for_ranks(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ranks) < n and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        assert len(self.ranks) >= n, f"saw only ranks {self.ranks} start (children {self.seen})"

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        """Wait for the exit and for EOF on its pipes, which every process it started holds too."""
        out, err = self.proc.communicate(timeout=timeout)
        self.ended = time.monotonic()
        self._stop = True
        self._thread.join()
        return self.proc.returncode, out, err

    def survivors(self, timeout: float = 60) -> list[int]:
        """Processes it started that are still running after ``finish()`` (waiting ``timeout`` for them)."""
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [p for p in self.seen if _alive(p)]


def test_failing_rank_stops_every_rank_and_names_the_error(model_dir):
    run = Watched(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", str(N_TOKENS), "--tp", "2"],
                  env={"WORKBENCH_TP_FAIL_AT": "1:3"})
    # Rank 0 is then blocked in a collective with the dead rank 1: only the launcher's stopping it (or
    # its peer's closed connection) ends the run within the deadline, not the hour-long timeout.
    code, out, err = run.finish()
    print(f"failing rank: launcher exited {run.ended - run.started:.1f} s after its start")
    assert code == 1
    assert err.strip().splitlines()[-1] == "workbench: error: rank 1 failed: RuntimeError: injected fault at step 3"
    assert "Traceback" not in err
    assert len(run.ranks) == 2  # the two ranks were started ...
    assert run.survivors() == []  # ... and none outlives the launcher


def test_ctrl_c_stops_every_rank(model_dir, tmp_path):
    trace = tmp_path / "interrupted.zarr"
    run = Watched(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", str(N_TOKENS), "--tp", "2",
                   "--record", str(trace), "--probes", "none"])
    assert run.proc.stdout.read(2) == "hi"  # rank 0 streams: generation is under way
    run.wait_for_ranks(2)
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole group
    code, out, err = run.finish()
    print(f"ctrl-c: launcher exited {run.ended - t0:.1f} s after SIGINT")
    assert code == 130
    assert err.strip().splitlines()[-1] == "workbench: interrupted"
    assert run.survivors() == []
    # Stopped, not finished: the ranks' trace ends part-way (a run that ignored Ctrl-C would have committed all).
    tr = open_trace(trace)
    assert tr.status != "complete" and tr.n_steps < N_TOKENS, (tr.status, tr.n_steps)


def test_killed_launcher_leaves_no_rank_behind(model_dir, tmp_path):
    trace = tmp_path / "orphaned.zarr"
    run = Watched(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", str(N_TOKENS), "--tp", "2",
                   "--record", str(trace), "--probes", "none"])
    assert run.proc.stdout.read(2) == "hi"
    run.wait_for_ranks(2)
    ranks = set(run.ranks)
    run.proc.kill()  # SIGKILL: the launcher gets no chance to clean up; the ranks notice on their own
    run.finish()     # returns once the ranks, which hold its output pipes, have exited
    assert [p for p in ranks if _alive(p)] == []
    # ...and they stopped part-way instead of generating to the end with nobody listening.
    tr = open_trace(trace)
    assert tr.status != "complete" and tr.n_steps < N_TOKENS, (tr.status, tr.n_steps)
