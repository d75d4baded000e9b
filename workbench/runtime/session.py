"""One generation run from a RunSpec: load, shard, instrument, generate, stream.

This is the single place where the runtime's parts meet (models, tensor parallelism, ARM, probes
and the trace recorder); the CLI and notebooks call ``run``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from workbench.errors import WorkbenchError
from workbench.runtime.sampler import Sampler, SamplerConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = PROJECT_ROOT / "data" / "models" / "llama-bytes"


@dataclass
class RunSpec:
    model: str = str(DEFAULT_MODEL)
    prompts: list[str] = field(default_factory=lambda: ["def fibonacci(n):\n"])
    max_new_tokens: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stop_strings: list[str] = field(default_factory=list)
    device: str = "auto"            # auto: cuda when present, else cpu
    block_size: int = 16
    tp: int = 1                     # tensor-parallel size
    tp_algorithm: str = "allreduce"  # or "reduce_scatter"
    record: str | None = None       # trace store path
    probes: list[str] | None = None  # probe names/selection (None: everything)
    arm: dict | None = None         # redistribution settings (None: off)

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError("device cuda requested but CUDA is not available")
    return torch.device(name)


def load_model(path: str | Path, device: torch.device):
    """Model and tokenizer from a local checkpoint directory, by its config.json model_type."""
    from workbench.runtime.checkpoint import load_llama, read_config
    from workbench.runtime.tokenizer import load_tokenizer
    path = Path(path)
    if not path.is_dir():
        raise WorkbenchError(f"model directory {path} does not exist")
    cfg = read_config(path)
    model = load_llama(path, device=device)
    tok = load_tokenizer(path, cfg.vocab_size, cfg.bos_id, cfg.eos_id)
    return model, tok


def encode_prompts(spec: RunSpec, tok, max_seq_len: int) -> list[list[int]]:
    ids = [tok.encode(p) for p in spec.prompts]
    for p, i in zip(spec.prompts, ids):
        if len(i) + spec.max_new_tokens > max_seq_len:
            raise WorkbenchError(f"prompt of {len(i)} tokens plus {spec.max_new_tokens} new tokens exceeds "
                                 f"the model's context of {max_seq_len}")
        if not i:
            raise WorkbenchError("empty prompt")
    return ids


class TextStreamer:
    """Prints sequence 0's new text as it is generated (holding back half-decoded characters)."""

    def __init__(self, tok, out=sys.stdout) -> None:
        self.tok, self.out, self.ids, self.shown, self.done = tok, out, [], 0, False

    def __call__(self, event) -> None:
        if self.done:
            return
        self.done = event.finished[0]
        self.ids.append(event.tokens[0])
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


def run_local(spec: RunSpec, on_step: Callable | None = None, rank: int = 0, world: int = 1):
    """Run one generation in this process (rank ``rank`` of ``world``); returns GenerationResult."""
    from workbench.runtime.generate import generate
    device = pick_device(spec.device)
    model, tok = load_model(spec.model, device)
    from workbench.models.arm import apply_arm  # ARM reads TP rank/world from model.info at call time
    apply_arm(model, spec.arm, seed=spec.sampler.seed)
    prompts = encode_prompts(spec, tok, model.cfg.max_seq_len)
    stop_ids = [tok.eos_id] if tok.eos_id is not None else []
    result = generate(model, prompts, spec.max_new_tokens, sampler=Sampler(spec.sampler), stop_ids=stop_ids,
                      stop_strings=spec.stop_strings, decode=tok.decode, on_step=on_step,
                      block_size=spec.block_size)
    return result


def run(spec: RunSpec, on_step: Callable | None = None):
    """Run a generation as the spec says (tensor parallel across processes when spec.tp > 1)."""
    if spec.tp != 1:
        raise WorkbenchError("tensor parallelism is not available yet")
    return run_local(spec, on_step=on_step)


def result_json(spec: RunSpec, result) -> str:
    return json.dumps({
        "prompts": spec.prompts,
        "prompt_ids": result.prompt_ids,
        "generated_ids": result.generated,
        "texts": result.texts,
        "finish_reasons": result.finish_reasons,
        "timings": {"prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
                    "decode_tokens_per_second": result.decode_tokens_per_second,
                    "steps": len(result.step_seconds)},
    })


def load_tokenizer_only(path: str | Path):
    from workbench.runtime.checkpoint import read_config
    from workbench.runtime.tokenizer import load_tokenizer
    cfg = read_config(path)
    return load_tokenizer(Path(path), cfg.vocab_size, cfg.bos_id, cfg.eos_id)
