"""Llama-family decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, gated MLP.

Each layer ends its attention and its MLP with a ``ResidualNorm`` unit (reduce partial sums, add
the residual, RMSNorm with the *next* norm's weight). With one rank the reduce is the identity;
tensor parallelism (workbench/runtime/tp.py) installs a collective into the same units, so the
model code is identical for every world size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.config import LlamaConfig
from workbench.models.hook_points import HookedModule, HookPoint
from workbench.models.part_clock import PartClock


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (HF's rotate-half layout), with optional llama3 frequency scaling."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        sc = cfg.rope_scaling or {}
        if sc.get("rope_type", sc.get("type")) == "llama3":
            inv_freq = _llama3_scale(inv_freq, sc)
        t = torch.arange(cfg.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)  # [max_seq, head_dim]
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # [b, t, head_dim] each


def _llama3_scale(inv_freq: torch.Tensor, sc: dict) -> torch.Tensor:
    factor = sc["factor"]
    low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [b, h, t, hd]; cos/sin [b, t, hd]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           hook_pattern: HookPoint) -> torch.Tensor:
    """Grouped-query attention: q [b, h, tq, hd], k/v [b, kvh, tk, hd], mask [b|1, 1, tq|1, tk] -> [b, h, tq, hd].

    The softmax weights are materialised, and passed through ``hook_pattern`` [b, h, tq, tk], only
    when someone listens there; otherwise the fused SDPA kernel runs.
    """
    if not hook_pattern.listeners:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    b, h, tq, hd = q.shape
    kvh = k.shape[1]
    # Heads sharing a KV head are stacked as extra query rows: no copies of k and v.
    grouped = q.reshape(b, kvh, (h // kvh) * tq, hd)
    scores = (grouped @ k.transpose(-1, -2)).view(b, h, tq, -1) * (1.0 / math.sqrt(hd))
    scores = torch.where(mask, scores if scores.dtype == torch.float32 else scores.float(), float("-inf"))
    pattern = hook_pattern(torch.softmax(scores, dim=-1))
    out = (pattern if pattern.dtype == q.dtype else pattern.to(q.dtype)).reshape(b, kvh, (h // kvh) * tq, -1) @ v
    return out.view(b, h, tq, hd)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        # Local head counts: tensor parallelism shrinks these when it shards the weights.
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attention_bias)
        self.hook_in = HookPoint()       # [b, t, d_model] normed input
        self.hook_pattern = HookPoint()  # [b, heads, t, keys] softmax weights (manual path only)
        self.hook_out = HookPoint()      # [b, t, d_model] output projection (a partial sum under TP)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache) -> torch.Tensor:
        if self.hook_in.listeners:
            x = self.hook_in(x)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin).transpose(1, 2)  # back to [b, t, kvh, hd] for the cache
        if cache is not None:
            cache.write(self.layer_idx, k, v)
            k, v = cache.read(self.layer_idx)  # [b, keys, kvh, hd]
        y = attend(q, k.transpose(1, 2), v.transpose(1, 2), mask, self.hook_pattern)  # [b, h, t, hd]
        y = self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        if self.hook_out.listeners:
            y = self.hook_out(y)
        return y


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = {
            "silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        }[cfg.act]
        self.redistribute: nn.Module | None = None  # ARM (workbench/models/arm.py) when enabled
        self.hook_in = HookPoint()        # [b, t, d_model] normed input
        self.hook_act_pre = HookPoint()   # [b, t, d_ff] act(gate(x)) before redistribution
        self.hook_act_post = HookPoint()  # [b, t, d_ff] after redistribution
        self.hook_out = HookPoint()       # [b, t, d_model] down projection (a partial sum under TP)
        self.taps: list | None = None  # the block's activation taps (models/activation_taps.py)
        self.tap_slot = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_in.listeners:
            x = self.hook_in(x)
        a = self.act_fn(self.gate_proj(x))
        if self.hook_act_pre.listeners:
            a = self.hook_act_pre(a)
        taps = self.taps
        if taps is not None:
            taps[self.tap_slot] = a  # mlp.act.pre
        if self.redistribute is not None:
            a = self.redistribute(a)
        if self.hook_act_post.listeners:
            a = self.hook_act_post(a)
        if taps is not None:
            taps[self.tap_slot + 1] = a  # mlp.act.post
        y = self.down_proj(a * self.up_proj(x))
        if self.hook_out.listeners:
            y = self.hook_out(y)
        return y


class ResidualNorm(nn.Module):
    """The All-Reduce RMSNorm unit: reduce partial sums, add the residual, RMSNorm.

    ``collective`` is None with one rank. Tensor parallelism sets it to a callable
    ``(unit, partial, residual, norm) -> (residual, normed)`` that reduces across ranks (and fires
    ``hook_reduced`` / ``hook_timing`` itself where its algorithm has those values).
    """

    def __init__(self) -> None:
        super().__init__()
        self.collective: Callable | None = None
        self.hook_partial = HookPoint()   # [b, t, d_model] this rank's partial sum
        self.hook_reduced = HookPoint()   # [b, t, d_model] sum over ranks
        self.hook_residual = HookPoint()  # [b, t, d_model] residual stream after the add
        self.hook_normed = HookPoint()    # [b, t, d_model] RMSNorm output, input of the next part
        self.hook_timing = HookPoint()    # dict(start_ns, end_ns, bytes, algorithm) of the collective

    def forward(self, partial: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hook_partial.listeners:
            partial = self.hook_partial(partial)
        if self.collective is None:
            if self.hook_reduced.listeners:
                partial = self.hook_reduced(partial)
            residual = residual + partial
            normed = norm(residual)
        else:
            residual, normed = self.collective(self, partial, residual, norm)
        if self.hook_residual.listeners:
            residual = self.hook_residual(residual)
        if self.hook_normed.listeners:
            normed = self.hook_normed(normed)
        return residual, normed


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.attn_allreduce = ResidualNorm()
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_allreduce = ResidualNorm()
        self.part_clock: PartClock | None = None  # set while timing is recorded (models/part_clock.py)
        self.part_clock_slot = 0
        self.taps: list | None = None  # set while activations are kept (models/activation_taps.py)
        self.tap_slot = 0

    def attach_taps(self, taps: list | None, slot: int) -> None:
        """Store this block's TAP_SITES tensors into ``taps[slot:slot + 4]`` (None: stop)."""
        self.taps = self.mlp.taps = taps
        self.tap_slot = self.mlp.tap_slot = slot

    def forward(self, h, residual, next_norm, cos, sin, mask, cache):
        clock = self.part_clock
        if clock is not None:
            ns, now, i = clock.ns, clock.now, self.part_clock_slot
            ns[i] = now()
        a = self.attn(h, cos, sin, mask, cache)
        if clock is not None:
            ns[i + 1] = now()
        taps = self.taps
        if taps is not None:
            taps[self.tap_slot + 2] = a  # attn.out
        residual, h = self.attn_allreduce(a, residual, self.post_attn_norm)
        if clock is not None:
            ns[i + 2] = now()
        m = self.mlp(h)
        if clock is not None:
            ns[i + 3] = now()
        residual, h = self.mlp_allreduce(m, residual, next_norm)
        if clock is not None:
            ns[i + 4] = now()
        if taps is not None:
            taps[self.tap_slot + 3] = residual  # resid.post
        return residual, h


class Llama(HookedModule):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)
        self.hook_embed = HookPoint()   # [b, t, d_model]
        self.hook_logits = HookPoint()  # [b, t or 1, vocab]
        self.setup_hook_points()

    def forward(self, tokens: torch.Tensor, cache=None, start_pos: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens`` [b, t] placed at positions ``start_pos[b] + arange(t)``.

        cache: a PagedKVCache prepared by the runtime (None: no cache, start_pos must be 0).
        logits_index: [b] position within ``tokens`` whose logits are wanted (prefill of a padded
        batch); None returns logits for every position.
        """
        b, t = tokens.shape
        if start_pos is None:
            start_pos = torch.zeros(b, dtype=torch.long, device=tokens.device)
        positions = start_pos[:, None] + torch.arange(t, device=tokens.device)  # [b, t]
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rotary(positions)
        if cache is not None:
            n_keys = cache.prepare(start_pos, t)
        else:
            n_keys = t
        keys = torch.arange(n_keys, device=tokens.device)
        mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [b, 1, t, keys]

        x = self.embed_tokens(tokens)
        if self.hook_embed.listeners:
            x = self.hook_embed(x)
        residual, h = x, self.layers[0].input_norm(x)
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            residual, h = layer(h, residual, next_norm, cos, sin, mask, cache)
        if logits_index is not None:
            h = h[torch.arange(b, device=h.device), logits_index].unsqueeze(1)
        logits = self.lm_head(h)
        if self.hook_logits.listeners:
            logits = self.hook_logits(logits)
        return logits
