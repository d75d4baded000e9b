"""One generation run from a RunSpec: load, shard, instrument, generate, stream.

This is the single place where the runtime's parts meet (models, tensor parallelism, ARM, probes
and the trace recorder); the CLI and notebooks call ``run``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.runtime.generate import check_settings
from workbench.runtime.sampler import Sampler, SamplerConfig

from workbench.paths import DEFAULT_MODEL, PROJECT_ROOT  # noqa: F401  (re-exported)


@dataclass
class RunSpec:
    model: str = str(DEFAULT_MODEL)
    prompts: list[str] = field(default_factory=lambda: ["def fibonacci(n):\n"])
    max_new_tokens: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stop_strings: list[str] = field(default_factory=list)
    device: str = "auto"            # auto: cuda when present, else cpu
    dtype: str = "float32"          # weights and activations: float32, bfloat16, float16, or auto (the checkpoint's)
    chat: bool = False              # lay each prompt out with the checkpoint's chat template (runtime/chat.py)
    prompt_ids: list | None = None  # token ids per prompt, used instead of encoding ``prompts`` (replay)
    block_size: int = 16
    tp: int = 1                     # tensor-parallel size
    tp_algorithm: str = "allreduce"  # or "reduce_scatter"
    record: str | None = None       # trace store path
    overwrite: bool = False         # replace an existing trace at ``record``
    probes: object = None           # ProbeSelection, or list of probe names (None: everything)
    arm: dict | None = None         # redistribution settings (None: off)
    # Your own probes: (hook point name or glob, fn(tensor, hook_point)) pairs attached on every rank
    # for the run (fn must be picklable under --tp); a returned tensor replaces the hooked one.
    hooks: list = field(default_factory=list)
    # Your own probes recorded into the trace (workbench/probes/user_probe.py; picklable under --tp).
    user_probes: list = field(default_factory=list)

    def check(self) -> None:
        """Refuse settings that are wrong whatever the model. ``run`` calls this first; the checks
        that need the model (context length, ARM layers, shards and TP size) come later, but also
        before a store is created or replaced."""
        from workbench.runtime.tp import check_algorithm
        check_settings(self.max_new_tokens, self.block_size, self.stop_strings)
        check_algorithm(self.tp_algorithm)
        if not (self.prompts if self.prompt_ids is None else self.prompt_ids):
            raise WorkbenchError("no prompt given")

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError("device cuda requested but CUDA is not available")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, checkpoint_dtype: str = "float32") -> torch.dtype:
    """``name`` as a torch dtype; ``auto`` is the checkpoint's own (``torch_dtype`` of config.json)."""
    if name == "auto":
        return DTYPES.get(checkpoint_dtype, torch.float32)
    if name not in DTYPES:
        raise WorkbenchError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)}, auto)")
    return DTYPES[name]


def load_model(path: str | Path, device: torch.device, rank: int = 0, world: int = 1, dtype: str = "float32"):
    """Model and tokenizer from a local checkpoint directory, by its config.json model_type.

    With ``world > 1`` the model is rank ``rank``'s tensor-parallel shard, read as slices from the
    files (the collectives are installed by the caller: ``tp.install_collective``). ``dtype`` names
    the weights' dtype (``pick_dtype``): bfloat16 halves the memory of a float32 model.
    """
    from workbench.runtime.checkpoint import load_llama, read_config
    from workbench.runtime.tokenizer import load_tokenizer
    path = Path(path)
    if not path.is_dir():
        raise WorkbenchError(f"model directory {path} does not exist")
    cfg = read_config(path)
    torch_dtype = pick_dtype(dtype, getattr(cfg, "torch_dtype", "float32"))
    if getattr(cfg, "model_type", "llama") in ("perceiver_ar", "perceiver"):
        from workbench.runtime.perceiver_checkpoint import load_perceiver
        model = load_perceiver(path, device=device, dtype=torch_dtype, rank=rank, world=world)
    else:
        model = load_llama(path, device=device, dtype=torch_dtype, rank=rank, world=world)
    tok = load_tokenizer(path, cfg.vocab_size, cfg.bos_id, cfg.eos_id)
    return model, tok


def checkpoint_stop_ids(path: str | Path, cfg, tok) -> list[int]:
    """End tokens of a checkpoint: the tokenizer's, every id of config.json's ``eos_token_id`` (a
    list in Llama 3 Instruct, whose turns end with <|eot_id|>) and generation_config.json's, which
    transformers' ``generate`` stops at too."""
    ids = set(cfg.eos_ids)
    if tok.eos_id is not None:
        ids.add(tok.eos_id)
    gen = Path(path) / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as e:
            raise WorkbenchError(f"{gen} is not a readable generation config ({type(e).__name__}: {e})") from None
        ids.update([] if eos is None else eos if isinstance(eos, list) else [eos])
    return sorted(int(i) for i in ids)


def encode_prompts(spec: RunSpec, tok, max_seq_len: int) -> list[list[int]]:
    if spec.prompt_ids is not None:
        ids = [[int(i) for i in p] for p in spec.prompt_ids]
    elif spec.chat:  # the template writes the special tokens it needs
        from workbench.runtime.chat import render_chat
        ids = [tok.encode(render_chat(spec.model, p), add_special_tokens=False) for p in spec.prompts]
    else:
        ids = [tok.encode(p) for p in spec.prompts]
    for p, i in zip(spec.prompts, ids):
        if len(i) + spec.max_new_tokens > max_seq_len:
            raise WorkbenchError(f"prompt of {len(i)} tokens plus {spec.max_new_tokens} new tokens exceeds "
                                 f"the model's context of {max_seq_len}")
        if not i:
            raise WorkbenchError("empty prompt")
    return ids


class TextStreamer:
    """Prints sequence 0's new text as it is generated (holding back half-decoded characters).

    Each step decodes a short window of recent tokens, not the whole text (that made every step
    cost more than the last): the new text is what the window decodes to beyond its already
    printed head, which also keeps tokenizers right whose decoding depends on the token before
    (a leading space, a byte sequence split over tokens).
    """

    def __init__(self, tok, out=sys.stdout, context: Sequence[int] = ()) -> None:
        # The window starts with ``context``'s last token (the prompt's, printed already): decoded
        # first, a token can lose its leading space (SentencePiece-style decoders strip it).
        self.tok, self.out, self.ids, self.done = tok, out, list(context)[-1:], False
        self.head = 0  # the window starts at this token; tokens before it are printed for good
        self.printed = len(self.ids)  # the window's tokens before this one are printed

    def __call__(self, event) -> None:
        if self.done:
            return
        self.done = event.finished[0]
        self.ids.append(event.tokens[0])
        shown = self.tok.decode(self.ids[self.head:self.printed])
        text = self.tok.decode(self.ids[self.head:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return  # nothing new, or a character still incomplete: wait for more tokens
        self.out.write(text[len(shown):])
        self.out.flush()
        self.head, self.printed = self.printed, len(self.ids)


@contextlib.contextmanager
def worker_setup(spec: RunSpec, model, rank: int, world: int, tok=None, prompts=None,
                 group=None) -> Iterator[Callable | None]:
    """Per-rank setup around one generation, in the process that runs the rank (every world size).

    Runs after the model is loaded and sharded, before generation; the code after ``yield`` runs
    when generation ends (also on error). Attach per-rank things here (trace recorder, probes);
    yield a per-step callback ``(StepEvent) -> None`` for this rank, or None.
    """
    if spec.record is None:
        yield None
        return
    from workbench.probes.recording import recording
    with recording(spec, model, tok, prompts, rank=rank, world=world, group=group) as recorder:
        yield recorder.on_step


def run_local(spec: RunSpec, on_step: Callable | None = None, rank: int = 0, world: int = 1, group=None):
    """Run one generation in this process (rank ``rank`` of ``world``); returns GenerationResult.

    With ``world > 1`` the process group must be initialised; the model is loaded sharded for this
    rank (workbench/runtime/tp.py) and every rank uses rank 0's sampled tokens.
    """
    from workbench.runtime.generate import generate
    if spec.record:  # the trace writer's worker starts up while the model loads
        from workbench.trace import worker_pool
        worker_pool.prestart()
    device = pick_device(spec.device)
    model, tok = load_model(spec.model, device, rank=rank, world=world, dtype=spec.dtype)  # only this rank's shard
    sampler = Sampler(spec.sampler)
    if world > 1:
        from workbench.runtime import tp
        tp.install_collective(model, spec.tp_algorithm, rank, world, group)
        sampler = tp.RankZeroSampler(spec.sampler, group)
    from workbench.models.arm import apply_arm  # ARM reads TP rank/world from model.info at call time
    apply_arm(model, spec.arm, seed=spec.sampler.seed, group=group)
    prompts = encode_prompts(spec, tok, model.cfg.max_seq_len)
    stop_ids = checkpoint_stop_ids(spec.model, model.cfg, tok)
    for pattern, fn in spec.hooks:
        model.add_listener(pattern, fn)
    with worker_setup(spec, model, rank, world, tok=tok, prompts=prompts, group=group) as rank_on_step:
        callbacks = [f for f in (rank_on_step, on_step) if f is not None]
        result = generate(model, prompts, spec.max_new_tokens, sampler=sampler, stop_ids=stop_ids,
                          stop_strings=spec.stop_strings, decode=tok.decode,
                          on_step=(lambda ev: [f(ev) for f in callbacks]) if callbacks else None,
                          block_size=spec.block_size)
    return result


def run(spec: RunSpec, on_step: Callable | None = None):
    """Run a generation as the spec says (tensor parallel across processes when spec.tp > 1).

    ``spec.tp > 1`` spawns that many local ranks (workbench/runtime/launch.py); ``on_step`` runs in
    this process with rank 0's steps (their ``cache`` is None). Under torchrun every process is one
    rank; there the call returns None on ranks other than 0, which print nothing.
    """
    from workbench.runtime import launch
    spec.check()
    if launch.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return _run_torchrun(spec, on_step)
    if spec.record is not None:
        from workbench.probes.recording import check_record_path
        check_record_path(spec.record, spec.overwrite)
    if spec.tp == 1:
        return run_local(spec, on_step=on_step)
    _check_tensor_parallel(spec, spec.tp)
    device = pick_device(spec.device)
    return launch.launch(spec.tp, functools.partial(launch.generate_on_rank, spec, on_step is not None),
                         device_type=device.type, on_message=on_step)


def _check_tensor_parallel(spec: RunSpec, world: int) -> None:
    """Bad sizes and prompts fail here, before any process starts."""
    from workbench.runtime import tp
    from workbench.runtime.checkpoint import read_config
    cfg = read_config(spec.model)
    tp.check_shardable(cfg, world)
    encode_prompts(spec, load_tokenizer_only(spec.model), cfg.max_seq_len)
    if spec.arm is not None and hasattr(cfg, "n_layers"):
        from workbench.models.arm import ARMConfig
        arm = ARMConfig.from_dict(spec.arm) if isinstance(spec.arm, dict) else spec.arm
        bad = [i for i in arm.layers if i >= cfg.n_layers]
        if bad:
            raise WorkbenchError(f"ARM layer {bad[0]} does not exist: the model has {cfg.n_layers} layers "
                                 f"(0..{cfg.n_layers - 1})")


def _run_torchrun(spec: RunSpec, on_step: Callable | None):
    from workbench.runtime import launch
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if spec.tp not in (1, world):
        raise WorkbenchError(f"--tp {spec.tp} does not match torchrun's WORLD_SIZE {world}")
    _check_tensor_parallel(spec, world)
    device = pick_device(spec.device)
    result = launch.run_torchrun_rank(
        functools.partial(_torchrun_body, spec, on_step if rank == 0 else None), device_type=device.type)
    return result if rank == 0 else None


def _torchrun_body(spec: RunSpec, on_step: Callable | None, ctx):
    import dataclasses
    return run_local(dataclasses.replace(spec, device=str(ctx.device)), on_step=on_step, rank=ctx.rank,
                     world=ctx.world, group=ctx.group)


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
