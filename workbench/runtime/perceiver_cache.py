"""Perceiver AR's cache: what a decode step can reuse, and nothing that would change its numbers.

Three parts (docs/perceiver.md has the reasoning and the cost):
- ``inputs``: a PagedKVCache holding the cross-attention keys/values of every input byte, one
  "layer" per distinct cross-attention (repeats that share weights share these). Inputs never change,
  so each byte is projected once.
- the output of repeat 0's cross block (residual and normed) per latent position, in a ring of
  ``n_latents`` slots: it depends only on the inputs up to that position, never on the window.
- the latent self-attention keys/values per (repeat, layer), in a ring of ``n_latents`` slots. They
  depend on where the window starts; they are reused while it has not moved (the first
  ``n_latents`` positions) and rebuilt from the cached cross outputs once it slides.
"""
from __future__ import annotations

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.runtime.kv_cache import CacheStats, PagedKVCache


class PerceiverARCache:
    def __init__(self, n_cross: int, n_latent_layers: int, n_kv_heads: int, head_dim: int, d_model: int,
                 n_latents: int, batch: int, max_len: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.inputs = PagedKVCache(n_cross, n_kv_heads, head_dim, batch, max_len, block_size=block_size,
                                   dtype=dtype, device=device)
        self.batch, self.n_latents, self.n_latent_layers = batch, n_latents, n_latent_layers
        self.n_kv_heads, self.head_dim, self.device = n_kv_heads, head_dim, torch.device(device)
        lat = (n_latent_layers, batch, n_latents, n_kv_heads, head_dim)
        self.k = torch.zeros(lat, dtype=dtype, device=device)  # latent keys, ring slot = position % N
        self.v = torch.zeros(lat, dtype=dtype, device=device)
        self.cross_residual = torch.zeros(batch, n_latents, d_model, dtype=dtype, device=device)
        self.cross_normed = torch.zeros(batch, n_latents, d_model, dtype=dtype, device=device)
        self.slot_pos = torch.full((batch, n_latents), -1, dtype=torch.long, device=device)  # -1: empty
        self.window_start = torch.zeros(batch, dtype=torch.long, device=device)
        self.latent_end = torch.full((batch,), -1, dtype=torch.long, device=device)  # last latent computed
        self.recomputes = 0  # steps that rebuilt the latent stack because a window slid
        self._rings_full = False  # every latent ring slot holds a position (until a release)
        # slot_pos only changes in place, so on the CPU one numpy view of it stays current.
        self._slot_pos_np = self.slot_pos.numpy() if self.slot_pos.device.type == "cpu" else None
        self._bidx = torch.arange(batch, device=device)[:, None]
        self._write: torch.Tensor | None = None
        self._write_sel: torch.Tensor | None = None
        self._read: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, block_size: int = 16) -> "PerceiverARCache":
        """Sized from the model's (possibly tensor-parallel, so local) head counts."""
        cross = model.repeats[0].cross
        p = model.embed_tokens.weight
        return cls(n_cross=len(model.cross_owners), n_latent_layers=model.cfg.n_repeats * model.cfg.n_self_layers,
                   n_kv_heads=cross.n_kv_heads, head_dim=cross.head_dim, d_model=model.cfg.d_model,
                   n_latents=model.cfg.n_latents, batch=batch, max_len=max_len, block_size=block_size,
                   dtype=p.dtype, device=p.device)

    # --- the step protocol PerceiverAR.forward follows -----------------------------------------
    def begin_step(self, start_pos: torch.Tensor, ws: torch.Tensor, end: torch.Tensor, batch: int) -> torch.Tensor:
        """Check the call continues the cached sequences; return the first position of the latent
        stack to compute per sequence: only the new latents, or the whole window once it slid."""
        if batch != self.batch:
            raise WorkbenchError(f"tokens have batch {batch} but the Perceiver AR cache was made for {self.batch}")
        cont = start_pos > 0
        gap = cont & (self.latent_end != start_pos - 1)
        if bool(gap.any()):
            j = int(gap.nonzero()[0, 0])
            raise WorkbenchError(f"sequence {j}: the cache holds latents up to position {int(self.latent_end[j])}, "
                                 f"so start_pos must be {int(self.latent_end[j]) + 1}, got {int(start_pos[j])}")
        new_from = torch.maximum(start_pos, ws)
        if bool((cont & (ws != self.window_start)).any()):
            self.recomputes += 1
            return ws
        return new_from

    def store_cross(self, pos: torch.Tensor, valid: torch.Tensor, residual: torch.Tensor, normed: torch.Tensor) -> None:
        """Keep repeat 0's cross-block output [b, slots, d_model] of the valid latent slots."""
        flat = (self._bidx * self.n_latents + pos.clamp(min=0) % self.n_latents)[valid]
        d = residual.shape[-1]
        self.cross_residual.view(-1, d).index_copy_(0, flat, residual[valid].to(self.cross_residual.dtype))
        self.cross_normed.view(-1, d).index_copy_(0, flat, normed[valid].to(self.cross_normed.dtype))

    def load_cross(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat 0's cross-block output (residual, normed) at positions [b, slots]."""
        ring = pos.clamp(min=0) % self.n_latents
        return self.cross_residual[self._bidx, ring], self.cross_normed[self._bidx, ring]

    def prepare_latents(self, pos: torch.Tensor, valid: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """Choose the ring slots the latent layers write (valid ``pos``) and read (the window in
        position order); returns the key positions [b, n_latents] (ws + 0..N-1)."""
        N = self.n_latents
        self._write = (self._bidx * N + pos.clamp(min=0) % N)[valid]
        self._write_sel = valid.reshape(-1)
        self.slot_pos.view(-1)[self._write] = pos[valid]
        keys = ws[:, None] + torch.arange(N, device=ws.device)
        self._read = keys % N
        return keys

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the latent keys/values [b, slots, kvh, hd] chosen by ``prepare_latents``."""
        flat = (-1, self.n_kv_heads, self.head_dim)
        self.k[layer].view(flat).index_copy_(0, self._write, k.reshape(flat)[self._write_sel].to(self.k.dtype))
        self.v[layer].view(flat).index_copy_(0, self._write, v.reshape(flat)[self._write_sel].to(self.v.dtype))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's latent keys/values [b, n_latents, kvh, hd], in position order."""
        return self.k[layer][self._bidx, self._read], self.v[layer][self._bidx, self._read]

    def end_step(self, ws: torch.Tensor, end: torch.Tensor) -> None:
        self.window_start, self.latent_end = ws.clone(), end.clone()

    # --- what the runtime and the probes use ----------------------------------------------------
    def set_lengths(self, lengths: list[int]) -> None:
        """Valid input positions per sequence after a forward pass (prefill pads short prompts)."""
        self.inputs.set_lengths(lengths)

    def release(self, seq: int) -> None:
        self.inputs.release(seq)
        self.slot_pos[seq] = -1
        self._rings_full = False
        self.window_start[seq], self.latent_end[seq] = 0, -1

    def usage(self) -> tuple[int, int, int]:
        """Input tokens and blocks, and latent ring slots held: what ``stats_of`` needs, cheap
        enough to call every step (counting held slots is one small reduction, and none once
        every ring is full)."""
        tokens, blocks = self.inputs.usage()
        ring = self.batch * self.n_latents
        if not self._rings_full:
            if self._slot_pos_np is not None:  # a numpy call costs a fraction of three torch ops
                held = int(np.count_nonzero(self._slot_pos_np >= 0))
            else:
                held = int((self.slot_pos >= 0).sum())
            self._rings_full = held == ring
            return tokens, blocks, held
        return tokens, blocks, ring

    def stats_by_part(self) -> dict[str, CacheStats]:
        """Usage per part: ``input`` (all cross-attention slots), ``latent`` (all latent layers) and
        ``cross`` (repeat 0's cached cross outputs); blocks count input blocks or ring slots."""
        return self._parts(*self.usage())

    def stats(self) -> CacheStats:
        """Totals over the whole cache: input tokens and blocks, bytes of every part (used/reserved)."""
        return self.stats_of(*self.usage())

    def stats_of(self, tokens, blocks, held) -> CacheStats:
        """``stats()`` for the numbers ``usage()`` returned (ints, or arrays of them per step)."""
        parts = self._parts(tokens, blocks, held)
        inp = parts["input"]
        return CacheStats(tokens=inp.tokens, blocks=inp.blocks,
                          bytes_used=sum(p.bytes_used for p in parts.values()),
                          bytes_reserved=sum(p.bytes_reserved for p in parts.values()))

    def _parts(self, tokens, blocks, held) -> dict[str, CacheStats]:
        inp = self.inputs.stats_of(tokens, blocks)
        n_cross = self.inputs.n_layers
        lat_bytes = 2 * self.n_latent_layers * self.n_kv_heads * self.head_dim * self.k.element_size()
        cross_bytes = 2 * self.cross_residual.shape[-1] * self.cross_residual.element_size()
        ring = self.batch * self.n_latents
        return {
            "input": CacheStats(tokens=inp.tokens, blocks=inp.blocks, bytes_used=inp.bytes_used * n_cross,
                                bytes_reserved=inp.bytes_reserved * n_cross),
            "latent": CacheStats(tokens=held, blocks=ring, bytes_used=held * lat_bytes,
                                 bytes_reserved=ring * lat_bytes),
            "cross": CacheStats(tokens=held, blocks=ring, bytes_used=held * cross_bytes,
                                bytes_reserved=ring * cross_bytes),
        }
