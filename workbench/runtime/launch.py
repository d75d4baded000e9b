"""Run a function on N ranks of one torch.distributed process group: spawned locally, or under torchrun.

``launch(world, fn)`` starts ``world`` fresh processes (spawn), each joins a process group (gloo on
CPU, NCCL on CUDA) with a short timeout and calls ``fn(ctx)``; rank 0's return value comes back.
The parent watches every rank: when one raises or dies, it collects the error, stops the others
within seconds and raises ``RankFailedError`` naming the rank (or the rank's WorkbenchError as
is). Ctrl-C stops every rank. Children exit on their own if the parent disappears.

Messages from ranks (``ctx.send(obj)``) reach the parent's ``on_message`` in order; this is how
rank 0 streams step events without the caller's callback ever entering a child process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.errors import WorkbenchError

# Collective timeout: a peer that hangs without dying is detected after this many seconds.
DEFAULT_TIMEOUT_S = float(os.environ.get("WORKBENCH_TP_TIMEOUT", "60"))
# After the first failure, how long to wait for the other ranks' reports before stopping them
# (so the root cause, not a peer's "connection closed", is the error shown).
_GRACE_S = 0.5
_STOP_S = 3.0  # SIGTERM, then SIGKILL after this long


class RankFailedError(WorkbenchError):
    """A rank raised or died; the message names the rank and its error. CLI exit code 1."""

    exit_code = 1


@dataclass
class RankContext:
    """What a rank's function gets: who it is, where to compute, and a channel to the parent."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup | None = None  # None: the default group
    _conn: Connection | None = None

    def send(self, obj: Any) -> None:
        """Deliver ``obj`` (picklable) to the parent's ``on_message``; a no-op under torchrun."""
        if self._conn is not None:
            self._conn.send(("message", pickle.dumps(obj)))


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """True in a process started by torchrun (or anything else that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launch(world: int, fn: Callable[[RankContext], Any], *, device_type: str = "cpu",
           on_message: Callable[[Any], None] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run ``fn(ctx)`` on ``world`` new local processes forming one process group.

    Args:
        world: number of ranks (processes) to start.
        fn: a picklable callable (module-level function or functools.partial of one).
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, rank r on cuda:r).
        on_message: called in this process, in order, with every object a rank passes to ``ctx.send``.
        timeout_s: collective timeout given to ``init_process_group``.
    Returns:
        rank 0's return value (it must be picklable).
    Raises:
        WorkbenchError: the first rank to fail raised one (bad input found inside a rank).
        RankFailedError: a rank raised something else or died; all ranks have been stopped.
        KeyboardInterrupt: on Ctrl-C, after stopping all ranks.
    """
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise WorkbenchError(f"tensor-parallel size {world} needs {world} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs, readers = [], {}
    try:
        for rank in range(world):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, name=f"workbench-rank{rank}", daemon=True,
                            args=(fn, rank, world, port, device_type, timeout_s, writer, os.getpid()))
            p.start()
            writer.close()  # the child holds the only write end: EOF when it exits
            procs.append(p)
            readers[reader] = rank
        return _monitor(procs, readers, on_message)
    finally:
        _stop(procs)
        for r in readers:
            r.close()


def _monitor(procs: list, readers: dict[Connection, int], on_message) -> Any:
    """Relay messages until every rank has exited; on the first failure stop them all and raise."""
    result, have_result = None, False
    errors: list[tuple[float, int, str, str]] = []  # (when, rank, kind, text)
    first_failure: float | None = None
    open_readers = dict(readers)
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    exited: set[int] = set()
    while True:
        ready = wait(list(open_readers) + [s for s, r in sentinels.items() if r not in exited],
                     timeout=0.2)
        for obj in ready:  # pipes first: a rank's report arrives before its exit
            if obj in open_readers:
                rank = open_readers[obj]
                try:
                    kind, *payload = obj.recv()
                except (EOFError, OSError):
                    del open_readers[obj]
                    continue
                if kind == "message" and on_message is not None:
                    on_message(pickle.loads(payload[0]))
                elif kind == "result":
                    result, have_result = pickle.loads(payload[0]), True
                elif kind == "error":
                    when, err_kind, text = payload
                    errors.append((when, rank, err_kind, text))
        for obj in ready:
            if obj in sentinels and sentinels[obj] not in exited:
                rank = sentinels[obj]
                exited.add(rank)
                procs[rank].join(1.0)  # the sentinel can fire a moment before the exit status is ready
                code = procs[rank].exitcode
                if code != 0 and not any(e[1] == rank for e in errors):
                    _drain(procs, open_readers, rank, errors)
                if code != 0 and not any(e[1] == rank for e in errors):
                    how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
                    errors.append((time.time(), rank, "died", f"process {how}"))
        if errors and first_failure is None:
            first_failure = time.monotonic()
        if len(exited) == len(procs) and not open_readers:
            break
        if first_failure is not None and (time.monotonic() - first_failure > _GRACE_S or len(exited) == len(procs)):
            break
    if errors:
        _, rank, kind, text = min(errors)  # the earliest failure is the cause; later ones are echoes
        if kind == "workbench":
            raise WorkbenchError(text)
        raise RankFailedError(f"rank {rank} failed: {text}")
    if not have_result:
        raise RankFailedError("rank 0 exited without a result")
    return result


def _drain(procs, open_readers: dict[Connection, int], rank: int, errors: list) -> None:
    """Read what an exited rank wrote before it died (its error report may still be in the pipe)."""
    for conn, r in list(open_readers.items()):
        if r != rank:
            continue
        try:
            while conn.poll(0.05):
                kind, *payload = conn.recv()
                if kind == "error":
                    errors.append((payload[0], rank, payload[1], payload[2]))
        except (EOFError, OSError):
            del open_readers[conn]


def _stop(procs: list) -> None:
    """Terminate ranks still running, kill them if they do not go, and reap every one."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _STOP_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _watch_parent(parent_pid: int) -> None:
    """Exit if the launcher disappears (killed with SIGKILL), so no rank outlives it."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _child_main(fn, rank: int, world: int, port: int, device_type: str, timeout_s: float,
                conn: Connection, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # N ranks share the cores
    try:
        device = _device(device_type, rank)
        dist.init_process_group(backend_for(device_type), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device_type == "cuda" else {}))
        out = fn(RankContext(rank=rank, world=world, local_rank=rank, device=device, _conn=conn))
        if rank == 0:
            conn.send(("result", pickle.dumps(out)))
        dist.destroy_process_group()
        conn.close()
        # Skip the interpreter's slow teardown of torch (seconds here); fn has finished its cleanup.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except KeyboardInterrupt:
        os._exit(130)  # Ctrl-C reaches every rank; the launcher reports it once
    except BaseException as e:  # report every failure, then leave without running cleanup that may hang
        kind = "workbench" if isinstance(e, WorkbenchError) else "error"
        text = str(e) if kind == "workbench" else f"{type(e).__name__}: {_one_line(e)}"
        if os.environ.get("WORKBENCH_TP_TRACEBACK"):
            traceback.print_exc()
        with contextlib.suppress(Exception):
            conn.send(("error", time.time(), kind, text))
            conn.close()
        sys.stderr.flush()
        os._exit(1)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


def run_torchrun_rank(fn: Callable[[RankContext], Any], *, device_type: str = "cpu",
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run ``fn(ctx)`` as this process's rank of a torchrun job (env:// rendezvous); returns its value."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(device_type, local_rank)
    dist.init_process_group(backend_for(device_type), init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if device_type == "cuda" else {}))
    try:
        return fn(RankContext(rank=rank, world=world, local_rank=local_rank, device=device))
    finally:
        dist.destroy_process_group()


# --- generation on every rank ---------------------------------------------------------------------

def generate_on_rank(spec, stream: bool, ctx: RankContext):
    """One rank of a tensor-parallel generation: load, shard, generate; rank 0 streams its steps.

    ``WORKBENCH_TP_FAIL_AT=rank:step`` makes that rank raise after that step (fault-injection tests).
    """
    from workbench.runtime import session
    spec = dataclasses.replace(spec, device=str(ctx.device))
    fail_rank, fail_step = _fail_at()

    def on_step(event) -> None:
        if stream and ctx.rank == 0:
            ctx.send(_portable(event))
        if ctx.rank == fail_rank and event.step == fail_step:
            raise RuntimeError(f"injected fault at step {fail_step}")

    return session.run_local(spec, on_step=on_step, rank=ctx.rank, world=ctx.world, group=ctx.group)


def _fail_at() -> tuple[int, int]:
    text = os.environ.get("WORKBENCH_TP_FAIL_AT", "")
    if not text:
        return -1, -1
    rank, _, step = text.partition(":")
    return int(rank), int(step or 0)


def _portable(event):
    """A StepEvent that can cross processes: tensors on the CPU, no KV cache."""
    return dataclasses.replace(event, cand_ids=event.cand_ids.cpu(), cand_probs=event.cand_probs.cpu(), cache=None)
