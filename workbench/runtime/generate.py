"""The generate loop: prefill a batch of prompts, then decode one token per step.

Step 0 is the prefill (it produces the first new token); step n >= 1 feeds token n-1 back and
produces token n. ``model.info`` tells hook-point listeners which step is running. A per-step
callback streams what was chosen; probes and the recorder use the same callback.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.runtime.kv_cache import PagedKVCache, check_block_size
from workbench.runtime.sampler import Sampler, SamplerConfig
from workbench.runtime.tokenizer import text_after


@dataclass
class StepEvent:
    step: int
    tokens: list[int]          # chosen token per sequence
    positions: list[int]       # position each chosen token occupies
    cand_ids: torch.Tensor     # [b, k]
    cand_probs: torch.Tensor   # [b, k]
    finished: list[bool]       # sequence finished at or before this step
    seconds: float             # wall time of this step's forward pass and sampling
    cache: object


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    generated: list[list[int]]       # new tokens per sequence, up to and including its stop token
    finish_reasons: list[str]        # "length", "eos" or "stop"
    texts: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_seconds(self) -> float:
        return self.step_seconds[0] if self.step_seconds else 0.0

    @property
    def decode_seconds(self) -> float:
        return sum(self.step_seconds[1:])

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.step_seconds) - 1
        return steps * len(self.generated) / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def make_cache(model, batch: int, max_len: int, block_size: int = 16, num_blocks: int | None = None):
    if hasattr(model, "make_cache"):  # models with their own cache kind (Perceiver AR)
        return model.make_cache(batch=batch, max_len=max_len)
    return PagedKVCache.for_model(model, batch, max_len, block_size=block_size, num_blocks=num_blocks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_settings(max_new_tokens: int, block_size: int, stop_strings: Sequence[str]) -> None:
    """Refuse generation settings that are wrong whatever the model and prompts."""
    if max_new_tokens < 1:
        raise WorkbenchError(f"max new tokens must be >= 1, got {max_new_tokens}")
    check_block_size(block_size)
    if any(not s for s in stop_strings):  # "" is in every text: it would end every sequence at once
        raise WorkbenchError("a stop string must not be empty")


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampler: Sampler | SamplerConfig | None = None, stop_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             on_step: Callable[[StepEvent], None] | None = None, block_size: int = 16,
             num_blocks: int | None = None, pad_id: int = 0) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (token id lists of any lengths).

    Args:
        model: a built model (``Llama`` or Perceiver AR), possibly sharded for tensor parallelism.
        prompts: token ids per sequence.
        max_new_tokens: steps to run at most (step 0 is the prefill).
        sampler: a Sampler (keeps its generator state) or a SamplerConfig.
        stop_ids: end tokens; a sequence that samples one is finished.
        stop_strings: a sequence whose decoded text contains one is finished (needs ``decode``).
        on_step: called after every step with a StepEvent (streaming, probes, recording).
    Returns:
        GenerationResult with the new tokens, why each sequence stopped and per-step timings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise WorkbenchError("every prompt must have at least one token")
    check_settings(max_new_tokens, block_size, stop_strings)
    ctx = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > ctx:
        raise WorkbenchError(f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the "
                             f"model's context of {ctx}")
    if stop_strings and decode is None:
        raise WorkbenchError("stop strings need a decode function")
    if not isinstance(sampler, Sampler):
        sampler = Sampler(sampler)
    device = next(model.parameters()).device
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
    for j, p in enumerate(prompts):
        tokens[j, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    cache = make_cache(model, b, longest + max_new_tokens, block_size, num_blocks)

    stop_set = set(stop_ids)
    # A stop string can only complete within the last few tokens (every token is at least one
    # byte; +4 covers a character split across byte tokens): decode those, not the whole text.
    tail = max((len(s.encode()) for s in stop_strings), default=0) + 4
    generated: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    finished = [False] * b
    step_seconds: list[float] = []
    start_pos = torch.zeros(b, dtype=torch.long, device=device)
    inp, logits_index = tokens, lengths - 1
    for step in range(max_new_tokens):
        model.info.step = step
        model.info.start_pos = start_pos
        model.info.lengths = lengths if step == 0 else torch.ones_like(lengths)
        t0 = time.perf_counter()
        model.info.t0_ns = time.perf_counter_ns()
        logits = model(inp, cache, start_pos=start_pos, logits_index=logits_index)  # [b, 1, vocab]
        cache.set_lengths((lengths + step).tolist())
        res = sampler.sample(logits[:, -1])
        _sync(device)
        seconds = time.perf_counter() - t0
        step_seconds.append(seconds)
        chosen = res.tokens.tolist()
        for j, tok in enumerate(chosen):
            if finished[j]:
                continue
            generated[j].append(tok)
            if tok in stop_set:
                finished[j], reasons[j] = True, "eos"
            elif stop_strings and any(s in _tail_text(decode, prompts[j], generated[j], tail) for s in stop_strings):
                finished[j], reasons[j] = True, "stop"
        if on_step is not None:
            on_step(StepEvent(step=step, tokens=chosen, positions=(lengths + step).tolist(),
                              cand_ids=res.cand_ids, cand_probs=res.cand_probs, finished=list(finished),
                              seconds=seconds, cache=cache))
        if all(finished):
            break
        start_pos = lengths + step
        inp, logits_index = res.tokens[:, None], None
    result = GenerationResult(prompt_ids=[list(p) for p in prompts], generated=generated,
                              finish_reasons=reasons, step_seconds=step_seconds)
    if decode is not None:
        result.texts = [_cut_at_stop(text_after(decode, p[-1:], g), stop_strings) for p, g in zip(prompts, generated)]
    return result


def _tail_text(decode: Callable[[list[int]], str], prompt: Sequence[int], generated: list[int], tail: int) -> str:
    """The text of the last ``tail`` generated tokens, read after the token before them."""
    before = prompt[-1:] if len(generated) <= tail else generated[-tail - 1:-tail]
    return text_after(decode, before, generated[-tail:])


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]
