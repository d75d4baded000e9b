"""Save and load Perceiver checkpoints: config.json (with ``model_type``) + model.safetensors.

Weights shared between repeats are stored once, under the first name ``named_parameters`` gives
them (safetensors refuses aliased tensors); loading builds the model, whose constructor re-ties
the repeats, and fills each shared tensor once. For one tensor-parallel rank only its slices of the
split weights are read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench.errors import WorkbenchError
from workbench.models.perceiver import MODEL_TYPES, PerceiverConfig, PerceiverCore, build_perceiver
from workbench.runtime.checkpoint import _skip_init, read_tensors


def read_perceiver_config(path: str | Path) -> PerceiverConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise WorkbenchError(f"{path} has no config.json")
    try:
        d = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise WorkbenchError(f"{cfg_file} is not valid JSON: {e}") from None
    if d.get("model_type") not in MODEL_TYPES:
        raise WorkbenchError(f"{cfg_file} has model_type {d.get('model_type')!r}, not one of {', '.join(MODEL_TYPES)}")
    return PerceiverConfig.from_dict(d)


def save_perceiver(model: PerceiverCore, path: str | Path) -> None:
    """Write config.json and model.safetensors (each shared tensor once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.named_parameters()}  # deduplicated
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def load_perceiver(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   rank: int = 0, world: int = 1) -> PerceiverCore:
    """Build the model that config.json names and load its weights; errors name the problem.

    With ``world > 1`` the model is rank ``rank``'s tensor-parallel shard: only its slices of the
    split weights are read (as for ``checkpoint.load_llama``); collectives are not installed yet.
    """
    path = Path(path)
    if not path.is_dir():
        raise WorkbenchError(f"model directory {path} does not exist")
    cfg = read_perceiver_config(path)
    with _skip_init():  # every weight comes from the file; split ones are replaced before use
        model = build_perceiver(cfg)
    expected = dict(model.named_parameters())
    f = path / "model.safetensors"
    if not f.exists():
        raise WorkbenchError(f"{path} has no model.safetensors")
    parts = None
    if world > 1:
        from workbench.runtime import tp
        parts = tp.shard_plan(model, rank, world)
    state = read_tensors([f], {k: tuple(v.shape) for k, v in expected.items()}, parts=parts)
    if parts is not None:
        tp.shard_weights(model, rank, world, loaded={k: state.pop(k) for k in parts if k in state})
    with torch.no_grad():
        for k, t in state.items():
            expected[k].copy_(t)
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()
