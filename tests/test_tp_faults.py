"""Tensor-parallel failures with real processes: a rank that raises, Ctrl-C, a launcher that is killed.

Each test runs the real CLI (``python -m workbench.cli generate --tp 2``), watches which processes
it starts (via /proc) and checks that every one of them is gone afterwards.
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

pytestmark = pytest.mark.slow


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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Watched:
    """The CLI as a subprocess, with the set of processes it started recorded while it runs."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "generate", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.started = time.monotonic()
        self.seen: set[int] = set()
        self.first_exit: float | None = None  # when the first started process was found gone
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop and self.proc.poll() is None:
            self.seen |= _children(self.proc.pid)
            if self.first_exit is None and any(not _alive(p) for p in self.seen):
                self.first_exit = time.monotonic()
            time.sleep(0.05)

    def wait_for_ranks(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        assert len(self.seen) >= n, f"saw only {self.seen} start"

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self.ended = time.monotonic()
        self._stop = True
        return self.proc.returncode, out, err

    def survivors(self) -> list[int]:
        time.sleep(0.2)
        return [p for p in self.seen if _alive(p)]


def test_failing_rank_stops_every_rank_and_names_the_error(model_dir):
    run = Watched(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2000", "--tp", "2"],
                  env={"WORKBENCH_TP_FAIL_AT": "1:3"})
    code, out, err = run.finish()
    assert code == 1
    assert err.strip().splitlines()[-1] == "workbench: error: rank 1 failed: RuntimeError: injected fault at step 3"
    assert "Traceback" not in err
    # Bounded: from the failing rank's exit to the launcher's (start-up time depends on machine load).
    assert run.first_exit is not None and run.ended - run.first_exit < 10
    assert len(run.seen) >= 2  # the two ranks were started ...
    assert run.survivors() == []  # ... and none outlives the launcher


def test_ctrl_c_stops_every_rank(model_dir):
    run = Watched(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4000", "--tp", "2"])
    assert run.proc.stdout.read(2) == "hi"  # rank 0 streams: generation is under way
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole group
    code, out, err = run.finish()
    assert run.ended - t0 < 10
    assert code == 130
    assert err.strip().splitlines()[-1] == "workbench: interrupted"
    assert run.survivors() == []


def test_killed_launcher_leaves_no_rank_behind(model_dir):
    run = Watched(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4000", "--tp", "2"])
    assert run.proc.stdout.read(2) == "hi"
    run.wait_for_ranks(2)
    ranks = set(run.seen)
    run.proc.kill()  # SIGKILL: the launcher gets no chance to clean up; the ranks notice on their own
    run.finish()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in ranks if _alive(p)] == []
