"""Recording Perceiver AR runs: the decoder Recorder, with the Perceiver's blocks as its layers.

The trace-wide ``layer`` dim (kv_cache, activations, comm, timing) holds one entry per block in
forward order: for each repeat r its cross block, then its latent blocks,

    layer r*(1+L)     repeats.{r}.cross        (cross, cross_allreduce, cross_mlp, cross_mlp_allreduce)
    layer r*(1+L)+1+i repeats.{r}.layers.{i}   (attn, attn_allreduce, mlp, mlp_allreduce)

so every decoder site (``mlp.act.pre``, ``attn_allreduce`` ...) has one hook point per layer; the
names are stored in ``spec.perceiver.layer_blocks``. Attention maps go to the ``cross_attention``
(latent x input) and ``latent_attention`` (latent x latent_key) groups, one row per latent the step
computed, at latent slot ``position - window_start``. KV totals are over the whole cache
(``PerceiverARCache.stats_of``): they go to layer 0 and the other layers stay unwritten (-1).
Activations: the prefill's every latent row, then each decode step's row of the position it added
(``_recorded_rows``; a window that slid recomputes all its rows, which are not recorded). Decode
steps are batched as the decoder's are, except that a step's maps are written when it ends: its
batch ends it with the rest.
"""
from __future__ import annotations

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.probes.recorder import KV_FIELDS, Recorder
from workbench.probes.selection import ProbeSelection
from workbench.trace.schema import PerceiverSpec, TraceSpec

# First part of a decoder hook suffix -> the cross block's module of the same role.
CROSS_PARTS = {"attn": "cross", "mlp": "cross_mlp", "attn_allreduce": "cross_allreduce",
               "mlp_allreduce": "cross_mlp_allreduce"}


def perceiver_blocks(cfg) -> list[str]:
    """Module names of the blocks in forward order: the trace's ``layer`` dim."""
    out = []
    for r in range(cfg.n_repeats):
        out.append(f"repeats.{r}.cross")
        out.extend(f"repeats.{r}.layers.{i}" for i in range(cfg.n_self_layers))
    return out


def block_part(block: str, part: str) -> str:
    """Module name of decoder part ``part`` (``attn``, ``mlp``, ``attn_allreduce`` ...) in ``block``."""
    if block.endswith(".cross"):
        return f"{block.removesuffix('cross')}{CROSS_PARTS[part]}"
    return f"{block}.{part}"


def block_hook(block: str, suffix: str) -> str:
    """Hook name of decoder site ``suffix`` (``attn.pattern``, ``mlp_allreduce.timing``) in ``block``."""
    part, _, rest = suffix.partition(".")
    return f"{block_part(block, part)}.{rest}"


class PerceiverRecorder(Recorder):
    """Records one Perceiver AR generation on one rank (same arguments as ``Recorder``)."""

    def __init__(self, model, writer, selection, token_text, prompts, user_probes=()) -> None:
        super().__init__(model, writer, selection, token_text, prompts, user_probes)
        cfg = model.cfg
        self.n_self = cfg.n_self_layers
        self.blocks = perceiver_blocks(cfg)
        self._mlps = [model.get_submodule(block_part(b, "mlp")) for b in self.blocks]
        self._arms = [(i, mlp.redistribute) for i, mlp in enumerate(self._mlps)
                      if getattr(mlp, "redistribute", None) is not None]
        self._hook_layer: dict[str, int] = {}
        self._windows: list = []  # rank 0: (window start, last latent, finished) of each batched step

    # ------------------------------------------------------------ what this model records
    @classmethod
    def check_selection(cls, model, selection: ProbeSelection) -> None:
        if model.cfg.model_type != "perceiver_ar":
            raise WorkbenchError("only Perceiver AR models generate text; a Perceiver classifier cannot be recorded")
        if selection.attention_layers is not None or selection.attention_heads is not None:
            raise WorkbenchError("layer/head selection is not supported for Perceiver AR traces "
                                 "(cross and latent maps record every repeat, layer and head)")

    @classmethod
    def trace_spec(cls, model, selection: ProbeSelection, n_seq: int, prompt_positions: int,
                   max_new_tokens: int, world: int = 1, top_k: int = 5) -> TraceSpec:
        cfg = model.cfg
        blocks = perceiver_blocks(cfg)
        positions = prompt_positions + max_new_tokens
        return TraceSpec(n_seq=n_seq, max_steps=max_new_tokens, max_positions=positions, n_layers=len(blocks),
                         n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, world=world, top_k=top_k,
                         vocab_size=cfg.vocab_size,
                         attention_layers=(),  # no decoder self-attention: maps live in the perceiver groups
                         perceiver=PerceiverSpec(n_latents=cfg.n_latents, n_inputs=positions,
                                                 n_repeats=cfg.n_repeats, n_heads=cfg.n_heads,
                                                 n_self_layers=cfg.n_self_layers, layer_blocks=tuple(blocks)))

    def _layer_hooks(self, suffix: str) -> list[str]:
        names = [block_hook(b, suffix) for b in self.blocks]
        self._hook_layer.update((n, k) for k, n in enumerate(names))
        return names

    def _layer_of(self, hp) -> int:
        return self._hook_layer[hp.name]

    def _attention_hooks(self) -> list[str]:
        return self._layer_hooks("attn.pattern")

    def _timed_blocks(self) -> list:
        # A cross block is stamped by its Repeat (Repeat.cross_block), a latent block by itself.
        return [self.model.get_submodule(b.removesuffix(".cross")) for b in self.blocks]

    def _tapped_blocks(self) -> list:
        return self._timed_blocks()  # a Repeat taps its cross block, as it stamps it

    def _where(self, layer: int) -> tuple[int, int | None]:
        """(repeat, latent block i or None for the cross block) of a trace layer."""
        r, k = divmod(layer, 1 + self.n_self)
        return r, (None if k == 0 else k - 1)

    def _rows(self, layer: int) -> torch.Tensor:
        """Absolute positions of the query rows this step computed in ``layer``  # [b, Q], -1 padding."""
        info = self.model.info.extra["perceiver"]
        return info["cross0_latents"] if layer == 0 else info["latents"]

    # ------------------------------------------------------------ per step
    def on_step(self, event) -> None:
        if self.rank == 0 and (event.step == 0 or not self.batches_decode):
            info = self.model.info.extra["perceiver"]
            self._write_positions(event.step, [(info["window_start"], info["last_latent"], self.finished)])
        super().on_step(event)

    def _step_rows(self, event) -> int:
        # The latent blocks' rows: one per sequence while its window grows, all N once it slid.
        return self.model.info.extra["perceiver"]["latents"].numel()

    def _keep_decode_step(self, event) -> None:
        # Maps are written as their step ends (the windows move); the rest of the step waits for
        # its batch, which ends it.
        if self._patterns:
            self._write_attention(event.step, None, None, [not f for f in self.finished])
            self._patterns.clear()
        super()._keep_decode_step(event)  # may queue the steps before this one first
        if self.rank == 0:  # the window of this step, written with its batch
            info = self.model.info.extra["perceiver"]
            self._windows.append((info["window_start"].clone(), info["last_latent"].clone(),
                                  self._pending[-1].finished))

    def _drain(self) -> None:
        if self._windows:
            self._write_positions(self._pending[0].step, self._windows)
            self._windows = []
        super()._drain()

    def _write_positions(self, first: int, windows) -> None:
        """Which absolute position each latent and input slot holds (-1: none) at steps first,
        first + 1, ...: ``windows`` holds each step's window start and last latent [b] and which
        sequences had finished before it."""
        spec = self.spec.perceiver
        ws = torch.stack([w[0] for w in windows], 1).cpu()[..., None]  # [b, steps, 1]
        end = torch.stack([w[1] for w in windows], 1).cpu()[..., None]
        gone = torch.tensor([w[2] for w in windows]).T[..., None]
        lat = ws + torch.arange(spec.n_latents)
        lat = lat.masked_fill((lat > end) | gone, -1).numpy()
        inp = torch.arange(spec.n_inputs).expand(*ws.shape[:2], -1)
        inp = inp.masked_fill((inp > end) | gone, -1).numpy()
        w, k = self.writer, len(windows)
        w.write(first, "cross_attention/latent_position", lat, n_steps=k)
        w.write(first, "cross_attention/input_position", inp, n_steps=k)
        if spec.n_self_layers:
            w.write(first, "latent_attention/latent_position", lat, n_steps=k)

    def _write_kv_totals(self, first: int, kv) -> None:
        """Totals over every part of the cache (``PerceiverARCache.stats_of``) go to layer 0."""
        for name in KV_FIELDS:
            data = getattr(kv, name)
            self.writer.write(first, f"kv_cache/{name}", data, n_steps=len(data), layer=0)

    def _keep_activations(self, step: int) -> bool:
        # Once a window slides, its latent blocks recompute every row: keep each sequence's row of
        # the position the step added, as a growing window's step computes (see _recorded_rows).
        acts = self._acts.items() if self._taps is None else zip(self._tap_keys, self._taps)
        new_rows: dict[int, torch.Tensor] = {}  # layer -> each sequence's row index, for its four sites
        for i, (key, x) in enumerate(acts):
            if x.shape[-2] == 1:
                continue
            if key[0] not in new_rows:  # finished sequences: any row
                new_rows[key[0]] = self._recorded_rows(key[0], step).int().argmax(dim=1).to(x.device)
            row = new_rows[key[0]]
            x = x[torch.arange(len(row), device=x.device), row][:, None]  # [b, 1, width]
            if self._taps is None:
                self._acts[key] = x
            else:
                self._taps[i] = x
        return super()._keep_activations(step)

    def _recorded_rows(self, layer: int, step: int) -> torch.Tensor:
        """Which rows of ``layer``'s activations [b, Q] a step records: at the prefill every latent
        it computed, at a decode step the latent of the position it added. A window that slid
        makes the latent blocks recompute all N rows; recording them would reduce N times the
        values (more work than the step) and count each position again at every step."""
        rows = self._rows(layer)
        if step == 0:
            return rows >= 0
        return rows == self.model.info.extra["perceiver"]["last_latent"][:, None]

    def _column_blocks(self, keys, first: int, last: int, arm_eps: dict[int, dict]):
        layers, site_ids, eps = super()._column_blocks(keys, first, last, arm_eps)
        # MLP sites without ARM count near-zero values below the trace's fixed threshold, not by
        # ARM's MAD rule (the decoder's).
        return layers, site_ids, np.where(np.isnan(eps), float(self.spec.near_zero_eps), eps)

    def _write_attention(self, step: int, q_start, q_stop, active) -> None:
        """This step's cross and latent maps and the attention mass each position received: per
        sequence, one write per cross block, one for a repeat's latent blocks (they share rows and
        keys) and one for the mass of every block (each write is a record the worker handles).
        Index arithmetic runs on numpy copies of the few small position tensors: a torch op on
        them costs microseconds, and there were dozens a step."""
        info = self.model.info.extra["perceiver"]
        ws = info["window_start"].cpu().numpy()
        end = info["last_latent"].cpu().numpy()
        keys = info["latent_keys"].cpu().numpy()  # [b, N] position in each key slot, -1: none
        dtype = torch.float16 if self.spec.attention_dtype == "float16" else torch.float32
        w = self.writer
        patterns = [(layer, p.detach()) for layer, p in sorted(self._patterns.items())]  # [b, heads, Q, keys]
        rows: dict[int, np.ndarray] = {}  # [b, Q] per block
        converted: dict[int, np.ndarray] = {}  # the blocks share two row tensors: convert each once
        for layer, _ in patterns:
            t = self._rows(layer)
            if id(t) not in converted:
                converted[id(t)] = t.cpu().numpy()
            rows[layer] = converted[id(t)]
        for j in range(len(active)):
            if not active[j]:
                continue
            n_pos = int(end[j]) + 1
            slots = np.flatnonzero(keys[j] >= 0)  # the window's first key slots
            key_slots, key_pos = _index(slots), keys[j, slots]
            masses = np.full((self.n_layers, n_pos), np.nan, dtype=np.float32)  # NaN (the fill): no rows
            latent: dict[int, list] = {}  # repeat -> (self layer, layer, map) of its latent blocks
            for layer, pattern in patterns:
                r, i = self._where(layer)
                q = np.flatnonzero(rows[layer][j] >= 0)  # valid slots: consecutive positions first..end
                if not len(q):
                    continue
                start = int(rows[layer][j, q[0]] - ws[j])
                if i is None:  # cross: key column c is input position c; inputs 0..end exist
                    m = pattern[j][:, _index(q), :n_pos]
                    w.write_cross_attention(step, m.to(dtype).cpu().numpy()[None], repeat=r, latent_start=start,
                                            seq=slice(j, j + 1))
                    # Attention received per position 0..end: sum over this rank's heads and the rows.
                    masses[layer] = m.float().sum(dim=(0, 1)).cpu().numpy()
                else:  # latent: key slot k holds position keys[j, k]
                    latent.setdefault(r, []).append((i, layer, pattern[j][:, _index(q)][:, :, key_slots], start))
            for r, maps in latent.items():
                key_start = int(key_pos[0] - ws[j])
                mass = self._write_latent_maps(step, j, r, maps, key_start, dtype)  # [blocks, keys]
                layers = [layer for _, layer, _, _ in maps]
                masses[layers] = 0.0
                masses[np.ix_(layers, key_pos)] = mass
            w.write_attention_mass(step, masses[None], seq=slice(j, j + 1))  # every block, one write

    def _write_latent_maps(self, step: int, j: int, r: int, maps: list, key_start: int, dtype) -> np.ndarray:
        """Sequence ``j``'s maps of repeat ``r``'s latent blocks in one write, ``maps`` = [(self
        layer, trace layer, map [heads, rows, keys], latent start)] in block order. Every block
        computes the same rows over the same keys, and every block is recorded (check_selection
        refuses layer selection). Returns the attention each key received in each block, summed
        over heads and rows  # [blocks, keys]."""
        first, last, start = maps[0][0], maps[-1][0], maps[0][3]
        assert last - first + 1 == len(maps), "latent blocks of a repeat are recorded together"
        block = torch.stack([m for _, _, m, _ in maps])  # [blocks, heads, rows, keys]
        weights = block.to(dtype).cpu().numpy()
        self.writer.write(step, "latent_attention/weights", weights[None], seq=slice(j, j + 1), repeat=r,
                          self_layer=slice(first, last + 1), latent=slice(start, start + weights.shape[-2]),
                          latent_key=slice(key_start, key_start + weights.shape[-1]))
        return block.float().sum(dim=(1, 2)).cpu().numpy()

    def _write_activations(self, step: int, q_start, q_stop, active) -> None:
        keys = sorted(self._acts)
        keep = torch.tensor(active)
        masks: dict[int, torch.Tensor | None] = {}  # per layer: its rows; None: every row
        tensors = []
        for key in keys:
            layer, x = key[0], self._acts[key]  # x: [b, Q, width]
            if layer not in masks:
                rows = self._recorded_rows(layer, step) & keep.to(x.device)[:, None]
                masks[layer] = None if bool(rows.all()) else rows
            rows = masks[layer]
            tensors.append(x.reshape(-1, x.shape[-1]) if rows is None else x[rows])
        if not tensors or all(t.numel() == 0 for t in tensors):
            return
        # The writer's worker reduces them when every block has the same rows; else they are
        # reduced here, with the same thresholds.
        if not self._ship_step_values(step, keys, tensors):
            eps = self._column_blocks(keys, step, step, {step: self._arm_eps()} if self._arms else {})[2][0]
            self._write_stats(step, keys, tensors, eps.tolist())


def _index(positions: np.ndarray) -> slice | torch.Tensor:
    """Ascending indices as a slice when consecutive (indexing a tensor with it makes a view, with
    no copy), else as a tensor."""
    if not len(positions):
        return slice(0, 0)
    if positions[-1] - positions[0] + 1 == len(positions):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return torch.from_numpy(positions)
