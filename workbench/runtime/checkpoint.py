"""Load and save local Hugging Face Llama checkpoints (config.json + safetensors, sharded or not)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama

# HF parameter names -> ours, below the "model." prefix (the rest of the name is identical).
_RENAMES = [(".self_attn.", ".attn."), (".post_attention_layernorm.", ".post_attn_norm."),
            (".input_layernorm.", ".input_norm.")]


def hf_to_ours(name: str) -> str:
    name = name.removeprefix("model.")
    for a, b in _RENAMES:
        name = name.replace(a, b)
    return name


def ours_to_hf(name: str) -> str:
    for a, b in _RENAMES:
        name = name.replace(b, a)
    return name if name.startswith("lm_head.") else "model." + name


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise WorkbenchError(f"{index} is not a valid safetensors index") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WorkbenchError(f"no *.safetensors weights in {path}")
    for f in files:
        if not f.exists():
            raise WorkbenchError(f"weight shard {f.name} listed in the index is missing from {path}")
    return files


def read_config(path: str | Path) -> LlamaConfig:
    path = Path(path)
    if not path.is_dir():
        raise WorkbenchError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise WorkbenchError(f"{path} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise WorkbenchError(f"{cfg_file} is not valid JSON: {e}") from None
    if hf.get("model_type") in ("perceiver_ar", "perceiver"):  # workbench's own Perceiver checkpoints
        from workbench.models.perceiver import PerceiverConfig
        return PerceiverConfig.from_dict(hf)
    return LlamaConfig.from_hf_dict(hf)


def load_llama(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               rank: int = 0, world: int = 1) -> Llama:
    """Build a Llama from a local HF checkpoint directory; errors name the problem.

    With ``world > 1`` the model is rank ``rank``'s shard for tensor parallelism: only the rank's
    rows and columns of the split weights are read from the files (``tp.shard_plan``), replicated
    tensors whole, so host memory holds one shard, not the whole model. The collectives are not
    installed yet (``tp.install_collective``, or ``tp.shard_model``, which sees the shard).
    """
    path = Path(path)
    cfg = read_config(path)
    if not isinstance(cfg, LlamaConfig):
        raise WorkbenchError(f"{path} holds a {cfg.model_type} model, not a Llama (use session.load_model)")
    with _skip_init():
        model = Llama(cfg)  # full size but never written: the split weights are replaced before use
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    parts = None
    if world > 1:
        from workbench.runtime import tp
        parts = tp.shard_plan(model, rank, world)
    state = read_tensors(weight_files(path), {k: tuple(v.shape) for k, v in expected.items()}, rename=hf_to_ours,
                         ignore=lambda ours: ours.endswith("rotary_emb.inv_freq") or ours in tied, show=ours_to_hf,
                         parts=parts)
    dtype = dtype or torch.float32
    for k in list(state):  # one tensor at a time, so a conversion never holds two copies of the model
        state[k] = state[k].to(dtype)
    if parts is not None:
        tp.shard_weights(model, rank, world, loaded=state)
        state = {k: v for k, v in state.items() if k not in parts}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def read_tensors(files: list[Path], expected: dict[str, tuple[int, ...]], *, rename=lambda key: key,
                 ignore=lambda name: False, show=lambda name: name, parts: dict | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every expected tensor from safetensors ``files``, checked by name and shape.

    rename: file key -> our name; ignore: our names to skip (derived buffers, tied weights);
    show: our name -> the name to print when one is missing. Errors name the tensor and the file.
    Tensors read whole are views of the file's memory map (pages come in when used and are shared
    with every process that maps the file). parts: for one tensor-parallel rank (``tp.shard_plan``):
    our name -> the ``tp.Part`` to read, or None for a tensor the rank does not hold (checked, not
    read); names not in ``parts`` are read whole. A part is read through its own map of the file,
    touching only its rows or columns, copied out and the map closed, so the process never holds
    more than its own parts plus one part's pages of the file.
    """
    state: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    for f in files:
        try:
            to_read: list[tuple[str, str]] = []
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():  # names and shapes first (from the header: no data is read)
                    ours = rename(key)
                    if ignore(ours):
                        continue
                    if ours not in expected:
                        raise WorkbenchError(f"unexpected tensor {key!r} in {f.name}")
                    shape = tuple(sf.get_slice(key).get_shape())
                    if shape != expected[ours]:
                        raise WorkbenchError(f"tensor {key!r} has shape {shape}, config implies {expected[ours]}")
                    found.add(ours)
                    if parts is None or ours not in parts:
                        state[ours] = sf.get_tensor(key)  # whole: a view of the file's memory map
                    elif parts[ours] is not None:
                        to_read.append((key, ours))
            for key, ours in to_read:  # a map per part, closed at once: its pages leave this process
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    piece = parts[ours].of(sf.get_slice(key))
                    state[ours] = piece.clone(memory_format=torch.contiguous_format)  # own memory, not the map's
        except (OSError, RuntimeError) as e:
            raise WorkbenchError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    missing = sorted(set(expected) - found)
    if missing:
        raise WorkbenchError(f"checkpoint lacks {len(missing)} tensors, e.g. {show(missing[0])!r}")
    return state


@contextlib.contextmanager
def _skip_init():
    """Build modules without random init: the checkpoint overwrites every weight anyway.

    (Building on the meta device instead pulls in torch._dynamo, ~5 s of import on this CPU.)
    """
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def save_llama(model: Llama, path: str | Path, tokenizer=None) -> None:
    """Write config.json and model.safetensors in the HF layout (loadable by transformers)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2))
    state = {ours_to_hf(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None and hasattr(tokenizer, "to_dict") and tokenizer.to_dict()["kind"] == "bytes":
        (path / "workbench_tokenizer.json").write_text(json.dumps(tokenizer.to_dict(), indent=2))
