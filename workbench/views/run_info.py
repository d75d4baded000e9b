"""Run view: model config, tensor-parallel size, sampler and redistribution settings, prompts, the
trace's sizes and status (with the error of a failed run)."""
from __future__ import annotations

import html
import json

import panel as pn

from workbench.views.base import TraceView

STATUS_COLORS = {"running": "#1c7ed6", "complete": "#2b8a3e", "failed": "#c92a2a"}


def status_badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#868e96")
    dot = "●" if status == "running" else ""
    return (f"<span style='background:{color};color:white;border-radius:10px;padding:2px 10px;"
            f"font-size:12px;font-weight:600'>{dot} {html.escape(status or 'no trace')}</span>")


def _table(title: str, rows: dict) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in rows.items())
    return f"<div class='card'><h4>{html.escape(title)}</h4><table>{body}</table></div>"


def _value(v) -> str:
    if isinstance(v, (dict, list)) and len(json.dumps(v)) > 60:
        return f"<pre>{html.escape(json.dumps(v, indent=1))}</pre>"
    if isinstance(v, (dict, list)):
        return f"<code>{html.escape(json.dumps(v))}</code>"
    return html.escape(str(v))


CSS = """
<style>
.runinfo { display:flex; flex-wrap:wrap; gap:12px; font-size:13px; }
.runinfo .card { border:1px solid #e3e6ec; border-radius:8px; padding:8px 12px; background:#fbfbfd; min-width:280px; }
.runinfo h4 { margin:2px 0 6px 0; font-size:13px; color:#24415f; }
.runinfo th { text-align:left; color:#5c677a; font-weight:500; padding:1px 12px 1px 0; vertical-align:top; }
.runinfo td { padding:1px 0; }
.runinfo pre { margin:0; font-size:11px; max-height:160px; overflow:auto; }
</style>
"""


def run_summary(trace) -> dict[str, dict]:
    """The run's settings grouped for display (all from the trace's metadata and spec)."""
    meta = dict(trace.metadata)
    spec = trace.spec
    model = meta.get("model_config") or meta.get("model") or {}
    if not isinstance(model, dict):
        model = {"model": model}
    if "dtype" in meta:  # what ran (--dtype), beside the checkpoint's own torch_dtype
        model = {"dtype that ran": meta["dtype"], **model}
    sampler = meta.get("sampler") or {}
    arm = meta.get("arm") or meta.get("redistribution")
    parallel = {"tensor-parallel size": meta.get("tp_size", meta.get("tp", spec.world)), "algorithm": meta.get("tp_algorithm", "allreduce")}
    sizes = {"sequences": spec.n_seq, "steps recorded": f"{trace.n_steps} of {spec.max_steps}",
             "positions": spec.max_positions, "layers": spec.n_layers, "heads": spec.n_heads,
             "kv heads": spec.n_kv_heads, "attention recorded": f"layers {list(spec.attention_layers)}, "
                                                                 f"heads {list(spec.attention_heads)}",
             "top-k candidates": spec.top_k, "histogram bins": spec.n_bins}
    if spec.perceiver is not None:
        p = spec.perceiver
        sizes["perceiver"] = f"{p.n_latents} latents × {p.n_inputs} inputs, {p.n_repeats} repeats, {p.n_heads} heads"
    for u in spec.user_arrays:  # your own probes: what ran, where, and of what shape
        shape = ", ".join(f"{d} {n}" for d, n in zip(u.dims, u.shape)) or "one value"
        sizes[f"user probe {u.name}"] = f"{u.fn} on {len(u.hooks)} hook points ({shape})"
    known = {"model_config", "model", "sampler", "arm", "redistribution", "tp", "tp_size", "tp_algorithm", "prompts",
             "dtype"}
    other = {k: v for k, v in meta.items() if k not in known}
    return {"model": model, "parallelism": parallel, "sampler": sampler,
            "redistribution (ARM)": arm if isinstance(arm, dict) else {"enabled": bool(arm)},
            "trace": sizes, "other": other}


class RunInfoView(TraceView):
    """Model config, parallelism, sampler, ARM settings, prompts and status."""

    watch_params = ("trace", "status", "version")

    def build(self):
        self.html = pn.pane.HTML("", sizing_mode="stretch_width")
        return self.html

    def clear(self) -> None:
        st = self.state
        self.html.object = (f"{CSS}<div class='runinfo'>{status_badge('')} "
                            f"<span>{html.escape(st.error or 'no trace open')}</span></div>")

    def redraw(self, changed: set[str]) -> None:
        st = self.state
        tr = st.trace
        groups = run_summary(tr)
        head = (f"<div style='margin-bottom:8px'>{status_badge(str(tr.status))} "
                f"<code style='margin-left:8px'>{html.escape(str(tr.path))}</code></div>")
        if getattr(tr, "error", ""):
            head += f"<div style='color:#c92a2a;margin-bottom:8px'><b>error:</b> {html.escape(tr.error)}</div>"
        prompts = tr.metadata.get("prompts") or []
        prompt_html = ""
        if prompts:
            items = "".join(f"<li><pre style='display:inline;white-space:pre-wrap'>{html.escape(str(p))}</pre></li>"
                            for p in prompts)
            prompt_html = f"<div class='card'><h4>prompts</h4><ol style='margin:0;padding-left:18px'>{items}</ol></div>"
        cards = "".join(_table(title, rows) for title, rows in groups.items())
        self.html.object = f"{CSS}{head}<div class='runinfo'>{cards}{prompt_html}</div>"
