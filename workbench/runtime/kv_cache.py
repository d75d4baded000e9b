"""Paged KV cache: a pool of fixed-size blocks per layer, a block table per sequence.

Blocks are handed out as sequences grow, so memory reserved tracks memory used within one block
per sequence. ``stats()`` reports what the trace records per layer: tokens cached, blocks
allocated, bytes used and bytes reserved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError


class CacheFullError(WorkbenchError):
    pass


@dataclass
class CacheStats:
    tokens: int
    blocks: int
    bytes_used: int
    bytes_reserved: int


def check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise WorkbenchError(f"KV cache block size must be >= 1, got {block_size}")


class PagedKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch: int, max_len: int,
                 block_size: int = 16, num_blocks: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        check_block_size(block_size)
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.batch, self.block_size = batch, block_size
        self.blocks_per_seq = math.ceil(max_len / block_size)
        self.num_blocks = num_blocks if num_blocks is not None else batch * self.blocks_per_seq
        shape = (n_layers, self.num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = torch.device(device)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths = [0] * batch  # valid tokens per sequence
        self._table_t: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self.bytes_per_token = 2 * n_kv_heads * head_dim * self.k.element_size()  # K and V, one layer

    def prepare(self, start_pos: torch.Tensor, n_new: int) -> int:
        """Allocate blocks for positions start..start+n_new-1 of every sequence; return key count."""
        starts = start_pos.tolist()
        for j, s in enumerate(starts):
            need = math.ceil((s + n_new) / self.block_size)
            table = self.tables[j]
            while len(table) < need:
                if not self._free:
                    raise CacheFullError(f"KV cache is full: {self.num_blocks} blocks of {self.block_size} tokens")
                table.append(self._free.pop())
        width = max(len(t) for t in self.tables)
        rows = [t + [t[-1]] * (width - len(t)) for t in self.tables]
        self._table_t = torch.tensor(rows, dtype=torch.long, device=self.device)  # [b, width]
        pos = start_pos[:, None].to(self.device) + torch.arange(n_new, device=self.device)  # [b, t]
        blocks = torch.gather(self._table_t, 1, pos // self.block_size)
        self._slots = (blocks * self.block_size + pos % self.block_size).reshape(-1)
        return width * self.block_size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values [b, t, kvh, hd] at the slots chosen by ``prepare``."""
        flat = (-1, self.n_kv_heads, self.head_dim)
        self.k[layer].view(flat).index_copy_(0, self._slots, k.reshape(flat).to(self.k.dtype))
        self.v[layer].view(flat).index_copy_(0, self._slots, v.reshape(flat).to(self.v.dtype))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys/values [b, keys, kvh, hd] (keys past a sequence's length are masked by the caller)."""
        b, w = self._table_t.shape
        shape = (b, w * self.block_size, self.n_kv_heads, self.head_dim)
        return self.k[layer][self._table_t].view(shape), self.v[layer][self._table_t].view(shape)

    def set_lengths(self, lengths: list[int]) -> None:
        """Record the valid tokens per sequence after a forward pass (prefill pads short prompts)."""
        self.lengths = list(lengths)

    def release(self, seq: int) -> None:
        self._free.extend(reversed(self.tables[seq]))
        self.tables[seq] = []
        self.lengths[seq] = 0

    def usage(self) -> tuple[int, int]:
        """Tokens cached and blocks allocated per layer; cheap enough to call every step."""
        return sum(self.lengths), self.num_blocks - len(self._free)

    def stats(self) -> CacheStats:
        """Per-layer usage (every layer of a decoder holds the same positions)."""
        return self.stats_of(*self.usage())

    def stats_of(self, tokens, blocks) -> CacheStats:
        """Per-layer usage for ``tokens`` cached in ``blocks`` (ints, or arrays of them per step)."""
        return CacheStats(tokens=tokens, blocks=blocks, bytes_used=tokens * self.bytes_per_token,
                          bytes_reserved=blocks * self.block_size * self.bytes_per_token)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, block_size: int = 16,
                  num_blocks: int | None = None) -> "PagedKVCache":
        attn = model.layers[0].attn
        p = model.embed_tokens.weight
        return cls(n_layers=len(model.layers), n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim,
                   batch=batch, max_len=max_len, block_size=block_size, num_blocks=num_blocks,
                   dtype=p.dtype, device=p.device)
