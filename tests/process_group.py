"""Hold a live run still for a test: stop and continue a whole process group.

A process that records a trace hands its records to a worker process of its own, and the worker
commits them; stopping only the recording process would let the worker commit the batch it holds.
So tests start the recording process with ``start_new_session=True`` (it leads a process group
that its workers join) and stop the whole group. ``kill`` returns before a process running on
another core has stopped (a rename in flight still lands), so `stop_group` waits until /proc shows
every member stopped: from then on the committed steps cannot change until `continue_group`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator


def _stat(pid_dir: Path) -> tuple[str, int] | None:
    """(state, process group) of one /proc entry, None if it is gone."""
    try:
        fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2])


def group_states(pgid: int) -> dict[int, str]:
    """State letter (R, S, D, T, Z, ...) of every process in group ``pgid``."""
    out = {}
    for pid_dir in Path("/proc").glob("[0-9]*"):
        st = _stat(pid_dir)
        if st is not None and st[1] == pgid:
            out[int(pid_dir.name)] = st[0]
    return out


def stop_group(pgid: int, timeout: float = 30.0) -> None:
    """SIGSTOP every process of the group and wait until each one has really stopped."""
    os.killpg(pgid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        running = {p: s for p, s in group_states(pgid).items() if s not in ("T", "t", "Z", "X")}
        if not running:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {running} of group {pgid} did not stop within {timeout} s")
        time.sleep(0.002)


def continue_group(pgid: int) -> None:
    """SIGCONT every process still in the group (none left is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGCONT)


@contextlib.contextmanager
def held(pgid: int) -> Iterator[None]:
    """The group stands still inside the block and goes on after it (also on error)."""
    try:
        stop_group(pgid)
        yield
    finally:
        continue_group(pgid)


def wait_group_gone(pgid: int, timeout: float = 60.0) -> None:
    """Wait until no process of the group is left but zombies (a killed leader's workers exit)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p: s for p, s in group_states(pgid).items() if s not in ("Z", "X")}
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {alive} of group {pgid} still run {timeout} s after its leader died")
        time.sleep(0.02)


def kill_leader_while_held(proc, committed: Callable[[], int]) -> int:
    """SIGKILL a recording process part-way; return the steps committed when it died.

    The group stands still while ``committed()`` is read and the leader is killed; then its
    workers go on, finish the flush in hand, see their pipes close and exit.
    """
    stop_group(proc.pid)
    at_kill = committed()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    continue_group(proc.pid)
    wait_group_gone(proc.pid)
    return at_kill


def end_group(proc) -> None:
    """Whatever happened in a test: let a held group go on, and kill its leader if still running."""
    continue_group(proc.pid)
    if proc.poll() is None:
        proc.kill()
        proc.wait()

