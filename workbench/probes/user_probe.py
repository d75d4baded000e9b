"""Your own probes: a function on hook points whose values are recorded into the trace.

A ``UserProbe`` names hook points (a glob or a list of globs) and a function
``fn(tensor, hook_point)`` that reduces what flows there to values of a fixed shape. While a run
is recorded, every rank calls it at each matching hook point and step, and the values land in the
trace's group ``user``, array ``name``, with dims ``(step, {name}_hook, rank, *dims)``. The
shape is declared up front because every array of a trace is created at full size before the
first step. A probe only records: what ``fn`` returns never replaces the tensor (to change the
model's computation use ``RunSpec.hooks``). A probe on ``*.attn.pattern`` makes attention
materialise its softmax weights for it (the fused kernel is skipped while it listens). A tensor
``fn`` returns is copied where it is and reaches the host with its batch of decode steps (one
transfer, not one per call); keep it small, as every step's value is kept until then.

Example::

    def last_rms(x, hp):                # x: [batch, tokens, d_model]
        return x[:, -1].pow(2).mean(-1).sqrt()

    probe = UserProbe("resid_rms", "layers.*.mlp_allreduce.residual", last_rms, dims=("seq",))
    run(RunSpec(record="runs/r.zarr", user_probes=[probe]))
    open_trace("runs/r.zarr").user["resid_rms"]   # (step, resid_rms_hook, rank, seq)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.trace.schema import UserArraySpec, user_group_problem

DTYPES = ("float32", "float64", "int64")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class UserProbe:
    """A probe of your own (see the module docstring).

    name: the trace array's name (a Python identifier).
    hooks: hook point name or glob (``layers.*.mlp.act.pre``), or a list of them.
    fn: ``fn(tensor, hook_point) -> values`` (a tensor, array or number) of ``shape``.
    dims: names of the value dims; ``"seq"`` is the batch (its size is the number of prompts).
    shape: sizes of the other dims, in order (None: only for ``"seq"``, which is sized for you).
    dtype: float32, float64 or int64. Cells of steps and hook points that recorded nothing hold
        NaN (-1 for int64).
    description: what the values are (default: the first line of ``fn``'s docstring).
    """

    name: str
    hooks: str | Sequence[str]
    fn: Callable[[Any, Any], Any]
    dims: Sequence[str] = ()
    shape: Sequence[int | None] | None = None
    dtype: str = "float32"
    description: str = ""

    def check(self) -> None:
        """One-line errors for a declaration that cannot be recorded (before any store is made)."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise WorkbenchError(f"user probe name {self.name!r} is not a Python identifier")
        if not callable(self.fn):
            raise WorkbenchError(f"user probe {self.name!r}: fn is not callable")
        if self.dtype not in DTYPES:
            raise WorkbenchError(f"user probe {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        dims = tuple(self.dims)
        if any(not isinstance(d, str) or not _NAME.match(d) for d in dims) or len(set(dims)) != len(dims):
            raise WorkbenchError(f"user probe {self.name!r}: dims {dims} must be distinct identifiers")
        shape = self._shape()
        if len(shape) != len(dims):
            raise WorkbenchError(f"user probe {self.name!r}: shape {tuple(shape)} has {len(shape)} sizes "
                                 f"for {len(dims)} dims {dims}")
        for d, n in zip(dims, shape):
            if n is None and d != "seq":
                raise WorkbenchError(f"user probe {self.name!r}: dim {d!r} needs a size (only 'seq' is sized for you)")
            if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
                raise WorkbenchError(f"user probe {self.name!r}: size {n!r} of dim {d!r} must be an int >= 1")

    def _shape(self) -> tuple[int | None, ...]:
        if self.shape is None:  # undeclared: only "seq" dims can be sized
            return tuple(None for _ in self.dims)
        return tuple(self.shape)

    def array_spec(self, hook_names: Sequence[str], n_seq: int) -> UserArraySpec:
        """The trace array of this probe on a model whose matching hook points are ``hook_names``."""
        shape = tuple(n_seq if n is None else int(n) for n in self._shape())
        doc = (getattr(self.fn, "__doc__", None) or "").strip().splitlines()
        return UserArraySpec(name=self.name, hooks=tuple(hook_names), dims=tuple(self.dims), shape=shape,
                             dtype=self.dtype, description=self.description or (doc[0] if doc else ""),
                             fn=qualified_name(self.fn))


def user_array_specs(probes: Sequence[UserProbe], model, n_seq: int) -> tuple[UserArraySpec, ...]:
    """Check ``probes`` against ``model`` (globs that match nothing) and each other (names, dims)."""
    specs: list[UserArraySpec] = []
    for probe in probes:
        if not isinstance(probe, UserProbe):
            raise WorkbenchError(f"user_probes takes UserProbe objects, got {type(probe).__name__}")
        probe.check()
        try:
            hook_points = model.match_hook_points(list(probe.hooks) if not isinstance(probe.hooks, str)
                                                  else probe.hooks)
        except KeyError:
            raise WorkbenchError(f"user probe {probe.name!r}: no hook point matches {probe.hooks!r} "
                                 f"(see model.hook_points)") from None
        specs.append(probe.array_spec([hp.name for hp in hook_points], n_seq))
    problem = user_group_problem(specs, n_seq)
    if problem:
        raise WorkbenchError(problem)
    return tuple(specs)


def load_user_probes(ref: str) -> list[UserProbe]:
    """``module:name`` or ``path/to/file.py:name`` -> the UserProbe (or list of them) it names.

    The module is imported as ``python -m`` would from the current directory; a file's directory
    goes on ``sys.path`` (so tensor-parallel ranks can import the probe functions too).
    """
    import importlib
    import sys
    from pathlib import Path
    module, sep, attr = ref.rpartition(":")
    if not sep or not module or not attr:
        raise WorkbenchError(f"--user-probe {ref!r}: expected MODULE:NAME or FILE.py:NAME")
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise WorkbenchError(f"--user-probe {ref!r}: no file {module}")
        sys.path.insert(0, str(path.parent))
        module = path.stem
    elif "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module, named in one line
        raise WorkbenchError(f"--user-probe {ref!r}: cannot import {module}: {type(e).__name__}: {e}") from None
    if not hasattr(mod, attr):
        raise WorkbenchError(f"--user-probe {ref!r}: module {module} has no {attr!r}")
    value = getattr(mod, attr)
    probes = list(value) if isinstance(value, (list, tuple)) else [value]
    if not probes or not all(isinstance(p, UserProbe) for p in probes):
        raise WorkbenchError(f"--user-probe {ref!r}: {attr} is not a UserProbe or a list of them")
    return probes


def qualified_name(fn: Callable) -> str:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(fn)


class UserValues:
    """One probe's values of the current step on this rank, filled by its listeners.

    A tensor that ``fn`` returns stays on its device (a detached copy) until the recorder queues
    the step's batch, then the batch moves to the host at once: copying each value as it comes
    would make every listener call wait for the device.
    """

    def __init__(self, spec: UserArraySpec, fn: Callable) -> None:
        self.spec, self.fn = spec, fn
        self.fill = -1 if spec.dtype == "int64" else np.nan
        self.values: list | None = None  # per hook point, what fn returned this step (None: not fired)

    def listener(self, hook: int) -> Callable:
        """The listener of the probe's ``hook``-th hook point (it never replaces the tensor)."""
        def keep(x, hp):
            try:
                out = self.fn(x, hp)
            except Exception as e:  # the user's code: name it in one line, keep the cause chained
                first = str(e).splitlines()[0] if str(e) else ""
                raise WorkbenchError(f"user probe {self.spec.name!r} at {hp.name} raised {type(e).__name__}: "
                                     f"{first}") from e
            if isinstance(out, torch.Tensor):
                dtype, shape = _numpy_kind(out.dtype), tuple(out.shape)
                out = out.detach().clone()  # not a view that would keep the activation alive
            else:
                out = np.asarray(out)
                dtype, shape = out.dtype, out.shape
            if not np.can_cast(dtype, self.spec.dtype, casting="same_kind"):
                raise WorkbenchError(f"user probe {self.spec.name!r} at {hp.name}: fn returned {dtype} "
                                     f"values, declared {self.spec.dtype}")
            if shape != self.spec.shape:
                raise WorkbenchError(f"user probe {self.spec.name!r} at {hp.name}: fn returned shape "
                                     f"{shape}, declared {self.spec.shape}")
            if self.values is None:
                self.values = [None] * len(self.spec.hooks)
            self.values[hook] = out
        return keep

    def take(self) -> list | None:
        """This step's values per hook point (None: no hook point fired); the next step starts empty."""
        values, self.values = self.values, None
        return values

    def to_array(self, steps: Sequence[list | None]) -> np.ndarray:
        """[steps, hooks, *shape] from what ``take`` returned at each step, on the host, with the
        fill value where a hook point did not fire: one device-to-host copy for all tensors."""
        out = np.full((len(steps), len(self.spec.hooks), *self.spec.shape), self.fill, dtype=self.spec.dtype)
        where, tensors = [], []
        for i, values in enumerate(steps):
            for h, v in enumerate(values or ()):
                if isinstance(v, torch.Tensor):
                    where.append((i, h))
                    tensors.append(v.to(getattr(torch, self.spec.dtype)))  # DTYPES are torch's names too
                elif v is not None:
                    out[i, h] = v
        if tensors:
            for (i, h), v in zip(where, torch.stack(tensors).cpu().numpy()):
                out[i, h] = v
        return out


def _numpy_kind(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype, for the cast check (bfloat16 and other types numpy lacks:
    float64, the same kind)."""
    try:
        return np.dtype(str(dtype).removeprefix("torch."))
    except TypeError:
        return np.dtype(np.float64 if dtype.is_floating_point else np.int64)
