"""Named hook points: identity modules that probes listen to.

Every tensor worth recording passes through a HookPoint placed where it is computed. Its name is
derived from the module tree (``layers.3.attn.pattern``) and is the name used in the trace store.
With no listener a hook point is never called: model code guards each site with
``if hp.listeners:``, so the plain path pays one list check (STYLE: no listener, no cost).
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

# A listener gets the tensor and the hook point; returning a tensor replaces it downstream.
Listener = Callable[[Any, "HookPoint"], Any]


@dataclass
class ForwardInfo:
    """What the runtime is doing in the current forward pass; probes read it via ``model.info``.

    step: generation step (0 = prefill of the prompts, n = n-th decode step).
    start_pos: [batch] position of the first new token of each sequence.
    lengths: [batch] number of valid new tokens per sequence (prefill pads shorter prompts).
    rank, world: tensor-parallel rank and size.
    t0_ns: time.perf_counter_ns() when the step started (timing probes measure from it).
    """

    step: int = 0
    t0_ns: int = 0
    start_pos: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    rank: int = 0
    world: int = 1
    extra: dict = field(default_factory=dict)


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.layer: int | None = None
        self.listeners: list[Listener] = []

    def forward(self, x: Any) -> Any:
        for fn in self.listeners:
            out = fn(x, self)
            if out is not None:
                x = out
        return x

    # Called directly, not through nn.Module.__call__: its hook machinery costs a few microseconds
    # per call, dozens of calls per decode step, and listeners are this module's hooks.
    __call__ = forward

    def extra_repr(self) -> str:
        return f"name={self.name!r}, listeners={len(self.listeners)}"


def hook_name(module_path: str) -> str:
    """``layers.3.mlp.hook_act_pre`` -> ``layers.3.mlp.act.pre``: the attribute says what is hooked."""
    head, _, last = module_path.rpartition(".")
    last = last.removeprefix("hook_").replace("_", ".")
    return f"{head}.{last}" if head else last


class HookedModule(nn.Module):
    """Base for models with hook points: naming, lookup by glob, and scoped listeners."""

    info: ForwardInfo

    def setup_hook_points(self) -> None:
        """Name every HookPoint after its place in the module tree; call at the end of __init__."""
        self.info = ForwardInfo()
        self._hook_points: dict[str, HookPoint] = {}
        for path, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                name = hook_name(path)
                mod.name = name
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
                    mod.layer = int(parts[1])
                self._hook_points[name] = mod
        # Fast attribute access: nn.Module resolves children through a Python-level __getattr__
        # (~1 us each here, dozens per layer per step); a copy of the reference in the owner's
        # __dict__ is found by plain lookup (~50 ns), so ``if self.hook_x.listeners:`` is nearly
        # free. _modules still holds the child, and nn.Module.__setattr__ drops the copy whenever
        # a child is replaced, so the two cannot disagree. (Parameters are not copied: loading
        # with assign=True replaces them.)
        for owner in self.modules():
            for attr, child in owner._modules.items():
                if child is not None:
                    owner.__dict__[attr] = child

    @property
    def hook_points(self) -> dict[str, HookPoint]:
        return self._hook_points

    def match_hook_points(self, pattern: str | list[str]) -> list[HookPoint]:
        """Hook points whose names match a glob (``layers.*.attn.pattern``) or list of globs."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        found = [hp for name, hp in self._hook_points.items()
                 if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if not found:
            raise KeyError(f"no hook point matches {patterns}; known: {sorted(self._hook_points)[:8]}...")
        return found

    def add_listener(self, pattern: str | list[str], fn: Listener) -> list[HookPoint]:
        hps = self.match_hook_points(pattern)
        for hp in hps:
            hp.listeners.append(fn)
        return hps

    def remove_listener(self, fn: Listener) -> None:
        for hp in self._hook_points.values():
            hp.listeners[:] = [f for f in hp.listeners if f is not fn]

    @contextlib.contextmanager
    def listening(self, pattern: str | list[str], fn: Listener) -> Iterator[list[HookPoint]]:
        """Listen while the block runs; the listener is removed on exit, even on error."""
        hps = self.add_listener(pattern, fn)
        try:
            yield hps
        finally:
            for hp in hps:
                hp.listeners[:] = [f for f in hp.listeners if f is not fn]

    def clear_listeners(self) -> None:
        for hp in self._hook_points.values():
            hp.listeners.clear()
