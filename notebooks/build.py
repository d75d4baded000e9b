"""Write the example notebooks (without outputs) from the cell sources below, or strip outputs.

    .venv/bin/python notebooks/build.py           # (re)write notebooks/*.ipynb from this file
    .venv/bin/python notebooks/build.py --strip   # strip outputs of notebooks/*.ipynb in place

The notebooks are committed without outputs: this file is their source, so a change to a notebook
is a reviewable diff of Python text. If you edit a notebook in Jupyter instead, strip it before
committing (``--strip``) and carry the change back here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Every notebook starts here: the trained default model (or WORKBENCH_MODEL), traces in a temp dir.
SETUP = '''\
import os
import tempfile
from pathlib import Path

from workbench.runtime.session import DEFAULT_MODEL

MODEL = os.environ.get("WORKBENCH_MODEL", str(DEFAULT_MODEL))   # the trained byte-level Llama
RUNS = Path(tempfile.mkdtemp(prefix="workbench-nb-"))           # traces go here, never into the repo
print("model:", MODEL)'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


NOTEBOOKS: dict[str, list] = {}

NOTEBOOKS["01-quickstart"] = [
    md('''
# Quickstart: record a generation, explore attention and the KV cache

The workbench runs a transformer one decode step at a time and records what happens inside each
step into a trace store (a Zarr directory): attention maps, KV-cache growth, activation histograms,
timings. Here we let the default byte-level Llama write some Python, watch the trace grow while it
runs, then look at its attention heads and its KV cache.
'''),
    code(SETUP),
    md('''
## Generate with recording

`generate_live` starts the generation in a background thread and returns at once. The cell shows a
progress bar and the trace as it grows (the same views as the dashboard, refreshed from the store
every few hundred milliseconds while the kernel is idle).
'''),
    code('''
from workbench.notebook import TraceWidget, generate_live, show_dashboard

live = generate_live(model=MODEL, prompts=["def fibonacci(n):\\n"], max_new_tokens=32,
                     record=str(RUNS / "quickstart.zarr"))
'''),
    md('''
`wait()` blocks until the run ends and returns the `GenerationResult`; `trace` opens the store.
'''),
    code('''
result = live.wait()
print(repr(result.texts[0]))
print(f"{result.decode_tokens_per_second:.0f} tokens/s while recording every probe")
trace = live.trace
trace
'''),
    md('''
## Attention

A trace widget: ipywidgets controls (step, layer, head; **play** replays the steps in the browser)
over the dashboard's own views. The controls and `widget.state` are linked both ways: setting the
state from code moves the controls, and moving a control redraws the views.
'''),
    code('''
widget = TraceWidget(trace, views=["tokens", "attention"])
widget.state.layer, widget.state.head = 1, 0
widget
'''),
    md('''
Numbers behind the picture: how much each head attends to the previous byte (mean weight on the
key just before the query). A byte-level model needs such heads to read words byte by byte; in
the trained default model they sit in the upper layers.
'''),
    code('''
import numpy as np

from workbench.analysis import best_head, head_scores_from_trace

prev = head_scores_from_trace(trace, "previous_token")          # [layer, head]
print(np.array2string(prev, precision=2))
best = best_head(prev)
print("strongest previous-token head:", best)
'''),
    code('''
# Open the strongest one in the widget above (the controls follow).
widget.state.layer, widget.state.head = best["layer"], best["head"]
'''),
    md('''
The same scores for every head at once, as the dashboard's Heads tab shows them (choose another
score: induction, first-token sink, self, entropy). It shares the widget's state, so a click on a
cell opens that head in the widget above:
'''),
    code('''
heads = TraceWidget(trace, views=["heads"], state=widget.state)
shown = np.reshape(heads.views["heads"].source.data["value"], prev.shape)
# the same numbers as head_scores_from_trace (the trace has fewer than the 256 query rows the tab scores)
assert np.allclose(shown, prev, atol=1e-6)
heads
'''),
    md('''
## The KV cache

Each decode step appends one key/value per layer to a paged cache (blocks of 16 tokens), so the
bytes in use grow by one token per step and the reserved bytes grow a block at a time.
'''),
    code('''
kv = trace.kv_cache.sel(layer=0, rank=0)
table = kv[["tokens", "blocks", "bytes_used", "bytes_reserved"]].to_dataframe()
print(table[["tokens", "blocks", "bytes_used", "bytes_reserved"]].iloc[[0, 1, 2, -1]].to_string())
assert int(kv["tokens"][-1]) == len(trace.token_ids(0)) - 1   # every position but the newest is cached
'''),
    code('''
TraceWidget(trace, views=["kv_cache"])
'''),
    md('''
## Your own probe

A `UserProbe` is a function on hook points (names or globs such as `layers.*.attn.pattern`;
`model.hook_points` lists them all) whose values are recorded into the trace beside the built-in
probes, per step, hook point and rank, in group `user`. Here: the entropy of each head's newest
attention row, a number per head per step that the built-in probes do not keep.
'''),
    code('''
import torch

from workbench import UserProbe


def attention_entropy(p, hp):
    """Entropy of each head's newest attention row (nats), sequence 0"""
    row = p[0, :, -1].double()                               # [heads, keys]
    return -(row * torch.log(row.clamp_min(1e-30))).sum(-1)


probe = UserProbe("attn_entropy", "layers.*.attn.pattern", attention_entropy,
                  dims=("head",), shape=(trace.spec.n_heads,), dtype="float64")
probed = generate_live(model=MODEL, prompts=["def fibonacci(n):\\n"], max_new_tokens=32,
                       record=str(RUNS / "probe.zarr"), user_probes=[probe], views=["tokens", "user"])
'''),
    code('''
probed.wait()
ent = probed.trace.user["attn_entropy"].isel(rank=0)           # (step, attn_entropy_hook, head)
print(ent.mean("head").to_pandas().round(3).iloc[[0, 1, 2, -1]])

# The same entropies from the attention maps the trace recorded anyway (float16: loose tolerance).
t, stops = probed.trace, probed.trace.tokens["query_stop"].values[0]
for step in (0, 5, 31):
    q = int(stops[step]) - 1                                 # the step's newest query row
    maps = t.attention["weights"].values[0, :, :, q, : q + 1].astype(np.float64)  # [layer, head, keys]
    recomputed = -(maps * np.log(np.clip(maps, 1e-30, None))).sum(-1)
    assert np.allclose(recomputed, ent.values[step], atol=2e-2), (step, recomputed, ent.values[step])
print("the probe's entropies match the recorded maps")
'''),
    md('''
## The whole dashboard in a cell

`show_dashboard` is the served dashboard (sidebar, every view, the live clock) inline.
'''),
    code('''
dashboard = show_dashboard(trace.path)
'''),
]

NOTEBOOKS["02-tensor-parallel"] = [
    md('''
# Tensor parallelism: all-reduce time per layer and rank

With `tp=2` the runtime starts two processes (gloo on CPU, NCCL on GPUs); rank r owns half of the
heads and MLP columns, and each layer ends its attention and its MLP with an **All-Reduce RMSNorm**:
all-reduce the partial sums, add the residual, normalise. There are two algorithms for it:
`allreduce` (one all-reduce, every rank normalises everything) and `reduce_scatter` (reduce-scatter,
add and normalise the rank's token shard, all-gather). They must give the same tokens.
'''),
    code(SETUP),
    code('''
from workbench.runtime.session import RunSpec, run
from workbench.trace.reader import open_trace

common = dict(model=MODEL, prompts=["import os\\n\\n\\ndef walk(root):\\n"], max_new_tokens=24, tp=2,
              probes=["comm", "timing", "kv", "sampler"])
results, traces = {}, {}
for algorithm in ("allreduce", "reduce_scatter"):
    path = RUNS / f"tp2-{algorithm}.zarr"
    results[algorithm] = run(RunSpec(**common, tp_algorithm=algorithm, record=str(path)))
    traces[algorithm] = open_trace(path)
    print(f"{algorithm:15s} {results[algorithm].decode_tokens_per_second:6.1f} tokens/s  "
          f"{results[algorithm].texts[0]!r}")

assert results["allreduce"].generated == results["reduce_scatter"].generated, "the algorithms disagree"
'''),
    md('''
## All-reduce time per layer and rank

The `comm` group holds, per (step, layer, site, rank), when each collective started within the step
and how long it took. Step 0 is the prefill (the whole prompt at once); the decode steps after it
move one token each. Median over the decode steps, in microseconds:
'''),
    code('''
comm = traces["allreduce"].comm
decode = comm["seconds"].isel(step=slice(1, None))
per_layer = (decode.median("step") * 1e6).round(1)
print(per_layer.to_series().unstack("rank").to_string())
'''),
    md('''
Both ranks wait for each other, so their all-reduce times differ mostly by who arrived first: the
rank that finished its part early waits inside the collective. The communication view shows the
same data over time; pick a layer with the control.
'''),
    code('''
from workbench.notebook import TraceWidget

TraceWidget(traces["allreduce"], views=["comm"])
'''),
    md('''
## The two algorithms

Same tokens, different collectives. `reduce_scatter` pads the token rows to a multiple of the ranks,
reduce-scatters them, adds and normalises only its own rows, then all-gathers
`[residual | normed]`: two collectives instead of one, to save norm work on 1/N of the tokens. The
time per layer in the prefill (the whole prompt) and in a decode step (one token), the share of a
decode step spent in collectives (medians, rank 0), and the bytes the collectives of one layer
carry at a decode step:
'''),
    code('''
for algorithm, tr in traces.items():
    c = tr.comm.isel(rank=0)
    per_layer = c["seconds"].sum("site")                            # (step, layer)
    prefill_us = float(per_layer.isel(step=0).median("layer")) * 1e6
    decode_us = float(per_layer.isel(step=slice(1, None)).median()) * 1e6
    step_s = tr.timing["step_seconds"].isel(step=slice(1, None), rank=0)
    share = float((c["seconds"].isel(step=slice(1, None)).sum(["layer", "site"]) / step_s).median("step"))
    moved = int(c["bytes"].isel(step=1).sum("site").max())
    print(f"{algorithm:15s} per layer: prefill {prefill_us:7.0f} us, decode {decode_us:6.0f} us; "
          f"collectives {share:5.1%} of a decode step; {moved} bytes per layer at a decode step")
'''),
    md('''
At batch 1 a decode step has a single token row, so `reduce_scatter` pays for two collectives and a
padded row to save the norm of half a row: it loses here. Its case is many tokens (long prefills,
big batches) on a fast interconnect (docs/tensor-parallel.md). On a 2-core CPU box the gloo
collectives are a large share of a decode step of this small model, and the figures vary between
runs as the two processes compete for the cores.
'''),
]

NOTEBOOKS["03-redistribution"] = [
    md('''
# Activation redistribution: meaningless tokens and ARM

Shi et al. (*Meaningless Tokens, Meaningful Gains*, arXiv 2510.01032) observe that inserting
meaningless tokens such as 55 `/` into a prompt shifts the first layer's MLP activations away from
zero, and that ARM, a module that does this shift directly, has the same effect without the tokens
(docs/arm.md). Three runs of the same prompt, recording activation histograms:

1. the plain prompt;
2. the prompt with 55 `/` inserted before it;
3. the plain prompt with ARM on at layer 0.
'''),
    code(SETUP),
    code('''
from workbench.runtime.session import RunSpec, run

prompt = "def mean(values):\\n"
runs = {
    "plain": dict(prompts=[prompt]),
    "slashes": dict(prompts=["/" * 55 + "\\n" + prompt]),
    "arm": dict(prompts=[prompt], arm={"layers": [0]}),
}
paths = {}
for name, settings in runs.items():
    paths[name] = RUNS / f"{name}.zarr"
    res = run(RunSpec(model=MODEL, max_new_tokens=16, probes=["activations", "sampler"],
                      record=str(paths[name]), **settings))
    print(f"{name:8s} {res.texts[0]!r}")
'''),
    md('''
## Before and after

`compare_traces` merges each run's histograms and moments over ranks and steps; the near-zero
fraction is the share of MLP activations with |a| below ARM's threshold. At layer 0 both the slashes
and ARM should push values away from zero compared to the plain prompt:
'''),
    code('''
from workbench.compare import compare_traces, format_comparison

with_slashes = compare_traces(paths["plain"], paths["slashes"], labels=("plain", "slashes"))
with_arm = compare_traces(paths["plain"], paths["arm"], labels=("plain", "arm"))
stats = ("near_zero_fraction", "zero_bin_fraction", "std")
print(format_comparison(with_slashes.sel(layer=[0]), stats))
print()
print(format_comparison(with_arm.sel(layer=[0]), stats))
'''),
    code('''
site = "mlp.act.post"
at = dict(layer=0, site=site)
for stat in ("zero_bin_fraction", "std"):
    before, after = (float(with_arm[stat].sel(run=r, **at)) for r in ("plain", "arm"))
    print(f"layer 0 {site} {stat}: {before:.4f} -> {after:.4f} with ARM")
# The histogram bin holding zero loses mass, and the spread grows: values moved out to the tails.
assert float(with_arm["delta_zero_bin_fraction"].sel(**at)) < 0 and float(with_arm["delta_std"].sel(**at)) > 0
'''),
    md('''
The histograms: layer 0's MLP activations before redistribution (`mlp.act.pre`) and after it
(`mlp.act.post`), in the dashboard's activations view. Without ARM the two coincide; with ARM a
fifth or so of the near-zero mass moves out to the tails.
'''),
    code('''
from workbench.notebook import TraceWidget

plain_widget = TraceWidget(paths["plain"], views=["activations"])
plain_widget
'''),
    code('''
arm_widget = TraceWidget(paths["arm"], views=["activations"])
arm_widget
'''),
    md('''
The two runs side by side in the dashboard's Compare view: both runs' histograms of the selected layer
overlaid, a statistic across layers, and a table of the differences (b - a) per layer:
'''),
    code('''
compare_widget = TraceWidget(paths["plain"], views=["compare"], compare_with=[paths["arm"], paths["slashes"]])
compare_widget
'''),
    md('''
And the three runs overlaid (share of layer 0's `mlp.act.post` values per bin, around zero):
'''),
    code('''
from bokeh.io import output_notebook, show
from bokeh.plotting import figure

output_notebook(hide_banner=True)
fig = figure(width=640, height=280, title=f"layer 0 {site}: share of values per bin",
             x_axis_label="activation", y_axis_label="share")
for (name, ds), color in zip((("plain", with_arm.sel(run="plain")), ("slashes", with_slashes.sel(run="slashes")),
                              ("arm", with_arm.sel(run="arm"))), ("#4c72b0", "#dd8452", "#55a868")):
    h = ds["hist_fraction"].sel(layer=0, site=site)
    centre = ((ds["bin_lower"] + ds["bin_upper"]) / 2).values
    keep = (abs(centre) < 3)
    fig.line(centre[keep], h.values[keep], legend_label=name, color=color, line_width=2)
show(fig)
'''),
]

NOTEBOOKS["04-perceiver-ar"] = [
    md('''
# Perceiver AR: cross-attention over the byte array

Perceiver AR (Hawthorne et al., arXiv 2202.07765) keeps only the last N positions as latents; each
latent cross-attends (causally) to every earlier byte of the input array, then a small latent
transformer runs over the window (docs/perceiver.md). The trace's `cross_attention` group holds
those maps: (seq, step, repeat, head, latent, input).
'''),
    code(SETUP),
    code('''
from workbench.runtime.session import PROJECT_ROOT

PERCEIVER = Path(os.environ.get("WORKBENCH_PERCEIVER_MODEL", PROJECT_ROOT / "data" / "models" / "perceiver-ar-bytes"))
if not (PERCEIVER / "config.json").exists():
    # The trained Perceiver AR is not shipped yet: a small random one shows the mechanics
    # (maps of a random model have no linguistic structure).
    import torch

    from workbench.models.perceiver import PerceiverAR, PerceiverConfig
    from workbench.runtime.perceiver_checkpoint import save_perceiver

    torch.manual_seed(0)
    PERCEIVER = RUNS / "random-perceiver-ar"
    save_perceiver(PerceiverAR(PerceiverConfig(d_model=64, n_latents=16, n_heads=4, n_self_layers=1,
                                               d_ff=128, max_seq_len=256)), PERCEIVER)
    print("no trained Perceiver AR found: using a random one at", PERCEIVER)
print("model:", PERCEIVER)
'''),
    code('''
from workbench.notebook import TraceWidget, generate_live

live = generate_live(model=str(PERCEIVER), prompts=["import sys\\n\\n\\ndef main(argv):\\n"],
                     max_new_tokens=32, record=str(RUNS / "perceiver.zarr"))
result = live.wait()
trace = live.trace
print(repr(result.texts[0]))
trace.cross_attention
'''),
    md('''
## The window after the last step

`cross_attention_map` assembles the window as it stands after a step: each latent's row comes from
the step that last computed it (a decode step computes only the newest latent; older rows are
cached). Rows are latents (the last N positions), columns are input bytes; the newest latent sees
every input before it.
'''),
    code('''
import numpy as np

m = trace.cross_attention_map(seq=0, repeat=0, head=0)
positions = m["latent_position"].values   # -1: a latent slot the window has not reached yet
held = positions[positions >= 0]
print("latents hold positions", held.min(), "to", held.max(), "of", trace.n_positions)
newest = m.isel(latent=int(np.argmax(positions))).values
top = np.argsort(np.nan_to_num(newest, nan=-1))[::-1][:5]
text = trace.tokens["text"].isel(seq=0).values
print("the newest latent attends most to inputs", [(int(i), str(text[i])) for i in top])
assert np.isclose(np.nansum(newest), 1.0, atol=1e-3)   # one softmax row over the inputs it sees
'''),
    md('''
The dashboard's Perceiver AR view draws the same maps: cross-attention of the selected head and
the latent self-attention of the window; the step control walks through the generation, and the
window slides along the input as it grows.
'''),
    code('''
TraceWidget(trace, views=["tokens", "perceiver"])
'''),
]

NOTEBOOKS["05-plain-xarray"] = [
    md('''
# A trace with plain xarray

A trace store is plain Zarr v3: every group opens with
`xarray.open_zarr(path, group=..., consolidated=False)`, with named dimensions, and nothing from
workbench is needed to read it (docs/trace-format.md). This notebook records a run with the command
line, then answers a question with xarray and NumPy only: **which heads attend most to the first
token?** (Heads that park their attention on position 0, "attention sinks".)
'''),
    code('''
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists())
model = os.environ.get("WORKBENCH_MODEL", str(root / "data" / "models" / "llama-bytes"))
path = Path(tempfile.mkdtemp(prefix="workbench-nb-")) / "plain.zarr"
done = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", model,
                       "--prompt", "class Stack:\\n    def __init__(self):\\n", "--max-new-tokens", "40",
                       "--probes", "attention,sampler", "--record", str(path)], capture_output=True, text=True)
assert done.returncode == 0, done.stderr
print("recorded", path)
'''),
    md('''
## Read it back

The root group holds the commit marker: a step's data is written before the marker moves, so a
reader uses only steps below it (here the run is finished, but the same code reads a live run).
'''),
    code('''
top = xr.open_zarr(path, consolidated=False)
committed = int(top["committed"].min())           # minimum over ranks
tokens = xr.open_zarr(path, group="tokens", consolidated=False)
attention = xr.open_zarr(path, group="attention", consolidated=False)
n = int(tokens["query_stop"][0, committed - 1])   # positions processed by the committed steps
print(committed, "steps,", n, "positions")
print("".join(tokens["text"][0, :n].values))
attention
'''),
    md('''
## Which heads attend most to the first token?

`weights` is (seq, layer, head, query, key); row q holds query position q's softmax over keys
0..q (later keys are NaN). Average the weight on key 0 over the queries after the first (query 0
can only attend to itself):
'''),
    code('''
w = attention["weights"].isel(seq=0, query=slice(1, n), key=slice(0, n)).astype("float32")  # stored as float16: sum in float32
to_first = w.isel(key=0).mean("query").compute()       # (layer, head)
print(to_first.round(2).to_pandas().to_string())
ranking = to_first.to_series().sort_values(ascending=False)
print()
print("heads that attend most to the first token:")
print(ranking.head(5).round(3).to_string())
'''),
    md('''
A check on the data: every recorded row is one softmax, so each sums to 1 over the keys it sees.
'''),
    code('''
row_sums = w.sum("key", skipna=True).compute()
assert np.allclose(row_sums, 1.0, atol=1e-3), float(abs(row_sums - 1).max())
print("every row sums to 1: max deviation", float(abs(row_sums - 1).max()))
'''),
]


def build() -> list[Path]:
    written = []
    for name, cells in NOTEBOOKS.items():
        for i, cell in enumerate(cells):
            cell.id = f"cell-{i:02d}"   # stable ids: rebuilding gives the same file
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3 (workbench)", "language": "python"},
            "language_info": {"name": "python"},
        })
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        written.append(path)
    return written


def strip(paths: list[Path]) -> None:
    """Remove outputs, execution counts and widget state (what a run adds) in place."""
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)


if __name__ == "__main__":
    if "--strip" in sys.argv[1:]:
        strip(sorted(HERE.glob("*.ipynb")))
    else:
        for p in build():
            print("wrote", p.relative_to(HERE.parent))
