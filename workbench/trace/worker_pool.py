"""Trace worker processes kept for the next writer of this process.

A worker (`worker.py`) is a fresh interpreter that imports numpy and numcodecs: ~0.3-0.4 s of a
core, paid while the first steps generate and before the first flush can commit. A process that
records again (a notebook, a sweep, the tests, a benchmark's repeats) would pay it every time, so
a writer that closes cleanly hands its worker back here, and the next writer of the same process
takes it. `prestart()` lets a caller that is about to record start one while it loads the model.

An idle worker holds no store. It exits when its socket closes: at this process's exit, or when
this process is killed. At most `KEEP` workers wait. A forked child starts with none: it closes
its copies of the sockets at once, so that it neither talks to its parent's workers nor keeps them
alive after the parent is gone.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .worker import recv_message, send_message

KEEP = 2


@dataclass
class Worker:
    process: subprocess.Popen
    sock: socket.socket
    ready: bool  # its "ready" (imports done) was read


_idle: list[Worker] = []
_live: list[Worker] = []  # every worker this process started and has not stopped
_lock = threading.Lock()


def spawn() -> Worker:
    """Start a worker. A fresh interpreter (not multiprocessing): spawn and forkserver would re-run
    the caller's __main__ script in the worker."""
    ours, theirs = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-m", "workbench.trace.worker", str(theirs.fileno())],
                               pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=_worker_env())
    theirs.close()
    worker = Worker(process, ours, False)
    with _lock:
        _live.append(worker)
    return worker


def take(path: str, rank: int) -> Worker:
    """A worker for the store at ``path``, rank ``rank``: an idle one of this process that is still
    alive, or a new one (which answers "ready" once its imports are done)."""
    while True:
        with _lock:
            worker = _idle.pop() if _idle else None
        if worker is None:
            break
        try:
            if worker.process.poll() is None:
                send_message(worker.sock, ("open", path, rank))
                return worker
        except OSError:  # it died just now
            pass
        stop(worker)  # it died while idle: try the next one
    worker = spawn()
    send_message(worker.sock, ("open", path, rank))
    return worker


def release(worker: Worker, reusable: bool) -> None:
    """Let a writer's worker go: kept for the next writer if ``reusable`` and it closes the store
    cleanly, stopped otherwise (after a writer error the stream may be cut mid-message)."""
    try:
        if reusable and worker.process.poll() is None:
            send_message(worker.sock, ("close",))
            reply = recv_message(worker.sock)
            if reply[0] == "ready":  # it never flushed
                worker.ready, reply = True, recv_message(worker.sock)
            if reply[0] == "closed":
                with _lock:
                    if len(_idle) < KEEP:
                        _idle.append(worker)
                        return
    except (EOFError, OSError):
        pass
    stop(worker)


def has_started(worker: Worker) -> bool:
    """True once the worker has finished its imports: its "ready" was read, or something it sent
    waits unread (peeked at, not consumed: the writer reads it at its first flush)."""
    if worker.ready:
        return True
    try:
        return bool(worker.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # it died: the writer's first flush says so


def prestart() -> None:
    """Start a worker now, if none is idle, so that the next writer need not wait for its imports."""
    with _lock:
        if _idle:
            return
    worker = spawn()
    with _lock:
        _idle.append(worker)


def stop(worker: Worker) -> None:
    """Ask a worker to exit and wait for it (kill it after 30 s)."""
    try:
        if worker.process.poll() is None:
            send_message(worker.sock, ("stop",))
            while recv_message(worker.sock)[0] != "stopped":  # "ready" if it never answered
                pass
    except (EOFError, OSError):
        pass
    with _lock:
        _forget(worker)
    try:
        worker.process.wait(30)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()


def _forget(worker: Worker) -> None:
    worker.sock.close()
    if worker in _live:
        _live.remove(worker)


def _worker_env() -> dict[str, str]:
    """The caller's environment, with this package importable even when run from a checkout."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for worker in _live:
        worker.sock.close()
    _live.clear()
    _idle.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_sockets() -> None:
    """Close every socket to a worker, so that the workers see the end of their input and exit."""
    for worker in list(_live):
        worker.sock.close()
    for worker in _idle:  # they hold no store and exit at once; reaped, they need no warning
        try:
            worker.process.wait(1)
        except subprocess.TimeoutExpired:
            pass
