"""What to record: which probes, layers, heads and steps (CLI ``--probes`` and Python)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from workbench.errors import WorkbenchError

PROBES = ("attention", "kv", "activations", "comm", "timing", "sampler")
PRESETS = {
    "all": PROBES,
    "light": ("kv", "activations", "comm", "timing", "sampler"),  # no attention maps
    "none": (),
}


def parse_int_set(text: str | None, what: str) -> tuple[int, ...] | None:
    """``"0-3,7"`` -> (0, 1, 2, 3, 7); None or "all" -> None (everything)."""
    if text is None or text.strip().lower() == "all":
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError
                out.update(range(int(lo), int(hi) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise WorkbenchError(f"bad {what} {text!r}: expected numbers and ranges like 0-3,7") from None
    if any(i < 0 for i in out) or not out:
        raise WorkbenchError(f"bad {what} {text!r}: expected numbers >= 0")
    return tuple(sorted(out))


@dataclass
class ProbeSelection:
    """Probes to run and where. None for layers/heads/steps means all of them.

    attention_steps limits attention maps (the bulk of a trace) to those steps; every other probe
    records every step.
    """

    probes: tuple[str, ...] = PROBES
    attention_layers: tuple[int, ...] | None = None
    attention_heads: tuple[int, ...] | None = None
    attention_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.probes = tuple(self.probes)
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown:
            raise WorkbenchError(f"unknown probe {unknown[0]!r} (known: {', '.join(PROBES)}; presets: "
                                 f"{', '.join(PRESETS)})")

    @classmethod
    def parse(cls, probes: str | None = None, layers: str | None = None, heads: str | None = None,
              steps: str | None = None) -> "ProbeSelection":
        """From CLI text: ``--probes light`` or ``--probes attention,kv`` plus layer/head/step ranges."""
        names: list[str] = []
        for item in (probes or "all").split(","):
            item = item.strip()
            names.extend(PRESETS.get(item, (item,)) if item else ())
        return cls(probes=tuple(dict.fromkeys(names)), attention_layers=parse_int_set(layers, "layers"),
                   attention_heads=parse_int_set(heads, "heads"), attention_steps=parse_int_set(steps, "steps"))

    def check_model(self, n_layers: int, n_heads: int) -> None:
        for what, values, n in (("layer", self.attention_layers, n_layers), ("head", self.attention_heads, n_heads)):
            if values is not None and max(values) >= n:
                raise WorkbenchError(f"attention {what} {max(values)} does not exist (the model has {n})")

    def __contains__(self, probe: str) -> bool:
        return probe in self.probes

    def to_dict(self) -> dict:
        return asdict(self)
