"""Perceiver (Jaegle et al. 2021) and Perceiver AR (Hawthorne et al. 2022) over byte arrays.

One core, two heads. A latent array [N, D] cross-attends to a byte array [M, D], then a latent
transformer (``n_self_layers`` Llama blocks) runs over the latents; cross-attention plus latent
transformer repeat ``n_repeats`` times. With ``share_weights`` every repeat uses the same latent
transformer and every repeat after the first the same cross-attention (the paper's choice: the
first cross-attention keeps its own weights). Each repeat keeps its own hook points, so probes see
``repeats.{r}.*`` for every repeat even when the weights are shared.

- ``PerceiverClassifier``: learned latents; bytes plus projected Fourier position features;
  non-causal; the final latents are averaged into class logits.
- ``PerceiverAR``: the latents are the last N positions of the sequence, initialised from their
  bytes' embeddings; cross-attention is causal (the latent at position p sees inputs <= p), the
  latent self-attention is causal within the window; rotary positions; next-byte logits. It runs
  under the decoder's runtime (same forward signature, ``make_cache``); see docs/perceiver.md for
  the caching scheme and its cost.

Attention projections are named as in Llama (q_proj/k_proj/v_proj/o_proj, gate/up/down_proj) and
every attention and MLP output goes through a ``ResidualNorm`` unit, so tensor parallelism shards
this model the way it shards Llama.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.config import SUPPORTED_ACTS, ConfigError
from workbench.models.hook_points import HookedModule, HookPoint
from workbench.models.llama import MLP, Block, ResidualNorm, RMSNorm, Rotary, apply_rotary, attend
from workbench.models.part_clock import PartClock

MODEL_TYPES = ("perceiver_ar", "perceiver")


@dataclass
class PerceiverConfig:
    model_type: str = "perceiver_ar"  # "perceiver_ar" (next byte) or "perceiver" (classifier)
    vocab_size: int = 259             # 256 bytes + <bos> <eos> <pad>
    d_model: int = 128
    n_latents: int = 32               # N: latent array length (Perceiver AR: the window of last positions)
    n_heads: int = 4
    n_kv_heads: int = 0               # 0: n_heads
    head_dim: int = 0                 # 0: d_model // n_heads
    n_self_layers: int = 2            # latent self-attention blocks per repeat
    n_repeats: int = 1                # cross-attention + latent transformer, repeated
    share_weights: bool = False       # repeats share the latent transformer and cross-attentions 1..R-1
    d_ff: int = 344
    max_seq_len: int = 1024           # M at most
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0       # Perceiver AR positions
    act: str = "silu"
    n_classes: int = 0                # classifier: number of classes
    n_fourier_bands: int = 16         # classifier: position features of the byte array
    bos_id: int | None = 256
    eos_id: int | None = 257
    pad_id: int | None = 258
    torch_dtype: str = "float32"

    # Fixed choices the reused Llama parts read (not saved: there is nothing to choose).
    rope_scaling = None
    attention_bias = False
    mlp_bias = False

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown Perceiver model_type {self.model_type!r} (known: {', '.join(MODEL_TYPES)})")
        for name in ("vocab_size", "d_model", "n_latents", "n_heads", "n_repeats", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_self_layers < 0:
            raise ConfigError(f"n_self_layers must be >= 0, got {self.n_self_layers}")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.model_type == "perceiver_ar" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.act not in SUPPORTED_ACTS:
            raise ConfigError(f"unsupported act {self.act!r} (supported: {', '.join(SUPPORTED_ACTS)})")
        if self.model_type == "perceiver" and self.n_classes < 1:
            raise ConfigError(f"a Perceiver classifier needs n_classes >= 1, got {self.n_classes}")

    @property
    def eos_ids(self) -> list[int]:
        return [] if self.eos_id is None else [self.eos_id]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PerceiverConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Perceiver config.json has unknown key {unknown[0]!r}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"Perceiver config.json has a bad value: {e}") from None


class CrossAttention(nn.Module):
    """Latent queries attend to the byte array. Keys/values come from ``project_inputs``, computed
    once per input row (Perceiver AR caches them), so ``forward`` only sees the latents."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        # Local head counts: tensor parallelism shrinks these when it shards the weights.
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.hook_in = HookPoint()       # [b, latent, d_model] normed latents
        self.hook_pattern = HookPoint()  # [b, heads, latent, input] softmax weights (manual path only)
        self.hook_out = HookPoint()      # [b, latent, d_model] output projection (a partial sum under TP)

    def project_inputs(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, input, kv_heads, head_dim] of the normed byte array x [b, input, d_model]."""
        b, m, _ = x.shape
        k = self.k_proj(x).view(b, m, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, m, self.n_kv_heads, self.head_dim)
        if cos is not None:
            k = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x [b, latent, d_model]; k, v [b, input, kvh, hd]; mask [b or 1, 1, latent or 1, input]
        if self.hook_in.listeners:
            x = self.hook_in(x)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [b, h, latent, hd]
        if cos is not None:
            q = apply_rotary(q, cos, sin)
        # pattern hook: [b, h, latent, input]
        y = attend(q, k.transpose(1, 2), v.transpose(1, 2), mask, self.hook_pattern)
        y = self.o_proj(y.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))
        if self.hook_out.listeners:
            y = self.hook_out(y)
        return y


class Repeat(nn.Module):
    """One cross-attend (attention + MLP, each closed by a ResidualNorm unit) and a latent transformer."""

    def __init__(self, cfg: PerceiverConfig, repeat_idx: int) -> None:
        super().__init__()
        self.q_norm = RMSNorm(cfg.d_model, cfg.norm_eps)   # latents before the cross-attention
        self.kv_norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # byte array before its keys/values
        self.cross = CrossAttention(cfg)
        self.cross_allreduce = ResidualNorm()
        self.cross_mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_mlp = MLP(cfg)
        self.cross_mlp_allreduce = ResidualNorm()
        # Block.attn.layer_idx is the latent cache's layer: repeats never share cached keys.
        self.layers = nn.ModuleList(Block(cfg, repeat_idx * cfg.n_self_layers + i)
                                    for i in range(cfg.n_self_layers))
        self.part_clock: PartClock | None = None  # the cross block's, while timing is recorded
        self.part_clock_slot = 0
        self.taps: list | None = None  # the cross block's activation taps (models/activation_taps.py)
        self.tap_slot = 0

    def attach_taps(self, taps: list | None, slot: int) -> None:
        """Store the cross block's TAP_SITES tensors into ``taps[slot:slot + 4]`` (None: stop);
        the latent blocks are ``llama.Block``s with taps of their own."""
        self.taps = self.cross_mlp.taps = taps
        self.tap_slot = self.cross_mlp.tap_slot = slot

    def cross_block(self, h, residual, next_norm, cos, sin, k, v, mask):
        """Cross-attend then MLP; returns (residual, next_norm(residual))  # [b, latent, d_model] each."""
        clock = self.part_clock  # the cross block's stamps, as in llama.Block.forward
        if clock is not None:
            ns, now, i = clock.ns, clock.now, self.part_clock_slot
            ns[i] = now()
        a = self.cross(h, cos, sin, k, v, mask)
        if clock is not None:
            ns[i + 1] = now()
        taps = self.taps
        if taps is not None:
            taps[self.tap_slot + 2] = a  # attn.out
        residual, h = self.cross_allreduce(a, residual, self.cross_mlp_norm)
        if clock is not None:
            ns[i + 2] = now()
        m = self.cross_mlp(h)
        if clock is not None:
            ns[i + 3] = now()
        residual, h = self.cross_mlp_allreduce(m, residual, self.layers[0].input_norm if self.layers else next_norm)
        if clock is not None:
            ns[i + 4] = now()
        if taps is not None:
            taps[self.tap_slot + 3] = residual  # resid.post
        return residual, h

    def latent_stack(self, h, residual, next_norm, cos, sin, mask, cache):
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else next_norm
            residual, h = layer(h, residual, nxt, cos, sin, mask, cache)
        return residual, h


_CROSS_PARTS = ("q_norm", "kv_norm", "cross", "cross_mlp_norm", "cross_mlp")


def _tie(dst: nn.Module, src: nn.Module, names: tuple[str, ...] | None = None) -> None:
    """Make ``dst`` use ``src``'s parameters (children ``names``, default all) while keeping its own
    hook points, so each repeat keeps its own hook names."""
    for name, child in src.named_children():
        if names is not None and name not in names:
            continue
        if any(isinstance(m, HookPoint) for m in child.modules()):
            assert not list(child.parameters(recurse=False)), "a module with hook points must not own parameters"
            _tie(getattr(dst, name), child)
        else:
            setattr(dst, name, child)


class PerceiverCore(HookedModule):
    """Repeats of cross-attention + latent transformer, and the final norm; heads subclass it."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.repeats = nn.ModuleList(Repeat(cfg, r) for r in range(cfg.n_repeats))
        if cfg.share_weights:
            for r in range(1, cfg.n_repeats):
                _tie(self.repeats[r], self.repeats[0], ("layers",))
                if r >= 2:
                    _tie(self.repeats[r], self.repeats[1], _CROSS_PARTS)
        # cross_slot[r]: which distinct cross-attention repeat r uses (its input keys/values are shared).
        self.cross_slot = [0 if r == 0 else (1 if cfg.share_weights else r) for r in range(cfg.n_repeats)]
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    @property
    def cross_owners(self) -> list[Repeat]:
        """The repeats that own a distinct cross-attention, in cache-slot order."""
        return [self.repeats[r] for r in sorted(set(self.cross_slot))]

    def setup_hook_points(self) -> None:
        """Names from the module tree; ``hp.repeat`` = r and ``hp.layer`` = block index within the repeat."""
        super().setup_hook_points()
        for name, hp in self.hook_points.items():
            parts = name.split(".")
            hp.repeat = int(parts[1]) if parts[0] == "repeats" else None
            hp.layer = int(parts[3]) if len(parts) > 3 and parts[0] == "repeats" and parts[2] == "layers" else None

    def _input_kv(self, x: torch.Tensor, cos, sin, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the byte array per distinct cross-attention  # [b, input, kvh, hd] each."""
        out = []
        for slot, rep in enumerate(self.cross_owners):
            k, v = rep.cross.project_inputs(rep.kv_norm(x), cos, sin)
            if cache is not None:
                cache.inputs.write(slot, k, v)
                k, v = cache.inputs.read(slot)
            out.append((k, v))
        return out

    def _next_norm(self, r: int) -> RMSNorm:
        return self.repeats[r + 1].q_norm if r + 1 < len(self.repeats) else self.norm


def _check_tokens(tokens: Any, vocab_size: int) -> tuple[int, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise WorkbenchError(f"tokens must be a [batch, seq] tensor of byte ids, got shape {shape}")
    if tokens.dtype not in (torch.long, torch.int32):  # what nn.Embedding takes
        raise WorkbenchError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    b, t = tokens.shape
    if b == 0 or t == 0:
        raise WorkbenchError(f"tokens must have at least one sequence and one position, got shape {(b, t)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise WorkbenchError(f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary of {vocab_size}")
    return b, t


def _check_vector(x: torch.Tensor | None, b: int, name: str, device) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b,):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise WorkbenchError(f"{name} must have shape [batch] = ({b},), got {shape}")
    return x.to(device=device, dtype=torch.long)


def _slots(first: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned slots for positions first..last per sequence: (positions, valid)  # [b, slots] each.

    The last slot holds ``last`` for every sequence; shorter ranges leave invalid slots on the left.
    """
    n = int((last - first).max()) + 1
    pos = last[:, None] - n + 1 + torch.arange(n, device=last.device)
    return pos, pos >= first[:, None]


def _rows_free(mask: torch.Tensor, q_valid: torch.Tensor) -> torch.Tensor:
    """Let invalid (padding) query rows see every key: their output is unused, but must not be NaN."""
    return mask | ~q_valid[:, None, :, None]


class PerceiverAR(PerceiverCore):
    """Perceiver AR: the last ``n_latents`` positions are the latents; next-byte logits."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        if cfg.model_type != "perceiver_ar":
            raise ConfigError(f"PerceiverAR needs model_type 'perceiver_ar', got {cfg.model_type!r}")
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.hook_embed = HookPoint()   # [b, t, d_model] byte-array rows of this call's tokens
        self.hook_logits = HookPoint()  # [b, 1 or latents, vocab]
        self.setup_hook_points()

    def make_cache(self, batch: int, max_len: int, block_size: int = 16):
        """A PerceiverARCache sized for this (possibly sharded) model; generate() calls it."""
        from workbench.runtime.perceiver_cache import PerceiverARCache  # runtime owns cache kinds
        return PerceiverARCache.for_model(self, batch=batch, max_len=max_len, block_size=block_size)

    def forward(self, tokens: torch.Tensor, cache=None, start_pos: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Next-byte logits for ``tokens`` [b, t] placed at positions ``start_pos[b] + arange(t)``.

        cache: a PerceiverARCache (None: no cache, start_pos must be 0). A call with a cache must
        continue right after the previous call's last latent (``start_pos`` = its position + 1).
        logits_index: [b] index within ``tokens`` of the last latent (prefill of a padded batch);
        returns [b, 1, vocab]. None: the last token is the last latent; returns logits for the last
        min(t, n_latents) positions [b, min(t, N), vocab] (only latent positions have logits).
        """
        cfg, N = self.cfg, self.cfg.n_latents
        b, t = _check_tokens(tokens, cfg.vocab_size)
        dev = tokens.device
        start_pos = _check_vector(start_pos, b, "start_pos", dev)
        if start_pos is None:
            start_pos = torch.zeros(b, dtype=torch.long, device=dev)
        logits_index = _check_vector(logits_index, b, "logits_index", dev)
        if logits_index is not None and (int(logits_index.min()) < 0 or int(logits_index.max()) >= t):
            raise WorkbenchError(f"logits_index must lie in [0, {t}), got {logits_index.tolist()}")
        if int(start_pos.min()) < 0:
            raise WorkbenchError(f"start_pos must be >= 0, got {start_pos.tolist()}")
        positions = start_pos[:, None] + torch.arange(t, device=dev)  # [b, t]
        if int(positions.max()) >= cfg.max_seq_len:
            raise WorkbenchError(f"position {int(positions.max())} exceeds max_seq_len {cfg.max_seq_len}")

        end = start_pos + (logits_index if logits_index is not None else t - 1)  # [b] last latent
        ws = (end - N + 1).clamp(min=0)              # [b] window start: latents are ws..end
        new_from = torch.maximum(start_pos, ws)      # [b] first latent not seen by an earlier call
        if cache is None:
            if int(start_pos.max()) > 0:
                raise WorkbenchError("start_pos > 0 needs a cache (the earlier inputs are not given)")
            stack_from = new_from
        else:
            stack_from = cache.begin_step(start_pos, ws, end, b)  # new_from, or ws once the window slid

        # Slots: repeat 0's cross block runs for the latents new to this call (q0); the rest of the
        # model for stack_from..end (q). Right-aligned, so the last slot is position `end`.
        q0_pos, q0_valid = _slots(new_from, end)  # [b, Q0]
        q_pos, q_valid = _slots(stack_from, end)  # [b, Q]
        if cache is None:
            lat_keys, lat_key_ok = q_pos, q_valid  # the latents are their own keys
        else:
            lat_keys = cache.prepare_latents(q_pos, q_valid, ws)  # [b, N] window positions in key order
            lat_key_ok = lat_keys <= end[:, None]  # window slots past the last latent are empty
        self.info.extra["perceiver"] = {  # what the query/key axes of this call's maps hold (-1: padding)
            "input_positions": positions, "window_start": ws, "last_latent": end,
            "cross0_latents": q0_pos.masked_fill(~q0_valid, -1),
            "latents": q_pos.masked_fill(~q_valid, -1),
            "latent_keys": lat_keys.masked_fill(~lat_key_ok, -1)}

        x = self.embed_tokens(tokens)  # [b, t, d_model]
        if self.hook_embed.listeners:
            x = self.hook_embed(x)
        cos_in, sin_in = self.rotary(positions)
        if cache is not None:
            cache.inputs.prepare(start_pos, t)
        kv = self._input_kv(x, cos_in, sin_in, cache)
        key_pos = torch.arange(kv[0][0].shape[1], device=dev)  # [input] cached input positions

        # Repeat 0's cross block: its output does not depend on the window, so the cache keeps it
        # and later steps never recompute it.
        idx = (q0_pos - start_pos[:, None]).clamp(0, t - 1)
        residual = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # [b, Q0, d_model] byte embeddings
        rep0 = self.repeats[0]
        cos0, sin0 = self.rotary(q0_pos.clamp(min=0))
        mask0 = _rows_free((key_pos[None, None, :] <= q0_pos[:, :, None]).unsqueeze(1), q0_valid)
        residual, h = rep0.cross_block(rep0.q_norm(residual), residual, self._next_norm(0), cos0, sin0,
                                       *kv[self.cross_slot[0]], mask0)
        if cache is not None:
            cache.store_cross(q0_pos, q0_valid, residual, h)
            residual, h = cache.load_cross(q_pos)  # [b, Q, d_model] each

        # The rest of repeat 0 and every later repeat, over stack_from..end.
        lat_mask = (lat_key_ok[:, None, :] & (lat_keys[:, None, :] <= q_pos[:, :, None])).unsqueeze(1)
        lat_mask = _rows_free(lat_mask, q_valid)                          # [b, 1, Q, keys]
        cross_mask = _rows_free((key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1), q_valid)
        cos, sin = self.rotary(q_pos.clamp(min=0))
        for r, rep in enumerate(self.repeats):
            if r > 0:
                residual, h = rep.cross_block(h, residual, self._next_norm(r), cos, sin,
                                              *kv[self.cross_slot[r]], cross_mask)
            residual, h = rep.latent_stack(h, residual, self._next_norm(r), cos, sin, lat_mask, cache)
        if cache is not None:
            cache.end_step(ws, end)

        # The last slot is position `end` of every sequence; the last Q0 slots are this call's latents.
        h = h[:, -1:] if logits_index is not None else h[:, -min(t, N):]
        logits = self.lm_head(h)
        if self.hook_logits.listeners:
            logits = self.hook_logits(logits)
        return logits


def fourier_features(positions: torch.Tensor, max_len: int, n_bands: int) -> torch.Tensor:
    """Position features of the Perceiver paper: [sin(pi f x), cos(pi f x), x] with x in [-1, 1]
    and frequencies f from 1 to the Nyquist frequency max_len / 2  # [..., 2 * n_bands + 1]."""
    x = positions.float() / max(max_len - 1, 1) * 2 - 1
    freqs = torch.linspace(1.0, max_len / 2, n_bands, device=positions.device)
    ang = math.pi * x[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos(), x[..., None]], dim=-1)


class PerceiverClassifier(PerceiverCore):
    """The Perceiver of the paper's figure: learned latents read a byte array; class logits."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        if cfg.model_type != "perceiver":
            raise ConfigError(f"PerceiverClassifier needs model_type 'perceiver', got {cfg.model_type!r}")
        super().__init__(cfg)
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_model) * 0.02)  # [N, d_model]
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_proj = nn.Linear(2 * cfg.n_fourier_bands + 1, cfg.d_model, bias=False)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self.hook_inputs = HookPoint()  # [b, input, d_model] byte array with position features
        self.hook_pooled = HookPoint()  # [b, d_model] latents averaged
        self.hook_logits = HookPoint()  # [b, n_classes]
        self.setup_hook_points()

    def make_cache(self, batch: int, max_len: int, **_):
        raise WorkbenchError("a Perceiver classifier does not generate text; use a perceiver_ar checkpoint")

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [b, n_classes] for byte arrays ``tokens`` [b, M]; ``lengths`` [b] masks padding."""
        cfg, N = self.cfg, self.cfg.n_latents
        b, m = _check_tokens(tokens, cfg.vocab_size)
        dev = tokens.device
        if m > cfg.max_seq_len:
            raise WorkbenchError(f"byte array of {m} exceeds max_seq_len {cfg.max_seq_len}")
        lengths = _check_vector(lengths, b, "lengths", dev)
        if lengths is None:
            lengths = torch.full((b,), m, dtype=torch.long, device=dev)
        if int(lengths.min()) < 1 or int(lengths.max()) > m:
            raise WorkbenchError(f"lengths must lie in [1, {m}], got {lengths.tolist()}")
        pos = torch.arange(m, device=dev)
        feats = fourier_features(pos, cfg.max_seq_len, cfg.n_fourier_bands).to(self.pos_proj.weight.dtype)
        x = self.embed_tokens(tokens) + self.pos_proj(feats)[None]  # [b, M, d_model]
        if self.hook_inputs.listeners:
            x = self.hook_inputs(x)
        kv = self._input_kv(x, None, None, None)
        cross_mask = (pos[None, :] < lengths[:, None])[:, None, None, :]  # [b, 1, 1, input]
        lat_mask = torch.ones(1, 1, N, N, dtype=torch.bool, device=dev)  # latents see each other
        # Llama blocks apply rotary; the identity rotation keeps the latents unordered.
        cos = torch.ones(1, N, cfg.head_dim, device=dev)
        sin = torch.zeros(1, N, cfg.head_dim, device=dev)
        residual = self.latents.expand(b, N, cfg.d_model)  # [b, N, d_model]
        h = self.repeats[0].q_norm(residual)
        self.info.extra["perceiver"] = {"input_lengths": lengths}
        for r, rep in enumerate(self.repeats):
            residual, h = rep.cross_block(h, residual, self._next_norm(r), None, None,
                                          *kv[self.cross_slot[r]], cross_mask)
            residual, h = rep.latent_stack(h, residual, self._next_norm(r), cos, sin, lat_mask, None)
        pooled = h.mean(dim=1)  # [b, d_model]
        if self.hook_pooled.listeners:
            pooled = self.hook_pooled(pooled)
        logits = self.head(pooled)
        if self.hook_logits.listeners:
            logits = self.hook_logits(logits)
        return logits


def build_perceiver(cfg: PerceiverConfig) -> PerceiverCore:
    """The model class that ``cfg.model_type`` names."""
    return PerceiverAR(cfg) if cfg.model_type == "perceiver_ar" else PerceiverClassifier(cfg)
