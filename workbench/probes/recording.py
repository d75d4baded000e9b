"""Recording one run: create the trace (rank 0), attach a Recorder per rank, close it whatever happens."""
from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from pathlib import Path
from typing import Iterator

import torch

import workbench
from workbench.errors import WorkbenchError
from workbench.probes.recorder import Recorder
from workbench.probes.selection import ProbeSelection
from workbench.probes.user_probe import qualified_name, user_array_specs
from workbench.trace.writer import TraceWriter


def check_record_path(path: str | Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not a trace, and a trace unless asked (before any process starts)."""
    path = Path(path)
    if not path.exists():
        if not path.parent.exists():
            raise WorkbenchError(f"cannot record to {path}: directory {path.parent} does not exist")
        return
    if not overwrite:
        raise WorkbenchError(f"{path} already exists (pass --overwrite to replace a trace)")
    if not path.is_dir() or (any(path.iterdir()) and not (path / "zarr.json").exists()):
        raise WorkbenchError(f"refusing to overwrite {path}: it is not a trace")


def run_metadata(spec, model, tok, prompts, world: int, selection: ProbeSelection) -> dict:
    """Everything a replay needs, and what the dashboard's run view shows."""
    from workbench.runtime.checkpoint_hash import checkpoint_hash
    return {
        "workbench_version": getattr(workbench, "__version__", "0"),
        "model_path": str(Path(spec.model).resolve()),
        "checkpoint_sha256": checkpoint_hash(spec.model),
        "model_config": model.cfg.to_dict(),
        "model_type": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompts": list(spec.prompts),
        "prompt_ids": [list(p) for p in prompts],
        "chat": bool(getattr(spec, "chat", False)),  # prompt_ids hold the chat template's layout
        "max_new_tokens": spec.max_new_tokens,
        "stop_strings": list(spec.stop_strings),
        "sampler": spec.sampler.to_dict(),
        "seed": spec.sampler.seed,
        "tp_size": world,
        "tp_algorithm": spec.tp_algorithm,
        "arm": spec.arm,
        "block_size": spec.block_size,
        "probes": selection.to_dict(),
        # Listeners that may have changed the computation: a replay runs without them.
        "hooks": [{"pattern": pattern, "fn": qualified_name(fn)} for pattern, fn in getattr(spec, "hooks", ())],
        "tokenizer": tok.to_dict() if hasattr(tok, "to_dict") else {},
        "host": platform.node(),
        "started_unix": time.time(),
    }


class CoreShare:
    """Torch's thread count for each step while the trace writer's worker process needs a core.

    Torch's intra-op threads spin while they wait for each other, so with every core busy a
    decode step of one row per sequence (small, memory-bound products that barely use a second
    thread) slows down several-fold: such steps run on one core fewer. A step whose blocks compute
    many rows (a Perceiver AR window that slid recomputes all its latents) is a matrix product
    that gains more from every core than the worker loses sharing one, as long as the worker is
    mostly idle (light probes; not maps of a whole window at every step, which keep it busy).
    """

    # Rows a step computes (sequences x rows per block) from which it may run on every core.
    rows_for_every_core = 64
    # ... while the worker was busy at most this share of the last `window` seconds.
    worker_share_for_every_core = 0.3
    window = 0.25

    def __init__(self, fewer: int, every: int, writer: TraceWriter) -> None:
        self.fewer, self.every, self.writer = fewer, every, writer
        self.current = torch.get_num_threads()
        self._since = (time.monotonic(), writer.writer_stats().worker_seconds)
        self._worker_share = 0.0

    def before_step(self, rows: int) -> None:
        """Set the thread count for a step that computes ``rows`` rows."""
        want = self.fewer
        if rows >= self.rows_for_every_core and self._worker_mostly_idle():
            want = self.every
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want

    def _worker_mostly_idle(self) -> bool:
        now = time.monotonic()
        t0, busy0 = self._since
        if now - t0 >= self.window:  # the worker's share of the last window, sampled once a window
            busy = self.writer.writer_stats().worker_seconds
            self._worker_share, self._since = (busy - busy0) / (now - t0), (now, busy)
        return self._worker_share <= self.worker_share_for_every_core


@contextlib.contextmanager
def a_core_left_for_the_writer(model, writer: TraceWriter | None = None) -> Iterator[CoreShare | None]:
    """On CPU, run torch on one core fewer inside the block (the thread count is restored after);
    yields the CoreShare of ``writer`` that may give a heavy step every core (None without a
    writer, off the CPU or on one core). The prefill keeps every core if ``writer``'s worker has
    started: it has nothing to do before the first step ends (a worker still importing has)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    if writer is None or not writer.worker_started():
        torch.set_num_threads(max(1, before - 1))
    try:
        yield CoreShare(max(1, before - 1), before, writer) if before > 1 and writer is not None else None
    finally:
        torch.set_num_threads(before)


def recorder_class(model) -> type[Recorder]:
    """The Recorder that knows this model's hook points: Perceiver models have repeats, not layers."""
    if hasattr(model, "repeats"):
        from workbench.probes.perceiver_recorder import PerceiverRecorder
        return PerceiverRecorder
    return Recorder


@contextlib.contextmanager
def recording(spec, model, tok, prompts, rank: int = 0, world: int = 1, group=None) -> Iterator[Recorder]:
    """Record the generation run inside the block into ``spec.record``; yields the rank's Recorder.

    Rank 0 creates the store at full size; the others open it after a barrier (before generation,
    so recording adds no collective to the steps it measures). On error the trace says so.
    """
    selection = spec.probes if isinstance(spec.probes, ProbeSelection) else ProbeSelection.parse(
        ",".join(spec.probes) if spec.probes else None)
    recorder_cls = recorder_class(model)
    recorder_cls.check_selection(model, selection)
    top_k = spec.sampler.report_k
    user_probes = list(getattr(spec, "user_probes", None) or ())
    user_arrays = user_array_specs(user_probes, model, len(prompts))  # every rank checks its own probes
    if rank == 0:
        tspec = recorder_cls.trace_spec(model, selection, len(prompts), max(len(p) for p in prompts),
                                        spec.max_new_tokens, world=world, top_k=top_k)
        tspec = dataclasses.replace(tspec, user_arrays=user_arrays)
        writer = TraceWriter(spec.record, tspec, run_metadata(spec, model, tok, prompts, world, selection),
                             rank=0, world=world, overwrite=getattr(spec, "overwrite", False))
    if world > 1:
        import torch.distributed as dist
        dist.barrier(group=group)
    if rank != 0:
        writer = TraceWriter.open(spec.record, rank, world)
    recorder = recorder_cls(model, writer, selection, tok.token_text, prompts, user_probes).attach()
    with a_core_left_for_the_writer(model, writer) as recorder.core_share:
        try:
            yield recorder
        except BaseException as e:
            try:
                recorder.detach()  # the steps already complete are still committed
            finally:
                writer.fail(f"{type(e).__name__}: {e}".splitlines()[0])
            raise
        else:
            try:
                recorder.detach()  # queues the last batch
            except BaseException as e:
                writer.fail(f"{type(e).__name__}: {e}".splitlines()[0])
                raise
            writer.close()
