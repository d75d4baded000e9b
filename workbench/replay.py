"""Replay a recorded run: re-run its generation from the trace's metadata and check the tokens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.errors import WorkbenchError


@dataclass
class ReplayReport:
    steps_checked: int
    first_difference: tuple[int, int] | None  # (step, seq) of the first differing token, None if identical
    recorded: list[list[int]]
    replayed: list[list[int]]
    checkpoint_matches: bool
    hooks: list[dict]  # the recorded run's RunSpec.hooks (pattern, fn): the replay ran without them

    @property
    def ok(self) -> bool:
        return self.first_difference is None

    def summary(self) -> str:
        if self.ok:
            n = len(self.recorded)
            return f"reproduced: {self.steps_checked} steps, {n} sequence{'s' * (n != 1)}, identical tokens"
        step, seq = self.first_difference
        rec = self.recorded[seq][step] if step < len(self.recorded[seq]) else None
        rep = self.replayed[seq][step] if step < len(self.replayed[seq]) else None
        return f"differs at step {step}, sequence {seq}: recorded token {rec}, replayed {rep}"


def spec_from_trace(trace, model: str | None = None):
    """The RunSpec that produced ``trace`` (without recording)."""
    from workbench.runtime.sampler import SamplerConfig
    from workbench.runtime.session import RunSpec
    meta = trace.metadata
    try:
        return RunSpec(model=model or meta["model_path"], prompts=list(meta["prompts"]),
                       max_new_tokens=int(meta["max_new_tokens"]), sampler=SamplerConfig(**meta["sampler"]),
                       stop_strings=list(meta.get("stop_strings", [])), tp=int(meta.get("tp_size", 1)),
                       tp_algorithm=meta.get("tp_algorithm", "allreduce"), arm=meta.get("arm"),
                       block_size=int(meta.get("block_size", 16)), device="cpu",
                       dtype=meta.get("dtype", "float32"),  # traces before 25 Nov 2026: always float32
                       # the ids the run read (a chat template may name today's date: never re-render)
                       prompt_ids=meta.get("prompt_ids"), chat=bool(meta.get("chat", False)))
    except KeyError as e:
        raise WorkbenchError(f"{trace.path} lacks run metadata {e.args[0]!r} needed to replay it") from None


def recorded_tokens(trace) -> list[list[int]]:
    """Generated tokens per sequence as recorded (up to the committed step)."""
    produced = trace.tokens.produced_step.values  # [seq, position]; -1 where nothing was written
    ids = trace.tokens.token_id.values
    prompt_len = trace.tokens.prompt_len.values
    return [[int(t) for t in ids[j][produced[j] >= 0][int(prompt_len[j]):]] for j in range(ids.shape[0])]


def verify(path: str | Path, model: str | None = None, tp: int | None = None) -> ReplayReport:
    """Re-run the recorded generation and compare its tokens with the trace's, step by step."""
    from workbench.runtime.checkpoint_hash import checkpoint_hash
    from workbench.runtime.session import run
    from workbench.trace.reader import open_trace
    trace = open_trace(path)
    spec = spec_from_trace(trace, model)
    if tp is not None:
        spec.tp = tp
    if not Path(spec.model).is_dir():
        raise WorkbenchError(f"the recorded model {spec.model} is not here; pass --model DIR")
    matches = checkpoint_hash(spec.model) == trace.metadata.get("checkpoint_sha256")
    recorded = recorded_tokens(trace)
    result = run(spec)
    replayed = [list(g) for g in result.generated]
    first = None
    steps = max(len(r) for r in recorded)
    for step in range(steps):
        for j in range(len(recorded)):
            a = recorded[j][step] if step < len(recorded[j]) else None
            b = replayed[j][step] if step < len(replayed[j]) else None
            if a is not None and a != b:
                first = (step, j)
                break
        if first:
            break
    return ReplayReport(steps_checked=steps, first_difference=first, recorded=recorded, replayed=replayed,
                        checkpoint_matches=matches, hooks=list(trace.metadata.get("hooks") or []))
